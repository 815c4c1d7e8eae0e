"""The iSCSI key table (RFC 7143 13): every RFC 7143 key with its type, default, scope, phases and senders, the
evaluation order, numeric values, and the result functions (RFC 7143 6.2) on their own."""
from __future__ import annotations

from dataclasses import fields

import pytest

from trioscsi.iscsi.keys import (KEYS, KeyType, Phase, Scope, Sender, evaluation_rank, is_extension, lookup,
                                 parse_number, result_and, result_list, result_max, result_min, result_or)
from trioscsi.iscsi.negotiation import SessionParams


# ------------------------------------------------------------------------------------------------ the key table

def test_table_covers_every_rfc7143_key() -> None:
    expected = {"HeaderDigest", "DataDigest", "MaxConnections", "SendTargets", "TargetName", "InitiatorName",
                "TargetAlias", "InitiatorAlias", "TargetAddress", "TargetPortalGroupTag", "InitialR2T",
                "ImmediateData", "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength",
                "DefaultTime2Wait", "DefaultTime2Retain", "MaxOutstandingR2T", "DataPDUInOrder",
                "DataSequenceInOrder", "ErrorRecoveryLevel", "SessionType", "AuthMethod", "TaskReporting",
                "iSCSIProtocolLevel", "OFMarker", "IFMarker", "OFMarkInt", "IFMarkInt",
                "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"}
    assert expected <= set(KEYS)


@pytest.mark.parametrize("name, kind, default", [
    ("InitialR2T", KeyType.BOOLEAN_OR, "Yes"), ("ImmediateData", KeyType.BOOLEAN_AND, "Yes"),
    ("MaxBurstLength", KeyType.NUMERIC_MIN, "262144"), ("FirstBurstLength", KeyType.NUMERIC_MIN, "65536"),
    ("DefaultTime2Wait", KeyType.NUMERIC_MAX, "2"), ("DefaultTime2Retain", KeyType.NUMERIC_MIN, "20"),
    ("MaxRecvDataSegmentLength", KeyType.NUMERIC_DECLARATIVE, "8192"), ("HeaderDigest", KeyType.LIST, "None"),
    ("DataPDUInOrder", KeyType.BOOLEAN_OR, "Yes"), ("ErrorRecoveryLevel", KeyType.NUMERIC_MIN, "0"),
    ("iSCSIProtocolLevel", KeyType.NUMERIC_MIN, "1"), ("TaskReporting", KeyType.LIST, "RFC3720"),
])
def test_key_types_and_defaults_follow_rfc7143_13(name: str, kind: KeyType, default: str) -> None:
    spec = KEYS[name]
    assert (spec.type, spec.default) == (kind, default)


def test_every_param_named_by_the_table_exists() -> None:
    names = {f.name for f in fields(SessionParams)}
    assert {spec.param for spec in KEYS.values() if spec.param} <= names


def test_scopes_phases_and_senders() -> None:
    assert KEYS["HeaderDigest"].scope is Scope.CONNECTION and not KEYS["HeaderDigest"].leading_only
    assert KEYS["MaxBurstLength"].leading_only and KEYS["SessionType"].leading_only
    assert Phase.SECURITY in KEYS["InitiatorName"].phases          # Any-Stage
    assert Phase.SECURITY not in KEYS["MaxRecvDataSegmentLength"].phases
    assert KEYS["SendTargets"].phases == Phase.FULL_FEATURE
    assert KEYS["CHAP_C"].phases == Phase.SECURITY and KEYS["CHAP_C"].type is KeyType.AUTH
    assert KEYS["TargetPortalGroupTag"].senders == Sender.TARGET
    assert lookup("X-com.example.thing") is None and is_extension("X-com.example.thing")


def test_evaluation_rank_decides_relevance_first() -> None:
    assert evaluation_rank("SessionType") < evaluation_rank("InitialR2T") < evaluation_rank("FirstBurstLength")
    assert evaluation_rank("AuthMethod") < evaluation_rank("CHAP_A")


@pytest.mark.parametrize("text, number", [("0", 0), ("8192", 8192), ("0x2000", 8192), ("0X10", 16),
                                          ("", None), ("-1", None), ("1e3", None), ("٣", None), ("9" * 30, None),
                                          (" 1", None), ("0x", None)])
def test_parse_number(text: str, number: int | None) -> None:
    assert parse_number(text) == number


# ------------------------------------------------------------------------------------------------ result functions

@pytest.mark.parametrize("a, b", [(True, True), (True, False), (False, True), (False, False)])
def test_boolean_result_functions(a: bool, b: bool) -> None:
    assert result_and(a, b) is (a and b)
    assert result_or(a, b) is (a or b)


def test_numeric_and_list_result_functions() -> None:
    assert result_min(65536, 262144) == 65536 and result_max(0, 2) == 2
    assert result_list(["CRC32C", "None"], ("None", "CRC32C")) == "CRC32C"
    assert result_list(["X-foo", "None"], ("None", "CRC32C")) == "None"
    assert result_list(["CRC32C"], ("None",)) is None       # "None" is valid only if offered
