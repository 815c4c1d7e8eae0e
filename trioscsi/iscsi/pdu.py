"""Sans-I/O iSCSI PDU codec (RFC 7143 §11): 48-byte BHS + AHS <-> frozen dataclasses.

Strategy: one precompiled `struct.Struct` per opcode covers the whole 48-byte BHS, so decoding a PDU is one
``unpack_from`` plus the dataclass constructor, and encoding is one ``pack``. Bytes 4..7 (TotalAHSLength and
DataSegmentLength) are packed as a single 32-bit word. Framing, digests and segment limits live in
``framing.py``; this module sees a complete header and data segment.

Invariants:
  * `decode` never keeps a reference to its ``bhs``/``ahs`` arguments (it copies the few byte fields), so a
    caller may reuse or release the buffer they came from. ``data`` is stored as given.
  * Reserved fields are ignored on receipt and zero on send (RFC 7143 §11.2). Decoding checks structure only;
    the meaning of codes (TMF function, logout reason, login stages...) is checked by the layers that answer them.
  * The only opcode with an AHS is the SCSI Command (Extended CDB, type 1; Bidirectional Read Expected Data
    Transfer Length, type 2). An AHS of a reserved type there is a protocol error; vendor types (60..63) are
    skipped. AHS on other opcodes is ignored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from struct import Struct
from typing import Any, TypeAlias

from .pdu_types import (
    INITIATOR_PDUS,
    R2T,
    RESERVED_TAG,
    TARGET_PDUS,
    AsyncEvent,
    AsyncMessage,
    DataIn,
    DataOut,
    FramingError,
    LoginRequest,
    LoginResponse,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    Opcode,
    Pdu,
    PduError,
    Reject,
    RejectReason,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    SnackType,
    TaskAttribute,
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    TmfFunction,
    TmfResponse,
)

__all__ = [
    "BHS_LENGTH",
    "INITIATOR_PDUS",
    "KNOWN_OPCODES",
    "MAX_DATA_SEGMENT_LENGTH",
    "R2T",
    "RESERVED_TAG",
    "TARGET_PDUS",
    "AsyncEvent",
    "AsyncMessage",
    "DataIn",
    "DataOut",
    "FramingError",
    "LoginRequest",
    "LoginResponse",
    "LogoutReason",
    "LogoutRequest",
    "LogoutResponse",
    "LogoutResponseCode",
    "NopIn",
    "NopOut",
    "Opcode",
    "Pdu",
    "PduError",
    "Reject",
    "RejectReason",
    "ScsiCommand",
    "ScsiResponse",
    "SnackRequest",
    "SnackType",
    "TaskAttribute",
    "TaskMgmtRequest",
    "TaskMgmtResponse",
    "TextRequest",
    "TextResponse",
    "TmfFunction",
    "TmfResponse",
    "data_length",
    "decode",
    "encode_header",
    "sense_from_segment",
    "sense_segment",
]

BHS_LENGTH = 48
MAX_DATA_SEGMENT_LENGTH = 0xFFFFFF  # DataSegmentLength is a 24-bit field
MAX_AHS_LENGTH = 255 * 4  # TotalAHSLength is a count of 4-byte words in one byte

Buf: TypeAlias = "bytes | bytearray | memoryview"
Data: TypeAlias = "bytes | memoryview"

# Byte 0: bit 6 is the I (immediate) bit, bits 0..5 the opcode. Byte 1 carries the F bit (0x80) and flags.
_I = 0x40
_F = 0x80
_C = 0x40  # Continue (Login, Text)

# One Struct per BHS layout; the comments name the unpacked fields in order.
_NOP_OUT = Struct(">BB2xIQIIII16x")  # op flags ahsdsl lun itt ttt cmdsn expstatsn  (also Text Request)
_SCSI_CMD = Struct(">BB2xIQIIII16s")  # op flags ahsdsl lun itt edtl cmdsn expstatsn cdb
_TMF_REQ = Struct(">BB2xIQIIIIII8x")  # op flags ahsdsl lun itt rtt cmdsn expstatsn refcmdsn expdatasn
_LOGIN_REQ = Struct(">BBBBI6sHIH2xII16x")  # op flags vmax vmin ahsdsl isid tsih itt cid cmdsn expstatsn
_DATA_OUT = Struct(">BB2xIQII4xI4xII4x")  # op flags ahsdsl lun itt ttt expstatsn datasn offset
_LOGOUT_REQ = Struct(">BB2xI8xIH2xII16x")  # op flags ahsdsl itt cid cmdsn expstatsn
_SNACK = Struct(">BB2xIQII4xI8xII")  # op flags ahsdsl lun itt ttt expstatsn begrun runlength
_NOP_IN = Struct(">BB2xIQIIIII12x")  # op flags ahsdsl lun itt ttt statsn expcmdsn maxcmdsn  (also Text Response)
_SCSI_RSP = Struct(">BBBBI8xIIIIIIII")  # op flags resp status ahsdsl itt snack statsn exp max expdatasn bidi res
_TMF_RSP = Struct(">BBB1xI8xI4xIII12x")  # op flags response ahsdsl itt statsn expcmdsn maxcmdsn
_LOGIN_RSP = Struct(">BBBBI6sHI4xIIIBB10x")  # op flags vmax vact ahsdsl isid tsih itt statsn exp max class detail
_DATA_IN = Struct(">BB1xBIQIIIIIIII")  # op flags status ahsdsl lun itt ttt statsn exp max datasn offset residual
_LOGOUT_RSP = Struct(">BBB1xI8xI4xIII4xHH4x")  # op flags response ahsdsl itt statsn exp max time2wait time2retain
_R2T = Struct(">BB2xIQIIIIIIII")  # op flags ahsdsl lun itt ttt statsn exp max r2tsn offset desired
_ASYNC = Struct(">BB2xIQI4xIIIBBHHH4x")  # op flags ahsdsl lun itt statsn exp max event vcode p1 p2 p3
_REJECT = Struct(">BBB1xI8xI4xIIII8x")  # op flags reason ahsdsl itt statsn exp max datasn_r2tsn
_AHS_HEAD = Struct(">HB")  # AHSLength AHSType
_AHS_BIDI = Struct(">HBxI")  # 5, 2, bidi read length

for _s in (_NOP_OUT, _SCSI_CMD, _TMF_REQ, _LOGIN_REQ, _DATA_OUT, _LOGOUT_REQ, _SNACK, _NOP_IN, _SCSI_RSP,
           _TMF_RSP, _LOGIN_RSP, _DATA_IN, _LOGOUT_RSP, _R2T, _ASYNC, _REJECT):  # fmt: skip
    assert _s.size == BHS_LENGTH, _s.format

_AHS_EXTENDED_CDB = 1
_AHS_BIDI_READ_LENGTH = 2
_AHS_VENDOR_FIRST = 60


def sense_segment(sense: bytes) -> bytes:
    """The data segment of a SCSI Response carrying sense data: 2-byte SenseLength, then the sense (§11.4.7)."""
    return len(sense).to_bytes(2, "big") + sense


def sense_from_segment(data: Buf) -> bytes:
    """The sense data in a SCSI Response's data segment (b"" if none); the inverse of `sense_segment`."""
    if len(data) < 2:
        return b""
    n = int.from_bytes(data[:2], "big")
    return bytes(data[2 : 2 + n])


