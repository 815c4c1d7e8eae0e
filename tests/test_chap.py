"""CHAP exchanges (RFC 7143 12.1.3, RFC 1994): the target's ChapAuthenticator driven through the real Negotiator
against the initiator in chap_helpers.py: one-way and mutual CHAP, algorithm choice, value encodings, the order of
keys, replay and reflection of challenges, and when a login may leave the security stage.

The same exchanges through LoginMachine are in test_chap_login_machine.py, secrets handling in
test_chap_secrets.py."""
from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given, strategies as st

from chap_helpers import (DIGEST_SIZE, NAMES, OPERATIONAL, OPERATIONAL_KEYS, SECRET, SECURITY, TUSER, USER,
                          Initiator, assert_clean, authenticator, b64, b64_unpadded, fails_with, h, hexed,
                          hexed_upper, negotiator, policy, unhex)
from trioscsi.iscsi.chap import (ChapAuthenticator, ChapCredentials, ChapPolicy, ReplayGuard, decode_binary,
                                 encode_binary)
from trioscsi.iscsi.negotiation import LoginStatus, NegotiationError


# ------------------------------------------------------------------------------------------------ one-way and mutual

def test_one_way_chap_as_libiscsi_does_it() -> None:
    auth = authenticator()
    neg = negotiator(auth)
    ini = Initiator(algorithms="5")                          # libiscsi offers MD5 only
    assert ini.login(neg) == {}                              # one-way: nothing to answer
    assert auth.authenticated and not auth.mutual and auth.algorithm == 5
    assert len(ini.target_challenge) == 16 and 0 <= ini.target_identifier <= 255
    # libiscsi repeats its names in the operational stage
    out = dict(neg.respond(NAMES + OPERATIONAL_KEYS, stage=OPERATIONAL))
    assert out["HeaderDigest"] == "None"


def test_wrong_password_is_refused() -> None:
    neg = negotiator(authenticator())
    ini = Initiator(secret=b"not-the-right-secret")
    ini.offer(neg)
    sent = dict(ini.response())["CHAP_R"]
    right = hexed(h(ini.algorithm, ini.target_identifier, SECRET, ini.target_challenge))
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE, sent[2:], right[2:]) as info:
        neg.respond(ini.response(), stage=SECURITY)
    assert USER in str(info.value)


def test_wrong_user_name_is_refused() -> None:
    neg = negotiator(authenticator())
    ini = Initiator(user="mallory")
    ini.offer(neg)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        neg.respond(ini.response(), stage=SECURITY)


def test_mutual_chap_as_open_iscsi_does_it() -> None:
    auth = authenticator(policy(mutual=True))
    ini = Initiator(algorithms="7,5", target_user=TUSER, challenge=os.urandom(16))
    answer = ini.login(negotiator(auth))
    assert set(answer) == {"CHAP_N", "CHAP_R"} and answer["CHAP_N"] == TUSER
    assert ini.target_proved(answer)
    assert auth.authenticated and auth.mutual and auth.algorithm == 7
    assert len(unhex(answer["CHAP_R"])) == 32


def test_mutual_chap_with_the_wrong_target_secret_is_caught_by_the_initiator() -> None:
    target_side = ChapPolicy(ChapCredentials(USER, SECRET), ChapCredentials(TUSER, b"some-other-target-secret"))
    ini = Initiator(target_user=TUSER)
    answer = ini.login(negotiator(authenticator(target_side)))
    assert not ini.target_proved(answer)              # RFC 7143: the initiator MUST close the connection
    assert_clean(repr(answer))


def test_mutual_requested_but_target_has_no_credentials() -> None:
    neg = negotiator(authenticator(policy(mutual=False)))
    ini = Initiator(target_user=TUSER)
    ini.offer(neg)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE) as info:
        neg.respond(ini.response(), stage=SECURITY)
    assert "mutual" in str(info.value)


def test_target_credentials_without_mutual_request_is_one_way() -> None:
    auth = authenticator(policy(mutual=True))
    assert Initiator().login(negotiator(auth)) == {}
    assert auth.authenticated and not auth.mutual


# ------------------------------------------------------------------------------------------------ algorithms

