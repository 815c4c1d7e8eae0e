"""The iSCSI service: portals that accept connections, the targets they offer, and the login decisions.

Ownership: `IscsiService.serve()` runs in the server's nursery and owns two nurseries: one for the
connections (each `Connection.run`) and one for the sessions (each `Session.run`), so a session is not a
child of the connection that created it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..config import ChapConfig, TargetConfig
from ..core.target import ScsiTarget
from ..listening import accept_forever, format_address, listen
from .connection import Connection
from .discovery import TextResponder
from .chap import ChapAuthenticator, ChapCredentials, ChapPolicy
from .login import LoginFailed, LoginOutcome
from .negotiation import LoginStatus, TargetSettings
from .pdu import TextRequest, TextResponse
from .session import Session, SessionRegistry

log = logging.getLogger("trioscsi.iscsi")


@dataclass
class ExportedTarget:
    config: TargetConfig
    scsi: ScsiTarget


class IscsiService:
    def __init__(self, targets: list[ExportedTarget], portals: list[tuple[str, int]], *,
                 discovery_chap: ChapConfig | None = None) -> None:
        self.discovery_chap = _policy(discovery_chap)
        self.targets = {t.config.name: t for t in targets}
        self.portals = portals
        self.registry = SessionRegistry()
        self.bound: list[tuple[str, int]] = []
        self.login_timeout = max((t.config.iscsi.login_timeout for t in targets), default=15.0)
        self.nop_interval = min((t.config.iscsi.nop_interval for t in targets), default=30.0)
        self.nop_timeout = max((t.config.iscsi.nop_timeout for t in targets), default=30.0)
        self.logout_grace = 10.0    # how long a logout waits for the session's commands to end
        # Repeated authentication failures from one address are answered ever more slowly.
        self.auth_failures: dict[str, tuple[int, float]] = {}
        self.auth_delay_base = 0.5
        self.auth_delay_max = 10.0
        self._sessions: trio.Nursery | None = None
        self.text = TextResponder(self)

    # ---- serving ----------------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = []
        for host, port in self.portals:
            listeners += await listen(host, port)
        self.bound = [sock.getsockname()[:2] for sock in listeners]
        for host, port in self.bound:
            log.info("iSCSI portal listening on %s", format_address(host, port))
        async with trio.open_nursery() as sessions:
            self._sessions = sessions
            async with trio.open_nursery() as connections:
                def connected(stream: trio.SocketStream) -> None:
                    host, port = stream.socket.getpeername()[:2]
                    connections.start_soon(Connection(self, stream, format_address(host, port), host).run)

                for sock in listeners:
                    connections.start_soon(accept_forever, sock, connected, "iSCSI")
                task_status.started(self.bound)

    def auth_failed(self, address: str) -> float:
        """Count an authentication failure from `address`; the delay before answering it (0: none yet).
        The count decays: an address quiet for ten minutes starts afresh."""
        count, last = self.auth_failures.get(address, (0, 0.0))
        now = trio.current_time()
        if now - last > 600:
            count = 0
        count += 1
        self.auth_failures[address] = (count, now)
        if len(self.auth_failures) > 10000:          # bounded memory under a flood of addresses
            oldest = min(self.auth_failures, key=lambda a: self.auth_failures[a][1])
            del self.auth_failures[oldest]
        return 0.0 if count < 2 else min(self.auth_delay_base * 2 ** (count - 2), self.auth_delay_max)

    async def start_session(self, session: Session) -> None:
        assert self._sessions is not None
        await self._sessions.start(session.run)

    def end_sessions_of(self, target: object) -> int:
        """TARGET COLD RESET (RFC 7143 11.5.1): every session with that target ends, its connections close."""
        ended = 0
        for session in self.registry:
            if session.target is target:
                self.registry.remove(session)
                session.close()
                ended += 1
        return ended

    # ---- login decisions --------------------------------------------------------------------------------

    def visible_targets(self, initiator_name: str, address: str) -> list[ExportedTarget]:
        """The targets this initiator may log in to (and so may discover)."""
        return [t for t in self.targets.values() if t.scsi.may_use(initiator_name, address)]

    def chap_policy(self, target_name: str | None, initiator_name: str, address: str) -> ChapPolicy | None:
        """CHAP for this login: the discovery policy, or the initiator group's, or the target's."""
        if target_name is None:
            return self.discovery_chap
        exported = self.targets[target_name]
        group, _ = exported.scsi.access.resolve(initiator_name, address)
        group_chap = {g.name: g.chap for g in exported.config.groups}.get(group.name) if group else None
        return _policy(group_chap or exported.config.chap)

    def text_response(self, connection: Connection, request: TextRequest) -> TextResponse:
        return self.text.respond(connection, request)


class ConnectionLogin:
    """The LoginContext of one connection: the service's decisions, for this initiator address."""

    def __init__(self, service: IscsiService, address: str) -> None:
        self.service = service
        self.address = address

    def target_settings(self, target_name: str | None, initiator_name: str, session_type: str) -> TargetSettings:
        service = self.service
        if target_name is None:
            policy = service.discovery_chap
            return TargetSettings(auth_methods=policy.auth_methods if policy else ("None",))
        exported = service.targets.get(target_name)
        if exported is None or not exported.scsi.may_use(initiator_name, self.address):
            # The same answer whether the target is hidden or absent: no hint that it exists.
            log.warning("login refused: %s from %s may not use %s%s", initiator_name, self.address, target_name,
                        "" if exported else " (no such target)")
            raise LoginFailed(LoginStatus.AUTHORIZATION_FAILURE, f"{initiator_name} may not use {target_name}")
        s = exported.config.iscsi
        policy = service.chap_policy(target_name, initiator_name, self.address)
        return TargetSettings(max_recv_data_segment_length=s.max_recv_data_segment_length,
                              max_burst_length=s.max_burst_length, first_burst_length=s.first_burst_length,
                              initial_r2t=s.initial_r2t, immediate_data=s.immediate_data,
                              max_outstanding_r2t=s.max_outstanding_r2t, header_digests=s.header_digest,
                              data_digests=s.data_digest, default_time2wait=s.default_time2wait,
                              default_time2retain=s.default_time2retain, target_alias=exported.config.alias,
                              target_portal_group_tag=exported.config.tpgt,
                              auth_methods=policy.auth_methods if policy else ("None",))

    def authenticator(self, target_name: str | None, initiator_name: str,
                      session_type: str) -> ChapAuthenticator | None:
        policy = self.service.chap_policy(target_name, initiator_name, self.address)
        return ChapAuthenticator(policy) if policy is not None and policy.required else None

    def bind_session(self, outcome: LoginOutcome) -> int:
        service = self.service
        exported = service.targets.get(outcome.target_name or "")
        if outcome.session_type == "Normal" and exported is None:
            raise LoginFailed(LoginStatus.AUTHORIZATION_FAILURE, f"unknown target {outcome.target_name}")

        def make(tsih: int) -> Session:
            return Session(tsih, outcome, exported.scsi if exported else None,
                           exported.config.tpgt if exported else 1,
                           exported.config.queue_depth if exported else 1, cmdsn=outcome.cmdsn,
                           address=self.address)
        session = service.registry.bind(outcome, make=make)
        outcome.session = session
        return session.tsih


def _policy(chap: ChapConfig | None) -> ChapPolicy | None:
    if chap is None:
        return None
    outgoing = ChapCredentials(chap.mutual_user, chap.mutual_secret) \
        if chap.mutual_user and chap.mutual_secret else None
    return ChapPolicy(incoming=ChapCredentials(chap.user, chap.secret), outgoing=outgoing,
                      algorithms=chap.algorithms)
