#!/usr/bin/env node
// js-readonly: a read-only SCSI disk that serves a file, for trioscsi, written from docs/emulator-protocol.md.
//
// The protocol: length-prefixed CBOR maps on stdin (from the core) and stdout (to the core), logs on stderr.
// Reads go to the file asynchronously, so commands finish out of order, `ping` is answered while reads are
// in flight, and `abort` really stops a command: its read result is dropped and it is answered
// {tag, status: 0, aborted: true}.
//
// hello.params: path (required; relative to the working directory, which the core sets to its state dir),
//               block_size (512 or 4096, default 512), max_inflight (default 32).
// SCSI: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard, VPD 0x00 0x80 0x83 0xB0), READ CAPACITY(10/16),
// READ(10/16), MODE SENSE(6) (WP set), SYNCHRONIZE CACHE(10/16); WRITE(10/16) get DATA PROTECT, WRITE PROTECTED;
// anything else ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.  REPORT LUNS etc. are the core's.
'use strict';

const fs = require('fs');
const { Encoder } = require('cbor-x');

const MAX_FRAME = 16 * 1024 * 1024 + 4096;
const MAX_IO = 8 * 1024 * 1024;
// Maps as plain objects, no cbor-x extensions ("records"), byte strings as plain major type 2, and integers
// above 2^53 as BigInt so that 64-bit tags survive.  cbor-x writes JS numbers >= 2^32 as floats: tags are
// therefore echoed exactly as they were decoded (a BigInt when the core sent a 64-bit integer).
const cbor = new Encoder({ useRecords: false, mapsAsObjects: true, tagUint8Array: false, int64AsType: 'bigint' });

const GOOD = 0x00, CHECK_CONDITION = 0x02;
const ILLEGAL_REQUEST = 0x5, DATA_PROTECT = 0x7;
const INVALID_OPCODE = 0x2000, LBA_OUT_OF_RANGE = 0x2100, INVALID_FIELD_IN_CDB = 0x2400,
  WRITE_PROTECTED = 0x2700, SAVING_PARAMS_UNSUPPORTED = 0x3900;

const log = (...args) => process.stderr.write(`js-readonly: ${args.join(' ')}\n`);

const disk = {
  file: null, blockSize: 512, blocks: 0n, maxInflight: 32,
  vendor: 'TRIOSCSI', product: 'js-readonly', revision: '0001', serial: 'js-readonly', naa: null,
};
const inflight = new Map();   // String(tag) -> { aborted: bool }
let helloDone = false;
let inputEnded = false;

// ---- frames -------------------------------------------------------------------------------------------------

function send(message) {
  const body = cbor.encode(message);
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);          // the encoder reuses its buffer: copy before the next encode
  process.stdout.write(frame);  // Node flushes as soon as the pipe takes it; order is kept
}

function protocolError(message) {
  log('protocol error:', message);
  send({ op: 'error', message });
}

// Stop reading and exit with `code` once stdout has drained (process.exit() could cut the last frame).
function quit(code) {
  process.exitCode = code;
  process.stdin.removeAllListeners('data');
  process.stdin.destroy();
}

// Collects stdin chunks and cuts frames without re-copying the buffer for each chunk.
const input = { chunks: [], length: 0 };

function take(n) {
  const out = input.chunks.length === 1 ? input.chunks[0] : Buffer.concat(input.chunks, input.length);
  input.chunks = out.length > n ? [out.subarray(n)] : [];
  input.length = out.length - n;
  return out.subarray(0, n);
}

function peekLength() {
  if (input.chunks[0].length < 4) input.chunks = [Buffer.concat(input.chunks, input.length)];
  return input.chunks[0].readUInt32BE(0);
}

process.stdin.on('data', (chunk) => {
  input.chunks.push(chunk);
  input.length += chunk.length;
  while (input.length >= 4) {
    const length = peekLength();
    if (length > MAX_FRAME) {
      protocolError(`frame of ${length} bytes is longer than max_frame`);
      quit(1);
      return;
    }
    if (input.length < 4 + length) return;
    const frame = take(4 + length).subarray(4);
    let message;
    try {
      message = cbor.decode(frame);
    } catch (err) {
      protocolError(`undecodable frame: ${err.message}`);
      continue;
    }
    if (message === null || typeof message !== 'object' || typeof message.op !== 'string') {
      protocolError('a frame is not a map with a text op');
      continue;
    }
    handle(message);
  }
});

process.stdin.on('end', () => {
  inputEnded = true;
  if (input.length) log('stdin ended inside a frame');
  maybeExit();
});

process.stdout.on('error', (err) => {   // the core went away: nobody is left to answer
  log('stdout:', err.message);
  process.exit(0);
});

function maybeExit() {
  if (!inputEnded || inflight.size) return;
  log('end of input: exiting');
  if (disk.file) disk.file.close();
  quit(0);
}

// ---- messages -----------------------------------------------------------------------------------------------

