"""The virtual tape cartridge: one file holding records, filemarks, setmarks and MAM (docs/tape.md, "Cartridge").

Layout::

    0      header slot A (4 KiB)   magic "TRIOTAPE", version, sequence, length, CRC32, then a CBOR map
    4096   header slot B (4 KiB)   the same; the valid slot with the higher sequence number is current
    8192   the log                 records appended one after the other, each a 32-byte head + payload

A record head is ``"TREC", kind, flags, 0, length u32, epoch u32, object u64, payload CRC32, head CRC32``
(big-endian). Kinds: data block, filemark, setmark (logical objects, numbered from 0) and index. After every 512
logical objects an *index record* follows: base object, filemarks and setmarks before it, the offset of the
previous index record, and the 512 objects' ``kind << 62 | offset``. The header names the last index record, so a
cartridge opens by walking that chain (one small read per 512 objects) and scanning at most 511 heads after it.

Strategy (crash safety): the header is the commit point. Records go to the log beyond the committed end of data
(free space); ``flush`` makes them durable (fdatasync) and only then writes the header into the *older* slot and
syncs again, so a torn header write leaves the previous one in force. Writing anywhere but at end of data first
commits the shorter tape under a new *epoch*, then overwrites. On open, records after the committed end that carry
the current epoch, the expected object number and good CRCs are rolled forward: what a killed process had written
is kept, while stale records of an earlier epoch are never resurrected. Nothing before the committed end is ever
rewritten, so a crash at any point cannot damage data that an earlier flush made durable.

Invariants: ``blocks[i]`` is the index record of objects [512 i, 512 i + 512); ``tail`` holds the entries of the
objects after the last index record; ``cum[kind][i]`` counts marks of that kind before block i (one more entry
than ``blocks``: the count before the tail). ``pos_off`` is the offset of object ``pos`` (``end`` at EOD).
"""
from __future__ import annotations

import fcntl
import os
import struct
import time
import zlib
from array import array
from bisect import bisect_right
from typing import Any, Iterable

import cbor2

DATA, FILEMARK, SETMARK, INDEX = 0, 1, 2, 3
MARKS = (FILEMARK, SETMARK)
FORMAT = 1
DENSITY = 0x80                       # vendor-unique density code "TRIOV1"
SLOT_SIZE, LOG_START = 4096, 8192
PER_INDEX = 512
OFF_MASK = (1 << 62) - 1
_SLOT = struct.Struct(">8sIQII")     # magic, version, sequence, body length, body CRC32
_HEAD = struct.Struct(">4sBBHIIQI")  # magic, kind, flags, 0, length, epoch, object, payload CRC32 (+ head CRC32)
_IDX = struct.Struct(">QQQQ")        # base object, filemarks before, setmarks before, previous index record
HEAD_SIZE = _HEAD.size + 4
INDEX_SIZE = HEAD_SIZE + _IDX.size + 8 * PER_INDEX
_MAGIC, _REC = b"TRIOTAPE", b"TREC"
_BIG = array("Q", [1]).tobytes()[0] == 0


class CartridgeError(Exception):
    """The image cannot be used: not a cartridge, corrupt, or in use by another drive."""


def _head(kind: int, length: int, epoch: int, obj: int, crc: int) -> bytes:
    h = _HEAD.pack(_REC, kind, 0, 0, length, epoch & 0xFFFFFFFF, obj, crc)
    return h + struct.pack(">I", zlib.crc32(h))


def _parse_head(raw: bytes) -> tuple[int, int, int, int, int] | None:
    """(kind, length, epoch, object, payload crc) of a valid record head, else None."""
    if len(raw) < HEAD_SIZE:
        return None
    magic, kind, _, _, length, epoch, obj, crc = _HEAD.unpack_from(raw)
    if magic != _REC or struct.unpack_from(">I", raw, _HEAD.size)[0] != zlib.crc32(raw[:_HEAD.size]):
        return None
    return kind, length, epoch, obj, crc


