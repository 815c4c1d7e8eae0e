"""Text negotiation by the target Negotiator (RFC 7143 6, 12.1, 13): values negotiated through the result
functions, logins as real initiators send them, Reject and NotUnderstood, discovery sessions, burst lengths, the
target's own offers, login-failing errors, full feature phase negotiation, login statuses and settings, and random
requests.

The key table itself is tested in test_iscsi_keys.py, the text format in test_iscsi_text.py."""
from __future__ import annotations

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from negotiation_helpers import _key_name, fails_with
from trioscsi.iscsi.keys import KEYS, KeyType, parse_number
from trioscsi.iscsi.negotiation import (LoginStatus, NegotiationError, Negotiator, SessionParams, TargetSettings,
                                        encode_text, parse_text)

INITIATOR = "iqn.2004-10.com.ubuntu:01:1234abcd"
TARGET = "iqn.2024-01.org.trioscsi:disk0"
SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3


def first_keys(**extra: str) -> list[tuple[str, str]]:
    pairs = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal")]
    return pairs + list(extra.items())


def logged_in(settings: TargetSettings | None = None, *, leading: bool = True, **kw: object) -> Negotiator:
    """A negotiator past its first (security stage) request."""
    neg = Negotiator(settings or TargetSettings(), leading=leading, **kw)  # type: ignore[arg-type]
    pairs = first_keys(AuthMethod="None")
    neg.respond(pairs if leading else pairs[:2] + pairs[3:], stage=SECURITY)   # SessionType is LO
    return neg


def answer(neg: Negotiator, stage: int = OPERATIONAL, **keys: str) -> dict[str, str]:
    return dict(neg.respond(list(keys.items()), stage=stage))


# ------------------------------------------------------------------------------------------------ negotiated values

@pytest.mark.parametrize("ours, offered, result", [
    (False, "Yes", "Yes"), (False, "No", "No"), (True, "No", "Yes"), (True, "Yes", "Yes")])
def test_initial_r2t_is_or(ours: bool, offered: str, result: str) -> None:
    neg = logged_in(TargetSettings(initial_r2t=ours))
    assert answer(neg, InitialR2T=offered) == {"InitialR2T": result}
    assert neg.params.initial_r2t is (result == "Yes")


@pytest.mark.parametrize("ours, offered, result", [
    (True, "Yes", "Yes"), (True, "No", "No"), (False, "Yes", "No"), (False, "No", "No")])
def test_immediate_data_is_and(ours: bool, offered: str, result: str) -> None:
    neg = logged_in(TargetSettings(immediate_data=ours))
    assert answer(neg, ImmediateData=offered) == {"ImmediateData": result}
    assert neg.params.immediate_data is (result == "Yes")


def test_numeric_min_and_max() -> None:
    neg = logged_in()
    got = answer(neg, MaxBurstLength="16776192", MaxOutstandingR2T="8", DefaultTime2Wait="0",
                 DefaultTime2Retain="0", ErrorRecoveryLevel="2", MaxConnections="4")
    assert got == {"MaxBurstLength": "1048576", "MaxOutstandingR2T": "1", "DefaultTime2Wait": "2",
                   "DefaultTime2Retain": "0", "ErrorRecoveryLevel": "0", "MaxConnections": "1"}
    p = neg.params
    assert (p.max_burst_length, p.default_time2wait, p.default_time2retain) == (1048576, 2, 0)
    neg = logged_in()
    assert answer(neg, DefaultTime2Wait="10", MaxBurstLength="65536") == {
        "DefaultTime2Wait": "10", "MaxBurstLength": "65536"}


def test_hex_numbers_are_accepted() -> None:
    neg = logged_in()
    assert answer(neg, MaxBurstLength="0x10000") == {"MaxBurstLength": "65536"}


@pytest.mark.parametrize("offered, ours, result, flag", [
    ("CRC32C,None", ("None", "CRC32C"), "CRC32C", True), ("None,CRC32C", ("None", "CRC32C"), "None", False),
    ("CRC32C,None", ("None",), "None", False), ("None", ("CRC32C",), "Reject", False),
    ("Y-vendor,CRC32C", ("None", "CRC32C"), "CRC32C", True), ("None,,CRC32C", ("None",), "Reject", False),
    ("None,Reject", ("None",), "Reject", False)])
