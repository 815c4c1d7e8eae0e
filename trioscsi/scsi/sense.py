"""SCSI status, sense keys and additional sense codes, and the exception that carries them.

Strategy: every SCSI error in the core is raised as `CheckCondition` and turned into status + sense bytes
by exactly one catcher (the core's pipeline).  `Asc` packs ASC and ASCQ into one int (ASC << 8 | ASCQ), as
tgt does, so a code is one name.
"""
from __future__ import annotations

import struct
from enum import IntEnum


class Status(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class Asc(IntEnum):
    NO_ADDITIONAL_SENSE = 0x0000
    LOGICAL_UNIT_NOT_READY_BECOMING_READY = 0x0401
    LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION = 0x0403
    LOGICAL_UNIT_COMMUNICATION_FAILURE = 0x0800
    LOGICAL_UNIT_COMMUNICATION_TIMEOUT = 0x0801
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    LBA_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    LOGICAL_UNIT_NOT_SUPPORTED = 0x2500
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604
    WRITE_PROTECTED = 0x2700
    NOT_READY_TO_READY_CHANGE = 0x2800
    POWER_ON_RESET_OR_BUS_DEVICE_RESET = 0x2900
    POWER_ON_OCCURRED = 0x2901
    SCSI_BUS_RESET_OCCURRED = 0x2902
    BUS_DEVICE_RESET_FUNCTION_OCCURRED = 0x2903
    I_T_NEXUS_LOSS_OCCURRED = 0x2907
    MODE_PARAMETERS_CHANGED = 0x2A01
    RESERVATIONS_PREEMPTED = 0x2A03
    RESERVATIONS_RELEASED = 0x2A04
    REGISTRATIONS_PREEMPTED = 0x2A05
    CAPACITY_DATA_HAS_CHANGED = 0x2A09
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = 0x2F00
    MEDIUM_NOT_PRESENT = 0x3A00
    REPORTED_LUNS_DATA_HAS_CHANGED = 0x3F0E
    INTERNAL_TARGET_FAILURE = 0x4400
    COMMAND_PHASE_ERROR = 0x4A00
    DATA_PHASE_ERROR = 0x4B00
    INITIATOR_DETECTED_ERROR = 0x4800
    OVERLAPPED_COMMANDS_ATTEMPTED = 0x4E00


class CheckCondition(Exception):
    """A command ends with CHECK CONDITION and this sense.

    Args:
        key: the sense key.
        asc: ASC << 8 | ASCQ.
        info: the INFORMATION field (e.g. the offending LBA), or None.
        field: (byte, bit) of an invalid CDB field, for the sense-key specific field pointer.
    """

    def __init__(self, key: SenseKey, asc: int, *, info: int | None = None,
                 field: tuple[int, int | None] | None = None) -> None:
        super().__init__(f"{SenseKey(key).name} {asc:04x}")
        self.key = SenseKey(key)
        self.asc = asc
        self.info = info
        self.field = field

    def sense(self, descriptor: bool = False) -> bytes:
        return build_sense(self.key, self.asc, info=self.info, field=self.field, descriptor=descriptor)


def _field_pointer(field: tuple[int, int | None]) -> bytes:
    byte, bit = field
    flags = 0x80 | 0x40  # SKSV, C/D = CDB
    if bit is not None:
        flags |= 0x08 | (bit & 7)
    return struct.pack(">BH", flags, byte)


def build_sense(key: int, asc: int, *, info: int | None = None,
                field: tuple[int, int | None] | None = None, descriptor: bool = False) -> bytes:
    """Sense data in fixed (0x70) or descriptor (0x72) format (SPC-4 4.5)."""
    if descriptor:
        descs = b""
        if info is not None:
            descs += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, info)
        if field is not None:
            descs += bytes((0x02, 0x06, 0, 0)) + _field_pointer(field) + b"\0"
        return struct.pack(">BBBBBBBB", 0x72, key & 0xF, asc >> 8, asc & 0xFF, 0, 0, 0, len(descs)) + descs
    sense = bytearray(18)
    sense[0] = 0x70 | (0x80 if info is not None else 0)
    sense[2] = key & 0xF
    if info is not None:
        struct.pack_into(">I", sense, 3, info & 0xFFFFFFFF)
    sense[7] = 10
    sense[12] = asc >> 8
    sense[13] = asc & 0xFF
    if field is not None:
        sense[15:18] = _field_pointer(field)
    return bytes(sense)


def parse_sense(sense: bytes) -> tuple[int, int]:
    """(sense key, ASC<<8|ASCQ) from fixed or descriptor sense; (0, 0) when too short."""
    if len(sense) >= 4 and sense[0] & 0x7F in (0x72, 0x73):
        return sense[1] & 0xF, sense[2] << 8 | sense[3]
    if len(sense) >= 14:
        return sense[2] & 0xF, sense[12] << 8 | sense[13]
    return 0, 0