def data_length(data: Data | bytearray) -> int:
    """Byte length of a data segment (a memoryview's ``len`` counts items, not bytes)."""
    return data.nbytes if isinstance(data, memoryview) else len(data)


# --- decoding ------------------------------------------------------------------------------------------------


def decode(bhs: Buf, ahs: Buf = b"", data: Data = b"") -> Pdu:
    """Decode one PDU of either direction.

    Args:
      bhs: at least 48 bytes; only the first 48 are read.
      ahs: the Additional Header Segments (TotalAHSLength * 4 bytes), without the header digest.
      data: the data segment without padding; stored in the PDU as is.

    Raises:
      PduError: unknown opcode (COMMAND_NOT_SUPPORTED) or a malformed AHS (PROTOCOL_ERROR).
      ValueError: ``bhs`` is shorter than 48 bytes (a caller bug, not a peer's).
    """
    if len(bhs) < BHS_LENGTH:
        raise ValueError(f"a BHS is {BHS_LENGTH} bytes, got {len(bhs)}")
    decoder = _DECODERS.get(bhs[0] & 0x3F)
    if decoder is None:
        raise PduError(
            RejectReason.COMMAND_NOT_SUPPORTED, f"unknown opcode 0x{bhs[0] & 0x3F:02x}", bytes(bhs[:BHS_LENGTH])
        )
    return decoder(bhs, ahs, data)


