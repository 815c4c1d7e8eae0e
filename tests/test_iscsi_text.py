"""The iSCSI text format (RFC 7143 6.1): parsing and encoding key=value data, malformed text, the length limits
at their boundaries, and properties of parse_text/encode_text on random input."""
from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from negotiation_helpers import _key_name, fails_with
from trioscsi.iscsi.negotiation import LoginStatus, NegotiationError, encode_text, parse_text


# ------------------------------------------------------------------------------------------------ text format

def test_parse_and_encode_text() -> None:
    data = b"InitiatorName=iqn.x\0TargetAlias=caf\xc3\xa9\0Empty=\0Eq=a=b\0"
    assert parse_text(data) == [("InitiatorName", "iqn.x"), ("TargetAlias", "café"), ("Empty", ""),
                                ("Eq", "a=b")]
    assert parse_text(memoryview(data)) == parse_text(data)
    assert encode_text(parse_text(data)) == data
    assert parse_text(b"") == []
    assert parse_text(b"A=1\0\0\0\0") == [("A", "1")]         # padding NULs
    assert parse_text(b"A=1\0B=2") == [("A", "1"), ("B", "2")]   # no final NUL
    with pytest.raises(ValueError):
        encode_text([("A=B", "1")])


@pytest.mark.parametrize("data", [
    b"NoEquals\0", b"=value\0", b"K" * 64 + b"=1\0", b"Bad Key=1\0", b"K\xff=1\0", b"Key=\xff\xfe\0",
    b"InitiatorAlias=" + b"a" * 256 + b"\0", b"HeaderDigest=None," + b"a" * 256 + b"\0",
    b"InitiatorName=iqn." + b"a" * 220 + b"\0", b"X-big=" + b"a" * 8193 + b"\0"])
def test_malformed_text_fails(data: bytes) -> None:
    with fails_with(LoginStatus.INITIATOR_ERROR):
        parse_text(data)


def test_length_limits_at_the_boundary() -> None:
    assert parse_text(b"K" * 63 + b"=1\0")[0][0] == "K" * 63
    assert parse_text(b"InitiatorAlias=" + b"a" * 255 + b"\0")
    assert parse_text(b"CHAP_C=0x" + b"ab" * 1024 + b"\0")                      # 1024-byte challenge
    assert parse_text(b"X-big=" + b"a" * 8192 + b"\0")


# ------------------------------------------------------------------------------------------------ properties

@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        pairs = parse_text(data)
    except NegotiationError as exc:
        assert exc.status is LoginStatus.INITIATOR_ERROR
    else:
        assert all(k and "=" not in k for k, _ in pairs)


@given(st.lists(st.tuples(_key_name,
                          st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0,"),
                                  max_size=40)), max_size=8))
def test_encode_parse_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert parse_text(encode_text(pairs)) == pairs
