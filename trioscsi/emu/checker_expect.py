"""What the emulator checker's checks share: CDB builders, sense parsing, expectations with the clause behind
them, and the predicates that pick checks by device type."""
from __future__ import annotations

import struct

from .checker import Session
from .checker_process import SPEC, CheckFailed, Done

GOOD, CHECK_CONDITION = 0x00, 0x02
ILLEGAL_REQUEST, DATA_PROTECT = 0x5, 0x7
INVALID_OPCODE, LBA_OUT_OF_RANGE, INVALID_FIELD_IN_CDB, WRITE_PROTECTED = (0x20, 0), (0x21, 0), (0x24, 0), (0x27, 0)
KEYS = {0: "NO SENSE", 1: "RECOVERED ERROR", 2: "NOT READY", 3: "MEDIUM ERROR", 4: "HARDWARE ERROR",
        5: "ILLEGAL REQUEST", 6: "UNIT ATTENTION", 7: "DATA PROTECT", 0xB: "ABORTED COMMAND", 0xE: "MISCOMPARE"}
TYPES = {0: "disk", 1: "tape", 3: "processor", 5: "CD/DVD", 7: "optical", 8: "changer", 0xD: "enclosure",
         0xE: "RBC disk"}
SENSE_CLAUSE = "SPC-4 sense data (fixed 0x70/0x71: key byte 2, ASC/ASCQ bytes 12-13; descriptor 0x72/0x73)"


# ---- CDBs and expectations ----------------------------------------------------------------------------------

def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def rw16(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", op, 0, lba, blocks, 0, 0)


TUR = bytes(6)
READ10, WRITE10, READ16, WRITE16 = 0x28, 0x2A, 0x88, 0x8A
READ_CAPACITY10 = bytes([0x25]) + bytes(9)
READ_CAPACITY16 = struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)


def parse_sense(sense: bytes) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed or descriptor sense data; CheckFailed when it is not valid sense."""
    if not sense:
        raise CheckFailed("CHECK CONDITION without sense data", f"{SPEC} §4 (with CHECK CONDITION, sense holds "
                                                                 "the sense data)")
    code = sense[0] & 0x7F
    if code in (0x70, 0x71):
        if len(sense) < 14 or sense[7] < 6:
            length = sense[7] if len(sense) > 7 else "?"
            raise CheckFailed(f"fixed-format sense of {len(sense)} bytes (additional length {length}) does not reach "
                              "ASC/ASCQ at bytes 12-13", SENSE_CLAUSE)
        if 8 + sense[7] > len(sense):
            raise CheckFailed(f"sense additional length {sense[7]} promises {8 + sense[7]} bytes, got {len(sense)}",
                              SENSE_CLAUSE)
        return sense[2] & 0x0F, sense[12], sense[13]
    if code in (0x72, 0x73):
        if len(sense) < 8:
            raise CheckFailed(f"descriptor-format sense of {len(sense)} bytes (needs at least 8)", SENSE_CLAUSE)
        return sense[1] & 0x0F, sense[2], sense[3]
    raise CheckFailed(f"sense response code 0x{sense[0]:02x} is neither fixed (0x70/0x71) nor descriptor "
                      f"(0x72/0x73): {sense[:18].hex()}", SENSE_CLAUSE)


def describe(done: Done) -> str:
    if done.status == GOOD:
        return f"GOOD with {len(done.data)} bytes"
    if done.status == CHECK_CONDITION:
        try:
            key, asc, ascq = parse_sense(done.sense)
            return f"CHECK CONDITION {KEYS.get(key, hex(key))} {asc:02X}/{ascq:02X}"
        except CheckFailed as exc:
            return f"CHECK CONDITION with bad sense ({exc.message})"
    return f"status 0x{done.status:02x}"


def expect_good(done: Done, what: str, clause: str) -> Done:
    if done.status != GOOD or done.aborted:
        raise CheckFailed(f"{what}: expected GOOD, got {describe(done)}" + (" (aborted)" if done.aborted else ""),
                          clause)
    return done


def expect_check(done: Done, what: str, key: int, codes: list[tuple[int, int]], clause: str) -> tuple[int, int, int]:
    wanted = " or ".join(f"{a:02X}/{q:02X}" for a, q in codes)
    if done.status != CHECK_CONDITION:
        raise CheckFailed(f"{what}: expected CHECK CONDITION {KEYS[key]} {wanted}, got {describe(done)}", clause)
    got = parse_sense(done.sense)
    if got[0] != key or (codes and (got[1], got[2]) not in codes):
        raise CheckFailed(f"{what}: expected {KEYS[key]} {wanted}, got {KEYS.get(got[0], hex(got[0]))} "
                          f"{got[1]:02X}/{got[2]:02X}", clause)
    return got


def not_implemented(done: Done) -> bool:
    try:
        return done.status == CHECK_CONDITION and parse_sense(done.sense)[:3] == (ILLEGAL_REQUEST, *INVALID_OPCODE)
    except CheckFailed:
        return False


def is_disk(s: Session) -> bool:
    return s.ready.get("device_type") == 0


def always(s: Session) -> bool:
    return True


def geometry(s: Session) -> tuple[int, int]:
    cap = s.ready.get("capacity") or {}
    bs, blocks = cap.get("block_size"), cap.get("blocks")
    if not bs or not blocks:
        raise CheckFailed("ready.capacity has no block_size/blocks", f"{SPEC} §3.2")
    return bs, blocks


def read_only(s: Session) -> bool:
    return "read_only" in (s.ready.get("features") or []) or s.options.params.get("read_only") is True


def wanted(s: Session, key: str, width: int) -> bytes | None:
    value = s.options.identity.get(key)
    return value.encode("ascii", "replace")[:width].ljust(width) if isinstance(value, str) else None