def _dec_nop_out(b: Buf, ahs: Buf, data: Data) -> NopOut:
    op, _fl, _, lun, itt, ttt, cmdsn, expstatsn = _NOP_OUT.unpack_from(b)
    return NopOut(immediate=bool(op & _I), lun=lun, itt=itt, ttt=ttt, cmdsn=cmdsn, expstatsn=expstatsn, data=data)


def _dec_scsi_command(b: Buf, ahs: Buf, data: Data) -> ScsiCommand:
    op, fl, _, lun, itt, edtl, cmdsn, expstatsn, cdb = _SCSI_CMD.unpack_from(b)
    bidi = None
    if ahs:
        ext, bidi = _parse_command_ahs(b, ahs)
        cdb += ext
    return ScsiCommand(
        immediate=bool(op & _I), final=bool(fl & 0x80), read=bool(fl & 0x40), write=bool(fl & 0x20),
        attr=fl & 0x07, lun=lun, itt=itt, edtl=edtl, cmdsn=cmdsn, expstatsn=expstatsn, cdb=cdb,
        bidi_read_length=bidi, data=data,
    )  # fmt: skip


def _parse_command_ahs(bhs: Buf, ahs: Buf) -> tuple[bytes, int | None]:
    """Walk a SCSI Command's AHS list (§11.2.2): returns (extended CDB bytes, bidi read length or None)."""
    ext, bidi, off, end = b"", None, 0, len(ahs)
    while off < end:
        if end - off < 4:
            raise _ahs_error(bhs, "truncated AHS")
        length, kind = _AHS_HEAD.unpack_from(ahs, off)
        stop = off + 3 + length  # AHSLength counts the bytes after AHSType, excluding padding
        if stop > end:
            raise _ahs_error(bhs, f"AHS of length {length} overruns TotalAHSLength")
        if kind == _AHS_EXTENDED_CDB:
            if length < 2:
                raise _ahs_error(bhs, "empty Extended CDB AHS")
            ext = bytes(ahs[off + 4 : stop])
        elif kind == _AHS_BIDI_READ_LENGTH:
            if length != 5:
                raise _ahs_error(bhs, f"Bidirectional Read Length AHS of length {length}, expected 5")
            bidi = int.from_bytes(ahs[off + 4 : stop], "big")
        elif kind < _AHS_VENDOR_FIRST:
            raise _ahs_error(bhs, f"reserved AHS type {kind}")
        off = (stop + 3) & ~3
    return ext, bidi


def _ahs_error(bhs: Buf, message: str) -> PduError:
    return PduError(RejectReason.PROTOCOL_ERROR, message, bytes(bhs[:BHS_LENGTH]))


