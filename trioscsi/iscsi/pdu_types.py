"""The iSCSI PDU vocabulary: opcodes, wire codes, errors and one frozen dataclass per opcode (RFC 7143 §11).

Strategy: these classes are plain records. They validate nothing, so building one costs only the dataclass
``__init__``; the codec in ``pdu.py`` is the single place that knows byte offsets. Every field has a default so
tests and senders build PDUs by keyword, and ``data`` (the data segment, without padding) is always last.

Field conventions: ``lun`` is the raw 8-byte LUN field as an int; tags and sequence numbers are ints mod 2**32;
tag fields that RFC 7143 fills with 0xFFFFFFFF when unused default to `RESERVED_TAG`. Bits that RFC 7143
fixes (the F bit of single-PDU requests, the I bit of a Login Request) are not fields: the encoder sets them.

Import these names from ``trioscsi.iscsi.pdu``; this module exists only to keep each file short.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeAlias

# The core's vocabulary: iSCSI carries SAM task management functions and service responses with these codes.
from ..core.nexus import TmfFunction, TmfResponse  # noqa: F401 (re-exported by pdu)

RESERVED_TAG = 0xFFFFFFFF
"""The value of an ITT/TTT that refers to no task (RFC 7143 §11.18, §11.19)."""


class Opcode(IntEnum):
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class RejectReason(IntEnum):
    """Reject PDU reason codes (RFC 7143 §11.17.1)."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class TaskAttribute(IntEnum):
    """ScsiCommand.attr (RFC 7143 §11.3.1)."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class LogoutReason(IntEnum):
    """LogoutRequest.reason (RFC 7143 §11.14.1)."""

    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


class LogoutResponseCode(IntEnum):
    """LogoutResponse.response (RFC 7143 §11.15.1)."""

    SUCCESS = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class SnackType(IntEnum):
    """SnackRequest.type (RFC 7143 §11.16.1)."""

    DATA_R2T = 0
    STATUS = 1
    DATA_ACK = 2
    R_DATA = 3


class AsyncEvent(IntEnum):
    """AsyncMessage.async_event (RFC 7143 §11.9.1)."""

    SCSI_EVENT = 0
    LOGOUT_REQUEST = 1
    CONNECTION_DROP = 2
    SESSION_DROP = 3
    NEGOTIATION_REQUEST = 4
    TASK_TERMINATION = 5
    VENDOR_SPECIFIC = 255


class PduError(Exception):
    """A PDU that is answered with a Reject; the connection survives.

    ``header`` is the 48-byte BHS of the offending PDU, which the Reject carries as its data segment.
    """

    def __init__(self, reason: RejectReason, message: str, header: bytes = b"") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.header = header

    def __repr__(self) -> str:
        return f"PduError({self.reason!r}, {self.message!r})"


class FramingError(Exception):
    """The byte stream cannot be resynchronised: the connection must be dropped."""


_Data: TypeAlias = "bytes | memoryview"
_T = RESERVED_TAG


# --- initiator to target -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NopOut:
    opcode: ClassVar[Opcode] = Opcode.NOP_OUT
    immediate: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = _T
    cmdsn: int = 0
    expstatsn: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class ScsiCommand:
    """``cdb`` is the 16-byte CDB field plus the Extended CDB AHS; shorter CDBs are zero-padded on the wire."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_COMMAND
    immediate: bool = False
    final: bool = True
    read: bool = False
    write: bool = False
    attr: int = TaskAttribute.SIMPLE
    lun: int = 0
    itt: int = 0
    edtl: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    cdb: bytes = bytes(16)
    bidi_read_length: int | None = None
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class TaskMgmtRequest:
    opcode: ClassVar[Opcode] = Opcode.TASK_MGMT_REQUEST
    immediate: bool = False
    function: int = 0
    lun: int = 0
    itt: int = 0
    rtt: int = _T
    cmdsn: int = 0
    expstatsn: int = 0
    refcmdsn: int = 0
    expdatasn: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class LoginRequest:
    opcode: ClassVar[Opcode] = Opcode.LOGIN_REQUEST
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_min: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class TextRequest:
    opcode: ClassVar[Opcode] = Opcode.TEXT_REQUEST
    immediate: bool = False
    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = _T
    cmdsn: int = 0
    expstatsn: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class DataOut:
    opcode: ClassVar[Opcode] = Opcode.DATA_OUT
    final: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = _T
    expstatsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    opcode: ClassVar[Opcode] = Opcode.LOGOUT_REQUEST
    immediate: bool = False
    reason: int = LogoutReason.CLOSE_SESSION
    itt: int = 0
    cid: int = 0
    cmdsn: int = 0
    expstatsn: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class SnackRequest:
    opcode: ClassVar[Opcode] = Opcode.SNACK_REQUEST
    type: int = SnackType.DATA_R2T
    lun: int = 0
    itt: int = _T
    ttt: int = _T
    expstatsn: int = 0
    begrun: int = 0
    runlength: int = 0
    data: _Data = b""


