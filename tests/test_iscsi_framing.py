"""PduReader / encode_pdu: vectors fed whole, byte by byte and with trailing bytes; digests; limits; round trips."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from test_iscsi_pdu import VECTORS, any_pdu, h

from trioscsi.iscsi.digest import crc32c, digest_bytes, digest_value
from trioscsi.iscsi.framing import NEED_DATA, DigestError, PduReader, encode_pdu
from trioscsi.iscsi.pdu import (
    DataIn,
    DataOut,
    FramingError,
    LoginRequest,
    NopIn,
    NopOut,
    Pdu,
    PduError,
    RejectReason,
    ScsiCommand,
    TextRequest,
    encode_header,
)

ReaderFactory = Callable[[], PduReader]


def drain(reader: PduReader) -> list[Pdu]:
    out = []
    while (pdu := reader.next_pdu()) is not NEED_DATA:
        out.append(pdu)
    return out


def tr(make: ReaderFactory, wire: bytes, expected: list[Pdu]) -> None:
    """Feed ``wire`` whole, one byte at a time, and with trailing bytes (h11's ``tr`` idiom)."""
    reader = make()
    reader.feed(wire)
    assert drain(reader) == expected
    assert reader.buffered == 0

    reader = make()
    got: list[Pdu] = []
    for i in range(len(wire)):
        reader.feed(wire[i : i + 1])
        got += drain(reader)
    assert got == expected
    assert reader.buffered == 0

    trailing = b"\x01\x80\x00"  # the start of another PDU
    reader = make()
    reader.feed(wire + trailing)
    assert drain(reader) == expected
    assert reader.buffered == len(trailing)
    assert reader.next_pdu() is NEED_DATA


def wire_of(*pdus: Pdu, header_digest: bool = False, data_digest: bool = False) -> bytes:
    return b"".join(
        bytes(part) for pdu in pdus for part in encode_pdu(pdu, header_digest=header_digest, data_digest=data_digest)
    )


@pytest.mark.parametrize("wire, data, pdu", VECTORS, ids=[type(v[2]).__name__ for v in VECTORS])
def test_vectors(wire: bytes, data: bytes, pdu: Pdu) -> None:
    padded = data + bytes(-len(data) % 4)
    tr(PduReader, wire + padded, [pdu])
    assert wire_of(pdu) == wire + padded


def test_several_pdus_in_one_feed() -> None:
    wire = b"".join(v[0] + v[1] + bytes(-len(v[1]) % 4) for v in VECTORS)
    tr(PduReader, wire, [v[2] for v in VECTORS])


def test_vectors_with_digests() -> None:
    pdus = [v[2] for v in VECTORS]
    make = lambda: PduReader(header_digest=True, data_digest=True)  # noqa: E731
    tr(make, wire_of(*pdus, header_digest=True, data_digest=True), pdus)


def test_interleaved_feed_and_next_pdu() -> None:
    pdus = [NopOut(itt=i, data=bytes([i]) * i) for i in range(20)]
    wire = wire_of(*pdus)
    reader, got = PduReader(), []
    for i in range(0, len(wire), 7):
        reader.feed(memoryview(wire)[i : i + 7])
        if (pdu := reader.next_pdu()) is not NEED_DATA:
            got.append(pdu)
    got += drain(reader)
    assert got == pdus


# --- encode_pdu ----------------------------------------------------------------------------------------------


def test_encode_pdu_parts() -> None:
    data = bytearray(b"abcde")
    view = memoryview(data)
    parts = encode_pdu(DataIn(itt=1, data=view))
    assert len(parts) == 3
    assert parts[1] is view  # not copied
    assert parts[2] == b"\0\0\0"
    assert encode_pdu(NopIn()) == [encode_header(NopIn())]  # no data: header only
    assert len(encode_pdu(NopIn(data=b"1234"))) == 2  # aligned data: no padding part
    assert len(encode_pdu(NopIn(), header_digest=True, data_digest=True)[0]) == 52  # no data, no data digest


def test_data_digest_covers_padding() -> None:
    parts = encode_pdu(NopIn(data=b"abcde"), data_digest=True)
    assert parts[2] == b"\0\0\0" + digest_bytes(b"abcde\0\0\0")


# --- digests (RFC 3720 appendix B.4) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, value, wire",
    [
        (bytes(32), 0x8A9136AA, "aa 36 91 8a"),
        (b"\xff" * 32, 0x62A8AB43, "43 ab a8 62"),
        (bytes(range(32)), 0x46DD794E, "4e 79 dd 46"),
        (bytes(range(31, -1, -1)), 0x113FDB5C, "5c db 3f 11"),
    ],
)
def test_crc32c_vectors(data: bytes, value: int, wire: str) -> None:
    assert crc32c(data) == value
    assert digest_bytes(data) == h(wire)  # least significant byte first on the wire
    assert digest_value(h(wire)) == value
    assert crc32c(data[5:], crc32c(data[:5])) == value