def _dec_tmf_request(b: Buf, ahs: Buf, data: Data) -> TaskMgmtRequest:
    op, fl, _, lun, itt, rtt, cmdsn, expstatsn, refcmdsn, expdatasn = _TMF_REQ.unpack_from(b)
    return TaskMgmtRequest(
        immediate=bool(op & _I), function=fl & 0x7F, lun=lun, itt=itt, rtt=rtt, cmdsn=cmdsn,
        expstatsn=expstatsn, refcmdsn=refcmdsn, expdatasn=expdatasn, data=data,
    )  # fmt: skip


def _dec_login_request(b: Buf, ahs: Buf, data: Data) -> LoginRequest:
    _op, fl, vmax, vmin, _, isid, tsih, itt, cid, cmdsn, expstatsn = _LOGIN_REQ.unpack_from(b)
    return LoginRequest(
        transit=bool(fl & _F), cont=bool(fl & _C), csg=(fl >> 2) & 3, nsg=fl & 3, version_max=vmax,
        version_min=vmin, isid=isid, tsih=tsih, itt=itt, cid=cid, cmdsn=cmdsn, expstatsn=expstatsn, data=data,
    )  # fmt: skip


def _dec_text_request(b: Buf, ahs: Buf, data: Data) -> TextRequest:
    op, fl, _, lun, itt, ttt, cmdsn, expstatsn = _NOP_OUT.unpack_from(b)
    return TextRequest(
        immediate=bool(op & _I), final=bool(fl & _F), cont=bool(fl & _C), lun=lun, itt=itt, ttt=ttt,
        cmdsn=cmdsn, expstatsn=expstatsn, data=data,
    )  # fmt: skip


def _dec_data_out(b: Buf, ahs: Buf, data: Data) -> DataOut:
    _op, fl, _, lun, itt, ttt, expstatsn, datasn, offset = _DATA_OUT.unpack_from(b)
    return DataOut(
        final=bool(fl & _F), lun=lun, itt=itt, ttt=ttt, expstatsn=expstatsn, datasn=datasn,
        buffer_offset=offset, data=data,
    )  # fmt: skip


def _dec_logout_request(b: Buf, ahs: Buf, data: Data) -> LogoutRequest:
    op, fl, _, itt, cid, cmdsn, expstatsn = _LOGOUT_REQ.unpack_from(b)
    return LogoutRequest(
        immediate=bool(op & _I), reason=fl & 0x7F, itt=itt, cid=cid, cmdsn=cmdsn, expstatsn=expstatsn, data=data
    )


def _dec_snack(b: Buf, ahs: Buf, data: Data) -> SnackRequest:
    _op, fl, _, lun, itt, ttt, expstatsn, begrun, runlength = _SNACK.unpack_from(b)
    return SnackRequest(
        type=fl & 0x0F, lun=lun, itt=itt, ttt=ttt, expstatsn=expstatsn, begrun=begrun, runlength=runlength,
        data=data,
    )  # fmt: skip


def _dec_nop_in(b: Buf, ahs: Buf, data: Data) -> NopIn:
    _op, _fl, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn = _NOP_IN.unpack_from(b)
    return NopIn(lun=lun, itt=itt, ttt=ttt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, data=data)


def _dec_scsi_response(b: Buf, ahs: Buf, data: Data) -> ScsiResponse:
    _op, fl, resp, status, _, itt, snack, statsn, exp, mx, expdatasn, bidi, res = _SCSI_RSP.unpack_from(b)
    return ScsiResponse(
        bidi_overflow=bool(fl & 0x10), bidi_underflow=bool(fl & 0x08), overflow=bool(fl & 0x04),
        underflow=bool(fl & 0x02), response=resp, status=status, itt=itt, snack_tag=snack, statsn=statsn,
        expcmdsn=exp, maxcmdsn=mx, expdatasn=expdatasn, bidi_residual=bidi, residual=res, data=data,
    )  # fmt: skip