# --- target to initiator -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NopIn:
    opcode: ClassVar[Opcode] = Opcode.NOP_IN
    lun: int = 0
    itt: int = _T
    ttt: int = _T
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class ScsiResponse:
    """``data`` is `sense_segment` (SenseLength + sense) or iSCSI response data."""

    opcode: ClassVar[Opcode] = Opcode.SCSI_RESPONSE
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    overflow: bool = False
    underflow: bool = False
    response: int = 0
    status: int = 0
    itt: int = 0
    snack_tag: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    expdatasn: int = 0
    bidi_residual: int = 0
    residual: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class TaskMgmtResponse:
    opcode: ClassVar[Opcode] = Opcode.TASK_MGMT_RESPONSE
    response: int = TmfResponse.FUNCTION_COMPLETE
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class LoginResponse:
    opcode: ClassVar[Opcode] = Opcode.LOGIN_RESPONSE
    transit: bool = False
    cont: bool = False
    csg: int = 0
    nsg: int = 0
    version_max: int = 0
    version_active: int = 0
    isid: bytes = bytes(6)
    tsih: int = 0
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    status_class: int = 0
    status_detail: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class TextResponse:
    opcode: ClassVar[Opcode] = Opcode.TEXT_RESPONSE
    final: bool = True
    cont: bool = False
    lun: int = 0
    itt: int = 0
    ttt: int = _T
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class DataIn:
    """``status_present`` is the S bit: ``status`` and ``statsn`` are meaningful only when it is set."""

    opcode: ClassVar[Opcode] = Opcode.DATA_IN
    final: bool = False
    ack: bool = False
    overflow: bool = False
    underflow: bool = False
    status_present: bool = False
    status: int = 0
    lun: int = 0
    itt: int = 0
    ttt: int = _T
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn: int = 0
    buffer_offset: int = 0
    residual: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class LogoutResponse:
    opcode: ClassVar[Opcode] = Opcode.LOGOUT_RESPONSE
    response: int = LogoutResponseCode.SUCCESS
    itt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    time2wait: int = 0
    time2retain: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class R2T:
    opcode: ClassVar[Opcode] = Opcode.R2T
    lun: int = 0
    itt: int = 0
    ttt: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    r2tsn: int = 0
    buffer_offset: int = 0
    desired_length: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class AsyncMessage:
    """The ITT of an Async Message is always 0xFFFFFFFF, so it is not a field."""

    opcode: ClassVar[Opcode] = Opcode.ASYNC_MESSAGE
    lun: int = 0
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    async_event: int = 0
    async_vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    data: _Data = b""


@dataclass(frozen=True, slots=True)
class Reject:
    """``data`` is the rejected PDU's 48-byte BHS; the ITT is always 0xFFFFFFFF, so it is not a field."""

    opcode: ClassVar[Opcode] = Opcode.REJECT
    reason: int = RejectReason.PROTOCOL_ERROR
    statsn: int = 0
    expcmdsn: int = 0
    maxcmdsn: int = 0
    datasn_r2tsn: int = 0
    data: _Data = b""


Pdu: TypeAlias = (
    NopOut
    | ScsiCommand
    | TaskMgmtRequest
    | LoginRequest
    | TextRequest
    | DataOut
    | LogoutRequest
    | SnackRequest
    | NopIn
    | ScsiResponse
    | TaskMgmtResponse
    | LoginResponse
    | TextResponse
    | DataIn
    | LogoutResponse
    | R2T
    | AsyncMessage
    | Reject
)

INITIATOR_PDUS: tuple[type[Pdu], ...] = (
    NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut, LogoutRequest, SnackRequest,
)  # fmt: skip
"""The PDU classes an initiator sends (a target receives)."""

TARGET_PDUS: tuple[type[Pdu], ...] = (
    NopIn, ScsiResponse, TaskMgmtResponse, LoginResponse, TextResponse, DataIn, LogoutResponse, R2T,
    AsyncMessage, Reject,
)  # fmt: skip
"""The PDU classes a target sends (an initiator receives)."""