def _entries(raw: bytes) -> array[int]:
    a = array("Q")
    a.frombytes(raw)
    if not _BIG:
        a.byteswap()
    return a


def _pwrite_all(fd: int, bufs: list[Any], offset: int) -> None:
    if len(bufs) > 512:
        bufs = [b"".join(bufs)]
    total = sum(len(b) for b in bufs)
    done = os.pwritev(fd, bufs, offset)
    if done < total:
        rest = memoryview(b"".join(bytes(b) for b in bufs))[done:]
        while rest:
            n = os.pwrite(fd, rest, offset + done)
            done, rest = done + n, rest[n:]


def create_cartridge(path: str, barcode: str, capacity: int, *, early_warning: int | None = None,
                     write_protect: bool = False, density: int = DENSITY, serial: str | None = None) -> str:
    """Create an empty cartridge image (it must not exist yet); the CLI's ``trioscsi tape create``.

    Args:
        barcode: the volume tag (up to 32 ASCII characters), also MAM attribute BARCODE.
        capacity: the nominal capacity in bytes: the log (heads included) may not grow past it.
        early_warning: bytes before the end at which writes start reporting EOM (default 1/20, 64 KiB to 1 GiB).
        write_protect: the cartridge's write-protect tab.
    """
    if not barcode or len(barcode) > 32 or not barcode.isascii():
        raise ValueError("barcode must be 1 to 32 ASCII characters")
    if capacity < 64 * 1024:
        raise ValueError("capacity must be at least 64 KiB")
    ew = early_warning if early_warning is not None else min(max(capacity // 20, 64 * 1024), 1 << 30)
    if not 0 <= ew < capacity:
        raise ValueError("early_warning must be less than the capacity")
    state = {"format": FORMAT, "barcode": barcode, "capacity": capacity, "early_warning": ew,
             "write_protect": bool(write_protect), "density": density, "serial": serial or barcode,
             "created": time.strftime("%Y%m%d"), "epoch": 0, "eod": 0, "end": LOG_START, "files": 0,
             "setmarks": 0, "index": 0, "loads": 0, "written": 0, "read": 0, "attributes": {}}
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.pwrite(fd, _slot(state, 1), 0)
        os.ftruncate(fd, LOG_START)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _slot(state: dict[str, Any], seq: int) -> bytes:
    body = cbor2.dumps(state)
    if _SLOT.size + len(body) > SLOT_SIZE:
        raise CartridgeError("header does not fit its slot")
    return (_SLOT.pack(_MAGIC, FORMAT, seq, len(body), zlib.crc32(body)) + body).ljust(SLOT_SIZE, b"\0")


class Cartridge:
    """An open cartridge image: the logical position, reads, appends, and the committed header.

    Args:
        path: the image file (see ``create_cartridge``).
        read_only: open without writing (also forced when the file is not writable); the tape is then write
            protected and the MAM is not updated.
    Raises:
        CartridgeError: not a cartridge, corrupt, or locked by another drive.
    """

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        try:
            self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except PermissionError:
            self.read_only = True
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CartridgeError(f"cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._load()
        except BaseException as exc:
            os.close(self.fd)
            if isinstance(exc, BlockingIOError):
                raise CartridgeError(f"{path} is in use by another drive") from None
            raise

    # -- opening --------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        best = None
        for slot in (0, 1):
            raw = os.pread(self.fd, SLOT_SIZE, slot * SLOT_SIZE)
            if len(raw) < _SLOT.size:
                continue
            magic, version, seq, length, crc = _SLOT.unpack_from(raw)
            body = raw[_SLOT.size:_SLOT.size + length]
            if magic == _MAGIC and len(body) == length and zlib.crc32(body) == crc and (not best or seq > best[0]):
                if version != FORMAT:
                    raise CartridgeError(f"{self.path}: cartridge format {version} is not supported")
                best = (seq, body)
        if best is None:
            raise CartridgeError(f"{self.path} is not a cartridge image (no valid header)")
        self.seq = best[0]
        self.meta: dict[str, Any] = cbor2.loads(best[1])
        m = self.meta
        self.epoch, self.eod, self.end = m["epoch"], m["eod"], m["end"]
        self.count = {FILEMARK: m["files"], SETMARK: m["setmarks"]}
        self.blocks: list[int] = []
        self.cum: dict[int, list[int]] = {FILEMARK: [], SETMARK: []}
        off = m["index"]
        chain = []
        while off:
            raw = os.pread(self.fd, HEAD_SIZE + _IDX.size, off)
            head = _parse_head(raw)
            if head is None or head[0] != INDEX:
                raise CartridgeError(f"{self.path}: broken index chain at offset {off}")
            chain.append((off, *_IDX.unpack_from(raw, HEAD_SIZE)))
            off = chain[-1][4]
        for i, (off, base, fms, sms, _) in enumerate(reversed(chain)):
            if base != i * PER_INDEX:
                raise CartridgeError(f"{self.path}: index record at {off} covers object {base}")
            self.blocks.append(off)
            self.cum[FILEMARK].append(fms)
            self.cum[SETMARK].append(sms)
        self._cache: dict[int, array[int]] = {}
        self.tail: array[int] = array("Q")
        if self.blocks:
            last = self._block(len(self.blocks) - 1)
            for k in MARKS:
                self.cum[k].append(self.cum[k][-1] + sum(1 for e in last if e >> 62 == k))
            off = self.blocks[-1] + INDEX_SIZE
        else:
            self.cum = {FILEMARK: [0], SETMARK: [0]}
            off = LOG_START
        obj = len(self.blocks) * PER_INDEX
        while off < self.end:
            head = _parse_head(os.pread(self.fd, HEAD_SIZE, off))
            if head is None or head[3] != obj or head[0] not in (DATA, FILEMARK, SETMARK):
                raise CartridgeError(f"{self.path}: corrupt record at offset {off}")
            self.tail.append(head[0] << 62 | off)
            off, obj = off + HEAD_SIZE + head[1], obj + 1
        if off != self.end or obj != self.eod:
            raise CartridgeError(f"{self.path}: end of data does not match the log")
        self.dirty = False
        self._roll_forward()
        self.pos, self.pos_off = 0, self.offset_of(0)

    def _roll_forward(self) -> None:
        """Adopt the records a killed writer left after the committed end (same epoch, next objects, good CRCs)."""
        rolled = 0
        while True:
            raw = os.pread(self.fd, HEAD_SIZE, self.end)
            head = _parse_head(raw)
            if head is None or head[2] != self.epoch & 0xFFFFFFFF:
                break
            kind, length, _, obj, crc = head
            payload = os.pread(self.fd, length, self.end + HEAD_SIZE)
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            if kind == INDEX:
                if len(self.tail) != PER_INDEX or obj != len(self.blocks) * PER_INDEX:
                    break
                self._close_block(self.end)
            elif kind in (DATA, FILEMARK, SETMARK) and obj == self.eod and len(self.tail) < PER_INDEX:
                self.tail.append(kind << 62 | self.end)
                self.eod += 1
                if kind != DATA:
                    self.count[kind] += 1
            else:
                break
            self.end += HEAD_SIZE + length
            rolled += 1
        if rolled:
            self.dirty = True
            self.flush()

    # -- the index ------------------------------------------------------------------------------------------------
    def _block(self, i: int) -> array[int]:
        entries = self._cache.get(i)
        if entries is None:
            raw = os.pread(self.fd, INDEX_SIZE, self.blocks[i])
            head = _parse_head(raw)
            if head is None or head[0] != INDEX or zlib.crc32(raw[HEAD_SIZE:]) != head[4]:
                raise CartridgeError(f"{self.path}: corrupt index record at {self.blocks[i]}")
            entries = _entries(raw[HEAD_SIZE + _IDX.size:])
            if len(self._cache) >= 8:
                self._cache.clear()
            self._cache[i] = entries
        return entries

    def _entry(self, n: int) -> int:
        base = len(self.blocks) * PER_INDEX
        if n >= base:
            return self.tail[n - base]
        return self._block(n // PER_INDEX)[n % PER_INDEX]

    def offset_of(self, n: int) -> int:
        return self.end if n >= self.eod else self._entry(n) & OFF_MASK

    def kind_of(self, n: int) -> int:
        return self._entry(n) >> 62

    def marks_before(self, n: int, kind: int = FILEMARK) -> int:
        """How many marks of ``kind`` lie before object ``n`` (the logical file number for filemarks)."""
        base = len(self.blocks) * PER_INDEX
        if n >= base:
            start, entries, count = base, self.tail, self.cum[kind][-1]
        else:
            i = n // PER_INDEX
            start, entries, count = i * PER_INDEX, self._block(i), self.cum[kind][i]
        return count + sum(1 for e in entries[:n - start] if e >> 62 == kind)

    def nth_mark(self, ordinal: int, kind: int = FILEMARK) -> int:
        """The object number of mark number ``ordinal`` (from 0) of ``kind``; it must exist."""
        cum = self.cum[kind]
        i = bisect_right(cum, ordinal) - 1
        entries = self.tail if i >= len(self.blocks) else self._block(i)
        left = ordinal - cum[i]
        for j, e in enumerate(entries):
            if e >> 62 == kind:
                if not left:
                    return i * PER_INDEX + j
                left -= 1
        raise CartridgeError(f"{self.path}: mark {ordinal} missing from the index")

    def next_mark(self, start: int, limit: int) -> int | None:
        """The first filemark or setmark in objects [start, limit), or None."""
        found = []
        for k in MARKS:
            o = self.marks_before(start, k)
            if o < self.count[k]:
                m = self.nth_mark(o, k)
                if m < limit:
                    found.append(m)
        return min(found) if found else None

    def prev_mark(self, start: int, limit: int) -> int | None:
        """The last filemark or setmark in objects [limit, start), or None."""
        found = []
        for k in MARKS:
            o = self.marks_before(start, k) - 1
            if o >= 0:
                m = self.nth_mark(o, k)
                if m >= limit:
                    found.append(m)
        return max(found) if found else None

    # -- position and reading -------------------------------------------------------------------------------------
    def seek(self, n: int) -> None:
        self.pos = min(max(n, 0), self.eod)
        self.pos_off = self.offset_of(self.pos)

    def read(self, count: int) -> list[tuple[int, memoryview]]:
        """Read up to ``count`` objects from the position, stopping after the first mark; the position advances
        past everything returned. Raises CartridgeError on a damaged record (the position then stays)."""
        stop = min(self.pos + count, self.eod)
        if stop <= self.pos:
            return []
        m = self.next_mark(self.pos, stop)
        if m is not None:
            stop = m + 1
        span = self.offset_of(stop) - self.pos_off
        buf = memoryview(os.pread(self.fd, span, self.pos_off))
        out, at, obj = [], 0, self.pos
        while obj < stop:
            head = _parse_head(bytes(buf[at:at + HEAD_SIZE]))
            if head is None:
                raise CartridgeError(f"{self.path}: damaged record head at {self.pos_off + at}")
            kind, length, _, num, crc = head
            payload = buf[at + HEAD_SIZE:at + HEAD_SIZE + length]
            at += HEAD_SIZE + length
            if kind == INDEX:
                continue
            if num != obj or len(payload) != length or zlib.crc32(payload) != crc:
                raise CartridgeError(f"{self.path}: damaged record {obj}")
            out.append((kind, payload))
            obj += 1
        self.pos, self.pos_off = stop, self.offset_of(stop)
        return out

    # -- writing --------------------------------------------------------------------------------------------------
    @property
    def write_protected(self) -> bool:
        return self.read_only or bool(self.meta["write_protect"])

    @property
    def limit(self) -> int:
        return LOG_START + int(self.meta["capacity"])

    def in_early_warning(self, offset: int | None = None) -> bool:
        m = self.meta
        return (self.end if offset is None else offset) >= LOG_START + int(m["capacity"]) - int(m["early_warning"])

    def truncate(self) -> None:
        """Make the position the end of data, durably, before anything after it is overwritten."""
        n = self.pos
        if n >= self.eod:
            return
        end, counts = self.offset_of(n), {k: self.marks_before(n, k) for k in MARKS}
        base = len(self.blocks) * PER_INDEX
        if n >= base:
            del self.tail[n - base:]
        else:
            i = n // PER_INDEX
            self.tail = array("Q", self._block(i)[:n - i * PER_INDEX])
            del self.blocks[i:]
            for k in MARKS:
                del self.cum[k][i + 1:]
            self._cache.clear()
        self.eod, self.end, self.count = n, end, counts
        self.epoch += 1
        self.dirty = True
        self.flush()

    def append(self, kind: int, payloads: Iterable[Any]) -> int:
        """Write objects of ``kind`` at the position (truncating the tape there first); returns how many fit
        before the end of the medium. OSError from the file leaves the cartridge as it was."""
        if self.pos < self.eod:
            self.truncate()
        saved = (array("Q", self.tail), len(self.blocks), self.eod, self.end, dict(self.count))
        bufs: list[Any] = []
        off, n = self.end, 0
        try:
            for p in payloads:
                size = HEAD_SIZE + len(p)
                if off + size > self.limit:
                    break
                bufs += (_head(kind, len(p), self.epoch, self.eod, zlib.crc32(p)), p) if len(p) else \
                    (_head(kind, 0, self.epoch, self.eod, 0),)
                self.tail.append(kind << 62 | off)
                off, n, self.eod = off + size, n + 1, self.eod + 1
                if kind != DATA:
                    self.count[kind] += 1
                if len(self.tail) == PER_INDEX:
                    bufs.append(self._index_record(off))
                    self._close_block(off)
                    off += INDEX_SIZE
            if bufs:
                _pwrite_all(self.fd, bufs, self.end)
        except BaseException:
            self.tail, nblocks, self.eod, self.end, self.count = saved
            self._cache.clear()
            del self.blocks[nblocks:]
            for k in MARKS:
                del self.cum[k][nblocks + 1:]
            raise
        self.end = off
        self.pos, self.pos_off = self.eod, off
        if n:
            self.dirty = True
        return n

    def _index_record(self, off: int) -> bytes:
        base = len(self.blocks) * PER_INDEX
        entries = array("Q", self.tail)
        if not _BIG:
            entries.byteswap()
        body = _IDX.pack(base, self.cum[FILEMARK][-1], self.cum[SETMARK][-1],
                         self.blocks[-1] if self.blocks else 0) + entries.tobytes()
        return _head(INDEX, len(body), self.epoch, base, zlib.crc32(body)) + body

    def _close_block(self, off: int) -> None:
        """The tail (512 entries) now has its index record at ``off``."""
        full = self.tail
        self.blocks.append(off)
        self._cache[len(self.blocks) - 1] = full
        for k in MARKS:
            self.cum[k].append(self.cum[k][-1] + sum(1 for e in full if e >> 62 == k))
        self.tail = array("Q")

    def flush(self) -> None:
        """Commit: make the log durable, then the header naming the new end of data."""
        if not self.dirty or self.read_only:
            self.dirty = False
            return
        os.fdatasync(self.fd)
        m = self.meta
        m.update(epoch=self.epoch, eod=self.eod, end=self.end, files=self.count[FILEMARK],
                 setmarks=self.count[SETMARK], index=self.blocks[-1] if self.blocks else 0)
        slot = _slot(m, self.seq + 1)
        self.seq += 1
        os.pwrite(self.fd, slot, (self.seq & 1) * SLOT_SIZE)
        os.fdatasync(self.fd)
        self.dirty = False

    def update_meta(self, **changes: Any) -> None:
        """Change MAM/header fields (load count, byte counters, host attributes) and commit them.

        Raises:
            CartridgeError: the header would outgrow its slot (nothing is changed).
        """
        old = dict(self.meta)
        self.meta.update(changes)
        if not self.read_only:
            self.dirty = True
            try:
                self.flush()
            except CartridgeError:
                self.meta.clear()
                self.meta.update(old)
                raise

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1

    def info(self) -> dict[str, Any]:
        """A summary for tools: barcode, capacity, bytes used, objects, files, write protect, loads."""
        m = self.meta
        return {"barcode": m["barcode"], "capacity": m["capacity"], "used": self.end - LOG_START,
                "objects": self.eod, "filemarks": self.count[FILEMARK], "setmarks": self.count[SETMARK],
                "write_protect": self.write_protected, "loads": m["loads"], "early_warning": m["early_warning"]}


def set_write_protect(path: str, on: bool) -> None:
    """Flip a cartridge's write-protect tab (for the CLI)."""
    cart = Cartridge(path)
    try:
        cart.update_meta(write_protect=bool(on))
    finally:
        cart.close()


# -- MAM attributes (SPC-4 7.4, READ/WRITE ATTRIBUTE) ------------------------------------------------------------
BINARY, ASCII, TEXT = 0, 1, 2
HOST_ATTRIBUTES = {0x0800: (ASCII, 8), 0x0801: (ASCII, 32), 0x0802: (ASCII, 8), 0x0803: (TEXT, 160),
                   0x0804: (ASCII, 12), 0x0805: (BINARY, 1), 0x0806: (ASCII, 32), 0x0807: (TEXT, 80),
                   0x0808: (TEXT, 160), 0x080B: (TEXT, 160), 0x080C: (BINARY, 12)}


def _asc(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size)


def mam_attributes(cart: Cartridge) -> list[tuple[int, bool, int, bytes]]:
    """(id, read only, format, value) of every attribute the cartridge has, in id order."""
    m, mib = cart.meta, 1 << 20
    u64 = struct.Struct(">Q").pack
    out = [(0x0000, True, BINARY, u64(max(0, cart.limit - cart.end) // mib)),
           (0x0001, True, BINARY, u64(m["capacity"] // mib)),
           (0x0003, True, BINARY, u64(m["loads"])),
           (0x0004, True, BINARY, u64(max(0, SLOT_SIZE - 512 - len(cbor2.dumps(m))))),
           (0x0006, True, BINARY, bytes((m["density"],))),
           (0x0220, True, BINARY, u64(m["written"] // mib)),
           (0x0221, True, BINARY, u64(m["read"] // mib)),
           (0x0400, True, ASCII, _asc("TRIOSCSI", 8)),
           (0x0401, True, ASCII, _asc(m["serial"], 32)),
           (0x0405, True, BINARY, bytes((m["density"],))),
           (0x0406, True, ASCII, _asc(m["created"], 8)),
           (0x0408, True, BINARY, bytes((0,))),                       # medium type: data
           (0x0806, False, ASCII, _asc(m["barcode"], 32))]
    host = {k: v for k, v in m["attributes"].items() if k != 0x0806}
    if 0x0806 in m["attributes"]:
        out[-1] = (0x0806, False, ASCII, bytes(m["attributes"][0x0806]))
    out += [(k, False, HOST_ATTRIBUTES.get(k, (BINARY, 0))[0], bytes(v)) for k, v in host.items()]
    return sorted(out)