def _dec_tmf_response(b: Buf, ahs: Buf, data: Data) -> TaskMgmtResponse:
    _op, _fl, response, _, itt, statsn, expcmdsn, maxcmdsn = _TMF_RSP.unpack_from(b)
    return TaskMgmtResponse(
        response=response, itt=itt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, data=data
    )


def _dec_login_response(b: Buf, ahs: Buf, data: Data) -> LoginResponse:
    _op, fl, vmax, vact, _, isid, tsih, itt, statsn, exp, mx, sclass, sdetail = _LOGIN_RSP.unpack_from(b)
    return LoginResponse(
        transit=bool(fl & _F), cont=bool(fl & _C), csg=(fl >> 2) & 3, nsg=fl & 3, version_max=vmax,
        version_active=vact, isid=isid, tsih=tsih, itt=itt, statsn=statsn, expcmdsn=exp, maxcmdsn=mx,
        status_class=sclass, status_detail=sdetail, data=data,
    )  # fmt: skip


def _dec_text_response(b: Buf, ahs: Buf, data: Data) -> TextResponse:
    _op, fl, _, lun, itt, ttt, statsn, expcmdsn, maxcmdsn = _NOP_IN.unpack_from(b)
    return TextResponse(
        final=bool(fl & _F), cont=bool(fl & _C), lun=lun, itt=itt, ttt=ttt, statsn=statsn, expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn, data=data,
    )  # fmt: skip


def _dec_data_in(b: Buf, ahs: Buf, data: Data) -> DataIn:
    _op, fl, status, _, lun, itt, ttt, statsn, exp, mx, datasn, offset, residual = _DATA_IN.unpack_from(b)
    return DataIn(
        final=bool(fl & 0x80), ack=bool(fl & 0x40), overflow=bool(fl & 0x04), underflow=bool(fl & 0x02),
        status_present=bool(fl & 0x01), status=status, lun=lun, itt=itt, ttt=ttt, statsn=statsn, expcmdsn=exp,
        maxcmdsn=mx, datasn=datasn, buffer_offset=offset, residual=residual, data=data,
    )  # fmt: skip


def _dec_logout_response(b: Buf, ahs: Buf, data: Data) -> LogoutResponse:
    _op, _fl, response, _, itt, statsn, exp, mx, t2w, t2r = _LOGOUT_RSP.unpack_from(b)
    return LogoutResponse(
        response=response, itt=itt, statsn=statsn, expcmdsn=exp, maxcmdsn=mx, time2wait=t2w, time2retain=t2r,
        data=data,
    )  # fmt: skip


def _dec_r2t(b: Buf, ahs: Buf, data: Data) -> R2T:
    _op, _fl, _, lun, itt, ttt, statsn, exp, mx, r2tsn, offset, desired = _R2T.unpack_from(b)
    return R2T(
        lun=lun, itt=itt, ttt=ttt, statsn=statsn, expcmdsn=exp, maxcmdsn=mx, r2tsn=r2tsn, buffer_offset=offset,
        desired_length=desired, data=data,
    )  # fmt: skip


def _dec_async(b: Buf, ahs: Buf, data: Data) -> AsyncMessage:
    _op, _fl, _, lun, _itt, statsn, exp, mx, event, vcode, p1, p2, p3 = _ASYNC.unpack_from(b)
    return AsyncMessage(
        lun=lun, statsn=statsn, expcmdsn=exp, maxcmdsn=mx, async_event=event, async_vcode=vcode, parameter1=p1,
        parameter2=p2, parameter3=p3, data=data,
    )  # fmt: skip


def _dec_reject(b: Buf, ahs: Buf, data: Data) -> Reject:
    _op, _fl, reason, _, _itt, statsn, exp, mx, datasn = _REJECT.unpack_from(b)
    return Reject(reason=reason, statsn=statsn, expcmdsn=exp, maxcmdsn=mx, datasn_r2tsn=datasn, data=data)


