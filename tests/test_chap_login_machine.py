"""CHAP through LoginMachine: whole logins as libiscsi sends them (security stage with CHAP, then operational),
a wrong password, and the security stage that may be neither skipped nor left before CHAP succeeded."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from chap_helpers import (FULL_FEATURE, NAMES, OPERATIONAL, OPERATIONAL_KEYS, SECURITY, TUSER, Initiator,
                          assert_clean, authenticator, policy, unhex)
from trioscsi.iscsi import login as login_module
from trioscsi.iscsi.chap import ChapAuthenticator
from trioscsi.iscsi.login import LoginMachine, LoginOutcome
from trioscsi.iscsi.negotiation import LoginStatus, Negotiator, TargetSettings, encode_text, parse_text
from trioscsi.iscsi.pdu import LoginRequest, LoginResponse


# ------------------------------------------------------------------------------------------------ through LoginMachine

@dataclass
class Context:
    auth: ChapAuthenticator | None
    bound: list[LoginOutcome] = field(default_factory=list)

    def target_settings(self, target_name: str | None, initiator_name: str, session_type: str) -> TargetSettings:
        return TargetSettings(auth_methods=self.auth.policy.auth_methods if self.auth else ("None",))

    def bind_session(self, outcome: LoginOutcome) -> int:
        self.bound.append(outcome)
        return 7

    def authenticator(self, target_name: str | None, initiator_name: str,
                      session_type: str) -> ChapAuthenticator | None:
        return self.auth


@dataclass
class WiredLoginMachine(LoginMachine):
    """LoginMachine plus the change proposed for login.py, applied from outside so login.py stays untouched:
    the authenticator goes to the Negotiator (see the `wired` fixture), a login may not skip the security stage
    or leave it before `may_leave_security`."""
    auth: ChapAuthenticator | None = None

    def _negotiate(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if self._negotiator is None and self.auth is not None and self.stage != SECURITY:
            self.auth.require_authenticated()
        return super()._negotiate(pairs)

    def _may_leave_stage(self) -> bool:
        assert self._negotiator is not None
        if self.stage == SECURITY:
            return self.auth is None or self.auth.may_leave_security(self._negotiator.params.auth_method)
        return super()._may_leave_stage()


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch) -> Callable[[ChapAuthenticator], LoginMachine]:
    def make(auth: ChapAuthenticator) -> LoginMachine:
        monkeypatch.setattr(login_module, "Negotiator",
                            lambda settings, *, leading, **_: Negotiator(settings, leading=leading, auth=auth))
        return WiredLoginMachine(Context(auth), auth=auth)
    return make


def pdu(pairs: list[tuple[str, str]], *, transit: bool, csg: int = SECURITY, nsg: int = OPERATIONAL) -> LoginRequest:
    return LoginRequest(transit=transit, csg=csg, nsg=nsg if transit else 0, isid=bytes.fromhex("400001370000"),
                        itt=5, cmdsn=1, data=encode_text(pairs))


def status(response: LoginResponse) -> int:
    return (response.status_class << 8) | response.status_detail


def text(response: LoginResponse) -> dict[str, str]:
    return dict(parse_text(response.data))


def libiscsi_login(machine: LoginMachine, ini: Initiator) -> LoginResponse:
    """libiscsi's PDUs: T=1 with AuthMethod, T=0 with CHAP_A, T=1 with the response, then operational."""
    first = machine.receive(pdu(NAMES + [("AuthMethod", "CHAP,None")], transit=True))
    assert status(first) == 0 and not first.transit and text(first)["AuthMethod"] == "CHAP"   # stay: T=0
    second = machine.receive(pdu(NAMES + [("CHAP_A", ini.algorithms)], transit=False))
    assert status(second) == 0 and not second.transit
    answer = text(second)
    ini.algorithm, ini.target_identifier = int(answer["CHAP_A"]), int(answer["CHAP_I"])
    ini.target_challenge = unhex(answer["CHAP_C"])
    third = machine.receive(pdu(NAMES + ini.response(), transit=True))
    if status(third) != 0:
        return third
    assert third.transit and third.nsg == OPERATIONAL
    if ini.target_user is not None:
        assert ini.target_proved(text(third))
    last = machine.receive(pdu(NAMES + OPERATIONAL_KEYS, transit=True, csg=OPERATIONAL, nsg=FULL_FEATURE))
    assert status(last) == 0 and last.transit and last.nsg == FULL_FEATURE
    return last


@pytest.mark.parametrize("mutual", [False, True])
def test_login_machine_full_login(wired: Callable[[ChapAuthenticator], LoginMachine], mutual: bool) -> None:
    auth = authenticator(policy(mutual=mutual))
    machine = wired(auth)
    libiscsi_login(machine, Initiator(algorithms="5", target_user=TUSER if mutual else None))
    assert machine.outcome is not None and machine.outcome.tsih == 7 and auth.authenticated


def test_login_machine_wrong_password(wired: Callable[[ChapAuthenticator], LoginMachine],
                                      caplog: pytest.LogCaptureFixture) -> None:
    machine = wired(authenticator())
    with caplog.at_level(logging.WARNING):
        last = libiscsi_login(machine, Initiator(secret=b"wrong-secret-wrong"))
    assert status(last) == LoginStatus.AUTHENTICATION_FAILURE and machine.failed and not last.data
    logged = caplog.text + str(machine.failure)       # the connection logs machine.failure
    assert "alice" in logged
    assert_clean(logged, "wrong-secret-wrong")


def test_login_machine_refuses_skipping_the_security_stage(
        wired: Callable[[ChapAuthenticator], LoginMachine]) -> None:
    machine = wired(authenticator())
    response = machine.receive(pdu(NAMES + OPERATIONAL_KEYS, transit=True, csg=OPERATIONAL, nsg=FULL_FEATURE))
    assert status(response) == LoginStatus.AUTHENTICATION_FAILURE and machine.failed


@pytest.mark.parametrize("auth_method", ["None", None])
def test_login_machine_refuses_leaving_without_chap(wired: Callable[[ChapAuthenticator], LoginMachine],
                                                    auth_method: str | None) -> None:
    machine = wired(authenticator())
    keys = NAMES + ([("AuthMethod", auth_method)] if auth_method else [])
    response = machine.receive(pdu(keys, transit=True))
    assert status(response) == LoginStatus.AUTHENTICATION_FAILURE and machine.failed


def test_login_machine_stays_while_challenged(wired: Callable[[ChapAuthenticator], LoginMachine]) -> None:
    machine = wired(authenticator())
    machine.receive(pdu(NAMES + [("AuthMethod", "CHAP")], transit=False))
    response = machine.receive(pdu([("CHAP_A", "5")], transit=True))      # T=1 before answering the challenge
    assert status(response) == 0 and not response.transit and machine.stage == SECURITY


def test_login_machine_runs_chap() -> None:
    auth = authenticator()
    machine = LoginMachine(Context(auth))
    libiscsi_login(machine, Initiator())
    assert machine.outcome is not None and auth.authenticated