@pytest.mark.parametrize("algorithm", [5, 6, 7, 8])
@pytest.mark.parametrize("mutual", [False, True])
def test_each_algorithm(algorithm: int, mutual: bool) -> None:
    auth = authenticator(policy(mutual=mutual))
    ini = Initiator(algorithms=str(algorithm), target_user=TUSER if mutual else None)
    answer = ini.login(negotiator(auth))
    assert auth.algorithm == ini.algorithm == algorithm and auth.authenticated
    assert len(ini.target_challenge) == DIGEST_SIZE[algorithm]     # Linux ties the challenge to the digest
    if mutual:
        assert ini.target_proved(answer) and len(unhex(answer["CHAP_R"])) == DIGEST_SIZE[algorithm]


@pytest.mark.parametrize("offer, allowed, chosen", [
    ("8,7,6,5", (8, 7, 6, 5), 8),
    ("5,8", (8, 7, 6, 5), 5),             # RFC 7143 6.2.1: the first of the initiator's list that we allow
    ("5,6,7,8", (8, 7), 7),               # the policy leaves out the weak ones
    ("99,abc,,6", (8, 7, 6, 5), 6),       # unknown values are ignored
    ("0x8", (8,), 8),                     # a numeric value may be hex
])
def test_algorithm_choice(offer: str, allowed: tuple[int, ...], chosen: int) -> None:
    auth = authenticator(policy(algorithms=allowed))
    ini = Initiator(algorithms=offer)
    assert ini.login(negotiator(auth)) == {} and ini.algorithm == chosen == auth.algorithm


@pytest.mark.parametrize("offer", ["5", "1,2,3", "Reject", "None", "abc"])
def test_no_acceptable_algorithm_fails_the_login(offer: str) -> None:
    """RFC 7143 12.1.3: the target MUST answer with a Login reject (Authentication Failure) or CHAP_A/I/C."""
    neg = negotiator(authenticator(policy(algorithms=(8, 7))))
    neg.respond(NAMES + [("AuthMethod", "CHAP")], stage=SECURITY)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE) as info:
        neg.respond([("CHAP_A", offer)], stage=SECURITY)
    assert "CHAP_A" in str(info.value)


# ------------------------------------------------------------------------------------------------ encodings

@pytest.mark.parametrize("encode", [hexed, hexed_upper, b64, b64_unpadded])
def test_response_and_challenge_encodings(encode: Callable[[bytes], str]) -> None:
    auth = authenticator(policy(mutual=True))
    ini = Initiator(target_user=TUSER, encode=encode, challenge=os.urandom(20))
    answer = ini.login(negotiator(auth))
    assert ini.target_proved(answer) and answer["CHAP_R"].startswith("0x")    # we always answer in hex


@pytest.mark.parametrize("value, data", [
    ("0xabc", b"\x0a\xbc"), ("0X00ff", b"\x00\xff"), ("0b" + "AAEC", b"\x00\x01\x02"), ("0BAAE=", b"\x00\x01"),
    ("0bAAE", b"\x00\x01")])
def test_decode_binary(value: str, data: bytes) -> None:
    assert decode_binary(value) == data


@pytest.mark.parametrize("value", ["", "0x", "0b", "abcd", "0xzz", "0x12 34", " 0x1234", "0x1234\n", "0bA",
                                   "0bAA=A", "0bAAE==", "0b====", "0b-_", "0o17", "1234"])
def test_decode_binary_refuses(value: str) -> None:
    with pytest.raises(ValueError) as info:
        decode_binary(value)
    assert str(info.value) == "not a 0x hex or 0b base64 constant"     # the value is not repeated


@given(st.binary(min_size=1, max_size=1100))
def test_binary_round_trips(data: bytes) -> None:
    assert decode_binary(encode_binary(data)) == data
    assert decode_binary(b64(data)) == data == decode_binary(b64_unpadded(data))


@pytest.mark.parametrize("response", ["0xZZ", "abc", "0x" + "00" * 16, "0x", "0b!!", "0x" + "00" * 64])
def test_malformed_or_wrong_length_response_is_an_authentication_failure(response: str) -> None:
    neg = negotiator(authenticator())
    Initiator(algorithms="5").offer(neg)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        neg.respond([("CHAP_N", USER), ("CHAP_R", response)], stage=SECURITY)


