"""The checks `checker.py` runs, in order: handshake, SCSI commands for the declared device type, protocol
mechanics (tags, concurrency, abort, ping, partial frames), lifetime (EOF) and version negotiation.

Each check is `async def check(s: Session) -> str | None`: it returns a short PASS detail, or raises
`CheckFailed(message, clause)` / `Warned` / `Skipped`.  Clauses cite docs/emulator-protocol.md by section (§N)
and SCSI by standard and command or page name (SPC-4, SBC-3), because clause numbers move between revisions.
Optional commands (READ/WRITE(16), SYNCHRONIZE CACHE, MODE SENSE) are checked only when the emulator does not
answer them INVALID COMMAND OPERATION CODE; everything else listed for a device type is required.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Callable

import trio

from .checker import Session
from .checker_expect import (CHECK_CONDITION, DATA_PROTECT, GOOD, ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB,
                             INVALID_OPCODE, LBA_OUT_OF_RANGE, READ10, READ16, READ_CAPACITY10, READ_CAPACITY16,
                             SENSE_CLAUSE, TUR, TYPES, WRITE10, WRITE16, WRITE_PROTECTED, always, describe,
                             expect_check, expect_good, geometry, inquiry, is_disk, not_implemented, parse_sense,
                             read_only, rw10, rw16, wanted)
from .checker_mechanics import (abort, concurrency, eof_exit, events, partial_frames, ping_while_busy, tags,
                                unknown_keys)
from .checker_process import SPEC, CheckFailed, Done, Skipped, Warned, schema_problems


# ---- handshake ----------------------------------------------------------------------------------------------

async def handshake(s: Session) -> str:
    emu, opts = s.emu, s.options
    hello = {"op": "hello", "versions": [1], "params": opts.params, "identity": opts.identity,
             "x-checker": "an unknown key: ignore it (§1)"}
    began = trio.current_time()
    await emu.send(hello)
    with trio.move_on_after(opts.ready_timeout):
        await emu.ready.wait()
    ready = emu.ready_message
    if ready is None:
        if emu.errors:
            raise CheckFailed(f"the emulator refused hello: {emu.errors[0].get('message')!r}", f"{SPEC} §3")
        if emu.gone.is_set():
            raise CheckFailed(f"no ready: {emu.gone_reason}", f"{SPEC} §3")
        first = f"; its first frame was {emu.first_frame['op']!r}" if emu.first_frame else ""
        raise CheckFailed(f"no ready within {opts.ready_timeout:g} s{first} (is each frame flushed? §7; unknown hello "
                          "keys such as 'x-checker' must be ignored, §1)", f"{SPEC} §3")
    took = trio.current_time() - began
    problems = schema_problems(ready)
    if ready.get("version") not in (1,):
        problems.append(f"ready.version {ready.get('version')!r} is not one of hello.versions [1]")
    dtype = ready.get("device_type")
    if dtype == 0 and not isinstance(ready.get("capacity"), dict):
        problems.append("a disk (device_type 0) must report capacity {block_size, blocks}")
    if ready.get("max_inflight", 64) == 0:
        problems.append("max_inflight 0: the core could never send a command")
    if isinstance(dtype, int) and not isinstance(dtype, bool) and 0 <= dtype <= 31 and ready.get("version") == 1:
        s.ready = ready
        cap = ready.get("capacity") or {}
        size = f", {cap.get('blocks')} x {cap.get('block_size')} B" if cap else ""
        s.notes["summary"] = (f"protocol v1, device type 0x{dtype:02x} ({TYPES.get(dtype, 'other')}){size}, "
                              f"max_inflight {ready.get('max_inflight', 64)}, features {ready.get('features', [])}")
    if problems:
        raise CheckFailed("; ".join(problems), f"{SPEC} §3.2, §8")
    mismatched = [k for k, v in opts.identity.items() if (ready.get("identity") or {}).get(k) != v]
    if mismatched:
        raise Warned(f"ready.identity differs from hello.identity in {mismatched} (normally the one received)",
                     f"{SPEC} §3.2")
    return f"ready in {took * 1000:.0f} ms"


async def version_refused(s: Session) -> str:
    emu, opts = s.emu, s.options
    emu.expect_error = True
    await emu.send({"op": "hello", "versions": [99], "params": opts.params, "identity": opts.identity})
    with trio.move_on_after(opts.ready_timeout):
        await emu.ready.wait()
    if emu.ready_message is not None:
        raise CheckFailed(f"answered ready (version {emu.ready_message.get('version')!r}) to hello.versions [99]",
                          f"{SPEC} §3.2 (if none fits it writes error and exits 2)")
    code = await emu.wait_exit(opts.exit_timeout)
    if not emu.errors:
        raise CheckFailed(f"no error frame for hello.versions [99] ({emu.exit_text()})", f"{SPEC} §3.2")
    if code != 2:
        raise CheckFailed(f"sent error but then {emu.exit_text()}, expected exit code 2", f"{SPEC} §3.2")
    return f"error {emu.errors[0].get('message')!r}, exit code 2"


# ---- SPC: every device type ---------------------------------------------------------------------------------

async def test_unit_ready(s: Session) -> str:
    done = await s.emu.execute(TUR)
    if is_disk(s):
        expect_good(done, "TEST UNIT READY", "SPC-4 TEST UNIT READY")
    elif done.status == CHECK_CONDITION:
        parse_sense(done.sense)
    elif done.status != GOOD:
        raise CheckFailed(f"TEST UNIT READY: {describe(done)}", "SPC-4 TEST UNIT READY")
    return describe(done)


async def inquiry_standard(s: Session) -> str:
    done = expect_good(await s.emu.execute(inquiry(alloc=255), xfer=255), "INQUIRY", "SPC-4 INQUIRY")
    d, clause = done.data, "SPC-4 INQUIRY, standard INQUIRY data"
    if len(d) < 36:
        raise CheckFailed(f"standard INQUIRY data is {len(d)} bytes, at least 36 are required", clause)
    problems = []
    if d[0] >> 5:
        problems.append(f"peripheral qualifier {d[0] >> 5} (0: a device is connected)")
    if d[0] & 0x1F != s.ready["device_type"]:
        problems.append(f"peripheral device type 0x{d[0] & 0x1F:02x}, but ready.device_type is "
                        f"0x{s.ready['device_type']:02x}")
    if d[3] & 0x0F != 2:
        problems.append(f"response data format {d[3] & 0x0F} (shall be 2)")
    if d[4] + 5 < 36:
        problems.append(f"additional length {d[4]} (at least 31 for 36 bytes)")
    for name, lo, hi in (("vendor", 8, 16), ("product", 16, 32), ("revision", 32, 36)):
        field, expected = bytes(d[lo:hi]), wanted(s, name, hi - lo)
        if any(b < 0x20 or b > 0x7E for b in field):
            problems.append(f"{name} {field!r} is not printable ASCII padded with spaces")
        elif expected is not None and field != expected:
            problems.append(f"{name} {field.decode()!r}, but hello.identity says {expected.decode()!r} (§3.1)")
    if problems:
        raise CheckFailed("; ".join(problems), f"{clause}; {SPEC} §3.1")
    if d[2] == 0:
        raise Warned("VERSION 0 claims conformance to no standard (initiators expect SPC-3 = 5 or later)", clause)
    return f"{len(d)} bytes, version {d[2]}, '{d[8:16].decode().strip()}' '{d[16:32].decode().strip()}'"


async def vpd(s: Session, page: int) -> bytes:
    done = expect_good(await s.emu.execute(inquiry(1, page, 255), xfer=255), f"INQUIRY VPD page 0x{page:02x}",
                       "SPC-4 INQUIRY (EVPD=1)")
    d, clause = done.data, "SPC-4 vital product data pages"
    if len(d) < 4 or d[1] != page:
        raise CheckFailed(f"VPD page 0x{page:02x}: data {d[:8].hex()} does not carry page code 0x{page:02x} in byte 1",
                          clause)
    length = struct.unpack_from(">H", d, 2)[0]
    if 4 + length > len(d):
        raise CheckFailed(f"VPD page 0x{page:02x}: page length {length} but only {len(d) - 4} bytes follow", clause)
    if d[0] & 0x1F != s.ready["device_type"]:
        raise CheckFailed(f"VPD page 0x{page:02x}: peripheral device type 0x{d[0] & 0x1F:02x} != ready.device_type",
                          clause)
    return bytes(d[4:4 + length])


async def vpd_supported(s: Session) -> str:
    pages = list(await vpd(s, 0x00))
    s.notes["vpd"] = pages
    missing = [f"0x{p:02x}" for p in (0x00, 0x80, 0x83) if p not in pages]
    if missing:
        raise CheckFailed(f"supported VPD pages {[hex(p) for p in pages]} lack {missing} (the core relies on the "
                          "emulator for 0x80/0x83)", f"SPC-4 Supported VPD Pages; {SPEC} §3.1")
    if pages != sorted(pages):
        raise CheckFailed(f"supported VPD pages {[hex(p) for p in pages]} are not in ascending order",
                          "SPC-4 Supported VPD Pages")
    return " ".join(f"{p:02x}" for p in pages)


async def vpd_serial(s: Session) -> str:
    serial = (await vpd(s, 0x80)).decode("ascii", "replace").strip(" \0")
    expected = s.options.identity.get("serial")
    if expected is not None and serial != expected:
        raise CheckFailed(f"unit serial number {serial!r}, but hello.identity.serial is {expected!r}",
                          f"{SPEC} §3.1; SPC-4 Unit Serial Number VPD page")
    return repr(serial)


async def vpd_device_id(s: Session) -> str:
    body, found, naa = await vpd(s, 0x83), [], s.options.identity.get("naa")
    pos = 0
    while pos + 4 <= len(body):
        code_set, kind, length = body[pos] & 0x0F, body[pos + 1], body[pos + 3]
        value = body[pos + 4:pos + 4 + length]
        if len(value) != length:
            raise CheckFailed(f"designator at offset {pos} claims {length} bytes, only {len(value)} remain",
                              "SPC-4 Device Identification VPD page")
        found.append((code_set, (kind >> 4) & 3, kind & 0x0F, bytes(value)))
        pos += 4 + length
    text = ", ".join(f"type {t} assoc {a} {v.hex() if c == 1 else v.decode(errors='replace')}" for c, a, t, v in found)
    if naa is not None and not any(t == 3 and a == 0 and v == naa for c, a, t, v in found):
        raise CheckFailed(f"no NAA designator (type 3, association 0 = logical unit) equal to hello.identity.naa "
                          f"{naa.hex()}; found: {text or 'nothing'}",
                          f"{SPEC} §3.1; SPC-4 Device Identification VPD page")
    return text


async def inquiry_invalid_fields(s: Session) -> str:
    clause = "SPC-4 INQUIRY (PAGE CODE with EVPD=0; unsupported VPD page)"
    done = await s.emu.execute(inquiry(0, 0x80, 255), xfer=255)
    expect_check(done, "INQUIRY with EVPD=0 and PAGE CODE 0x80", ILLEGAL_REQUEST, [INVALID_FIELD_IN_CDB], clause)
    page = next(p for p in (0xDE, 0xEE, 0xBE, 0x7E) if p not in s.notes.get("vpd", []))
    done = await s.emu.execute(inquiry(1, page, 255), xfer=255)
    expect_check(done, f"INQUIRY of unsupported VPD page 0x{page:02x}", ILLEGAL_REQUEST, [INVALID_FIELD_IN_CDB],
                 clause)
    return f"24/00 for EVPD=0 with a page code and for VPD page 0x{page:02x}"


async def unknown_opcode(s: Session) -> str:
    op = s.options.unknown_opcode
    done = await s.emu.execute(bytes([op]) + bytes(15))
    expect_check(done, f"opcode 0x{op:02x}", ILLEGAL_REQUEST, [INVALID_OPCODE],
                 f"{SPEC} §4 (an unimplemented opcode gets ILLEGAL REQUEST 20/00); {SENSE_CLAUSE}")
    return f"0x{op:02x} -> ILLEGAL REQUEST 20/00, {len(done.sense)}-byte sense"


async def malformed_cdbs(s: Session) -> str:
    cases: list[tuple[str, bytes]] = [
        ("SERVICE ACTION IN(16) with unknown service action 0x1f", struct.pack(">BBQIBB", 0x9E, 0x1F, 0, 32, 0, 0)),
        ("a 260-byte variable-length CDB (0x7f) with an unknown service action", bytes([0x7F, 0, 0, 0, 0, 0, 0, 252,
                                                                                      0xFF, 0xFF]) + bytes(250)),
    ]
    if is_disk(s):
        cases += [("READ(10) opcode in a 6-byte CDB", bytes([READ10, 0, 0, 0, 1, 0])),
                  ("READ(16) opcode in a 10-byte CDB", bytes([READ16]) + bytes([0, 0, 0, 0, 0, 0, 0, 1, 0]))]
    for what, cdb in cases:
        done = await s.emu.execute(cdb, xfer=512)
        expect_check(done, what, ILLEGAL_REQUEST, [],
                     f"{SPEC} §4 (cdb is 6 to 260 bytes, exactly as sent); SPC-4 (a CDB the device server cannot "
                     "parse ends with ILLEGAL REQUEST)")
    return f"{len(cases)} malformed CDBs -> ILLEGAL REQUEST, emulator still answering"


# ---- SBC: disks ---------------------------------------------------------------------------------------------

async def read_capacity(s: Session, sixteen: bool) -> str:
    bs, blocks = geometry(s)
    name = f"READ CAPACITY({16 if sixteen else 10})"
    d = expect_good(await s.emu.execute(READ_CAPACITY16 if sixteen else READ_CAPACITY10, xfer=32 if sixteen else 8),
                    name, f"SBC-3 {name}").data
    if len(d) < (12 if sixteen else 8):
        raise CheckFailed(f"{name} returned {len(d)} bytes, expected {32 if sixteen else 8}", f"SBC-3 {name}")
    last, size = struct.unpack_from(">QI" if sixteen else ">II", d)
    if (last, size) != (blocks - 1 if sixteen else min(blocks - 1, 0xFFFFFFFF), bs):
        raise CheckFailed(f"{name} says last LBA {last}, block {size} B; ready.capacity says {blocks - 1}, {bs} B",
                          f"SBC-3 {name}; {SPEC} §3.2 capacity")
    return f"last LBA {last}, {size}-byte blocks"


async def round_trip(s: Session, read_op: int, write_op: int, lba: int, count: int, cdb: Callable[..., bytes],
                     name: str) -> str:
    bs, _ = geometry(s)
    clause = f"SBC-3 READ{name}, WRITE{name}"
    if read_only(s):
        got = expect_good(await s.emu.execute(cdb(read_op, lba, count), xfer=count * bs), f"READ{name}", clause).data
        if len(got) < count * bs:
            raise CheckFailed(f"READ{name} of {count} blocks returned {len(got)} bytes", clause)
        done = await s.emu.execute(cdb(write_op, lba, count), os.urandom(count * bs))
        expect_check(done, f"WRITE{name} to a read-only disk", DATA_PROTECT, [WRITE_PROTECTED], clause)
        return f"read {count} blocks at LBA {lba}; write refused with DATA PROTECT 27/00"
    data = os.urandom(count * bs)
    done = await s.emu.execute(cdb(write_op, lba, count), data)
    if done.status == CHECK_CONDITION and parse_sense(done.sense)[0] == DATA_PROTECT:
        raise Warned(f"WRITE{name} refused with DATA PROTECT, but ready.features lacks 'read_only'", f"{SPEC} §3.2")
    expect_good(done, f"WRITE{name} of {count} blocks at LBA {lba}", clause)
    got = expect_good(await s.emu.execute(cdb(read_op, lba, count), xfer=count * bs), f"READ{name}", clause).data
    if not s.options.verify:
        data = got = got[:len(data)]
    if len(got) < len(data):
        raise CheckFailed(f"READ{name} of {count} blocks returned {len(got)} bytes", clause)
    if got[:len(data)] != data:
        first = next((i for i in range(min(len(got), len(data))) if got[i] != data[i]), min(len(got), len(data)))
        raise CheckFailed(f"READ{name} returned {len(got)} bytes that differ from what WRITE{name} wrote "
                          f"(first difference at byte {first}; a device that discards writes: --no-verify)", clause)
    short = expect_good(await s.emu.execute(cdb(read_op, lba, count), xfer=bs), f"READ{name} with xfer < length",
                        f"{SPEC} §4 (xfer)").data
    if short[:bs] != data[:bs] and s.options.verify:
        raise CheckFailed(f"READ{name} with xfer {bs} returned the wrong bytes", f"{SPEC} §4 (xfer)")
    return f"wrote and read back {count} blocks at LBA {lba}"


async def read_write10(s: Session) -> str:
    bs, blocks = geometry(s)
    count = min(8, blocks)
    return await round_trip(s, READ10, WRITE10, min(blocks // 2, blocks - count), count, rw10, "(10)")


async def read_write16(s: Session) -> str:
    bs, blocks = geometry(s)
    count = min(8, blocks)
    probe = await s.emu.execute(rw16(READ16, 0, 1), xfer=bs)
    s.notes["rw16"] = not not_implemented(probe)
    if not s.notes["rw16"]:
        raise Skipped("READ(16) not implemented (20/00)")
    return await round_trip(s, READ16, WRITE16, blocks - count, count, rw16, "(16)")


async def transfer_length_zero(s: Session) -> str:
    done = expect_good(await s.emu.execute(rw10(READ10, 0, 0)), "READ(10) with TRANSFER LENGTH 0",
                       "SBC-3 READ (10): transfer length 0 is not an error")
    if done.data:
        raise Warned(f"READ(10) of 0 blocks returned {len(done.data)} bytes", "SBC-3 READ (10)")
    return "GOOD, no data"


async def lba_out_of_range(s: Session) -> str:
    bs, blocks = geometry(s)
    clause = "SBC-3 READ/WRITE: LOGICAL BLOCK ADDRESS OUT OF RANGE (21/00)"
    cases = []
    if blocks <= 0xFFFFFFFF:
        cases += [("READ(10) at LBA = capacity", rw10(READ10, blocks, 1), b"", bs),
                  ("READ(10) of 2 blocks at the last LBA", rw10(READ10, blocks - 1, 2), b"", 2 * bs)]
        if not read_only(s):
            cases.append(("WRITE(10) at LBA = capacity", rw10(WRITE10, blocks, 1), os.urandom(bs), 0))
    if s.notes.get("rw16"):
        cases += [("READ(16) at LBA = capacity", rw16(READ16, blocks, 1), b"", bs),
                  ("READ(16) of 2 blocks at LBA 2^64-1 (wraps around)", rw16(READ16, 2**64 - 1, 2), b"", 2 * bs)]
    for what, cdb, data, xfer in cases:
        expect_check(await s.emu.execute(cdb, data, xfer), what, ILLEGAL_REQUEST, [LBA_OUT_OF_RANGE], clause)
    return f"{len(cases)} commands past the end -> ILLEGAL REQUEST 21/00"


async def optional_command(s: Session, name: str, cdb: bytes, xfer: int, clause: str) -> Done:
    done = await s.emu.execute(cdb, xfer=xfer)
    if not_implemented(done):
        raise Skipped(f"{name} not implemented (20/00)")
    return expect_good(done, name, clause)


async def synchronize_cache(s: Session) -> str:
    await optional_command(s, "SYNCHRONIZE CACHE(10)", bytes([0x35]) + bytes(9), 0, "SBC-3 SYNCHRONIZE CACHE (10)")
    return "GOOD"


async def mode_sense6(s: Session) -> str:
    clause = "SPC-4 MODE SENSE(6), mode parameter header(6)"
    d = (await optional_command(s, "MODE SENSE(6) all pages", bytes([0x1A, 0, 0x3F, 0, 255, 0]), 255, clause)).data
    if len(d) < 4 or d[0] + 1 < 4:
        raise CheckFailed(f"MODE SENSE(6) returned {len(d)} bytes, mode data length {d[0] if d else '?'}", clause)
    if d[0] + 1 < len(d):
        raise CheckFailed(f"mode data length {d[0]} but {len(d)} bytes returned", clause)
    wp = bool(d[2] & 0x80)
    if is_disk(s) and wp != read_only(s):
        raise CheckFailed(f"WP bit is {int(wp)} but the disk is {'read-only' if read_only(s) else 'writable'}",
                          "SBC-3 device-specific parameter (WP)")
    return f"{len(d)} bytes, WP={int(wp)}"


async def large_transfer(s: Session) -> str:
    bs, blocks = geometry(s)
    count = min(s.options.large // bs, blocks, 0xFFFF)
    if read_only(s):
        got = expect_good(await s.emu.execute(rw10(READ10, 0, count), xfer=count * bs), "large READ(10)",
                          "SBC-3 READ (10)").data
        if len(got) < count * bs:
            raise CheckFailed(f"READ(10) of {count * bs} bytes returned {len(got)}", "SBC-3 READ (10)")
        return f"read {count * bs} bytes in one command"
    data = os.urandom(count * bs)
    expect_good(await s.emu.execute(rw10(WRITE10, 0, count), data), f"WRITE(10) of {len(data)} bytes",
                "SBC-3 WRITE (10)")
    got = expect_good(await s.emu.execute(rw10(READ10, 0, count), xfer=len(data)), f"READ(10) of {len(data)} bytes",
                      "SBC-3 READ (10)").data
    if len(got) < len(data) or (s.options.verify and got[:len(data)] != data):
        raise CheckFailed(f"{len(data)}-byte READ(10) did not return what WRITE(10) wrote", "SBC-3 READ (10)")
    return f"wrote and read back {len(data)} bytes in one command each"


Check = tuple[str, Callable[[Session], Any], Callable[[Session], bool]]


CHECKS: list[Check] = [
    ("scsi.test_unit_ready", test_unit_ready, always),
    ("scsi.inquiry.standard", inquiry_standard, always),
    ("scsi.inquiry.vpd_00", vpd_supported, always),
    ("scsi.inquiry.vpd_80", vpd_serial, always),
    ("scsi.inquiry.vpd_83", vpd_device_id, always),
    ("scsi.inquiry.invalid_fields", inquiry_invalid_fields, always),
    ("scsi.unknown_opcode", unknown_opcode, always),
    ("scsi.malformed_cdb", malformed_cdbs, always),
    ("sbc.read_capacity10", lambda s: read_capacity(s, False), is_disk),
    ("sbc.read_capacity16", lambda s: read_capacity(s, True), is_disk),
    ("sbc.read_write10", read_write10, is_disk),
    ("sbc.read_write16", read_write16, is_disk),
    ("sbc.transfer_length_zero", transfer_length_zero, is_disk),
    ("sbc.lba_out_of_range", lba_out_of_range, is_disk),
    ("sbc.synchronize_cache", synchronize_cache, is_disk),
    ("spc.mode_sense6", mode_sense6, always),
    ("sbc.large_transfer", large_transfer, is_disk),
    ("proto.unknown_keys", unknown_keys, always),
    ("proto.partial_frames", partial_frames, always),
    ("proto.tags", tags, always),
    ("proto.concurrency", concurrency, always),
    ("proto.abort", abort, always),
    ("proto.ping_while_busy", ping_while_busy, always),
    ("proto.events", events, always),
    ("lifetime.eof_exit", eof_exit, always),
]
