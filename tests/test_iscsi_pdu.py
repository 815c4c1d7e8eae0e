"""The PDU codec: byte vectors written from RFC 7143 §11 by hand, AHS handling, and Hypothesis round trips."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioscsi.iscsi.pdu import (
    INITIATOR_PDUS,
    KNOWN_OPCODES,
    R2T,
    RESERVED_TAG,
    TARGET_PDUS,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
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
    TaskMgmtRequest,
    TaskMgmtResponse,
    TextRequest,
    TextResponse,
    decode,
    encode_header,
    sense_from_segment,
    sense_segment,
)

ALL_PDUS = INITIATOR_PDUS + TARGET_PDUS


def h(text: str) -> bytes:
    """Hex with spaces and newlines ignored, so vectors can be laid out by field."""
    return bytes.fromhex("".join(text.split()))


def roundtrip(pdu: Pdu) -> Pdu:
    header = encode_header(pdu)
    return decode(memoryview(header)[:48], memoryview(header)[48:], pdu.data)


# Each vector: (wire header, data segment, the PDU). Fields are laid out one per line, as in RFC 7143 §11.
VECTORS: list[tuple[bytes, bytes, Pdu]] = [
    (  # §11.18 NOP-Out ping, immediate, no reply TTT
        h("""40 80 0000  00 000000  0000000000000000
             00000005  ffffffff  0000000a  00000003  00000000000000000000000000000000"""),
        b"",
        NopOut(immediate=True, itt=5, ttt=RESERVED_TAG, cmdsn=10, expstatsn=3),
    ),
    (  # §11.3 SCSI Command READ(10), LUN 1, SIMPLE, F|R
        h("""01 c1 0000  00 000000  0001000000000000
             00000010  00001000  00000007  00000003
             28000000002000000800 000000000000"""),
        b"",
        ScsiCommand(final=True, read=True, attr=1, lun=0x0001000000000000, itt=0x10, edtl=4096, cmdsn=7,
                    expstatsn=3, cdb=h("28000000002000000800 000000000000")),
    ),
    (  # §11.3 SCSI Command WRITE(10) with 512 bytes of immediate data, ORDERED
        h("""01 a2 0000  00 000200  0000000000000000
             00000011  00000200  00000008  00000004
             2a000000000000000100 000000000000"""),
        b"\xab" * 512,
        ScsiCommand(final=True, write=True, attr=2, itt=0x11, edtl=512, cmdsn=8, expstatsn=4,
                    cdb=h("2a000000000000000100 000000000000"), data=b"\xab" * 512),
    ),
    (  # §11.12 Login Request: T, CSG=1 NSG=3, ISID, CID 1
        h("""43 87 00 00  00 00000e  400001370000 0000
             00000000  0001 0000  00000001  00000000  00000000000000000000000000000000"""),
        b"HeaderDigest=N",
        LoginRequest(transit=True, csg=1, nsg=3, isid=h("400001370000"), itt=0, cid=1, cmdsn=1,
                     data=b"HeaderDigest=N"),
    ),
    (  # §11.13 Login Response: T, CSG=1 NSG=3, TSIH 5, success
        h("""23 87 00 00  00 000000  400001370000 0005
             00000000  00000000  00000001  00000002  00000009  00 00 00000000000000000000"""),
        b"",
        LoginResponse(transit=True, csg=1, nsg=3, isid=h("400001370000"), tsih=5, statsn=1, expcmdsn=2,
                      maxcmdsn=9),
    ),
    (  # §11.13 Login Response: initiator error, target not found (0x0203)
        h("""23 00 00 00  00 000000  400001370000 0000
             00000007  00000000  00000000  00000001  00000001  02 03 00000000000000000000"""),
        b"",
        LoginResponse(isid=h("400001370000"), itt=7, expcmdsn=1, maxcmdsn=1, status_class=2, status_detail=3),
    ),
    (  # §11.7 Data-In, final with status (S), underflow, residual 100
        h("""25 83 00 00  00 000004  0000000000000000
             00000010  ffffffff  00000004  00000008  00000027  00000000  00000000  00000064"""),
        b"\x01\x02\x03\x04",
        DataIn(final=True, underflow=True, status_present=True, status=0, itt=0x10, statsn=4, expcmdsn=8,
               maxcmdsn=0x27, residual=100, data=b"\x01\x02\x03\x04"),
    ),
    (  # §11.4 SCSI Response, CHECK CONDITION with 18 bytes of fixed sense
        h("""21 80 00 02  00 000014  0000000000000000
             00000012  00000000  00000005  00000009  00000028  00000000  00000000  00000000"""),
        sense_segment(h("700005000000000a00000000240000000000")),
        ScsiResponse(status=2, itt=0x12, statsn=5, expcmdsn=9, maxcmdsn=0x28,
                     data=sense_segment(h("700005000000000a00000000240000000000"))),
    ),
    (  # §11.8 R2T
        h("""31 80 0000  00 000000  0002000000000000
             00000013  00000101  00000006  0000000a  00000029  00000000  00001000  00010000"""),
        b"",
        R2T(lun=0x0002000000000000, itt=0x13, ttt=0x101, statsn=6, expcmdsn=10, maxcmdsn=0x29,
            buffer_offset=4096, desired_length=65536),
    ),
    (  # §11.5 Task Management: ABORT TASK, immediate
        h("""42 81 0000  00 000000  0001000000000000
             00000020  00000013  0000000b  00000007  0000000a  00000000  0000000000000000"""),
        b"",
        TaskMgmtRequest(immediate=True, function=1, lun=0x0001000000000000, itt=0x20, rtt=0x13, cmdsn=11,
                        expstatsn=7, refcmdsn=10),
    ),
    (  # §11.14 Logout Request: close the session
        h("""46 80 0000  00 000000  0000000000000000
             00000021  0001 0000  0000000c  00000008  00000000000000000000000000000000"""),
        b"",
        LogoutRequest(immediate=True, reason=0, itt=0x21, cid=1, cmdsn=12, expstatsn=8),
    ),
    (  # §11.15 Logout Response: Time2Wait 2, Time2Retain 20
        h("""26 80 00 00  00 000000  0000000000000000
             00000021  00000000  00000008  0000000d  0000002c  00000000  0002 0014  00000000"""),
        b"",
        LogoutResponse(itt=0x21, statsn=8, expcmdsn=13, maxcmdsn=0x2C, time2wait=2, time2retain=20),
    ),
    (  # §11.17 Reject: protocol error, data = the rejected BHS
        h("""3f 80 04 00  00 000030  0000000000000000
             ffffffff  00000000  00000009  0000000e  0000002d  00000000  0000000000000000"""),
        bytes(range(48)),
        Reject(reason=4, statsn=9, expcmdsn=14, maxcmdsn=0x2D, data=bytes(range(48))),
    ),
    (  # §11.9 Async Message: target requests logout in 5 seconds
        h("""32 80 0000  00 000000  0000000000000000
             ffffffff  00000000  0000000a  0000000f  0000002e  01 00 0000 0005 0000  00000000"""),
        b"",
        AsyncMessage(statsn=10, expcmdsn=15, maxcmdsn=0x2E, async_event=1, parameter2=5),
    ),
    (  # §11.16 SNACK: status SNACK
        h("""10 81 0000  00 000000  0000000000000000
             ffffffff  ffffffff  00000000  00000004  0000000000000000  00000002  00000001"""),
        b"",
        SnackRequest(type=1, expstatsn=4, begrun=2, runlength=1),
    ),
]


@pytest.mark.parametrize("wire, data, pdu", VECTORS, ids=[type(v[2]).__name__ for v in VECTORS])
def test_vectors(wire: bytes, data: bytes, pdu: Pdu) -> None:
    assert len(wire) == 48
    assert decode(memoryview(wire), b"", data) == pdu
    assert encode_header(pdu) == wire


def test_every_class_has_its_opcode_and_data_last() -> None:
    assert {cls.opcode for cls in ALL_PDUS} == set(Opcode)
    assert KNOWN_OPCODES == {int(op) for op in Opcode}
    for cls in ALL_PDUS:
        fields = dataclasses.fields(cls)
        assert fields[-1].name == "data"
        assert encode_header(cls())[0] & 0x3F == cls.opcode  # every field has a default


def test_decode_accepts_bytes_and_ignores_reserved_bits() -> None:
    wire = bytearray(VECTORS[0][0])
    wire[0] |= 0x80  # reserved bit of byte 0
    wire[1] |= 0x7F  # reserved flag bits
    wire[32:48] = b"\xff" * 16  # reserved words
    assert decode(bytes(wire)) == VECTORS[0][2]


def test_fixed_bits_are_set_by_the_encoder() -> None:
    assert encode_header(LoginRequest())[0] == 0x43  # a Login Request is always immediate
    assert encode_header(NopOut())[1] == 0x80  # F is always 1 on single-PDU requests
    assert encode_header(Reject())[16:20] == b"\xff" * 4  # Reject and Async carry ITT 0xffffffff
    assert encode_header(AsyncMessage())[16:20] == b"\xff" * 4


def test_unknown_opcode() -> None:
    bhs = bytes([0x1C]) + bytes(47)
    with pytest.raises(PduError) as info:
        decode(memoryview(bhs))
    assert info.value.reason == RejectReason.COMMAND_NOT_SUPPORTED
    assert info.value.header == bhs


def test_short_bhs_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        decode(bytes(47))


# --- SCSI Command AHS (RFC 7143 §11.2.2) ---------------------------------------------------------------------

CDB32 = bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18]) + bytes(range(1, 25))  # a 32-byte variable-length CDB


def test_extended_cdb_ahs_wire_form() -> None:
    header = encode_header(ScsiCommand(itt=1, cdb=CDB32))
    assert header[4] == 5  # TotalAHSLength: (3 + 17 rounded up to 4) / 4 words
    assert header[32:48] == CDB32[:16]
    assert header[48:52] == h("0011 01 00")  # AHSLength = CDBLength - 15, type 1, reserved
    assert header[52:68] == CDB32[16:]
    assert len(header) == 68


def test_extended_cdb_ahs_padding_and_decode() -> None:
    cdb = bytes(range(16)) + b"\xaa\xbb\xcc"  # 19 bytes: AHSLength 4, padded to 8
    header = encode_header(ScsiCommand(cdb=cdb))
    assert header[4] == 2
    assert header[48:] == h("0004 01 00 aabbcc 00")
    assert decode(header[:48], header[48:]).cdb == cdb  # type: ignore[union-attr]


def test_bidi_read_length_ahs() -> None:
    pdu = ScsiCommand(read=True, write=True, edtl=512, bidi_read_length=0x12345678, cdb=CDB32)
    header = encode_header(pdu)
    assert header[4] == 7
    assert header[68:] == h("0005 02 00 12345678")
    assert roundtrip(pdu) == pdu


def test_ahs_order_does_not_matter() -> None:
    bhs = encode_header(ScsiCommand(cdb=CDB32[:16]))
    ahs = h("0005 02 00 00000200") + h("0011 01 00") + CDB32[16:]
    pdu = decode(bhs, ahs)
    assert isinstance(pdu, ScsiCommand)
    assert (pdu.cdb, pdu.bidi_read_length) == (CDB32, 0x200)


def test_short_cdb_is_padded_to_16() -> None:
    pdu = roundtrip(ScsiCommand(cdb=h("1200000024 00")))
    assert isinstance(pdu, ScsiCommand)
    assert pdu.cdb == h("1200000024 00") + bytes(10)


@pytest.mark.parametrize(
    "ahs",
    [
        h("0005 02"),  # truncated
        h("0020 01 00") + bytes(8),  # overruns TotalAHSLength
        h("0001 01 00"),  # extended CDB with no CDB bytes
        h("0004 02 00 00000000"),  # bidi length AHS of the wrong length
        h("0001 00 00"),  # reserved type 0
        h("0001 03 00"),  # reserved type 3
    ],
)
def test_malformed_ahs_is_a_protocol_error(ahs: bytes) -> None:
    bhs = encode_header(ScsiCommand(itt=9))
    with pytest.raises(PduError) as info:
        decode(bhs, ahs)
    assert info.value.reason == RejectReason.PROTOCOL_ERROR
    assert info.value.header == bhs


def test_vendor_ahs_is_skipped() -> None:
    bhs = encode_header(ScsiCommand(itt=9))
    pdu = decode(bhs, h("0005 3c 00 11223344") + h("0005 02 00 00000010"))
    assert isinstance(pdu, ScsiCommand) and pdu.bidi_read_length == 16


def test_ahs_on_other_opcodes_is_ignored() -> None:
    assert decode(encode_header(NopOut(itt=3)), h("0001 03 00")) == NopOut(itt=3)


# --- encoder checks and helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pdu",
    [
        LoginRequest(isid=b"12345"),
        LoginResponse(isid=b"1234567"),
        LoginRequest(csg=4),
        ScsiCommand(attr=8),
        TaskMgmtRequest(function=128),
        SnackRequest(type=16),
        NopOut(lun=1 << 64),
        NopIn(statsn=-1),
        R2T(desired_length=1 << 32),
        ScsiCommand(cdb=bytes(1100)),
    ],
)
def test_encode_rejects_values_that_do_not_fit(pdu: Pdu) -> None:
    with pytest.raises(ValueError):
        encode_header(pdu)


def test_data_segment_length_counts_bytes_of_a_memoryview() -> None:
    data = memoryview(bytearray(12)).cast("I")  # 3 items, 12 bytes
    assert encode_header(NopIn(data=data))[5:8] == h("00000c")


def test_sense_segment() -> None:
    sense = h("700005000000000a00000000240000000000")
    seg = sense_segment(sense)
    assert seg[:2] == b"\x00\x12" and seg[2:] == sense
    assert sense_from_segment(seg) == sense
    assert sense_from_segment(b"") == b""


# --- Hypothesis round trips ----------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

# Field name -> strategy, where the field is narrower than 32 bits or not an int.
SPECIAL: dict[str, st.SearchStrategy[Any]] = {
    "lun": st.integers(0, 2**64 - 1),
    "attr": st.integers(0, 7),
    "csg": st.integers(0, 3),
    "nsg": st.integers(0, 3),
    "function": st.integers(0, 0x7F),
    "type": st.integers(0, 0xF),
    "isid": st.binary(min_size=6, max_size=6),
    "cdb": st.binary(min_size=16, max_size=16) | st.binary(min_size=17, max_size=260),
    "bidi_read_length": st.none() | u32,
    "data": st.binary(max_size=64),
}
NARROW = {
    "version_max": u8, "version_min": u8, "version_active": u8, "status_class": u8, "status_detail": u8,
    "response": u8, "status": u8, "async_event": u8, "async_vcode": u8, "tsih": u16, "cid": u16,
    "time2wait": u16, "time2retain": u16, "parameter1": u16, "parameter2": u16, "parameter3": u16,
}  # fmt: skip


def field_strategy(cls: type, field: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    if field.type == "bool":
        return st.booleans()
    if field.name == "reason":
        return u8 if cls is Reject else st.integers(0, 0x7F)
    if field.name in SPECIAL:
        return SPECIAL[field.name]
    return NARROW.get(field.name, u32)


def pdu_strategy(cls: type) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{f.name: field_strategy(cls, f) for f in dataclasses.fields(cls)})


def test_strategies_cover_every_field() -> None:
    """A new field must not silently default to a 32-bit strategy that the wire cannot carry."""
    for cls in ALL_PDUS:
        for f in dataclasses.fields(cls):
            assert f.type == "bool" or f.name in SPECIAL or f.name in NARROW or f.type == "int", (cls, f)


any_pdu = st.one_of([pdu_strategy(cls) for cls in ALL_PDUS])


@given(any_pdu)
def test_roundtrip(pdu: Pdu) -> None:
    assert roundtrip(pdu) == pdu


@given(any_pdu)
def test_header_layout(pdu: Pdu) -> None:
    header = encode_header(pdu)
    assert header[0] & 0x3F == pdu.opcode
    assert header[0] & 0x80 == 0
    assert len(header) == 48 + header[4] * 4
    assert int.from_bytes(header[5:8], "big") == len(pdu.data)
