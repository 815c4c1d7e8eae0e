"""The parse step: what the core must know about every opcode of every device type.

Strategy: one table per device type, built from shared command-set fragments (SPC for all, SBC for disks,
...).  The core never interprets a command's semantics; it needs only the data direction, the transfer
length the CDB asks for, whether the command is exempt from unit attention, whether repeating it after an
emulator restart is safe, and (for reservations) which reservation types it conflicts with.
Later device types (tape, changer, cdrom) add their fragment here; nothing else changes.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum


class Direction(Enum):
    NONE = "none"
    READ = "read"      # data-in
    WRITE = "write"    # data-out
    BIDI = "bidi"


class DeviceType:
    DISK = 0x00
    TAPE = 0x01
    PROCESSOR = 0x03
    CDROM = 0x05
    CHANGER = 0x08
    ENCLOSURE = 0x0D
    NO_DEVICE = 0x1F


LengthFn = Callable[[bytes, int], int]   # (cdb, block_size) -> bytes the CDB asks to transfer
PrRule = Callable[[bytes], str]          # cdb -> reservation conflict class, for opcodes that depend on fields


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    direction: Direction
    length: LengthFn | None = None      # None: whatever the initiator sends / accepts
    ua_exempt: bool = False             # delivered even with a unit attention pending (SAM-5 5.14 / SPC-4)
    retry_safe: bool = True             # may be resent to a restarted emulator without changing the outcome
    # Reservation conflict class (SPC-4 5.13 table 48): "read", "write", "none" (allowed for everyone), "other".
    pr_class: str = "other"
    writes_medium: bool = False         # refused on a write-protected mapping (DATA PROTECT, 27/00)
    pr_rule: PrRule | None = None       # overrides pr_class when the class depends on the CDB

    def pr_class_of(self, cdb: bytes) -> str:
        return self.pr_rule(cdb) if self.pr_rule is not None else self.pr_class


def _u8(i: int) -> LengthFn:
    return lambda cdb, bs: cdb[i] if len(cdb) > i else 0


def _u16(i: int) -> LengthFn:
    return lambda cdb, bs: struct.unpack_from(">H", cdb, i)[0] if len(cdb) >= i + 2 else 0


def _u24(i: int) -> LengthFn:
    return lambda cdb, bs: int.from_bytes(cdb[i:i + 3], "big")


def _u32(i: int) -> LengthFn:
    return lambda cdb, bs: struct.unpack_from(">I", cdb, i)[0] if len(cdb) >= i + 4 else 0


def _blocks(fn: LengthFn) -> LengthFn:
    return lambda cdb, bs: fn(cdb, bs) * bs


def _by_service_action(default: str, classes: dict[int, str]) -> PrRule:
    return lambda cdb: classes.get(cdb[1] & 0x1F, default) if len(cdb) > 1 else default


def _blocks6(cdb: bytes, bs: int) -> int:
    n = cdb[4] if len(cdb) > 4 else 0
    return (n or 256) * bs


IN, OUT, NONE = Direction.READ, Direction.WRITE, Direction.NONE

SPC: dict[int, CommandSpec] = {
    0x00: CommandSpec("TEST UNIT READY", NONE, pr_class="none"),
    0x03: CommandSpec("REQUEST SENSE", IN, _u8(4), ua_exempt=True, pr_class="none"),
    0x12: CommandSpec("INQUIRY", IN, _u16(3), ua_exempt=True, pr_class="none"),
    0x15: CommandSpec("MODE SELECT(6)", OUT, _u8(4), retry_safe=True),
    0x16: CommandSpec("RESERVE(6)", NONE, pr_class="none"),
    0x17: CommandSpec("RELEASE(6)", NONE, pr_class="none"),
    0x1A: CommandSpec("MODE SENSE(6)", IN, _u8(4), pr_class="read"),
    0x1C: CommandSpec("RECEIVE DIAGNOSTIC RESULTS", IN, _u16(3), pr_class="read"),
    0x1D: CommandSpec("SEND DIAGNOSTIC", OUT, _u16(3)),
    0x1E: CommandSpec("PREVENT ALLOW MEDIUM REMOVAL", NONE,
                      pr_rule=lambda c: "none" if len(c) > 4 and c[4] & 3 == 0 else "write"),
    0x3B: CommandSpec("WRITE BUFFER", OUT, _u24(6)),
    0x3C: CommandSpec("READ BUFFER", IN, _u24(6), pr_class="read"),
    0x4C: CommandSpec("LOG SELECT", OUT, _u16(7)),
    0x4D: CommandSpec("LOG SENSE", IN, _u16(7), pr_class="none"),
    0x55: CommandSpec("MODE SELECT(10)", OUT, _u16(7)),
    0x56: CommandSpec("RESERVE(10)", NONE, pr_class="none"),
    0x57: CommandSpec("RELEASE(10)", NONE, pr_class="none"),
    0x5A: CommandSpec("MODE SENSE(10)", IN, _u16(7), pr_class="read"),
    0x5E: CommandSpec("PERSISTENT RESERVE IN", IN, _u16(7), pr_class="none"),
    0x5F: CommandSpec("PERSISTENT RESERVE OUT", OUT, _u32(5), pr_class="none"),
    0x83: CommandSpec("EXTENDED COPY", OUT, _u32(10), retry_safe=False, pr_class="write"),
    0x84: CommandSpec("RECEIVE COPY RESULTS", IN, _u32(10), pr_class="read"),
    0xA0: CommandSpec("REPORT LUNS", IN, _u32(6), ua_exempt=True, pr_class="none"),
    0xA3: CommandSpec("MAINTENANCE IN", IN, _u32(6), pr_class="none",
                      pr_rule=_by_service_action("none", {0x0C: "read", 0x0D: "read", 0x10: "read"})),
    0xA4: CommandSpec("MAINTENANCE OUT", OUT, _u32(6)),
    0xAB: CommandSpec("SERVICE ACTION IN(12)", IN, _u32(6),
                      pr_rule=_by_service_action("read", {0x01: "none"})),
    0x9E: CommandSpec("SERVICE ACTION IN(16)", IN, _u32(10), pr_class="read",
                      pr_rule=_by_service_action("read", {0x10: "none"})),
    0x9F: CommandSpec("SERVICE ACTION OUT(16)", OUT, _u32(10)),
}

SBC: dict[int, CommandSpec] = {
    0x04: CommandSpec("FORMAT UNIT", OUT, retry_safe=False, pr_class="write", writes_medium=True),
    0x08: CommandSpec("READ(6)", IN, _blocks6, pr_class="read"),
    0x0A: CommandSpec("WRITE(6)", OUT, _blocks6, pr_class="write", writes_medium=True),
    0x1B: CommandSpec("START STOP UNIT", NONE, pr_class="write",
                      pr_rule=lambda c: "none" if len(c) > 4 and c[4] & 0xF1 == 0x01 else "write"),
    0x25: CommandSpec("READ CAPACITY(10)", IN, lambda cdb, bs: 8, pr_class="none"),
    0x28: CommandSpec("READ(10)", IN, _blocks(_u16(7)), pr_class="read"),
    0x2A: CommandSpec("WRITE(10)", OUT, _blocks(_u16(7)), pr_class="write", writes_medium=True),
    0x2E: CommandSpec("WRITE AND VERIFY(10)", OUT, _blocks(_u16(7)), pr_class="write", writes_medium=True),
    0x2F: CommandSpec("VERIFY(10)", OUT, pr_class="read"),
    0x34: CommandSpec("PRE-FETCH(10)", NONE, pr_class="read"),
    0x35: CommandSpec("SYNCHRONIZE CACHE(10)", NONE, pr_class="write"),
    0x37: CommandSpec("READ DEFECT DATA(10)", IN, _u16(7), pr_class="read"),
    0x41: CommandSpec("WRITE SAME(10)", OUT, pr_class="write", writes_medium=True),
    0x42: CommandSpec("UNMAP", OUT, _u16(7), pr_class="write", writes_medium=True),
    0x48: CommandSpec("SANITIZE", OUT, _u16(7), retry_safe=False, pr_class="write", writes_medium=True),
    0x88: CommandSpec("READ(16)", IN, _blocks(_u32(10)), pr_class="read"),
    0x89: CommandSpec("COMPARE AND WRITE", OUT, lambda cdb, bs: cdb[13] * 2 * bs, retry_safe=False,
                      pr_class="write", writes_medium=True),
    0x8A: CommandSpec("WRITE(16)", OUT, _blocks(_u32(10)), pr_class="write", writes_medium=True),
    0x8B: CommandSpec("ORWRITE(16)", OUT, _blocks(_u32(10)), retry_safe=False, pr_class="write", writes_medium=True),
    0x8E: CommandSpec("WRITE AND VERIFY(16)", OUT, _blocks(_u32(10)), pr_class="write", writes_medium=True),
    0x8F: CommandSpec("VERIFY(16)", OUT, pr_class="read"),
    0x90: CommandSpec("PRE-FETCH(16)", NONE, pr_class="read"),
    0x91: CommandSpec("SYNCHRONIZE CACHE(16)", NONE, pr_class="write"),
    0x93: CommandSpec("WRITE SAME(16)", OUT, pr_class="write", writes_medium=True),
    0x9C: CommandSpec("WRITE ATOMIC(16)", OUT, _blocks(_u16(12)), pr_class="write", writes_medium=True),
    0xA8: CommandSpec("READ(12)", IN, _blocks(_u32(6)), pr_class="read"),
    0xAA: CommandSpec("WRITE(12)", OUT, _blocks(_u32(6)), pr_class="write", writes_medium=True),
    0xAE: CommandSpec("WRITE AND VERIFY(12)", OUT, _blocks(_u32(6)), pr_class="write", writes_medium=True),
    0xAF: CommandSpec("VERIFY(12)", OUT, pr_class="read"),
    0xB7: CommandSpec("READ DEFECT DATA(12)", IN, _u32(6), pr_class="read"),
}

def _tape_count(cdb: bytes, bs: int) -> int:
    """READ(6)/WRITE(6) on tape: a byte count in variable mode, a block count x block size when FIXED=1."""
    count = int.from_bytes(cdb[2:5], "big")
    return count * bs if cdb[1] & 0x01 else count


# SSC-4. Motion and writing are not safe to repeat after an emulator restart (the tape may have moved);
# REWIND and LOCATE are absolute and may be resent. Another nexus moving the tape is a data-loss risk, so
# everything but reading and inquiring conflicts with a reservation.
SSC: dict[int, CommandSpec] = {
    0x01: CommandSpec("REWIND", NONE, pr_class="write"),
    0x05: CommandSpec("READ BLOCK LIMITS", IN, lambda cdb, bs: 6, pr_class="read"),
    0x08: CommandSpec("READ(6)", IN, _tape_count, retry_safe=False, pr_class="read"),
    0x0A: CommandSpec("WRITE(6)", OUT, _tape_count, retry_safe=False, pr_class="write", writes_medium=True),
    0x10: CommandSpec("WRITE FILEMARKS(6)", NONE, retry_safe=False, pr_class="write", writes_medium=True),
    0x11: CommandSpec("SPACE(6)", NONE, retry_safe=False, pr_class="write"),
    0x19: CommandSpec("ERASE(6)", NONE, retry_safe=False, pr_class="write", writes_medium=True),
    0x1B: CommandSpec("LOAD UNLOAD", NONE, pr_class="write"),
    0x2B: CommandSpec("LOCATE(10)", NONE, pr_class="write"),
    0x34: CommandSpec("READ POSITION", IN, pr_class="read"),
    0x44: CommandSpec("REPORT DENSITY SUPPORT", IN, _u16(7), pr_class="read"),
    0x80: CommandSpec("WRITE FILEMARKS(16)", NONE, retry_safe=False, pr_class="write", writes_medium=True),
    0x8C: CommandSpec("READ ATTRIBUTE", IN, _u32(10), pr_class="read"),
    0x8D: CommandSpec("WRITE ATTRIBUTE", OUT, _u32(10), pr_class="write"),
    0x91: CommandSpec("SPACE(16)", NONE, retry_safe=False, pr_class="write"),
    0x92: CommandSpec("LOCATE(16)", NONE, pr_class="write"),
}

# SMC-3. A MOVE MEDIUM in doubt is not repeated: the cartridge may already be in the drive.
SMC: dict[int, CommandSpec] = {
    0x07: CommandSpec("INITIALIZE ELEMENT STATUS", NONE, pr_class="write"),
    0x2B: CommandSpec("POSITION TO ELEMENT", NONE, pr_class="write"),
    0x37: CommandSpec("INITIALIZE ELEMENT STATUS WITH RANGE", NONE, pr_class="write"),
    0xA5: CommandSpec("MOVE MEDIUM", NONE, retry_safe=False, pr_class="write"),
    0xA6: CommandSpec("EXCHANGE MEDIUM", NONE, retry_safe=False, pr_class="write"),
    0xB8: CommandSpec("READ ELEMENT STATUS", IN, _u24(7), pr_class="read"),
}

# MMC-6, a read-only CD/DVD-ROM drive. GET CONFIGURATION and GET EVENT STATUS NOTIFICATION are delivered with a
# unit attention pending and leave it pending (MMC-6 4.1.6.1, as INQUIRY): sr polls media events with GESN and
# must see them. Reading the disc and its layout conflicts only with exclusive-access reservations; the
# drive's configuration and mechanism status are allowed for everyone, like READ CAPACITY. The writes are listed
# so a read-only mapping refuses them itself (a ROM drive answers DATA PROTECT for them anyway).
MMC: dict[int, CommandSpec] = {
    0x1B: CommandSpec("START STOP UNIT", NONE, pr_class="write",
                      pr_rule=lambda c: "none" if len(c) > 4 and c[4] & 0xF1 == 0x01 else "write"),
    0x25: CommandSpec("READ CAPACITY", IN, lambda cdb, bs: 8, pr_class="none"),
    0x28: CommandSpec("READ(10)", IN, _blocks(_u16(7)), pr_class="read"),
    0x2A: CommandSpec("WRITE(10)", OUT, _blocks(_u16(7)), pr_class="write", writes_medium=True),
    0x2E: CommandSpec("WRITE AND VERIFY(10)", OUT, _blocks(_u16(7)), pr_class="write", writes_medium=True),
    0x42: CommandSpec("READ SUB-CHANNEL", IN, _u16(7), pr_class="read"),
    0x43: CommandSpec("READ TOC/PMA/ATIP", IN, _u16(7), pr_class="read"),
    0x46: CommandSpec("GET CONFIGURATION", IN, _u16(7), ua_exempt=True, pr_class="none"),
    0x4A: CommandSpec("GET EVENT STATUS NOTIFICATION", IN, _u16(7), ua_exempt=True, pr_class="none"),
    0x51: CommandSpec("READ DISC INFORMATION", IN, _u16(7), pr_class="read"),
    0x52: CommandSpec("READ TRACK INFORMATION", IN, _u16(7), pr_class="read"),
    0xA8: CommandSpec("READ(12)", IN, _blocks(_u32(6)), pr_class="read"),
    0xAA: CommandSpec("WRITE(12)", OUT, _blocks(_u32(6)), pr_class="write", writes_medium=True),
    0xB6: CommandSpec("SET STREAMING", OUT, _u16(9)),
    0xBB: CommandSpec("SET CD SPEED", NONE),
    0xBD: CommandSpec("MECHANISM STATUS", IN, _u16(8), pr_class="none"),
}

TABLES: dict[int, Mapping[int, CommandSpec]] = {
    DeviceType.DISK: {**SPC, **SBC},
    DeviceType.TAPE: {**SPC, **SSC},
    DeviceType.CHANGER: {**SPC, **SMC},
    DeviceType.CDROM: {**SPC, **MMC},
}


def table_for(device_type: int) -> Mapping[int, CommandSpec]:
    """The opcode table of a device type; unknown types get SPC only (the emulator still sees the rest)."""
    return TABLES.get(device_type, SPC)


UNKNOWN = CommandSpec("UNKNOWN", Direction.NONE, retry_safe=False)


def lookup(device_type: int, opcode: int) -> CommandSpec:
    return table_for(device_type).get(opcode, UNKNOWN)


def cdb_length(cdb: bytes | memoryview) -> int:
    """The length of the CDB in a (zero-padded) CDB field, from the opcode's group code (SPC-4 4.2.5.1)."""
    group = cdb[0] >> 5
    if group == 0:
        return 6
    if group in (1, 2):
        return 10
    if group == 4:
        return 16
    if group == 5:
        return 12
    if group == 3 and cdb[0] == 0x7F and len(cdb) >= 8:
        return 8 + cdb[7]
    return len(cdb)