def test_digest_list_negotiation(offered: str, ours: tuple[str, ...], result: str, flag: bool) -> None:
    neg = logged_in(TargetSettings(header_digests=ours, data_digests=ours))
    assert answer(neg, HeaderDigest=offered, DataDigest=offered) == {"HeaderDigest": result, "DataDigest": result}
    assert neg.params.header_digest is flag and neg.params.data_digest is flag


def test_task_reporting_and_protocol_level() -> None:
    neg = logged_in()
    assert answer(neg, TaskReporting="ResponseFence,RFC3720", iSCSIProtocolLevel="2") == {
        "TaskReporting": "RFC3720", "iSCSIProtocolLevel": "1"}
    neg = logged_in(TargetSettings(task_reporting=("RFC3720", "ResponseFence")))
    assert answer(neg, TaskReporting="ResponseFence,RFC3720") == {"TaskReporting": "ResponseFence"}
    assert neg.params.task_reporting == "ResponseFence"


def test_max_recv_data_segment_length_is_declarative() -> None:
    neg = logged_in()
    assert answer(neg, MaxRecvDataSegmentLength="65536") == {}
    assert neg.params.initiator_max_recv_data_segment_length == 65536
    assert neg.params.target_max_recv_data_segment_length == 8192   # not declared yet
    assert ("MaxRecvDataSegmentLength", "262144") in neg.target_declarations(stage=OPERATIONAL)
    assert neg.params.target_max_recv_data_segment_length == 262144


# ------------------------------------------------------------------------------------------------ real initiators

OPEN_ISCSI_SECURITY = [("InitiatorName", INITIATOR), ("InitiatorAlias", "host1"), ("TargetName", TARGET),
                       ("SessionType", "Normal"), ("AuthMethod", "None")]
OPEN_ISCSI_OPERATIONAL = [
    ("HeaderDigest", "None,CRC32C"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"), ("IFMarker", "No"), ("OFMarker", "No"), ("ErrorRecoveryLevel", "0"),
    ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "16776192"),
    ("FirstBurstLength", "262144"), ("MaxOutstandingR2T", "1"), ("MaxConnections", "1"),
    ("DataPDUInOrder", "Yes"), ("DataSequenceInOrder", "Yes"), ("MaxRecvDataSegmentLength", "262144")]