@pytest.mark.parametrize("identifier, challenge", [("256", None), ("-1", None), ("x", None), ("1", "0xzz"),
                                                   ("1", "deadbeef")])
def test_malformed_mutual_keys_are_initiator_errors(identifier: str, challenge: str | None) -> None:
    neg = negotiator(authenticator(policy(mutual=True)))
    ini = Initiator(target_user=TUSER)
    ini.offer(neg)
    keys = dict(ini.response()) | {"CHAP_I": identifier}
    if challenge is not None:
        keys["CHAP_C"] = challenge
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond(list(keys.items()), stage=SECURITY)


def test_hex_identifier_is_accepted() -> None:
    ini = Initiator(target_user=TUSER, identifier=0x2A)
    neg = negotiator(authenticator(policy(mutual=True)))
    ini.offer(neg)
    keys = dict(ini.response()) | {"CHAP_I": "0x2a"}
    assert ini.target_proved(dict(neg.respond(list(keys.items()), stage=SECURITY)))


# ------------------------------------------------------------------------------------------------ order of keys

def test_response_before_chap_a_is_an_initiator_error() -> None:
    neg = negotiator(authenticator())
    neg.respond(NAMES + [("AuthMethod", "CHAP")], stage=SECURITY)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("CHAP_N", USER), ("CHAP_R", "0x" + "00" * 16)], stage=SECURITY)


def test_chap_a_with_response_keys_is_an_initiator_error() -> None:
    neg = negotiator(authenticator())
    neg.respond(NAMES + [("AuthMethod", "CHAP")], stage=SECURITY)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("CHAP_A", "5"), ("CHAP_N", USER)], stage=SECURITY)


def test_chap_a_again_is_an_initiator_error() -> None:
    neg = negotiator(authenticator())
    Initiator().offer(neg)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("CHAP_A", "5")], stage=SECURITY)


def test_identifier_without_challenge_is_an_initiator_error() -> None:
    neg = negotiator(authenticator(policy(mutual=True)))
    ini = Initiator()
    ini.offer(neg)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond(ini.response() + [("CHAP_I", "1")], stage=SECURITY)


def test_mutual_keys_without_response_fail() -> None:
    neg = negotiator(authenticator(policy(mutual=True)))
    Initiator().offer(neg)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        neg.respond([("CHAP_I", "1"), ("CHAP_C", hexed(os.urandom(16)))], stage=SECURITY)


def test_chap_keys_after_success_are_an_initiator_error() -> None:
    auth = authenticator(policy(mutual=True))
    neg = negotiator(auth)
    Initiator().login(neg)
    with fails_with(LoginStatus.INITIATOR_ERROR):
        neg.respond([("CHAP_I", "1"), ("CHAP_C", hexed(os.urandom(16)))], stage=SECURITY)


def test_after_a_failure_every_step_fails() -> None:
    auth = authenticator()
    with pytest.raises(NegotiationError):
        auth("CHAP", [("CHAP_N", USER)])
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        auth("CHAP", [("CHAP_A", "5")])
    assert not auth.authenticated


def test_other_methods_and_missing_credentials_fail() -> None:
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        authenticator()("SRP", [("CHAP_A", "5")])
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        authenticator(ChapPolicy(None))("CHAP", [("CHAP_A", "5")])


# ------------------------------------------------------------------------------------------------ replay and reflection

def test_reflected_challenge_is_refused() -> None:
    """The initiator sends our own challenge back as its mutual challenge."""
    neg = negotiator(authenticator(policy(mutual=True)))
    ini = Initiator(target_user=TUSER)
    ini.offer(neg)
    ini.challenge = ini.target_challenge
    ini.identifier = ini.target_identifier
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE) as info:
        neg.respond(ini.response(), stage=SECURITY)
    assert "reflect" in str(info.value)


@pytest.mark.parametrize("encode", [hexed, b64])
def test_challenge_reflected_from_another_connection_is_refused(encode: Callable[[bytes], str]) -> None:
    guard = ReplayGuard()
    first = Initiator()
    first.offer(negotiator(authenticator(policy(mutual=True), replay_guard=guard)))   # left waiting
    neg = negotiator(authenticator(policy(mutual=True), replay_guard=guard))
    second = Initiator(target_user=TUSER, challenge=first.target_challenge, encode=encode)
    second.offer(neg)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE) as info:
        neg.respond(second.response(), stage=SECURITY)
    assert "reflect" in str(info.value)