def test_header_digest_on_the_wire() -> None:
    header = encode_header(NopOut(itt=1))
    assert encode_pdu(NopOut(itt=1), header_digest=True)[0] == header + crc32c(header).to_bytes(4, "little")


def test_bad_header_digest_is_fatal() -> None:
    wire = bytearray(wire_of(NopOut(itt=1), NopOut(itt=2), header_digest=True))
    wire[51] ^= 1
    reader = PduReader(header_digest=True)
    reader.feed(wire)
    with pytest.raises(DigestError) as info:
        reader.next_pdu()
    assert info.value.header_digest is True
    assert info.value.pdu is None
    assert info.value.header == wire[:48]
    with pytest.raises(DigestError):  # the reader stays failed
        reader.next_pdu()


def test_bad_header_digest_is_seen_before_the_data_arrives() -> None:
    wire = bytearray(wire_of(NopOut(itt=1, data=bytes(4000)), header_digest=True))
    wire[10] ^= 0x40
    reader = PduReader(header_digest=True)
    reader.feed(wire[:60])
    with pytest.raises(DigestError):
        reader.next_pdu()


@pytest.mark.parametrize("corrupt", [60, -1], ids=["data", "digest"])
def test_bad_data_digest_consumes_the_pdu(corrupt: int) -> None:
    bad = ScsiCommand(write=True, itt=7, edtl=10, data=b"0123456789")
    wire = bytearray(wire_of(bad, NopOut(itt=8, data=b"x"), header_digest=True, data_digest=True))
    first = len(wire_of(bad, header_digest=True, data_digest=True))
    wire[corrupt if corrupt >= 0 else first + corrupt] ^= 0x10
    reader = PduReader(header_digest=True, data_digest=True)
    reader.feed(wire)
    with pytest.raises(DigestError) as info:
        reader.next_pdu()
    assert info.value.header_digest is False
    assert isinstance(info.value.pdu, ScsiCommand) and info.value.pdu.itt == 7
    assert info.value.header == wire[:48]
    assert reader.next_pdu() == NopOut(itt=8, data=b"x")


def test_no_data_digest_without_data() -> None:
    wire = wire_of(NopOut(itt=1), data_digest=True)
    assert len(wire) == 48
    tr(lambda: PduReader(data_digest=True), wire, [NopOut(itt=1)])


def test_digests_switched_on_between_pdus() -> None:
    login = LoginRequest(transit=True, csg=1, nsg=3, data=b"HeaderDigest=CRC32C")
    cmd = ScsiCommand(itt=1, data=b"abc", write=True, edtl=3)
    reader = PduReader()
    reader.feed(wire_of(login) + wire_of(cmd, header_digest=True, data_digest=True))
    assert reader.next_pdu() == login
    reader.header_digest = reader.data_digest = True
    assert reader.next_pdu() == cmd


# --- limits and garbage --------------------------------------------------------------------------------------