_DECODERS: dict[int, Callable[[Buf, Buf, Data], Pdu]] = {
    Opcode.NOP_OUT: _dec_nop_out,
    Opcode.SCSI_COMMAND: _dec_scsi_command,
    Opcode.TASK_MGMT_REQUEST: _dec_tmf_request,
    Opcode.LOGIN_REQUEST: _dec_login_request,
    Opcode.TEXT_REQUEST: _dec_text_request,
    Opcode.DATA_OUT: _dec_data_out,
    Opcode.LOGOUT_REQUEST: _dec_logout_request,
    Opcode.SNACK_REQUEST: _dec_snack,
    Opcode.NOP_IN: _dec_nop_in,
    Opcode.SCSI_RESPONSE: _dec_scsi_response,
    Opcode.TASK_MGMT_RESPONSE: _dec_tmf_response,
    Opcode.LOGIN_RESPONSE: _dec_login_response,
    Opcode.TEXT_RESPONSE: _dec_text_response,
    Opcode.DATA_IN: _dec_data_in,
    Opcode.LOGOUT_RESPONSE: _dec_logout_response,
    Opcode.R2T: _dec_r2t,
    Opcode.ASYNC_MESSAGE: _dec_async,
    Opcode.REJECT: _dec_reject,
}
_DECODERS = {int(k): v for k, v in _DECODERS.items()}  # plain-int keys: the lookup key is bhs[0] & 0x3F

KNOWN_OPCODES = frozenset(_DECODERS)
"""Opcodes `decode` understands; framing uses it to tell an unsupported PDU from garbage."""


# --- encoding ------------------------------------------------------------------------------------------------


def encode_header(pdu: Pdu) -> bytes:
    """The 48-byte BHS followed by the AHS (padded to 4), with TotalAHSLength and DataSegmentLength filled in.

    Raises:
      ValueError: a field does not fit its wire width, or the data segment is longer than 2**24 - 1 bytes.
    """
    dsl = data_length(pdu.data)
    if dsl > MAX_DATA_SEGMENT_LENGTH:
        raise ValueError(f"data segment of {dsl} bytes exceeds the 24-bit DataSegmentLength")
    try:
        return _ENCODERS[type(pdu)](pdu, dsl)
    except struct.error as e:
        raise ValueError(f"{type(pdu).__name__}: {e}") from None


def _bits(value: int, width: int, name: str) -> int:
    """Check a sub-byte field so a bad value cannot spill into its neighbours' bits."""
    if not 0 <= value < 1 << width:
        raise ValueError(f"{name}={value} does not fit in {width} bits")
    return value


def _enc_nop_out(p: NopOut, dsl: int) -> bytes:
    op = Opcode.NOP_OUT | (_I if p.immediate else 0)
    return _NOP_OUT.pack(op, _F, dsl, p.lun, p.itt, p.ttt, p.cmdsn, p.expstatsn)


def _enc_scsi_command(p: ScsiCommand, dsl: int) -> bytes:
    fl = (_F if p.final else 0) | (0x40 if p.read else 0) | (0x20 if p.write else 0) | _bits(p.attr, 3, "attr")
    op = Opcode.SCSI_COMMAND | (_I if p.immediate else 0)
    cdb = bytes(p.cdb)
    ahs = b""
    if len(cdb) > 16:
        ext = cdb[16:]
        ahs = _AHS_HEAD.pack(len(ext) + 1, _AHS_EXTENDED_CDB) + b"\0" + ext + b"\0" * (-(len(ext) + 4) % 4)
    if p.bidi_read_length is not None:
        ahs += _AHS_BIDI.pack(5, _AHS_BIDI_READ_LENGTH, p.bidi_read_length)
    if len(ahs) > MAX_AHS_LENGTH:
        raise ValueError(f"CDB of {len(cdb)} bytes does not fit in the AHS")
    ahsdsl = (len(ahs) >> 2) << 24 | dsl
    return _SCSI_CMD.pack(op, fl, ahsdsl, p.lun, p.itt, p.edtl, p.cmdsn, p.expstatsn, cdb[:16]) + ahs


