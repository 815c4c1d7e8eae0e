"""iSCSI sessions: the registry that binds logins to sessions (ISID/TSIH, reinstatement) and the session
object that owns its commands.

Ownership: the service's session nursery runs `Session.run()`, which owns the nursery of the session's
commands.  A session therefore does not die with one TCP connection's task (room for reinstatement,
Time2Retain and several connections per session); at error recovery level 0 it closes when its last
connection closes.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from ..core.nexus import Nexus
from ..core.target import ScsiTarget
from .login import LoginFailed, LoginOutcome
from .negotiation import LoginStatus, SessionParams
from .sequencing import CmdSnWindow

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("trioscsi.iscsi.session")


class Session:
    def __init__(self, tsih: int, outcome: LoginOutcome, target: ScsiTarget | None, tpgt: int,
                 queue_depth: int, cmdsn: int, relative_port: int = 1, address: str = "") -> None:
        self.tsih = tsih
        self.isid = outcome.isid
        self.initiator_name = outcome.initiator_name
        self.target_name = outcome.target_name
        self.session_type = outcome.session_type
        self.params: SessionParams = outcome.params
        self.target = target
        self.nexus = Nexus(initiator_port=f"{outcome.initiator_name},i,0x{outcome.isid.hex()}",
                           target_port=f"{outcome.target_name},t,0x{tpgt:04x}",
                           initiator_name=outcome.initiator_name, relative_port=relative_port,
                           initiator_address=address)
        self.window: CmdSnWindow[Any] = CmdSnWindow(cmdsn, queue_depth)
        self.connections: set[Connection] = set()
        self.commands: trio.Nursery | None = None
        self._closed = trio.Event()
        self.ended = trio.Event()
        self.replaces: Session | None = None    # the session this one reinstates (RFC 7143 6.3.5)

    @property
    def is_discovery(self) -> bool:
        return self.session_type == "Discovery"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.commands = nursery
                task_status.started()
                await self._closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self.target is not None:
                self.target.nexus_lost(self.nexus)
            self.ended.set()
            log.info("session %s (TSIH %d) ended", self.nexus.initiator_port, self.tsih)

    def close(self, keep: Connection | None = None) -> None:
        """End the session: its commands are aborted and its connections (but `keep`) closed."""
        self._closed.set()
        for connection in list(self.connections):
            if connection is not keep:
                connection.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


class SessionRegistry:
    """Every live session, by TSIH and by (initiator name, ISID, target name) for reinstatement."""

    def __init__(self) -> None:
        self._by_tsih: dict[int, Session] = {}
        self._ending: set[Session] = set()      # removed, but their commands may not have ended yet
        self._tsihs: Iterator[int] = itertools.cycle(range(1, 0x10000))

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_tsih.values()))

    def __len__(self) -> int:
        return len(self._by_tsih)

    def bind(self, outcome: LoginOutcome, *, make: Any) -> Session:
        """Find or create the session a login belongs to (RFC 7143 6.3.1 and 6.3.5)."""
        if outcome.tsih:
            session = self._by_tsih.get(outcome.tsih)
            if session is None or session.closed or session.isid != outcome.isid \
                    or session.initiator_name != outcome.initiator_name:
                raise LoginFailed(LoginStatus.SESSION_DOES_NOT_EXIST, f"no session with TSIH {outcome.tsih}")
            raise LoginFailed(LoginStatus.TOO_MANY_CONNECTIONS, "MaxConnections=1: no second connection")
        replaced = None
        for old in self:
            if (old.initiator_name, old.isid, old.target_name) == (outcome.initiator_name, outcome.isid,
                                                                   outcome.target_name):
                log.info("session reinstatement: %s replaces TSIH %d", old.nexus.initiator_port, old.tsih)
                self.remove(old)
                old.close()
        self._ending = {s for s in self._ending if not s.ended.is_set()}
        for old in self._ending:          # a dropped session of the same initiator port, still cleaning up
            if (old.initiator_name, old.isid, old.target_name) == (outcome.initiator_name, outcome.isid,
                                                                   outcome.target_name):
                replaced = old
        tsih = self._free_tsih()
        new: Session = make(tsih)
        new.replaces = replaced
        self._by_tsih[tsih] = new
        return new

    def _free_tsih(self) -> int:
        for tsih in self._tsihs:
            if tsih not in self._by_tsih:
                return tsih
        raise LoginFailed(LoginStatus.OUT_OF_RESOURCES, "no free TSIH")

    def remove(self, session: Session) -> None:
        if self._by_tsih.get(session.tsih) is session:
            del self._by_tsih[session.tsih]
            if not session.ended.is_set():
                self._ending.add(session)