def test_oversized_data_segment_is_rejected_then_the_stream_continues() -> None:
    big = DataOut(itt=1, data=bytes(8193))
    after = NopOut(itt=2)
    for chunk in (1, 1000, 1 << 20):
        reader = PduReader(data_digest=True)
        wire = wire_of(big, after, data_digest=True)
        errors, got = [], []
        for i in range(0, len(wire), chunk):
            reader.feed(wire[i : i + chunk])
            while True:
                try:
                    pdu = reader.next_pdu()
                except PduError as e:
                    errors.append(e)
                    continue
                if pdu is NEED_DATA:
                    break
                got.append(pdu)
            assert reader.buffered <= 100  # dropped as it arrives, never buffered whole
        assert [e.reason for e in errors] == [RejectReason.PROTOCOL_ERROR]
        assert errors[0].header == encode_header(big)
        assert got == [after]


def test_max_recv_data_segment_length_changed_between_pdus() -> None:
    pdus = [TextRequest(itt=1, data=bytes(9000)), TextRequest(itt=2, data=bytes(9000))]
    reader = PduReader()
    reader.feed(wire_of(*pdus))
    with pytest.raises(PduError):
        reader.next_pdu()
    reader.max_recv_data_segment_length = 262144
    assert reader.next_pdu() == pdus[1]
    assert reader.buffered == 0


def test_unknown_opcode_is_consumed() -> None:
    unknown = bytes([0x1C, 0x80, 0, 0, 0, 0, 0, 5]) + bytes(40) + b"hello\0\0\0"
    reader = PduReader()
    reader.feed(unknown + wire_of(NopOut(itt=4)))
    with pytest.raises(PduError) as info:
        reader.next_pdu()
    assert info.value.reason == RejectReason.COMMAND_NOT_SUPPORTED
    assert info.value.header == unknown[:48]
    assert reader.next_pdu() == NopOut(itt=4)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: x\r\nAccept: */*\r\n\r\n",
        bytes([0x3E, 0x80, 0, 0, 0, 0x10, 0, 0]) + bytes(40),  # unknown opcode, 1 MiB data segment
    ],
)
def test_garbage_is_a_framing_error(garbage: bytes) -> None:
    reader = PduReader()
    reader.feed(garbage)
    with pytest.raises(FramingError):
        reader.next_pdu()
    with pytest.raises(FramingError):
        reader.next_pdu()
    reader.feed(b"more")  # ignored once failed
    assert reader.buffered == len(garbage)


def test_hard_limit_is_a_framing_error() -> None:
    reader = PduReader(max_recv_data_segment_length=1 << 24, hard_data_segment_limit=4096)
    reader.feed(encode_header(DataOut(data=bytes(4097))))
    with pytest.raises(FramingError):
        reader.next_pdu()


def test_large_data_segment_in_chunks() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    pdu = DataOut(final=True, itt=3, data=data)
    wire = wire_of(pdu, header_digest=True, data_digest=True)
    reader = PduReader(header_digest=True, data_digest=True, max_recv_data_segment_length=len(data))
    got = []
    for i in range(0, len(wire), 65536):
        reader.feed(wire[i : i + 65536])
        got += drain(reader)
    assert got == [pdu]


# --- Hypothesis round trips through the reader ---------------------------------------------------------------


@given(
    pdus=st.lists(any_pdu, min_size=1, max_size=5),
    header_digest=st.booleans(),
    data_digest=st.booleans(),
    cuts=st.lists(st.integers(1, 80), max_size=20),
)
def test_roundtrip_through_reader(pdus: list[Pdu], header_digest: bool, data_digest: bool, cuts: list[int]) -> None:
    wire = wire_of(*pdus, header_digest=header_digest, data_digest=data_digest)
    reader = PduReader(header_digest=header_digest, data_digest=data_digest)
    got, pos = [], 0
    for n in cuts:
        reader.feed(wire[pos : pos + n])
        pos += n
        got += drain(reader)
    reader.feed(wire[pos:])
    got += drain(reader)
    assert got == pdus
    assert reader.buffered == 0


@given(st.binary(min_size=48, max_size=300), st.booleans())
def test_random_bytes_never_crash(wire: bytes, header_digest: bool) -> None:
    reader = PduReader(header_digest=header_digest)
    reader.feed(wire)
    try:
        drain(reader)
    except (FramingError, DigestError, PduError):
        pass