function handle(message) {
  if (!helloDone) {
    if (message.op !== 'hello') {
      protocolError('the first frame must be hello');
      return quit(1);
    }
    helloDone = true;
    return hello(message);
  }
  switch (message.op) {
    case 'cmd': return command(message);
    case 'ping': return send({ op: 'pong', tag: message.tag });
    case 'abort': {
      const state = inflight.get(String(message.tag));
      if (state) state.aborted = true;  // an unknown tag is ignored
      return undefined;
    }
    case 'error': return log('the core reports a protocol error:', message.message);
    default: return log('ignoring a frame with unknown op', message.op);
  }
}

function hello(message) {
  const versions = Array.isArray(message.versions) ? message.versions.map(Number) : [];
  if (!versions.includes(1)) {
    protocolError('no common protocol version (this emulator speaks [1])');
    return quit(2);
  }
  const params = message.params || {};
  const identity = message.identity || {};
  const fail = (text) => {
    protocolError(text);
    quit(1);
  };
  if (typeof params.path !== 'string' || !params.path) return fail('params.path (the file to serve) is required');
  disk.blockSize = Number(params.block_size ?? 512);
  if (disk.blockSize !== 512 && disk.blockSize !== 4096) return fail('params.block_size must be 512 or 4096');
  disk.maxInflight = Number(params.max_inflight ?? 32);
  let size;
  try {
    disk.file = new File(fs.openSync(params.path, 'r'));
    size = fs.fstatSync(disk.file.fd).size;
  } catch (err) {
    return fail(`cannot open ${params.path}: ${err.message}`);
  }
  disk.blocks = BigInt(Math.floor(size / disk.blockSize));
  if (disk.blocks === 0n) return fail(`${params.path} is smaller than one block`);
  for (const key of ['vendor', 'product', 'revision', 'serial']) {
    if (typeof identity[key] === 'string') disk[key] = identity[key];
  }
  if (identity.naa instanceof Uint8Array) disk.naa = Buffer.from(identity.naa);
  send({
    op: 'ready', version: 1, device_type: 0, identity,
    capacity: { block_size: disk.blockSize, blocks: disk.blocks <= BigInt(2 ** 32 - 1) ? Number(disk.blocks) : disk.blocks },
    features: ['read_only'], max_inflight: disk.maxInflight,
  });
  log(`ready: serving ${params.path}, ${disk.blocks} blocks of ${disk.blockSize} bytes`);
}

// An open file whose reads are promises (fs.read with a callback: many reads run at once in libuv's pool).
class File {
  constructor(fd) { this.fd = fd; }
  read(buffer, position) {
    return new Promise((resolve, reject) => {
      fs.read(this.fd, buffer, 0, buffer.length, position, (err, n) => (err ? reject(err) : resolve(n)));
    });
  }
  close() { fs.closeSync(this.fd); }
}

function command(message) {
  const { tag, cdb } = message;
  const uint = typeof tag === 'bigint' ? tag >= 0n : Number.isSafeInteger(tag) && tag >= 0;
  if (!uint || !(cdb instanceof Uint8Array)) return protocolError('cmd needs an unsigned tag and a byte-string cdb');
  const key = String(tag);
  const state = { aborted: false };
  inflight.set(key, state);
  execute(Buffer.from(cdb.buffer, cdb.byteOffset, cdb.length))
    .catch((err) => {
      log('command failed:', err.stack || err);
      return checkCondition(0x4, 0x4400);     // HARDWARE ERROR, INTERNAL TARGET FAILURE
    })
    .then((result) => {
      inflight.delete(key);
      if (state.aborted) send({ op: 'done', tag, status: GOOD, aborted: true });
      else send({ op: 'done', tag, ...result });
      maybeExit();
    });
}

// ---- SCSI ---------------------------------------------------------------------------------------------------

function checkCondition(key, asc) {
  const sense = Buffer.alloc(18);
  sense[0] = 0x70;              // fixed format, current error (our control mode page has D_SENSE = 0)
  sense[2] = key;
  sense[7] = 10;
  sense[12] = asc >> 8;
  sense[13] = asc & 0xff;
  return { status: CHECK_CONDITION, sense };
}

const good = (data, alloc) => ({ status: GOOD, data: alloc === undefined ? data : data.subarray(0, alloc) });
const ascii = (text, width) => Buffer.from(text.padEnd(width, ' ').slice(0, width), 'ascii');
const CDB_LENGTH = [6, 10, 10, 0, 16, 12, 0, 0];   // by group code (opcode >> 5); 0: not checked here

async function execute(cdb) {
  if (cdb.length < 6 || cdb.length < CDB_LENGTH[cdb[0] >> 5]) return checkCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
  switch (cdb[0]) {
    case 0x00: return { status: GOOD };                       // TEST UNIT READY
    case 0x03: {                                              // REQUEST SENSE: nothing pending
      const sense = Buffer.alloc(18);
      sense[0] = 0x70;
      sense[7] = 10;
      return good(sense, cdb[4]);
    }
    case 0x12: return inquiry(cdb);
    case 0x1a: return modeSense6(cdb);
    case 0x25: return readCapacity10();
    case 0x9e:
      if ((cdb[1] & 0x1f) === 0x10) return readCapacity16(cdb);
      return checkCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
    case 0x28: return read(cdb, BigInt(cdb.readUInt32BE(2)), cdb.readUInt16BE(7));
    case 0x88: return read(cdb, cdb.readBigUInt64BE(2), cdb.readUInt32BE(10));
    case 0x2a: case 0x8a: return checkCondition(DATA_PROTECT, WRITE_PROTECTED);
    case 0x35: case 0x91: return { status: GOOD };            // SYNCHRONIZE CACHE: nothing is cached
    default: return checkCondition(ILLEGAL_REQUEST, INVALID_OPCODE);
  }
}

