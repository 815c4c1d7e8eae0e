"""The target side of one iSCSI login (RFC 7143 6.3, 11.12-11.13), sans I/O.

Strategy: `LoginMachine.receive(LoginRequest) -> LoginResponse`.  Stage transitions come from one table,
`_TRANSITIONS[(current stage, next stage)]`; a pair missing from it fails the login with INITIATOR ERROR.
The machine asks its `LoginContext` (the portal) the questions it cannot answer alone: does this target exist
and may this initiator use it, and which session does this login create or join.  Any failure is a
`LoginFailed` carrying the login status; `receive` turns it into the final Login Response and sets `failed`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from .chap import ChapAuthenticator
from .negotiation import LoginStatus, NegotiationError, Negotiator, SessionParams, TargetSettings, encode_text, \
    parse_text
from .pdu import LoginRequest, LoginResponse

log = logging.getLogger("trioscsi.iscsi.login")

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
_TRANSITIONS: dict[tuple[int, int], str] = {
    (SECURITY, SECURITY): "stay",
    (SECURITY, OPERATIONAL): "to operational",
    (SECURITY, FULL_FEATURE): "to full feature",
    (OPERATIONAL, OPERATIONAL): "stay",
    (OPERATIONAL, FULL_FEATURE): "to full feature",
}
MAX_LOGIN_TEXT = 65536


class LoginFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = LoginStatus(status)


@dataclass
class LoginOutcome:
    """What a successful login established; the connection turns it into a session."""
    initiator_name: str
    initiator_alias: str | None
    target_name: str | None
    session_type: str
    isid: bytes
    tsih: int
    cid: int
    params: SessionParams
    cmdsn: int = 0
    session: object = None


class LoginContext(Protocol):
    def target_settings(self, target_name: str | None, initiator_name: str, session_type: str) -> TargetSettings:
        """Settings for this target (raise LoginFailed NOT_FOUND / AUTHORIZATION_FAILURE when refused)."""

    def bind_session(self, outcome: LoginOutcome) -> int:
        """Create, reinstate or join the session; return its TSIH (raise LoginFailed to refuse)."""

    def authenticator(self, target_name: str | None, initiator_name: str,
                      session_type: str) -> ChapAuthenticator | None:
        """A fresh CHAP authenticator for this login, or None when the target requires no authentication."""


@dataclass
class LoginMachine:
    context: LoginContext
    expcmdsn_window: int = 1
    stage: int = SECURITY
    failed: bool = False
    failure: LoginFailed | None = None
    outcome: LoginOutcome | None = None
    _first: LoginRequest | None = None
    _negotiator: Negotiator | None = None
    _auth: ChapAuthenticator | None = None
    _pending_text: bytearray = field(default_factory=bytearray)
    _statsn: int = 0
    initiator_name: str | None = None

    @property
    def done(self) -> bool:
        return self.failed or self.outcome is not None

    def receive(self, request: LoginRequest) -> LoginResponse:
        try:
            return self._receive(request)
        except NegotiationError as exc:
            return self._fail(request, LoginFailed(exc.status, str(exc)))
        except LoginFailed as exc:
            return self._fail(request, exc)

    def _fail(self, request: LoginRequest, exc: LoginFailed) -> LoginResponse:
        self.failed = True
        self.failure = exc
        return self._response(request, status=int(exc.status), transit=False, nsg=0)

    def _receive(self, request: LoginRequest) -> LoginResponse:
        if self.done:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "login request after the login ended")
        if request.version_min > 0 or request.version_max < 0:
            raise LoginFailed(LoginStatus.UNSUPPORTED_VERSION, "only iSCSI version 0 is spoken")
        first = self._first
        if first is None:
            first = self._first = request
            self._statsn = request.expstatsn
            if request.csg == OPERATIONAL:      # the security stage may be skipped (RFC 7143 6.3)
                self.stage = OPERATIONAL
        elif (request.isid, request.tsih, request.cid, request.itt) != (first.isid, first.tsih, first.cid,
                                                                       first.itt):
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "ISID, TSIH, CID or ITT changed during login")
        if request.csg != self.stage or request.csg == 2:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR,
                              f"request is in stage {request.csg}, login is in stage {self.stage}")
        if request.transit and (request.csg, request.nsg) not in _TRANSITIONS:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, f"no transition {request.csg} -> {request.nsg}")
        if request.transit and request.cont:
            raise LoginFailed(LoginStatus.INITIATOR_ERROR, "T and C bits both set")
        self._pending_text += request.data
        if len(self._pending_text) > MAX_LOGIN_TEXT:
            raise LoginFailed(LoginStatus.OUT_OF_RESOURCES, "login text too long")
        if request.cont:
            return self._response(request, transit=False, nsg=0)
        pairs = parse_text(bytes(self._pending_text))
        self._pending_text.clear()
        answer = self._negotiate(pairs)
        transit = False
        nsg = 0
        if request.transit and self._may_leave_stage():
            transit, nsg = True, request.nsg
        response_data = encode_text(answer)
        if transit:
            self.stage = nsg
            if nsg == FULL_FEATURE:
                self._finish(request)
        assert self._negotiator is not None
        return self._response(request, transit=transit, nsg=nsg, data=response_data,
                              tsih=self.outcome.tsih if self.outcome else request.tsih)

    def _negotiate(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        answer: list[tuple[str, str]] = []
        if self._negotiator is None:
            keys = dict(pairs)
            initiator = keys.get("InitiatorName")
            self.initiator_name = initiator
            if not initiator:
                raise LoginFailed(LoginStatus.MISSING_PARAMETER, "first login request lacks InitiatorName")
            session_type = keys.get("SessionType", "Normal")
            target = keys.get("TargetName")
            if session_type == "Normal" and not target:
                raise LoginFailed(LoginStatus.MISSING_PARAMETER, "normal session without TargetName")
            if session_type not in ("Normal", "Discovery"):
                raise LoginFailed(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"session type {session_type!r}")
            settings = self.context.target_settings(target if session_type == "Normal" else None, initiator,
                                                    session_type)
            self._auth = self.context.authenticator(target if session_type == "Normal" else None, initiator,
                                                    session_type)
            if self._auth is not None and self.stage != SECURITY:
                self._auth.require_authenticated()     # the security stage may not be skipped
            assert self._first is not None
            self._negotiator = Negotiator(settings, leading=self._first.tsih == 0, auth=self._auth)
        answer += self._negotiator.respond(pairs, stage=self.stage)
        if self.stage == OPERATIONAL:
            answer += self._negotiator.target_declarations(stage=OPERATIONAL)
        return answer

    def _may_leave_stage(self) -> bool:
        assert self._negotiator is not None
        if self.stage == SECURITY:
            return self._auth is None or self._auth.may_leave_security(self._negotiator.params.auth_method)
        return self._negotiator.complete

    def _finish(self, request: LoginRequest) -> None:
        assert self._negotiator is not None and self._first is not None
        params = self._negotiator.params
        outcome = LoginOutcome(initiator_name=params.initiator_name, initiator_alias=params.initiator_alias,
                               target_name=params.target_name or None, session_type=params.session_type,
                               isid=bytes(request.isid), tsih=request.tsih, cid=request.cid, params=params,
                               cmdsn=request.cmdsn)
        outcome.tsih = self.context.bind_session(outcome)
        self.outcome = outcome

    def _response(self, request: LoginRequest, *, transit: bool, nsg: int, data: bytes = b"",
                  status: int = 0, tsih: int | None = None) -> LoginResponse:
        statsn = self._statsn
        self._statsn = (statsn + 1) & 0xFFFFFFFF
        return LoginResponse(transit=transit, cont=False, csg=request.csg if request.csg != 2 else 0,
                             nsg=nsg if transit else 0, version_max=0, version_active=0,
                             isid=bytes(request.isid), tsih=tsih if tsih is not None else request.tsih,
                             itt=request.itt, statsn=statsn, expcmdsn=request.cmdsn,
                             maxcmdsn=(request.cmdsn + self.expcmdsn_window - 1) & 0xFFFFFFFF,
                             status_class=status >> 8, status_detail=status & 0xFF, data=data)

    @property
    def next_statsn(self) -> int:
        return self._statsn
