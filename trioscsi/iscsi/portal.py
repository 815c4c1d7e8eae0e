"""The iSCSI service: portals that accept connections, the targets they offer, and the login decisions.

Ownership: `IscsiService.serve()` runs in the server's nursery and owns two nurseries: one for the
connections (each `Connection.run`) and one for the sessions (each `Session.run`), so a session is not a
child of the connection that created it.
"""
from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

import trio

from ..config import TargetConfig
from ..core.target import ScsiTarget
from .connection import Connection
from .discovery import TextResponder
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
    def __init__(self, targets: list[ExportedTarget], portals: list[tuple[str, int]]) -> None:
        self.targets = {t.config.name: t for t in targets}
        self.portals = portals
        self.registry = SessionRegistry()
        self.bound: list[tuple[str, int]] = []
        self.login_timeout = max((t.config.iscsi.login_timeout for t in targets), default=15.0)
        self.nop_interval = min((t.config.iscsi.nop_interval for t in targets), default=30.0)
        self.nop_timeout = max((t.config.iscsi.nop_timeout for t in targets), default=30.0)
        self._sessions: trio.Nursery | None = None
        self.text = TextResponder(self)

    # ---- serving ----------------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = []
        for host, port in self.portals:
            listeners += await _listen(host, port)
        self.bound = [sock.getsockname()[:2] for sock in listeners]
        for host, port in self.bound:
            log.info("iSCSI portal listening on %s", _format_address(host, port))
        async with trio.open_nursery() as sessions:
            self._sessions = sessions
            async with trio.open_nursery() as connections:
                for sock in listeners:
                    connections.start_soon(self._accept_loop, sock, connections)
                task_status.started(self.bound)

    async def _accept_loop(self, listener: trio.socket.SocketType, connections: trio.Nursery) -> None:
        async with trio.SocketListener(listener) as socket_listener:
            while True:
                try:
                    stream = await socket_listener.accept()
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("accept failed (%s); retrying in 100 ms", exc)
                        await trio.sleep(0.1)
                        continue
                    raise
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = _format_address(*stream.socket.getpeername()[:2])
                connections.start_soon(Connection(self, stream, peer).run)

    async def start_session(self, session: Session) -> None:
        assert self._sessions is not None
        await self._sessions.start(session.run)

    # ---- LoginContext ----------------------------------------------------------------------------------------

    def target_settings(self, target_name: str | None, initiator_name: str, session_type: str) -> TargetSettings:
        if target_name is None:
            return TargetSettings()
        exported = self.targets.get(target_name)
        if exported is None:
            raise LoginFailed(LoginStatus.NOT_FOUND, f"{initiator_name} asked for unknown target {target_name}")
        s = exported.config.iscsi
        return TargetSettings(max_recv_data_segment_length=s.max_recv_data_segment_length,
                              max_burst_length=s.max_burst_length, first_burst_length=s.first_burst_length,
                              initial_r2t=s.initial_r2t, immediate_data=s.immediate_data,
                              max_outstanding_r2t=s.max_outstanding_r2t, header_digests=s.header_digest,
                              data_digests=s.data_digest, default_time2wait=s.default_time2wait,
                              default_time2retain=s.default_time2retain, target_alias=exported.config.alias,
                              target_portal_group_tag=exported.config.tpgt)

    def bind_session(self, outcome: LoginOutcome) -> int:
        exported = self.targets.get(outcome.target_name or "")
        if outcome.session_type == "Normal" and exported is None:
            raise LoginFailed(LoginStatus.NOT_FOUND, f"unknown target {outcome.target_name}")

        def make(tsih: int) -> Session:
            return Session(tsih, outcome, exported.scsi if exported else None,
                           exported.config.tpgt if exported else 1,
                           exported.config.queue_depth if exported else 1, cmdsn=outcome.cmdsn)
        session = self.registry.bind(outcome, make=make)
        outcome.session = session
        return session.tsih

    def text_response(self, connection: Connection, request: TextRequest) -> TextResponse:
        return self.text.respond(connection, request)


async def _listen(host: str, port: int) -> list[trio.socket.SocketType]:
    infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                          flags=socket.AI_PASSIVE)
    sockets = []
    seen = set()
    for family, kind, proto, _, address in infos:
        if address in seen:
            continue
        seen.add(address)
        sock = trio.socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(address)
        sock.listen(128)
        sockets.append(sock)
    return sockets


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
