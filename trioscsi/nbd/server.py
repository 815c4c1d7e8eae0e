"""The NBD transport: listeners, one task per connection, each NBD request run through the SCSI core.

Ownership: `NbdService.serve()` runs in the server's nursery and owns one nursery of connections; each
`NbdConnection.run` owns the nursery of its requests, which run concurrently and answer by handle in whatever
order they finish (NBD allows it).  The connection is an I_T nexus of its own: every request is admitted into
the LU's task set when it is read off the socket (so task management and task ordering see it), runs inside its
task's cancel scope, and is released when it ends; the nexus is lost (reservations, unit attentions, emulator
state) when the connection ends.  See docs/nbd.md.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from ..config import NbdConfig
from ..core.lu import Task, TaskAborted
from ..core.nexus import Command, Nexus, Response
from ..core.target import ScsiTarget
from ..listening import accept_forever, format_address, listen
from ..scsi.sense import CheckCondition, Status
from . import scsi_map
from .protocol import NEED_DATA, Aborted, Cmd, CmdFlag, Disconnect, Errno, Export, ExportRequested, \
    NbdProtocolError, NbdServer, Reply, Request, State, TransmissionFlag, encode_reply
from .scsi_map import Geometry

log = logging.getLogger("trioscsi.nbd")

RECV_SIZE = 1 << 18
HANDSHAKE_TIMEOUT = 30.0
MAX_IN_FLIGHT = 32              # requests read ahead per connection (bounds the memory a client can pin)
MAX_ATTEMPTS = 8                # a command repeated after unit attentions, BUSY and the like
MAX_PAYLOAD = 32 << 20


@dataclass
class NbdExport:
    config: NbdConfig
    target: ScsiTarget


class ConnectionClosed(Exception):
    """The peer went away."""


class NbdService:
    """Every NBD listener; exports sharing a listen address share its listener."""

    def __init__(self, exports: Sequence[NbdExport]) -> None:
        self.listeners: dict[tuple[str, int], dict[str, NbdExport]] = {}
        for export in exports:
            self.listeners.setdefault(export.config.listen, {})[export.config.export] = export
        self.bound: list[tuple[str, int]] = []
        self.connections: set[NbdConnection] = set()

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        sockets = []
        for (host, port), exports in self.listeners.items():
            for sock in await listen(host, port):
                sockets.append((sock, exports))
        self.bound = [sock.getsockname()[:2] for sock, _ in sockets]
        for (sock, exports), (host, port) in zip(sockets, self.bound):
            log.info("NBD listening on %s: %s", format_address(host, port), ", ".join(map(repr, exports)))
        async with trio.open_nursery() as connections:
            for sock, exports in sockets:
                connections.start_soon(accept_forever, sock, self._on_connection(sock, exports, connections),
                                       "NBD")
            task_status.started(self.bound)

    def _on_connection(self, listener: trio.socket.SocketType, exports: dict[str, NbdExport],
                       connections: trio.Nursery) -> Callable[[trio.SocketStream], None]:
        local = listener.getsockname()[:2]

        def connected(stream: trio.SocketStream) -> None:
            peer = stream.socket.getpeername()[:2]
            connections.start_soon(self._serve_connection, NbdConnection(stream, exports, local, peer))
        return connected

    async def _serve_connection(self, connection: NbdConnection) -> None:
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)

    def apply_access(self) -> None:
        """After a configuration reload: close the connections whose view of their export changed (the LUN is
        no longer theirs, or its read-only flag moved). NBD cannot tell a client its export changed, so it must
        connect again and negotiate afresh."""
        for connection in list(self.connections):
            reason = connection.lost_access()
            if reason:
                log.info("reload: %s: %s; closing the NBD connection", connection.peer, reason)
                connection.close()


class NbdConnection:
    def __init__(self, stream: trio.SocketStream, exports: dict[str, NbdExport], local: tuple[str, int],
                 peer: tuple[str, int]) -> None:
        self.stream = stream
        self.exports = exports
        self.local = local
        self.host, self.port = peer[0], peer[1]
        self.peer = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.protocol = NbdServer(list(exports))
        self.nexuses: dict[int, tuple[ScsiTarget, Nexus]] = {}
        self.export: NbdExport | None = None
        self.nexus: Nexus | None = None
        self.geometry: Geometry | None = None
        self._tags = itertools.count(1)
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._scope = trio.CancelScope()

    def close(self) -> None:
        self._scope.cancel()

    def lost_access(self) -> str | None:
        """Why the negotiated export is no longer what this connection may use, or None."""
        export, nexus, geometry = self.export, self.nexus, self.geometry
        if export is None or nexus is None or geometry is None:
            return None
        mapping = export.target.lun_map(nexus).get(export.config.lun)
        if mapping is None:
            return f"{nexus.initiator_name} may no longer use LUN {export.config.lun} of {export.target.name}"
        if mapping.read_only and not geometry.read_only:
            return f"LUN {export.config.lun} of {export.target.name} became read-only for {nexus.initiator_name}"
        return None

    # ---- lifetime --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve this connection until the client disconnects or breaks the protocol (or a reload closes it)."""
        try:
            with self._scope:
                if await self._handshake():
                    async with trio.open_nursery() as requests:
                        await self._receive_requests(requests)
        except* (ConnectionClosed, NbdProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                 OSError, trio.TooSlowError) as group:
            log.info("%s: NBD connection closed: %s", self.peer, _first_reason(group))
        except* Exception as group:          # a bug must end this connection only, never the server
            log.error("%s: NBD connection dropped after an internal error: %s", self.peer, _first_reason(group),
                      exc_info=group)
        finally:
            for target, nexus in self.nexuses.values():
                target.nexus_lost(nexus)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    def _nexus(self, export: NbdExport) -> Nexus:
        """This connection's I_T nexus with the export's target (one per target the connection touched)."""
        known = self.nexuses.get(id(export.target))
        if known is not None:
            return known[1]
        host, port = self.local
        config = export.config
        nexus = Nexus(initiator_port=f"nbd:{self.peer}", target_port=f"nbd:{host}:{port}",
                      initiator_name=config.initiator or f"nbd:{self.host}", relative_port=config.relative_port,
                      initiator_address=self.host)
        self.nexuses[id(export.target)] = (export.target, nexus)
        return nexus

    # ---- handshake ---------------------------------------------------------------------------------------------

    async def _handshake(self) -> bool:
        """Option haggling; True once the connection is in the transmission phase."""
        protocol = self.protocol
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            while True:
                event = protocol.next_event()
                await self._send_protocol_data()     # what haggling produced, before waiting for more
                if event is NEED_DATA:
                    await self._receive()
                elif isinstance(event, ExportRequested):
                    await self._answer(event)
                    if protocol.state is State.TRANSMISSION:
                        await self._send_protocol_data()
                        log.info("%s: NBD export %r (%d bytes%s) for initiator %s", self.peer,
                                 protocol.export_name, protocol.export.size if protocol.export else 0,
                                 ", read-only" if self._read_only() else "",
                                 self.nexus.initiator_name if self.nexus else "?")
                        return True
                    if protocol.closed:
                        raise ConnectionClosed(f"export {event.name!r} refused")
                elif isinstance(event, Aborted):
                    await self._send_protocol_data()
                    raise ConnectionClosed("the client aborted the handshake")

    async def _answer(self, event: ExportRequested) -> None:
        export = self.exports.get(event.name)
        if export is None and event.name == "" and self.exports:
            export = next(iter(self.exports.values()))           # the default export: the first one
        if export is None:
            self.protocol.answer_export(None, Reply.ERR_UNKNOWN, f"no export named {event.name!r}")
            return
        nexus = self._nexus(export)
        mapping = export.target.lun_map(nexus).get(export.config.lun)
        if mapping is None:
            log.warning("%s: %s may not use LUN %d of %s", self.peer, nexus.initiator_name, export.config.lun,
                        export.target.name)
            self.protocol.answer_export(None, Reply.ERR_POLICY, "this client may not use that export")
            return
        try:
            geometry = await self._geometry(export, nexus, read_only=mapping.read_only)
        except ValueError as exc:
            log.warning("%s: export %r is not usable: %s", self.peer, event.name, exc)
            self.protocol.answer_export(None, Reply.ERR_UNKNOWN, f"export not usable: {exc}")
            return
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA \
            | TransmissionFlag.SEND_WRITE_ZEROES
        if geometry.can_trim:
            flags |= TransmissionFlag.SEND_TRIM
        if geometry.read_only:
            flags |= TransmissionFlag.READ_ONLY
        self.protocol.answer_export(Export(size=geometry.size, flags=int(flags), minimum_block=geometry.block_size,
                                           preferred_block=max(geometry.block_size, 4096),
                                           maximum_payload=MAX_PAYLOAD))
        if self.protocol.export is not None:
            self.export, self.nexus, self.geometry = export, nexus, geometry

    async def _geometry(self, export: NbdExport, nexus: Nexus, read_only: bool) -> Geometry:
        """READ CAPACITY(16), the Block Limits VPD page and the WP bit, through the core like any command.

        Raises:
            ValueError: the LU did not answer READ CAPACITY(16) (not a disk, not ready).
        """
        lun = export.config.lun
        capacity = await self._scsi(export.target, nexus, lun, scsi_map.read_capacity16(), xfer=32)
        if capacity.status != Status.GOOD:
            key, asc = scsi_map.sense_of(capacity)
            raise ValueError(f"READ CAPACITY(16): status 0x{capacity.status:02x}, sense {key:x}/{asc:04x}")
        geometry = scsi_map.parse_capacity(bytes(capacity.data))
        limits = await self._scsi(export.target, nexus, lun, scsi_map.block_limits_vpd(), xfer=64)
        if limits.status == Status.GOOD:
            geometry = scsi_map.with_block_limits(geometry, bytes(limits.data))
        mode = await self._scsi(export.target, nexus, lun, scsi_map.mode_sense6_header(), xfer=255)
        protected = mode.status == Status.GOOD and len(mode.data) >= 3 and bool(mode.data[2] & 0x80)
        read_only = read_only or protected or export.config.read_only
        if read_only:
            geometry = dataclasses.replace(geometry, read_only=True)
        return geometry

    def _read_only(self) -> bool:
        return self.geometry is not None and self.geometry.read_only

    # ---- transmission ------------------------------------------------------------------------------------------

    async def _receive_requests(self, requests: trio.Nursery) -> None:
        protocol = self.protocol
        while True:
            event = protocol.next_event()
            if event is NEED_DATA:
                await self._receive()
                continue
            if isinstance(event, Disconnect):
                log.info("%s: NBD disconnect", self.peer)
                return                     # the nursery waits for what is in flight, then we close
            assert isinstance(event, Request)
            await self._slots.acquire()
            task = self._admit() if _runs(event) else None
            requests.start_soon(self._serve, event, task)

    def _admit(self) -> Task | None:
        """Enter the request into the LU's task set now, in arrival order."""
        assert self.export is not None and self.nexus is not None
        return self.export.target.admit(self.nexus, self.export.config.lun, next(self._tags))

    async def _serve(self, request: Request, task: Task | None) -> None:
        error: int = request.error
        data: list[bytes] = []
        scope = task.scope if task is not None else trio.CancelScope()
        try:
            if _runs(request):
                with scope:                # task management cancels this scope
                    error, data = await self._perform(request, task)
                if scope.cancelled_caught:
                    error, data = Errno.EIO, []
        except TaskAborted:
            error, data = Errno.EIO, []
        finally:
            if task is not None:
                assert self.export is not None and self.nexus is not None
                self.export.target.release(self.nexus, self.export.config.lun, task)
            self._slots.release()
        if error:
            log.debug("%s: NBD %s at %d+%d: error %d", self.peer, _name(request.command), request.offset,
                      request.length, error)
        buffers = encode_reply(request.handle, error)
        if not error:
            buffers.extend(data)
        await self._send(buffers)

    async def _perform(self, request: Request, task: Task | None) -> tuple[int, list[bytes]]:
        """Run one NBD request as one or more SCSI commands; (NBD error, data read)."""
        export, nexus, geometry = self.export, self.nexus, self.geometry
        assert export is not None and nexus is not None and geometry is not None
        target, lun, command = export.target, export.config.lun, request.command
        bs = geometry.block_size
        first, count = request.offset // bs, request.length // bs
        fua = bool(request.flags & CmdFlag.FUA)

        async def run(cdb: bytes, data_out: bytes | memoryview = b"", xfer: int = 0) -> Response:
            return await self._scsi(target, nexus, lun, cdb, data_out, xfer, task)

        out: list[bytes] = []
        if command == Cmd.READ:
            for lba, blocks in scsi_map.chunks(first, count, geometry.transfer_blocks):
                response = await run(scsi_map.read16(lba, blocks), xfer=blocks * bs)
                if response.status != Status.GOOD or len(response.data) != blocks * bs:
                    return scsi_map.nbd_error(response, command) or Errno.EIO, []
                out.append(bytes(response.data))
            return Errno.OK, out
        if command == Cmd.WRITE:
            view = memoryview(request.data)
            for lba, blocks in scsi_map.chunks(first, count, geometry.transfer_blocks):
                start = (lba - first) * bs
                response = await run(scsi_map.write16(lba, blocks, fua), view[start:start + blocks * bs])
                if response.status != Status.GOOD:
                    return scsi_map.nbd_error(response, command), []
            return Errno.OK, []
        if command == Cmd.FLUSH:
            return scsi_map.nbd_error(await run(scsi_map.synchronize_cache16()), command), []
        if command == Cmd.WRITE_ZEROES:
            unmap = geometry.thin and geometry.zeroes_unmapped and not request.flags & CmdFlag.NO_HOLE
            zero = bytes(bs)
            for lba, blocks in scsi_map.chunks(first, count, geometry.write_same_blocks):
                response = await run(scsi_map.write_same16(lba, blocks, unmap), zero)
                if response.status != Status.GOOD:
                    return scsi_map.nbd_error(response, command), []
        elif command == Cmd.TRIM:
            pieces = list(scsi_map.chunks(first, count, geometry.max_unmap_blocks))
            for at in range(0, len(pieces), geometry.max_unmap_descriptors):
                cdb, params = scsi_map.unmap(pieces[at:at + geometry.max_unmap_descriptors])
                response = await run(cdb, params)
                if response.status != Status.GOOD:
                    return scsi_map.nbd_error(response, command), []
        if fua:                            # WRITE SAME and UNMAP have no FUA bit: make the range durable
            return scsi_map.nbd_error(await run(scsi_map.synchronize_cache16(first, count)), command), []
        return Errno.OK, []

    async def _scsi(self, target: ScsiTarget, nexus: Nexus, lun: int, cdb: bytes,
                    data_out: bytes | memoryview = b"", xfer: int = 0, task: Task | None = None) -> Response:
        """One SCSI command through the core, repeated (a bounded number of times) after a unit attention or a
        transient condition, as an initiator would."""
        response = Response(Status.BUSY)
        for attempt in range(MAX_ATTEMPTS):
            command = Command(nexus, lun, cdb, tag=task.tag if task is not None else 0, data_out=data_out, xfer=xfer,
                              admitted=task)
            try:
                response = await target.execute(command)
            except CheckCondition as cc:
                response = Response(Status.CHECK_CONDITION, cc.sense())
            delay = scsi_map.retry_delay(response, attempt)
            if delay is None:
                return response
            if delay:
                await trio.sleep(delay)
        return response

    # ---- the pump ------------------------------------------------------------------------------------------------

    async def _receive(self) -> None:
        chunk = await self.stream.receive_some(RECV_SIZE)
        if not chunk:
            raise ConnectionClosed("peer closed the connection")
        self.protocol.receive_data(chunk)

    async def _send_protocol_data(self) -> None:
        for data in self.protocol.data_to_send():
            await self.stream.send_all(data)

    async def _send(self, buffers: list[bytes | memoryview]) -> None:
        async with self._send_lock:        # replies of concurrent requests must not interleave
            for data in buffers:
                await self.stream.send_all(data)


def _runs(request: Request) -> bool:
    """Whether a request reaches the core (not refused by validation, not an empty transfer)."""
    return not request.error and bool(request.length or request.command == Cmd.FLUSH)


def _name(command: int) -> str:
    try:
        return Cmd(command).name
    except ValueError:
        return f"command {command}"


def _first_reason(group: BaseExceptionGroup[BaseException]) -> str:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_reason(exc)
        return str(exc) or type(exc).__name__
    return "?"