def test_initiator_challenge_reuse_is_refused() -> None:
    guard = ReplayGuard()
    challenge = os.urandom(16)
    ini = Initiator(target_user=TUSER, challenge=challenge)
    assert ini.target_proved(ini.login(negotiator(authenticator(policy(mutual=True), replay_guard=guard))))
    neg = negotiator(authenticator(policy(mutual=True), replay_guard=guard))
    again = Initiator(target_user=TUSER, challenge=challenge, identifier=ini.identifier + 1)
    again.offer(neg)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE) as info:
        neg.respond(again.response(), stage=SECURITY)
    assert "replay" in str(info.value)


def test_repeated_target_challenge_is_refused() -> None:
    """A random source that repeats itself: the second login cannot be challenged the same way."""
    guard = ReplayGuard()
    stuck = lambda n: bytes(range(n))   # noqa: E731
    assert Initiator(algorithms="5").login(negotiator(authenticator(replay_guard=guard, random=stuck))) == {}
    neg = negotiator(authenticator(replay_guard=guard, random=stuck))
    neg.respond(NAMES + [("AuthMethod", "CHAP")], stage=SECURITY)
    with fails_with(LoginStatus.TARGET_ERROR):
        neg.respond([("CHAP_A", "5")], stage=SECURITY)


def test_short_random_output_is_refused() -> None:
    auth = authenticator(random=lambda n: b"\x01" * min(n, 4))
    with fails_with(LoginStatus.TARGET_ERROR):
        auth("CHAP", [("CHAP_A", "5")])


@pytest.mark.parametrize("size", [0, 1, 8, 15, 1025])
def test_initiator_challenge_out_of_bounds_is_refused(size: int) -> None:
    neg = negotiator(authenticator(policy(mutual=True)))
    ini = Initiator(target_user=TUSER, challenge=os.urandom(size))
    ini.offer(neg)
    keys = dict(ini.response())
    if size == 0:
        keys["CHAP_C"] = "0x"       # not even a binary value
    with pytest.raises(NegotiationError) as info:
        neg.respond(list(keys.items()), stage=SECURITY)
    assert info.value.status in (LoginStatus.AUTHENTICATION_FAILURE, LoginStatus.INITIATOR_ERROR)


def test_replay_guard_bounds_and_capacity() -> None:
    guard = ReplayGuard(capacity=2, min_target_challenge=16, min_initiator_challenge=8)
    guard.accept(b"i" * 8)
    with fails_with(LoginStatus.TARGET_ERROR):
        guard.issue(b"t" * 15)
    for n in range(3):
        guard.issue(bytes([n]) * 16)
    assert len(guard) == 2
    guard.issue(bytes([0]) * 16)          # forgotten: only the last `capacity` challenges are kept
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        guard.accept(bytes([2]) * 16)     # still remembered: a challenge we sent
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        guard.accept(b"i" * 7)            # shorter than min_initiator_challenge


def test_default_guard_is_process_wide() -> None:
    a, b = ChapAuthenticator(policy()), ChapAuthenticator(policy())
    assert a._guard is b._guard


# ------------------------------------------------------------------------------------------------ the security stage

def test_may_leave_security() -> None:
    assert ChapAuthenticator(ChapPolicy(None)).may_leave_security(None)
    auth = authenticator()
    assert auth.may_leave_security("CHAP") is False           # under way: answer T=0
    for method in (None, "None"):
        with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
            auth.may_leave_security(method)
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        auth.require_authenticated()
    Initiator().login(negotiator(auth))
    assert auth.may_leave_security("CHAP")
    auth.require_authenticated()
    ChapAuthenticator(ChapPolicy(None)).require_authenticated()


def test_failed_exchange_cannot_leave_security() -> None:
    auth = authenticator()
    with pytest.raises(NegotiationError):
        auth("CHAP", [("CHAP_A", "1")])
    with fails_with(LoginStatus.AUTHENTICATION_FAILURE):
        auth.may_leave_security("CHAP")
