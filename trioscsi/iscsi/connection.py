"""One iSCSI connection, target role: the socket pump, the login phase, and full feature phase dispatch.

Strategy: the only socket code in the transport lives here.  `_receive_loop` feeds bytes to the sans-I/O
`PduReader` and dispatches each PDU synchronously through `_HANDLERS` (opcode -> method); anything that must
wait (a SCSI command, task management) is started in the session's nursery.  `_send_loop` writes queued
buffers with one vectored `sendmsg` per batch, so header, data and digest go out without being joined.
StatSN is assigned when a status-bearing PDU is queued, so StatSN order is queue order.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..core.lu import TaskAborted
from ..core.nexus import Command, Response, TaskAttribute, TmfFunction, TmfResponse, decode_lun
from ..scsi.opcodes import cdb_length
from ..scsi.sense import CheckCondition, Status
from .framing import NEED_DATA, DigestError, PduReader, encode_pdu
from .login import LoginMachine
from .pdu import RESERVED_TAG, DataOut, FramingError, LoginRequest, LoginResponse, LogoutRequest, \
    LogoutResponse, NopIn, NopOut, PduError, Reject, RejectReason, ScsiCommand, SnackRequest, TaskMgmtRequest, \
    TaskMgmtResponse, TextRequest, encode_header
from .scsi_task import IscsiTask, StatusStamp

if TYPE_CHECKING:
    from .portal import IscsiService
    from .session import Session

log = logging.getLogger("trioscsi.iscsi")

IOV_MAX = 512
RECV_SIZE = 1 << 18
MAX_WRITE_BUFFER = 16 << 20   # larger writes are refused before any data is buffered (see core max transfer)
SEND_BACKLOG = 8 << 20        # answers queued for a slow reader before we stop reading its requests


class ConnectionClosed(Exception):
    """Raised inside the connection's tasks to end it (logout done, fatal protocol error)."""