def _enc_tmf_request(p: TaskMgmtRequest, dsl: int) -> bytes:
    op = Opcode.TASK_MGMT_REQUEST | (_I if p.immediate else 0)
    fl = _F | _bits(p.function, 7, "function")
    return _TMF_REQ.pack(op, fl, dsl, p.lun, p.itt, p.rtt, p.cmdsn, p.expstatsn, p.refcmdsn, p.expdatasn)


def _login_flags(transit: bool, cont: bool, csg: int, nsg: int) -> int:
    return (_F if transit else 0) | (_C if cont else 0) | _bits(csg, 2, "csg") << 2 | _bits(nsg, 2, "nsg")


def _enc_login_request(p: LoginRequest, dsl: int) -> bytes:
    if len(p.isid) != 6:
        raise ValueError(f"isid must be 6 bytes, got {len(p.isid)}")
    fl = _login_flags(p.transit, p.cont, p.csg, p.nsg)
    op = Opcode.LOGIN_REQUEST | _I  # a Login Request is always immediate (§11.12)
    return _LOGIN_REQ.pack(
        op, fl, p.version_max, p.version_min, dsl, p.isid, p.tsih, p.itt, p.cid, p.cmdsn, p.expstatsn
    )


def _enc_text_request(p: TextRequest, dsl: int) -> bytes:
    op = Opcode.TEXT_REQUEST | (_I if p.immediate else 0)
    fl = (_F if p.final else 0) | (_C if p.cont else 0)
    return _NOP_OUT.pack(op, fl, dsl, p.lun, p.itt, p.ttt, p.cmdsn, p.expstatsn)


def _enc_data_out(p: DataOut, dsl: int) -> bytes:
    fl = _F if p.final else 0
    return _DATA_OUT.pack(
        Opcode.DATA_OUT, fl, dsl, p.lun, p.itt, p.ttt, p.expstatsn, p.datasn, p.buffer_offset
    )


def _enc_logout_request(p: LogoutRequest, dsl: int) -> bytes:
    op = Opcode.LOGOUT_REQUEST | (_I if p.immediate else 0)
    fl = _F | _bits(p.reason, 7, "reason")
    return _LOGOUT_REQ.pack(op, fl, dsl, p.itt, p.cid, p.cmdsn, p.expstatsn)


def _enc_snack(p: SnackRequest, dsl: int) -> bytes:
    fl = _F | _bits(p.type, 4, "type")
    return _SNACK.pack(
        Opcode.SNACK_REQUEST, fl, dsl, p.lun, p.itt, p.ttt, p.expstatsn, p.begrun, p.runlength
    )


def _enc_nop_in(p: NopIn, dsl: int) -> bytes:
    return _NOP_IN.pack(Opcode.NOP_IN, _F, dsl, p.lun, p.itt, p.ttt, p.statsn, p.expcmdsn, p.maxcmdsn)


def _enc_scsi_response(p: ScsiResponse, dsl: int) -> bytes:
    fl = (
        _F
        | (0x10 if p.bidi_overflow else 0)
        | (0x08 if p.bidi_underflow else 0)
        | (0x04 if p.overflow else 0)
        | (0x02 if p.underflow else 0)
    )
    return _SCSI_RSP.pack(
        Opcode.SCSI_RESPONSE, fl, p.response, p.status, dsl, p.itt, p.snack_tag, p.statsn, p.expcmdsn,
        p.maxcmdsn, p.expdatasn, p.bidi_residual, p.residual,
    )  # fmt: skip


def _enc_tmf_response(p: TaskMgmtResponse, dsl: int) -> bytes:
    return _TMF_RSP.pack(
        Opcode.TASK_MGMT_RESPONSE, _F, p.response, dsl, p.itt, p.statsn, p.expcmdsn, p.maxcmdsn
    )