function inquiry(cdb) {
  const evpd = cdb[1] & 0x01, page = cdb[2], alloc = cdb.readUInt16BE(3);
  if ((cdb[1] & 0x02) || (!evpd && page)) return checkCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
  if (!evpd) {
    const std = Buffer.alloc(36);
    std[2] = 0x06;              // SPC-4
    std[3] = 0x12;              // HISUP, response data format 2
    std[4] = 36 - 5;
    std[7] = 0x02;              // CMDQUE
    ascii(disk.vendor, 8).copy(std, 8);
    ascii(disk.product, 16).copy(std, 16);
    ascii(disk.revision, 4).copy(std, 32);
    return good(std, alloc);
  }
  let body;
  switch (page) {
    case 0x00: body = Buffer.from([0x00, 0x80, 0x83, 0xb0]); break;
    case 0x80: body = Buffer.from(disk.serial, 'ascii'); break;
    case 0x83: {
      const designators = [];
      if (disk.naa) designators.push(Buffer.from([0x01, 0x03, 0x00, disk.naa.length]), disk.naa);   // NAA, binary
      const t10 = Buffer.concat([ascii(disk.vendor, 8), Buffer.from(disk.serial.slice(0, 64), 'ascii')]);
      designators.push(Buffer.from([0x02, 0x01, 0x00, t10.length]), t10);                               // T10 vendor ID
      body = Buffer.concat(designators);
      break;
    }
    case 0xb0: {                // block limits: the largest READ we take in one command
      body = Buffer.alloc(0x3c);
      body.writeUInt32BE(MAX_IO / disk.blockSize, 4);
      body.writeUInt32BE((1 << 20) / disk.blockSize, 8);
      break;
    }
    default: return checkCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
  }
  const head = Buffer.from([0x00, page, body.length >> 8, body.length & 0xff]);
  return good(Buffer.concat([head, body]), alloc);
}

function readCapacity10() {
  const data = Buffer.alloc(8);
  const last = disk.blocks - 1n;
  data.writeUInt32BE(last > 0xffffffffn ? 0xffffffff : Number(last), 0);
  data.writeUInt32BE(disk.blockSize, 4);
  return good(data);
}

function readCapacity16(cdb) {
  const data = Buffer.alloc(32);
  data.writeBigUInt64BE(disk.blocks - 1n, 0);
  data.writeUInt32BE(disk.blockSize, 8);
  return good(data, cdb.readUInt32BE(10));
}

function modeSense6(cdb) {
  const page = cdb[2] & 0x3f, control = cdb[2] >> 6, dbd = cdb[1] & 0x08;
  if (control === 3) return checkCondition(ILLEGAL_REQUEST, SAVING_PARAMS_UNSUPPORTED);
  if (![0x08, 0x0a, 0x3f].includes(page) || (cdb[3] && !(page === 0x3f && cdb[3] === 0xff))) {
    return checkCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
  }
  const parts = [Buffer.from([0, 0, 0x80, dbd ? 0 : 8])];   // header: WP (write protected)
  if (!dbd) {
    const desc = Buffer.alloc(8);
    desc.writeUInt32BE(disk.blocks > 0xffffffffn ? 0xffffffff : Number(disk.blocks), 0);
    desc.writeUIntBE(disk.blockSize, 5, 3);
    parts.push(desc);
  }
  if (page === 0x08 || page === 0x3f) parts.push(Buffer.from([0x08, 0x12, ...new Array(0x12).fill(0)]));  // caching
  if (page === 0x0a || page === 0x3f) parts.push(Buffer.from([0x0a, 0x0a, ...new Array(0x0a).fill(0)]));  // control
  const data = Buffer.concat(parts);
  data[0] = data.length - 1;
  return good(data, cdb[4]);
}

async function read(cdb, lba, count) {
  if (cdb[1] >> 5) return checkCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);  // no protection information
  if (lba > disk.blocks || BigInt(count) > disk.blocks - lba) return checkCondition(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE);
  const bytes = count * disk.blockSize;
  if (bytes > MAX_IO) return checkCondition(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB);
  if (bytes === 0) return { status: GOOD };
  const data = Buffer.alloc(bytes);   // zeroed: a file that shrank under us reads as zeros past its end
  let done = 0;
  const position = Number(lba) * disk.blockSize;
  while (done < bytes) {
    const n = await disk.file.read(data.subarray(done), position + done);
    if (n === 0) break;
    done += n;
  }
  return good(data);
}