class Connection(StatusStamp):
    def __init__(self, service: IscsiService, stream: trio.SocketStream, peer: str, address: str = "") -> None:
        self.service = service
        self.stream = stream
        self.peer = peer
        self.address = address
        self.reader = PduReader()
        self.header_digest = False
        self.data_digest = False
        self.session: Session | None = None
        self.cid = 0
        self.statsn = 0
        self.max_send_segment = 8192
        self.tasks: dict[int, IscsiTask] = {}
        self._out: list[Any] = []
        self._sending = False
        self._socket = stream.socket
        self._out_ready = trio.Event()
        self._drained = trio.Event()
        self._queued_bytes = 0
        self._scope = trio.CancelScope()
        self._ttt = 0
        self._ping_ttt: int | None = None
        self._ping_answered = trio.Event()
        self._logout: LogoutRequest | None = None

    # ---- lifetime --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve this connection until the peer leaves, logs out, or breaks the protocol."""
        with self._scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop)
                    await self._login()
                    if self.session is not None:
                        nursery.start_soon(self._ping_loop)
                        await self._receive_loop(self._dispatch)
                        if self._logout is not None:
                            await self._complete_logout(self._logout)
                    await self._flush()
                    nursery.cancel_scope.cancel()
            except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                     FramingError, trio.TooSlowError) as group:
                log.info("%s: connection closed: %s", self.peer, _first_reason(group))
            except* Exception as group:      # a bug must end this connection only, never the server
                log.error("%s: connection dropped after an internal error: %s", self.peer, _first_reason(group),
                          exc_info=group)
            finally:
                self._detach()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    def close(self) -> None:
        self._scope.cancel()

    def _detach(self) -> None:
        session = self.session
        if session is not None:
            session.connections.discard(self)
            if not session.connections:      # error recovery level 0: the session ends with its connection
                self.service.registry.remove(session)
                session.close()

    # ---- the pump ----------------------------------------------------------------------------------------------

    async def _receive_loop(self, dispatch: Callable[[Any], bool | None]) -> None:
        reader = self.reader
        receive = self.stream.receive_some
        while True:
            try:
                pdu = reader.next_pdu()
            except PduError as exc:
                self.reject(exc.reason, exc.header)
                continue
            except DigestError as exc:
                if exc.header_digest:
                    raise ConnectionClosed("header digest error") from None
                self.reject(RejectReason.DATA_DIGEST_ERROR, encode_header(exc.pdu)[:48])
                continue
            if pdu is NEED_DATA:
                if self._queued_bytes > SEND_BACKLOG:
                    # The initiator is not reading its answers: stop reading its requests until it does.
                    await self._drained.wait()
                chunk = await receive(RECV_SIZE)
                if not chunk:
                    raise ConnectionClosed("peer closed the connection")
                reader.feed(chunk)
                continue
            if dispatch(pdu):
                return

    def queue(self, pdu: Any) -> None:
        buffers = encode_pdu(pdu, header_digest=self.header_digest, data_digest=self.data_digest)
        if not self.tasks and not self._out and not self._sending:
            # No other command in flight and nothing queued ahead: write now (one writev on the non-blocking
            # socket) instead of waking the send loop (with commands in flight the loop batches answers into
            # one sendmsg).  What the socket does not take (or an error, which the loop then raises) is queued.
            try:
                sent = os.writev(self._socket.fileno(), buffers)    # -1 (EBADF) once closed
            except OSError:
                sent = 0
            if sent:
                for count, buf in enumerate(buffers):
                    size = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
                    if size > sent:
                        buffers = [memoryview(buf).cast("B")[sent:]] + buffers[count + 1:]
                        break
                    sent -= size
                else:
                    return
        if self._drained.is_set():
            self._drained = trio.Event()
        self._queued_bytes += sum(len(b) if not isinstance(b, memoryview) else b.nbytes for b in buffers)
        self._out.extend(buffers)
        self._out_ready.set()

    async def _send_loop(self) -> None:
        sock = self.stream.socket
        while True:
            if not self._out:
                self._drained.set()
                await self._out_ready.wait()
            self._out_ready = trio.Event()
            buffers, self._out = self._out, []
            self._sending = bool(buffers)
            while buffers:
                batch = buffers[:IOV_MAX]
                sent = await sock.sendmsg(batch)
                self._queued_bytes -= sent
                total = 0
                for count, buf in enumerate(batch):
                    size = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
                    if total + size > sent:
                        buffers = [memoryview(buf).cast("B")[sent - total:]] + buffers[count + 1:]
                        break
                    total += size
                else:
                    buffers = buffers[len(batch):]
            self._sending = False

    async def _flush(self) -> None:
        """Wait until everything queued so far is on the wire (before closing after a logout or failed login)."""
        while self._out or not self._drained.is_set():
            await self._drained.wait()

    # ---- login --------------------------------------------------------------------------------------------------

    async def _login(self) -> None:
        from .portal import ConnectionLogin
        machine = LoginMachine(ConnectionLogin(self.service, self.address), expcmdsn_window=1)

        def on_login_pdu(pdu: Any) -> bool:
            if not isinstance(pdu, LoginRequest):
                self.reject(RejectReason.PROTOCOL_ERROR, encode_header(pdu)[:48])
                raise ConnectionClosed("non-login PDU during login")
            response: LoginResponse = machine.receive(pdu)
            self.queue(response)
            if machine.failed:
                return True
            if machine.outcome is not None:
                self.statsn = machine.next_statsn
                self.cid = pdu.cid
                return True
            return False

        with trio.fail_after(self.service.login_timeout):
            await self._receive_loop(on_login_pdu)
        if machine.failure is not None:
            await self._login_failed(machine)
            return
        if machine.outcome is None:
            return
        outcome = machine.outcome
        session: Session = outcome.session  # type: ignore[assignment]
        params = outcome.params
        self.header_digest = params.header_digest
        self.data_digest = params.data_digest
        self.reader.header_digest = params.header_digest
        self.reader.data_digest = params.data_digest
        self.reader.max_recv_data_segment_length = params.target_max_recv_data_segment_length
        self.max_send_segment = params.initiator_max_recv_data_segment_length
        if session.replaces is not None:
            # The old nexus must be gone (its tasks ended, its reservation and prevention released) before
            # the new one's first command, or the old session's cleanup would land on the new nexus.
            with trio.move_on_after(self.service.logout_grace):
                await session.replaces.ended.wait()
            session.replaces = None
        await self.service.start_session(session)
        session.connections.add(self)
        self.session = session
        log.info("%s: login of %s to %s (%s session, TSIH %d): %s", self.peer, outcome.initiator_name,
                 outcome.target_name or "discovery", outcome.session_type, session.tsih, _describe(params))

    async def _login_failed(self, machine: LoginMachine) -> None:
        """Log who failed and why (never a secret), and slow down repeated authentication failures."""
        failure = machine.failure
        assert failure is not None
        log.warning("%s: login of %s refused: %s (status 0x%04x)", self.peer, machine.initiator_name or "?",
                    failure, failure.status)
        if failure.status == 0x0201:
            delay = self.service.auth_failed(self.address)
            if delay:
                log.warning("%s: %d authentication failures; answering after %.1f s", self.peer,
                            self.service.auth_failures.get(self.address, (0, 0.0))[0], delay)
                await trio.sleep(delay)

    # ---- full feature phase ----------------------------------------------------------------------------------------

    def status(self) -> tuple[int, int, int]:
        statsn = self.statsn
        self.statsn = (statsn + 1) & 0xFFFFFFFF
        window = self.session.window  # type: ignore[union-attr]
        return statsn, window.expcmdsn, window.maxcmdsn

    def window(self) -> tuple[int, int]:
        window = self.session.window  # type: ignore[union-attr]
        return window.expcmdsn, window.maxcmdsn

    def reject(self, reason: int, header: bytes) -> None:
        statsn, expcmdsn, maxcmdsn = self.status() if self.session else (self.statsn, 0, 0)
        log.warning("%s: Reject reason 0x%02x", self.peer, reason)
        self.queue(Reject(reason=reason, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn,
                          datasn_r2tsn=0, data=bytes(header[:48])))

    def _dispatch(self, pdu: Any) -> bool | None:
        handler = _HANDLERS.get(type(pdu))
        if handler is None:
            self.reject(RejectReason.PROTOCOL_ERROR, encode_header(pdu)[:48])
            return None
        return handler(self, pdu)

    def _sequence(self, pdu: Any, run: Callable[[Any], Any]) -> None:
        """Order a CmdSN-carrying request and start whatever became deliverable."""
        session = self.session
        assert session is not None
        ready = session.window.accept(pdu.cmdsn, pdu.immediate, (pdu, run))
        if ready is None:
            log.debug("%s: CmdSN %d outside the window; dropped", self.peer, pdu.cmdsn)
            return
        for item, handler in ready:          # each queued PDU runs with its own handler
            handler(item)

    def _on_nop_out(self, pdu: NopOut) -> None:
        if pdu.ttt != RESERVED_TAG:
            if pdu.ttt == self._ping_ttt:
                self._ping_answered.set()
            return
        if pdu.itt == RESERVED_TAG:
            if not pdu.immediate:
                self._sequence(pdu, lambda _: None)
            return
        if len(pdu.data) > self.max_send_segment:
            self.reject(RejectReason.PROTOCOL_ERROR, encode_header(pdu)[:48])
            return

        def answer(item: NopOut) -> None:
            statsn, expcmdsn, maxcmdsn = self.status()
            self.queue(NopIn(lun=item.lun, itt=item.itt, ttt=RESERVED_TAG, statsn=statsn, expcmdsn=expcmdsn,
                             maxcmdsn=maxcmdsn, data=item.data))
        self._sequence(pdu, answer)

    def _on_scsi_command(self, pdu: ScsiCommand) -> None:
        session = self.session
        assert session is not None
        if session.is_discovery or session.target is None:
            self.reject(RejectReason.PROTOCOL_ERROR, encode_header(pdu)[:48])
            return
        if pdu.itt in self.tasks:
            self.reject(RejectReason.TASK_IN_PROGRESS, encode_header(pdu)[:48])
            return
        task = IscsiTask(pdu)
        if pdu.write:
            params = session.params
            if len(pdu.data) and not params.immediate_data:
                self.reject(RejectReason.PROTOCOL_ERROR, encode_header(pdu)[:48])
                return
            task.start_data_out(params.first_burst_length, params.initial_r2t, MAX_WRITE_BUFFER)
        self.tasks[pdu.itt] = task

        def start(item: ScsiCommand) -> None:
            session.window.started()
            assert session.commands is not None and session.target is not None
            lun = decode_lun(item.lun)
            task.core = session.target.admit(session.nexus, lun if lun is not None else 0xFFFF, item.itt,
                                             _task_attribute(item.attr))
            session.commands.start_soon(self._run_command, task)
        self._sequence(pdu, start)

    def _on_data_out(self, pdu: DataOut) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None or not task.command.write:
            self.reject(RejectReason.PROTOCOL_ERROR, encode_header(pdu)[:48])
            return
        try:
            task.on_data_out(pdu)
        except PduError as exc:
            self.reject(exc.reason, encode_header(pdu)[:48])

    async def _run_command(self, task: IscsiTask) -> None:
        session = self.session
        assert session is not None and session.target is not None
        pdu = task.command
        core = task.core
        scope = core.scope if core is not None else trio.CancelScope()
        try:
            with scope:           # task management cancels this, from gathering Data-Out to the answer
                response = await self._execute(session, task)
            if scope.cancelled_caught:
                return            # aborted: RFC 7143 sends no response for an aborted task
        except TaskAborted:
            return
        except Exception:            # a bug must cost this connection at most, never the server
            log.exception("%s: command ITT 0x%08x failed; closing the connection", self.peer, pdu.itt)
            self.close()
            return
        finally:
            self.tasks.pop(pdu.itt, None)
            session.window.finished()
            if core is not None:
                lun = decode_lun(pdu.lun)
                session.target.release(session.nexus, lun if lun is not None else 0xFFFF, core)
        for out in task.response_pdus(response, max_data_segment=self.max_send_segment, wanted=response.wanted,
                                      stamp=self):
            self.queue(out)

    async def _execute(self, session: Session, task: IscsiTask) -> Response:
        pdu = task.command
        assert session.target is not None
        lun = decode_lun(pdu.lun)
        cdb = bytes(pdu.cdb[:cdb_length(pdu.cdb)])
        if task.error is not None:
            return Response(Status.CHECK_CONDITION, task.error.sense())
        if pdu.write:
            await self._gather(session, task)
        command = Command(session.nexus, lun if lun is not None else 0xFFFF, cdb, tag=pdu.itt,
                          data_out=task.buffer[:task.received] if pdu.write else b"",
                          xfer=pdu.edtl if pdu.read else 0, attr=_task_attribute(pdu.attr), admitted=task.core)
        if not pdu.read and not pdu.write and pdu.edtl:
            pass  # a transfer length with neither R nor W: the data has nowhere to go; residual reported
        try:
            return await session.target.execute(command)
        except CheckCondition as cc:
            return Response(Status.CHECK_CONDITION, cc.sense())

    async def _gather(self, session: Session, task: IscsiTask) -> None:
        await task.burst_done.wait()
        r2tsn = 0
        while True:
            self._ttt = (self._ttt + 1) & 0x7FFFFFFF
            r2t = task.r2t(self._ttt, r2tsn, session.params.max_burst_length)
            if r2t is None:
                return
            expcmdsn, maxcmdsn = self.window()
            self.queue(_stamped(r2t, statsn=self.statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn))
            r2tsn += 1
            await task.burst_done.wait()

    def _on_task_mgmt(self, pdu: TaskMgmtRequest) -> None:
        session = self.session
        assert session is not None

        async def perform(item: TaskMgmtRequest, plan: Any) -> None:
            response = 5 if plan is None else int(await plan())
            statsn, expcmdsn, maxcmdsn = self.status()
            self.queue(TaskMgmtResponse(response=response, itt=item.itt, statsn=statsn, expcmdsn=expcmdsn,
                                        maxcmdsn=maxcmdsn))
            if item.function & 0x7F == TmfFunction.TARGET_COLD_RESET and response == TmfResponse.FUNCTION_COMPLETE:
                # RFC 7143 11.5.1: after the response, the target closes every connection of every session.
                await self._flush()
                ended = self.service.end_sessions_of(session.target)
                log.info("%s: TARGET COLD RESET from %s: %d session(s) closed", self.peer,
                         session.initiator_name, ended)

        def start(item: TaskMgmtRequest) -> None:
            assert session.commands is not None
            plan = None
            if session.target is not None:      # the affected tasks are chosen now, in CmdSN order
                lun = decode_lun(item.lun)
                plan = session.target.plan_task_management(session.nexus, item.function & 0x7F,
                                                           lun if lun is not None else 0xFFFF, item.rtt)
            session.commands.start_soon(perform, item, plan)
        self._sequence(pdu, start)

    def _on_text(self, pdu: TextRequest) -> None:
        self._sequence(pdu, lambda item: self.queue(self.service.text_response(self, item)))

    def _on_logout(self, pdu: LogoutRequest) -> bool:
        """Stop reading; `run` completes the logout once the session's commands have ended."""
        self._logout = pdu
        return True

    async def _complete_logout(self, pdu: LogoutRequest) -> None:
        """RFC 7143 11.14: answer only after every command of what is closing has ended, so a reservation
        or registration the nexus held is already released when the initiator sees the answer."""
        session = self.session
        assert session is not None
        response = 0 if pdu.reason in (0, 1) else 2   # reason 2 (remove for recovery) needs ERL 2
        if response == 0:
            log.info("%s: logout (%s)", self.peer, "close session" if pdu.reason == 0 else "close connection")
            self.service.registry.remove(session)
            session.close(keep=self)
            with trio.move_on_after(self.service.logout_grace):
                await session.ended.wait()
        statsn, expcmdsn, maxcmdsn = self.status()
        self.queue(LogoutResponse(response=response, itt=pdu.itt, statsn=statsn, expcmdsn=expcmdsn,
                                  maxcmdsn=maxcmdsn, time2wait=0, time2retain=0))

    def _on_snack(self, pdu: SnackRequest) -> None:
        self.reject(RejectReason.PROTOCOL_ERROR, encode_header(pdu)[:48])

    def _on_login_in_ffp(self, pdu: LoginRequest) -> None:
        self.reject(RejectReason.PROTOCOL_ERROR, encode_header(pdu)[:48])

    async def _ping_loop(self) -> None:
        """Target-initiated NOP-In: drop a connection whose initiator no longer answers."""
        interval = self.service.nop_interval
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            self._ttt = (self._ttt + 1) & 0x7FFFFFFF
            self._ping_ttt = self._ttt
            self._ping_answered = trio.Event()
            expcmdsn, maxcmdsn = self.window()
            self.queue(NopIn(lun=0, itt=RESERVED_TAG, ttt=self._ping_ttt, statsn=self.statsn, expcmdsn=expcmdsn,
                             maxcmdsn=maxcmdsn))
            with trio.move_on_after(self.service.nop_timeout):
                await self._ping_answered.wait()
            if not self._ping_answered.is_set():
                raise ConnectionClosed(f"no NOP-Out answer within {self.service.nop_timeout:.0f} s")


