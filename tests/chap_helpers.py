"""The CHAP initiator and target-side set-up shared by the CHAP tests (test_chap*.py): an initiator written with
hashlib the way libiscsi and open-iscsi do it (RFC 7143 12.1.3, RFC 1994), independent of chap.py, and builders
for the target's ChapPolicy, ChapAuthenticator and Negotiator; `fails_with` also checks that no secret leaks into
the error."""
from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from trioscsi.iscsi.chap import ChapAuthenticator, ChapCredentials, ChapPolicy, ReplayGuard
from trioscsi.iscsi.negotiation import LoginStatus, NegotiationError, Negotiator, TargetSettings

INITIATOR = "iqn.2004-10.com.ubuntu:01:1234abcd"
TARGET = "iqn.2024-01.org.trioscsi:disk0"
SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
USER, SECRET = "alice", b"initiator-secret-0123"
TUSER, TSECRET = "iqn.2024-01.org.trioscsi:disk0", b"target-secret-4567"
HASH = {5: hashlib.md5, 6: hashlib.sha1, 7: hashlib.sha256, 8: hashlib.sha3_256}
DIGEST_SIZE = {5: 16, 6: 20, 7: 32, 8: 32}
NAMES = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal")]
OPERATIONAL_KEYS = [   # what libiscsi sends in its operational stage
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("InitialR2T", "Yes"), ("ImmediateData", "Yes"),
    ("MaxBurstLength", "262144"), ("FirstBurstLength", "262144"), ("MaxRecvDataSegmentLength", "262144"),
    ("DataPDUInOrder", "Yes"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"), ("MaxConnections", "1"),
    ("MaxOutstandingR2T", "1"), ("ErrorRecoveryLevel", "0"), ("DataSequenceInOrder", "Yes")]


# ------------------------------------------------------------------------------------------------ the initiator

def h(algorithm: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """The initiator's own CHAP computation (RFC 1994), independent of chap.py."""
    return HASH[algorithm](bytes([identifier]) + secret + challenge).digest()


def unhex(value: str) -> bytes:
    assert value[:2] == "0x", value     # the target always answers in hex
    return bytes.fromhex(value[2:])


def hexed(data: bytes) -> str:
    return "0x" + data.hex()


def hexed_upper(data: bytes) -> str:    # libiscsi's i2h() writes upper case digits
    return "0X" + data.hex().upper()


def b64(data: bytes) -> str:
    return "0b" + base64.b64encode(data).decode()


def b64_unpadded(data: bytes) -> str:
    return "0b" + base64.b64encode(data).decode().rstrip("=")


@dataclass
class Initiator:
    """CHAP as open-iscsi / libiscsi run it. Set target_user for mutual CHAP."""
    user: str = USER
    secret: bytes = SECRET
    algorithms: str = "8,7,6,5"
    target_user: str | None = None
    target_secret: bytes = TSECRET
    identifier: int = 77
    challenge: bytes = field(default_factory=lambda: os.urandom(32))
    encode: Callable[[bytes], str] = hexed
    algorithm: int = 0
    target_identifier: int = 0
    target_challenge: bytes = b""

    def offer(self, neg: Negotiator) -> dict[str, str]:
        """AuthMethod, then CHAP_A; keeps the target's CHAP_A/I/C."""
        assert dict(neg.respond(NAMES + [("AuthMethod", "CHAP,None")], stage=SECURITY))["AuthMethod"] == "CHAP"
        answer = dict(neg.respond([("CHAP_A", self.algorithms)], stage=SECURITY))
        assert set(answer) == {"CHAP_A", "CHAP_I", "CHAP_C"}
        self.algorithm, self.target_identifier = int(answer["CHAP_A"]), int(answer["CHAP_I"])
        self.target_challenge = unhex(answer["CHAP_C"])
        return answer

    def response(self) -> list[tuple[str, str]]:
        keys = [("CHAP_N", self.user),
                ("CHAP_R", self.encode(h(self.algorithm, self.target_identifier, self.secret, self.target_challenge)))]
        if self.target_user is not None:
            keys += [("CHAP_I", str(self.identifier)), ("CHAP_C", self.encode(self.challenge))]
        return keys

    def target_proved(self, answer: dict[str, str]) -> bool:
        """open-iscsi's acl_chap_auth_request: the target's CHAP_N and CHAP_R must match."""
        return answer.get("CHAP_N") == self.target_user and unhex(answer["CHAP_R"]) == h(
            self.algorithm, self.identifier, self.target_secret, self.challenge)

    def login(self, neg: Negotiator) -> dict[str, str]:
        self.offer(neg)
        return dict(neg.respond(self.response(), stage=SECURITY))


def policy(mutual: bool = False, **kw: object) -> ChapPolicy:
    return ChapPolicy(ChapCredentials(USER, SECRET), ChapCredentials(TUSER, TSECRET) if mutual else None,
                      **kw)  # type: ignore[arg-type]


def authenticator(pol: ChapPolicy | None = None, **kw: object) -> ChapAuthenticator:
    kw.setdefault("replay_guard", ReplayGuard())
    return ChapAuthenticator(pol or policy(), **kw)  # type: ignore[arg-type]


def negotiator(auth: ChapAuthenticator) -> Negotiator:
    return Negotiator(TargetSettings(auth_methods=auth.policy.auth_methods), leading=True, auth=auth)


LEAKS = [SECRET.decode(), TSECRET.decode(), SECRET.hex(), TSECRET.hex()]


def assert_clean(text: str, *more: str) -> None:
    """No secret (nor the given responses) in a message or repr."""
    for leak in LEAKS + [m for m in more if m]:
        assert leak.lower() not in text.lower(), (leak, text)


@contextmanager
def fails_with(status: LoginStatus, *responses: str) -> Iterator[pytest.ExceptionInfo[NegotiationError]]:
    with pytest.raises(NegotiationError) as info:
        yield info
    assert info.value.status == status, info.value
    assert_clean(str(info.value), *responses)
