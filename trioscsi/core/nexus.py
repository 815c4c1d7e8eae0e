"""The vocabulary shared by every transport and the core: I_T nexus, command, response, task attributes."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus: an initiator port and a target port (SAM-5 names, e.g. iSCSI `iqn...,i,0x<ISID>`).

    `initiator_name` is the initiator's device name alone (for ACLs); `relative_port` is the target port's
    relative identifier, which the configuration fixes so several gateways can agree on it.
    """
    initiator_port: str
    target_port: str
    initiator_name: str
    relative_port: int = 1
    transport_id: bytes = b""
    initiator_address: str = ""


class TaskAttribute(IntEnum):
    SIMPLE = 0
    ORDERED = 1
    HEAD_OF_QUEUE = 2
    ACA = 4


@dataclass(slots=True)
class Command:
    """One SCSI command as the core sees it, whatever the transport."""
    nexus: Nexus
    lun: int
    cdb: bytes
    tag: int = 0
    data_out: bytes | memoryview = b""
    xfer: int = 0                  # bytes of data-in the initiator will accept
    attr: int = TaskAttribute.SIMPLE
    admitted: Any = None           # its task-set entry, registered at delivery (see ScsiTarget.admit)


@dataclass(slots=True)
class Response:
    status: int
    sense: bytes = b""
    data: bytes | memoryview = b""
    wanted: int | None = None      # bytes the CDB asked to transfer, when the LU's opcode table says (residuals)


class TmfFunction(IntEnum):
    """Task management functions (SAM-5 7), numbered as iSCSI carries them (RFC 7143 11.5.1)."""
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    """RFC 7143 11.6.1 / SAM-5 service responses, with the iSCSI codes."""
    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    FUNCTION_REJECTED = 255


def decode_lun(raw: int) -> int | None:
    """The LUN number of an 8-byte SAM LUN field, or None for an addressing method we do not map."""
    b0, b1 = (raw >> 56) & 0xFF, (raw >> 48) & 0xFF
    method = b0 >> 6
    if raw & 0x0000FFFFFFFFFFFF:
        return None
    if method == 0 and b0 == 0:
        return b1
    if method == 1:
        return ((b0 & 0x3F) << 8) | b1
    return None


def encode_lun(lun: int) -> bytes:
    """The 8-byte LUN field: peripheral device addressing below 256, flat space above."""
    if lun < 256:
        return struct.pack(">BB6x", 0, lun)
    return struct.pack(">BB6x", 0x40 | (lun >> 8), lun & 0xFF)