def _enc_login_response(p: LoginResponse, dsl: int) -> bytes:
    if len(p.isid) != 6:
        raise ValueError(f"isid must be 6 bytes, got {len(p.isid)}")
    fl = _login_flags(p.transit, p.cont, p.csg, p.nsg)
    return _LOGIN_RSP.pack(
        Opcode.LOGIN_RESPONSE, fl, p.version_max, p.version_active, dsl, p.isid, p.tsih, p.itt, p.statsn,
        p.expcmdsn, p.maxcmdsn, p.status_class, p.status_detail,
    )  # fmt: skip


def _enc_text_response(p: TextResponse, dsl: int) -> bytes:
    fl = (_F if p.final else 0) | (_C if p.cont else 0)
    return _NOP_IN.pack(
        Opcode.TEXT_RESPONSE, fl, dsl, p.lun, p.itt, p.ttt, p.statsn, p.expcmdsn, p.maxcmdsn
    )


def _enc_data_in(p: DataIn, dsl: int) -> bytes:
    fl = (
        (0x80 if p.final else 0)
        | (0x40 if p.ack else 0)
        | (0x04 if p.overflow else 0)
        | (0x02 if p.underflow else 0)
        | (0x01 if p.status_present else 0)
    )
    return _DATA_IN.pack(
        Opcode.DATA_IN, fl, p.status, dsl, p.lun, p.itt, p.ttt, p.statsn, p.expcmdsn, p.maxcmdsn, p.datasn,
        p.buffer_offset, p.residual,
    )  # fmt: skip


def _enc_logout_response(p: LogoutResponse, dsl: int) -> bytes:
    return _LOGOUT_RSP.pack(
        Opcode.LOGOUT_RESPONSE, _F, p.response, dsl, p.itt, p.statsn, p.expcmdsn, p.maxcmdsn, p.time2wait,
        p.time2retain,
    )  # fmt: skip


def _enc_r2t(p: R2T, dsl: int) -> bytes:
    return _R2T.pack(
        Opcode.R2T, _F, dsl, p.lun, p.itt, p.ttt, p.statsn, p.expcmdsn, p.maxcmdsn, p.r2tsn, p.buffer_offset,
        p.desired_length,
    )  # fmt: skip


def _enc_async(p: AsyncMessage, dsl: int) -> bytes:
    return _ASYNC.pack(
        Opcode.ASYNC_MESSAGE, _F, dsl, p.lun, RESERVED_TAG, p.statsn, p.expcmdsn, p.maxcmdsn, p.async_event,
        p.async_vcode, p.parameter1, p.parameter2, p.parameter3,
    )  # fmt: skip


def _enc_reject(p: Reject, dsl: int) -> bytes:
    return _REJECT.pack(
        Opcode.REJECT, _F, p.reason, dsl, RESERVED_TAG, p.statsn, p.expcmdsn, p.maxcmdsn, p.datasn_r2tsn
    )


_ENCODERS: dict[type[Any], Callable[[Any, int], bytes]] = {
    NopOut: _enc_nop_out,
    ScsiCommand: _enc_scsi_command,
    TaskMgmtRequest: _enc_tmf_request,
    LoginRequest: _enc_login_request,
    TextRequest: _enc_text_request,
    DataOut: _enc_data_out,
    LogoutRequest: _enc_logout_request,
    SnackRequest: _enc_snack,
    NopIn: _enc_nop_in,
    ScsiResponse: _enc_scsi_response,
    TaskMgmtResponse: _enc_tmf_response,
    LoginResponse: _enc_login_response,
    TextResponse: _enc_text_response,
    DataIn: _enc_data_in,
    LogoutResponse: _enc_logout_response,
    R2T: _enc_r2t,
    AsyncMessage: _enc_async,
    Reject: _enc_reject,
}
