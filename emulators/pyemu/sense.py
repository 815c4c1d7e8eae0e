"""SCSI errors that carry their own wire answer, and the sense data they become.

Strategy: handlers raise ``ScsiError``; one catcher (``spc.ScsiDevice.execute``) turns it into fixed (0x70) or
descriptor (0x72) sense, whichever the control mode page's D_SENSE bit asks for. ASC and ASCQ travel packed as
``asc << 8 | ascq`` (tgt's convention) so one constant names both.
"""
from __future__ import annotations

import struct
from enum import IntEnum

CHECK_CONDITION = 0x02


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
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


class Asc(IntEnum):
    NO_ADDITIONAL_SENSE = 0x0000
    LOGICAL_UNIT_NOT_READY_INIT_REQUIRED = 0x0402
    WRITE_ERROR = 0x0C00
    UNRECOVERED_READ_ERROR = 0x1100
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    MISCOMPARE_DURING_VERIFY = 0x1D00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    LBA_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    WRITE_PROTECTED = 0x2700
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = 0x2707
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    MEDIUM_NOT_PRESENT = 0x3A00
    INTERNAL_TARGET_FAILURE = 0x4400


class ScsiError(Exception):
    """A command failed with CHECK CONDITION; the attributes are its sense data.

    Args:
        sense_key: the SENSE KEY.
        asc: ``asc << 8 | ascq`` (an ``Asc`` member or any int).
        info: the INFORMATION field (an LBA or a byte offset), or None.
        field: ``(byte, bit)`` of the offending field, for the sense-key-specific field pointer; ``bit`` may be
            None. It points into the CDB for INVALID FIELD IN CDB, into the parameter list otherwise.
    """

    def __init__(self, sense_key: int, asc: int, info: int | None = None,
                 field: tuple[int, int | None] | None = None) -> None:
        super().__init__(f"sense key {sense_key:x}, asc/ascq {asc >> 8:02x}/{asc & 0xFF:02x}")
        self.sense_key = sense_key
        self.asc = asc
        self.info = info
        self.field = field

    def sense(self, descriptor: bool = False) -> bytes:
        """The sense data, descriptor format when ``descriptor`` (D_SENSE) is set."""
        return build_sense(self.sense_key, self.asc, self.info, self._sks(), descriptor)

    def _sks(self) -> bytes | None:
        if self.field is None:
            return None
        byte, bit = self.field
        cd = 0x40 if self.asc == Asc.INVALID_FIELD_IN_CDB else 0
        bits = 0 if bit is None else 0x08 | (bit & 7)
        return struct.pack(">BH", 0x80 | cd | bits, byte & 0xFFFF)


def build_sense(key: int, asc: int, info: int | None = None, sks: bytes | None = None,
                descriptor: bool = False) -> bytes:
    """Fixed (SPC-4 4.5.3) or descriptor (4.5.2) sense data, current error."""
    if descriptor:
        descs = b""
        if info is not None:
            descs += struct.pack(">BBBxQ", 0x00, 0x0A, 0x80, info & 0xFFFFFFFFFFFFFFFF)
        if sks is not None:
            descs += b"\x02\x06\x00\x00" + sks + b"\x00"
        return struct.pack(">BBBBxxxB", 0x72, key, asc >> 8, asc & 0xFF, len(descs)) + descs
    valid = info is not None and 0 <= info <= 0xFFFFFFFF   # INFORMATION is 4 bytes here; else VALID=0
    return struct.pack(">BxBIBIBBx3s", 0x70 | (0x80 if valid else 0), key, info if valid else 0, 10, 0,
                       asc >> 8, asc & 0xFF, sks or b"\x00\x00\x00")


def internal_failure() -> ScsiError:
    """HARDWARE ERROR, INTERNAL TARGET FAILURE: what an unexpected exception in a handler becomes."""
    return ScsiError(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)


def invalid_opcode() -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE, field=(0, 7))


def invalid_field(byte: int, bit: int | None = None) -> ScsiError:
    """INVALID FIELD IN CDB pointing at ``byte``/``bit`` of the CDB."""
    return ScsiError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=(byte, bit))


def invalid_param(byte: int, bit: int | None = None) -> ScsiError:
    """INVALID FIELD IN PARAMETER LIST pointing at ``byte``/``bit`` of the data-out buffer."""
    return ScsiError(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=(byte, bit))


def param_length_error() -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


def lba_out_of_range(lba: int | None = None) -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, info=lba)


def write_protected() -> ScsiError:
    return ScsiError(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


def miscompare(offset: int) -> ScsiError:
    """MISCOMPARE DURING VERIFY OPERATION; INFORMATION = offset of the first differing byte."""
    return ScsiError(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, info=offset)