def test_open_iscsi_login() -> None:
    """Linux open-iscsi: AuthMethod=None in the security stage, then every operational key in one PDU."""
    neg = Negotiator(TargetSettings(target_alias="disk0"), leading=True)
    sec = neg.respond(OPEN_ISCSI_SECURITY, stage=SECURITY)
    assert sec == [("AuthMethod", "None"), ("TargetPortalGroupTag", "1"), ("TargetAlias", "disk0")]
    assert neg.target_declarations(stage=SECURITY) == []
    op = neg.respond(OPEN_ISCSI_OPERATIONAL, stage=OPERATIONAL) + neg.target_declarations(stage=OPERATIONAL)
    assert op == [
        ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
        ("IFMarker", "No"), ("OFMarker", "No"), ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"),
        ("ImmediateData", "Yes"), ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144"),
        ("MaxOutstandingR2T", "1"), ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"), ("MaxRecvDataSegmentLength", "262144")]
    assert neg.complete
    assert neg.params == SessionParams(
        initial_r2t=False, immediate_data=True, max_burst_length=1048576, first_burst_length=262144,
        default_time2retain=0, initiator_max_recv_data_segment_length=262144,
        target_max_recv_data_segment_length=262144, initiator_name=INITIATOR, initiator_alias="host1",
        target_name=TARGET, target_portal_group_tag=1, auth_method="None")
    assert parse_text(encode_text(op)) == op


LIBISCSI_OPERATIONAL = [
    ("InitiatorName", INITIATOR), ("InitiatorAlias", "libiscsi"), ("TargetName", TARGET),
    ("SessionType", "Normal"), ("HeaderDigest", "None,CRC32C"), ("DataDigest", "None"), ("InitialR2T", "No"),
    ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"),
    ("MaxRecvDataSegmentLength", "262144"), ("DataPDUInOrder", "Yes"), ("DefaultTime2Wait", "2"),
    ("DefaultTime2Retain", "0"), ("IFMarker", "No"), ("OFMarker", "No"), ("MaxConnections", "1"),
    ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"), ("DataSequenceInOrder", "Yes")]


def test_libiscsi_login_without_security_stage() -> None:
    """libiscsi without CHAP starts in the operational stage; TPGT still comes in the first response."""
    neg = Negotiator(TargetSettings(), leading=True)
    out = dict(neg.respond(LIBISCSI_OPERATIONAL, stage=OPERATIONAL))
    assert out["TargetPortalGroupTag"] == "1" and out["HeaderDigest"] == "None"
    assert out["MaxBurstLength"] == "262144" and out["FirstBurstLength"] == "262144"
    assert "InitiatorName" not in out and "MaxRecvDataSegmentLength" not in out
    assert neg.target_declarations(stage=OPERATIONAL) == [("MaxRecvDataSegmentLength", "262144")]
    assert neg.complete and neg.params.auth_method is None


class FakeChap:
    """Stands in for the auth module: records what it was given, answers like a CHAP target."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def __call__(self, method: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        self.calls.append((method, pairs))
        keys = dict(pairs)
        if "CHAP_A" in keys:
            return [("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0x" + "ab" * 16)]
        if keys.get("CHAP_R") != "0x" + "cd" * 16:
            raise NegotiationError.of(LoginStatus.AUTHENTICATION_FAILURE, "bad CHAP_R")
        return []


def test_libiscsi_login_with_chap_passes_auth_keys_to_the_handler() -> None:
    """libiscsi with CHAP: AuthMethod=CHAP,None, then CHAP_A, then CHAP_N/CHAP_R; then it repeats its names in
    the operational stage, which is allowed with the same values."""
    chap = FakeChap()
    neg = Negotiator(TargetSettings(auth_methods=("CHAP",)), leading=True, auth=chap)
    first = first_keys(InitiatorAlias="libiscsi", AuthMethod="CHAP,None")
    assert neg.respond(first, stage=SECURITY) == [("AuthMethod", "CHAP"), ("TargetPortalGroupTag", "1")]
    assert neg.params.auth_method == "CHAP"
    assert neg.respond([("CHAP_A", "5")], stage=SECURITY) == [
        ("CHAP_A", "5"), ("CHAP_I", "1"), ("CHAP_C", "0x" + "ab" * 16)]
    assert neg.respond([("CHAP_N", "user"), ("CHAP_R", "0x" + "cd" * 16)], stage=SECURITY) == []
    assert chap.calls[-1] == ("CHAP", [("CHAP_N", "user"), ("CHAP_R", "0x" + "cd" * 16)])
    out = dict(neg.respond(LIBISCSI_OPERATIONAL, stage=OPERATIONAL))
    assert out["HeaderDigest"] == "None" and "TargetPortalGroupTag" not in out


def test_auth_handler_failure_fails_the_login() -> None:
    neg = Negotiator(TargetSettings(auth_methods=("CHAP",)), leading=True, auth=FakeChap())
    neg.respond(first_keys(AuthMethod="CHAP"), stage=SECURITY)
    neg.respond([("CHAP_A", "5")], stage=SECURITY)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        neg.respond([("CHAP_N", "user"), ("CHAP_R", "0x00")], stage=SECURITY)


def test_auth_method_policy() -> None:
    neg = Negotiator(TargetSettings(auth_methods=("CHAP",)), leading=True, auth=FakeChap())
    assert dict(neg.respond(first_keys(AuthMethod="None"), stage=SECURITY))["AuthMethod"] == "Reject"
    assert neg.params.auth_method is None
    with pytest.raises(ValueError):
        Negotiator(TargetSettings(auth_methods=("CHAP", "None")), leading=True)


def test_chap_keys_without_agreed_method_fail() -> None:
    neg = logged_in()
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("CHAP_A", "5")], stage=SECURITY)


# ------------------------------------------------------------------------------------------------ Reject, NotUnderstood

@pytest.mark.parametrize("key, value", [
    ("MaxBurstLength", "100"), ("MaxBurstLength", "16777216"), ("FirstBurstLength", "abc"),
    ("ErrorRecoveryLevel", "3"), ("MaxConnections", "0"), ("MaxConnections", "65536"), ("DefaultTime2Wait", "-1"),
    ("DefaultTime2Retain", "3601"), ("MaxOutstandingR2T", "1" * 40), ("InitialR2T", "yes"),
    ("ImmediateData", "Maybe"), ("DataPDUInOrder", ""), ("HeaderDigest", "MD5"), ("iSCSIProtocolLevel", "32"),
    ("MaxRecvDataSegmentLength", "511"), ("InitialR2T", "Reject")])
def test_out_of_range_or_wrong_typed_values_are_rejected(key: str, value: str) -> None:
    neg = logged_in()
    before = SessionParams(**vars(neg.params))
    assert neg.respond([(key, value)], stage=OPERATIONAL) == [(key, "Reject")]
    assert neg.params == before


def test_unknown_and_extension_keys_are_not_understood() -> None:
    neg = logged_in()
    assert neg.respond([("X-com.example.Feature", "Yes"), ("FancyKey", "1"), ("X#Unregistered", "a")],
                       stage=OPERATIONAL) == [
        ("X-com.example.Feature", "NotUnderstood"), ("FancyKey", "NotUnderstood"),
        ("X#Unregistered", "NotUnderstood")]


def test_node_architecture_is_declarative() -> None:
    neg = logged_in()
    assert neg.respond([("X#NodeArchitecture", "Linux/6.1,open-iscsi/2.1")], stage=OPERATIONAL) == []


@pytest.mark.parametrize("key, value, result", [
    ("IFMarker", "No", "No"), ("OFMarker", "Yes", "No"), ("OFMarkInt", "2048~8192", "Reject"),
    ("IFMarkInt", "2048", "Reject")])
def test_obsolete_marker_keys(key: str, value: str, result: str) -> None:
    """RFC 7143 "Obsoleted Keys": never NotUnderstood; the booleans may be answered No, intervals Reject."""
    neg = logged_in()
    assert neg.respond([(key, value)], stage=OPERATIONAL) == [(key, result)]


# ------------------------------------------------------------------------------------------------ discovery sessions

def test_discovery_session_answers_irrelevant() -> None:
    neg = Negotiator(TargetSettings(), leading=True)
    sec = neg.respond([("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")],
                      stage=SECURITY)
    assert sec == [("AuthMethod", "None")]                     # no TargetPortalGroupTag for discovery
    op = dict(neg.respond([
        ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
        ("ErrorRecoveryLevel", "0"), ("MaxRecvDataSegmentLength", "32768"), ("MaxConnections", "1"),
        ("InitialR2T", "No"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
        ("FirstBurstLength", "65536"), ("MaxOutstandingR2T", "1"), ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"), ("TaskReporting", "RFC3720")], stage=OPERATIONAL))
    for key in ("MaxConnections", "InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
                "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "TaskReporting"):
        assert op[key] == "Irrelevant", key
    assert op["DefaultTime2Retain"] == "0" and op["HeaderDigest"] == "None"
    assert neg.params.session_type == "Discovery" and neg.params.initial_r2t is True
    assert neg.target_declarations(stage=OPERATIONAL) == [("MaxRecvDataSegmentLength", "262144")]


def test_session_type_in_same_request_decides_relevance() -> None:
    """SessionType is evaluated first, even when it comes last in the request."""
    neg = Negotiator(TargetSettings(), leading=True)
    out = dict(neg.respond([("InitialR2T", "No"), ("InitiatorName", INITIATOR), ("SessionType", "Discovery")],
                           stage=OPERATIONAL))
    assert out == {"InitialR2T": "Irrelevant"}


def test_first_burst_length_irrelevant_with_initial_r2t_and_no_immediate_data() -> None:
    neg = logged_in(TargetSettings(initial_r2t=True, immediate_data=False))
    assert answer(neg, FirstBurstLength="65536", InitialR2T="Yes", ImmediateData="Yes") == {
        "FirstBurstLength": "Irrelevant", "InitialR2T": "Yes", "ImmediateData": "No"}
    assert "FirstBurstLength" not in dict(neg.target_declarations(stage=OPERATIONAL))


# ------------------------------------------------------------------------------------------------ burst lengths

def test_first_burst_is_clamped_to_max_burst_in_the_same_request() -> None:
    """RFC 7143 13.14: FirstBurstLength MUST NOT exceed MaxBurstLength."""
    neg = logged_in()
    assert answer(neg, FirstBurstLength="262144", MaxBurstLength="65536") == {
        "FirstBurstLength": "65536", "MaxBurstLength": "65536"}
    assert (neg.params.first_burst_length, neg.params.max_burst_length) == (65536, 65536)


def test_first_burst_is_clamped_across_requests_and_offers() -> None:
    neg = logged_in()
    assert answer(neg, FirstBurstLength="262144") == {"FirstBurstLength": "262144"}
    assert answer(neg, MaxBurstLength="16384") == {"MaxBurstLength": "16384"}
    assert neg.params.first_burst_length == 16384
    # our FirstBurstLength offer is capped by a MaxBurstLength the initiator already chose
    neg = logged_in()
    answer(neg, MaxBurstLength="131072")
    assert dict(neg.target_declarations(stage=OPERATIONAL))["FirstBurstLength"] == "131072"


# ------------------------------------------------------------------------------------------------ target offers

def test_target_offers_what_differs_from_rfc_defaults() -> None:
    neg = logged_in()
    assert neg.respond([], stage=OPERATIONAL) == []
    offers = neg.target_declarations(stage=OPERATIONAL)
    assert offers == [("MaxRecvDataSegmentLength", "262144"), ("InitialR2T", "No"),
                      ("MaxBurstLength", "1048576"), ("FirstBurstLength", "262144")]
    assert not neg.complete
    assert neg.target_declarations(stage=OPERATIONAL) == []       # once per login
    assert neg.respond([("InitialR2T", "No"), ("MaxBurstLength", "65536")], stage=OPERATIONAL) == []
    assert not neg.complete
    assert neg.respond([("FirstBurstLength", "Reject")], stage=OPERATIONAL) == []
    assert neg.complete
    p = neg.params
    assert (p.initial_r2t, p.max_burst_length, p.first_burst_length) == (False, 65536, 65536)


def test_target_offer_answer_is_checked() -> None:
    neg = logged_in()
    neg.target_declarations(stage=OPERATIONAL)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("MaxBurstLength", "2097152")], stage=OPERATIONAL)   # min(x, 1048576) cannot be larger
    neg = logged_in(TargetSettings(immediate_data=False))
    assert ("ImmediateData", "No") in neg.target_declarations(stage=OPERATIONAL)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("ImmediateData", "Yes")], stage=OPERATIONAL)   # AND(No, x) is No


def test_or_answer_yes_to_our_no_is_admissible() -> None:
    neg = logged_in()
    neg.target_declarations(stage=OPERATIONAL)
    assert neg.respond([("InitialR2T", "Yes")], stage=OPERATIONAL) == []
    assert neg.params.initial_r2t is True


def test_offers_skip_lo_keys_on_non_leading_connections() -> None:
    neg = logged_in(leading=False, params=SessionParams())
    assert neg.target_declarations(stage=OPERATIONAL) == [("MaxRecvDataSegmentLength", "262144")]


def test_digest_offer_when_target_prefers_crc() -> None:
    neg = logged_in(TargetSettings(header_digests=("CRC32C", "None")))
    offers = dict(neg.target_declarations(stage=OPERATIONAL))
    assert offers["HeaderDigest"] == "CRC32C,None" and "DataDigest" not in offers
    neg.respond([("HeaderDigest", "CRC32C")], stage=OPERATIONAL)
    assert neg.params.header_digest is True


# ------------------------------------------------------------------------------------------------ login-failing errors

def test_lo_key_on_non_leading_connection_fails() -> None:
    neg = logged_in(leading=False)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("MaxBurstLength", "65536")], stage=OPERATIONAL)


def test_non_leading_connection_negotiates_connection_keys() -> None:
    session = SessionParams(initial_r2t=False, header_digest=True, initiator_max_recv_data_segment_length=65536)
    params = session.for_new_connection()
    assert params.initial_r2t is False and params.header_digest is False
    assert params.initiator_max_recv_data_segment_length == 8192
    neg = Negotiator(TargetSettings(), leading=False, params=params)
    out = neg.respond([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("HeaderDigest", "CRC32C")],
                      stage=OPERATIONAL)
    assert out == [("HeaderDigest", "CRC32C"), ("TargetPortalGroupTag", "1")]


def test_repeated_key_in_one_login_fails() -> None:
    """RFC 7143 6.3: a parameter may not be negotiated twice in one login."""
    neg = logged_in()
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("HeaderDigest", "None"), ("HeaderDigest", "None")], stage=OPERATIONAL)
    neg = logged_in()
    answer(neg, MaxBurstLength="65536")
    with fails_with(LoginStatus.INITIATOR_ERROR):
        answer(neg, MaxBurstLength="65536")
    neg = logged_in()
    neg.respond([("X-foo", "1")], stage=OPERATIONAL)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("X-foo", "1")], stage=OPERATIONAL)


def test_redeclared_identity_must_not_change() -> None:
    neg = logged_in()
    assert neg.respond([("InitiatorName", INITIATOR), ("SessionType", "Normal")], stage=OPERATIONAL) == []
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("TargetName", "iqn.2024-01.org.other:x")], stage=OPERATIONAL)


def test_initiator_alias_and_max_recv_may_be_redeclared() -> None:
    neg = logged_in()
    answer(neg, MaxRecvDataSegmentLength="65536", InitiatorAlias="a")
    answer(neg, MaxRecvDataSegmentLength="131072", InitiatorAlias="b")
    assert neg.params.initiator_max_recv_data_segment_length == 131072 and neg.params.initiator_alias == "b"


@pytest.mark.parametrize("stage, key, value", [
    (SECURITY, "HeaderDigest", "None"), (SECURITY, "MaxRecvDataSegmentLength", "8192"),
    (OPERATIONAL, "AuthMethod", "None"), (OPERATIONAL, "CHAP_A", "5"), (OPERATIONAL, "SendTargets", "All"),
    (OPERATIONAL, "TargetAlias", "x"), (SECURITY, "TargetPortalGroupTag", "1"),
    (OPERATIONAL, "TargetAddress", "10.0.0.1:3260,1")])
def test_key_in_wrong_stage_or_from_wrong_sender_fails(stage: int, key: str, value: str) -> None:
    neg = logged_in()
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([(key, value)], stage=stage)


@pytest.mark.parametrize("pairs, status", [
    ([("TargetName", TARGET)], LoginStatus.MISSING_PARAMETER),
    ([("InitiatorName", INITIATOR)], LoginStatus.MISSING_PARAMETER),
    ([("InitiatorName", INITIATOR), ("SessionType", "Normal")], LoginStatus.MISSING_PARAMETER),
    ([("InitiatorName", INITIATOR), ("SessionType", "Boot")], LoginStatus.SESSION_TYPE_NOT_SUPPORTED),
    ([("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "discovery")],
     LoginStatus.SESSION_TYPE_NOT_SUPPORTED),
    ([("InitiatorName", ""), ("TargetName", TARGET)], LoginStatus.INITIATOR_ERROR)])
def test_first_request_checks(pairs: list[tuple[str, str]], status: LoginStatus) -> None:
    neg = Negotiator(TargetSettings(), leading=True)
    with fails_with(status):
        neg.respond(pairs, stage=SECURITY)


def test_check_first_request_alone() -> None:
    neg = Negotiator(TargetSettings(), leading=True)
    neg.check_first_request([("InitiatorName", INITIATOR), ("SessionType", "Discovery")])
    with fails_with(LoginStatus.MISSING_PARAMETER):
        neg.check_first_request([("SessionType", "Discovery")])


def test_bad_stage_fails() -> None:
    neg = Negotiator(TargetSettings(), leading=True)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond(first_keys(), stage=2)


# ------------------------------------------------------------------------------------------------ full feature phase

def test_full_feature_text_negotiation() -> None:
    neg = logged_in()
    neg.respond(OPEN_ISCSI_OPERATIONAL, stage=OPERATIONAL)
    out = neg.respond([("SendTargets", "All"), ("MaxRecvDataSegmentLength", "65536"), ("HeaderDigest", "CRC32C"),
                       ("X-vendor", "1"), ("InitiatorAlias", "renamed")], stage=FULL_FEATURE)
    assert out == [("HeaderDigest", "Reject"), ("X-vendor", "NotUnderstood")]
    assert neg.passthrough == [("SendTargets", "All")]
    assert neg.params.initiator_max_recv_data_segment_length == 65536
    assert neg.params.initiator_alias == "renamed" and neg.params.header_digest is False
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("SendTargets", "All")], stage=FULL_FEATURE)   # again in the same sequence
    neg.begin_sequence()
    assert neg.respond([("SendTargets", TARGET)], stage=FULL_FEATURE) == []
    assert neg.passthrough == [("SendTargets", TARGET)]
    assert neg.target_declarations(stage=FULL_FEATURE) == []
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("HeaderDigest", "None")], stage=OPERATIONAL)


def test_full_feature_negotiator_for_an_existing_session() -> None:
    params = SessionParams(session_type="Discovery", initiator_name=INITIATOR)
    neg = Negotiator(TargetSettings(), leading=True, params=params)
    assert neg.respond([("SendTargets", "All")], stage=FULL_FEATURE) == []
    assert neg.passthrough == [("SendTargets", "All")] and neg.params is params


# ------------------------------------------------------------------------------------------------ statuses and settings

def test_login_status_codes() -> None:
    assert (int(LoginStatus.MISSING_PARAMETER), int(LoginStatus.INVALID_DURING_LOGIN)) == (0x0207, 0x020B)
    assert LoginStatus.OUT_OF_RESOURCES.status_class == 3 and LoginStatus.OUT_OF_RESOURCES.status_detail == 2
    assert len(LoginStatus) == 18
    err = NegotiationError(0x02, 0x09, "nope")
    assert err.status is LoginStatus.SESSION_TYPE_NOT_SUPPORTED and str(err) == "nope"
    assert NegotiationError(0x02, 0x7F, "vendor").status == 0x027F


@pytest.mark.parametrize("kw", [dict(first_burst_length=2097152), dict(max_burst_length=100),
                                dict(header_digests=("MD5",)), dict(header_digests=()),
                                dict(max_recv_data_segment_length=100), dict(error_recovery_level=3),
                                dict(target_portal_group_tag=70000)])
def test_bad_settings_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TargetSettings(**kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ properties

_KNOWN = sorted(KEYS)
_VALUES = ["Yes", "No", "None", "CRC32C", "None,CRC32C", "0", "1", "2", "512", "8192", "65536", "262144",
           "16777215", "16777216", "0x10", "Reject", "Irrelevant", "NotUnderstood", "", "Normal", "Discovery",
           "CHAP,None", "All", INITIATOR, TARGET, "RFC3720,FastAbort", "5"]
_key = st.one_of(st.sampled_from(_KNOWN), st.sampled_from(["X-foo", "X#bar", "Unknown"]), _key_name)
_value = st.one_of(st.sampled_from(_VALUES), st.text(max_size=20))
_pairs = st.lists(st.tuples(_key, _value), max_size=12)


def _check_answers(out: list[tuple[str, str]]) -> None:
    """Every answer to a numeric key is a reserved constant or a value within the key's range."""
    for key, value in out:
        spec = KEYS.get(key)
        if spec is None or spec.type not in (KeyType.NUMERIC_MIN, KeyType.NUMERIC_MAX):
            continue
        if value not in ("Reject", "Irrelevant", "NotUnderstood"):
            number = parse_number(value)
            assert number is not None and spec.low is not None and spec.high is not None
            assert spec.low <= number <= spec.high, (key, value)


@hsettings(max_examples=300, deadline=None)
@given(requests=st.lists(st.tuples(st.sampled_from([0, 1, 1, 3, 2]), _pairs), max_size=5),
       leading=st.booleans(), chap=st.booleans())
def test_random_requests_raise_only_negotiation_error(requests: list[tuple[int, list[tuple[str, str]]]],
                                                      leading: bool, chap: bool) -> None:
    settings = TargetSettings(auth_methods=("CHAP", "None") if chap else ("None",))
    neg = Negotiator(settings, leading=leading, auth=(lambda m, p: []) if chap else None)
    for stage, pairs in requests:
        try:
            out = neg.respond(pairs, stage=stage) + neg.target_declarations(stage=stage)
        except NegotiationError as exc:
            assert isinstance(exc.status, LoginStatus)
            return
        _check_answers(out)
        assert parse_text(encode_text(out)) == out
    assert neg.params.first_burst_length <= neg.params.max_burst_length