_HANDLERS: dict[type, Callable[[Connection, Any], bool | None]] = {
    NopOut: Connection._on_nop_out,
    ScsiCommand: Connection._on_scsi_command,
    DataOut: Connection._on_data_out,
    TaskMgmtRequest: Connection._on_task_mgmt,
    TextRequest: Connection._on_text,
    LogoutRequest: Connection._on_logout,
    SnackRequest: Connection._on_snack,
    LoginRequest: Connection._on_login_in_ffp,
}


# RFC 7143 11.3.1.2 numbers task attributes 0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA; the core
# speaks SAM's numbering (TaskAttribute).  An untagged task is treated as simple.
_SAM_ATTRIBUTE = {0: TaskAttribute.SIMPLE, 1: TaskAttribute.SIMPLE, 2: TaskAttribute.ORDERED,
                  3: TaskAttribute.HEAD_OF_QUEUE, 4: TaskAttribute.ACA}


def _task_attribute(iscsi_attr: int) -> int:
    return _SAM_ATTRIBUTE.get(iscsi_attr, TaskAttribute.SIMPLE)


def _stamped(pdu: Any, **fields: int) -> Any:
    import dataclasses
    return dataclasses.replace(pdu, **fields)


def _describe(params: Any) -> str:
    return ", ".join(f"{k}={getattr(params, k)}" for k in (
        "header_digest", "data_digest", "initiator_max_recv_data_segment_length",
        "target_max_recv_data_segment_length", "max_burst_length", "first_burst_length", "initial_r2t",
        "immediate_data", "max_outstanding_r2t") if hasattr(params, k))


def _first_reason(group: BaseExceptionGroup) -> str:  # type: ignore[type-arg]
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_reason(exc)
        return str(exc) or type(exc).__name__
    return "?"
