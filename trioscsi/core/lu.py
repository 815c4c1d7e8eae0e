"""A logical unit: the emulator that executes its CDBs, and the state the core keeps for it.

The pipeline for one command (after the target mapped the LUN) is a list of small steps, in order:
unit attention -> reservations (SPC-2 and persistent; the core answers RESERVE/RELEASE and PR IN/OUT itself)
-> write protection -> emulator with a deadline.  Each step either
returns None (go on) or raises `CheckCondition` / returns a `Response` that ends the command.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from ..emu.supervisor import DeviceInfo, Emulator, EmulatorLost, EmulatorUnavailable
from ..scsi.opcodes import CommandSpec, DeviceType, lookup
from ..scsi.sense import Asc, CheckCondition, SenseKey, Status, build_sense
from . import identity, pr_store
from .nexus import Command, Nexus, Response, TaskAttribute
from .reservations import Conflict, Reservations
from .unit_attention import UnitAttentions

log = logging.getLogger("trioscsi.core")

RESERVE_6, RELEASE_6, RESERVE_10, RELEASE_10 = 0x16, 0x17, 0x56, 0x57
PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT = 0x5E, 0x5F
REQUEST_SENSE = 0x03
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E


_MODE_SENSE_WP_BYTE = {0x1A: 2, 0x5A: 3}    # MODE SENSE(6/10): device-specific parameter byte


def _set_write_protect(data: bytes | memoryview, index: int) -> bytes | memoryview:
    """Report WP in a mode parameter header when this view maps the LU read-only."""
    if len(data) <= index:
        return data
    patched = bytearray(data)
    patched[index] |= 0x80
    return bytes(patched)


_PERSIST_LIMITER = trio.CapacityLimiter(1)


def _nexus_id(nexus: Nexus) -> str:
    """How emulators tell I_T nexuses apart (protocol 4): initiator port and target port."""
    return f"{nexus.initiator_port}|{nexus.target_port}"


class TaskAborted(Exception):
    """The command was aborted by task management; the transport sends no response for it."""


@dataclass(eq=False, slots=True)
class Task:
    nexus: Nexus
    tag: int
    scope: trio.CancelScope
    aborted: bool = False
    attr: int = TaskAttribute.SIMPLE
    seq: int = 0                       # delivery order within the LU's task set
    done: bool = False
    _ended: trio.Event | None = None   # made only for whoever waits (task management, ordering)

    @property
    def ended(self) -> trio.Event:
        if self._ended is None:
            self._ended = trio.Event()
            if self.done:
                self._ended.set()
        return self._ended

    def finish(self) -> None:
        self.done = True
        if self._ended is not None:
            self._ended.set()


_ORDERING = (TaskAttribute.ORDERED, TaskAttribute.HEAD_OF_QUEUE)


@dataclass
class LuOptions:
    command_timeout: float = 30.0
    read_only: bool = False
    reservation_file: str | None = None     # where APTPL persistent reservations are kept
    serialize: bool | None = None           # one command at a time (default: yes for tapes and changers)
    move_timeout: float = 60.0              # how long a MOVE MEDIUM waits for the drive to load or unload


class LogicalUnit:
    def __init__(self, name: str, emulator: Emulator, options: LuOptions | None = None) -> None:
        self.name = name
        self.emulator = emulator
        self.options = options or LuOptions()
        spec = emulator.spec
        spec.abort_grace = min(spec.abort_grace, self.options.command_timeout / 4)
        self.unit_attentions = UnitAttentions()
        path = self.options.reservation_file
        self.reservations = Reservations(pr_store.load(path) if path else None, aptpl_capable=path is not None)
        self._persist_lock = trio.Lock()
        self.tasks: set[Task] = set()
        self._delivered = 0                 # tasks admitted so far: their order in the task set
        self._ordering_tasks = 0            # live ORDERED and HEAD OF QUEUE tasks (none: SIMPLE never waits)
        self._one_at_a_time = trio.Lock()
        # Removable media (docs/emulator-protocol.md 10): the drive's last reported position, kept here so a
        # restarted drive emulator is put back exactly where the initiator believes the tape is.
        self.medium: dict[str, Any] | None = None
        self.resolve_drive: Callable[[str | None, int | None], LogicalUnit | None] = lambda serial, lun: None
        self._moves_in_flight: list[Any] = []
        # Nexuses whose PREVENT ALLOW MEDIUM REMOVAL the device accepted: replayed into a restarted emulator, so
        # a crash never unlocks a medium an initiator has locked (the emulator keeps the authoritative copy).
        self.preventing: set[Nexus] = set()
        emulator.on_event = self._on_emulator_event
        emulator.on_ready = self._on_emulator_ready

    @property
    def device_type(self) -> int:
        info = self.emulator.info
        return info.device_type if info is not None else DeviceType.DISK

    @property
    def block_size(self) -> int:
        """The block size the parse step multiplies transfer counts by (a tape's comes from its mode)."""
        if self.medium is not None and self.device_type == DeviceType.TAPE:
            return int(self.medium.get("block_size") or 0)
        info = self.emulator.info
        return int(((info.capacity if info else None) or {}).get("block_size", 512))

    def _on_emulator_ready(self, info: DeviceInfo) -> list[dict[str, Any]]:
        """What a new emulator incarnation gets before its first command: its medium back, then every
        prevention of medium removal still in force, as the PREVENT commands of the nexuses that hold one."""
        return self._restore_medium(info) + [
            {"op": "cmd", "cdb": bytes((PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0)), "xfer": 0,
             "nexus": _nexus_id(nexus)} for nexus in self.preventing]

    def _restore_medium(self, info: DeviceInfo) -> list[dict[str, Any]]:
        """Restore a drive's medium, or reconcile a changer's drives."""
        if "changer" in info.features:
            for drive in info.ready.get("drives") or []:
                lu = self.resolve_drive(drive.get("serial"), drive.get("lun"))
                if lu is not None and (lu.medium or {}).get("path") != drive.get("path"):
                    lu.change_medium(drive.get("path"))
            return []
        if "removable" not in info.features:
            return []
        if self.medium is None:
            self.medium = info.ready.get("medium")
            return []
        log.info("%s: restoring the drive to %s", self.name, self.medium)
        return [{"op": "restore", "path": self.medium.get("path"), "object": self.medium.get("object", 0),
                 "loaded": bool(self.medium.get("loaded")), "block_size": self.medium.get("block_size", 0)}]

    def change_medium(self, path: str | None) -> Any:
        """Load `path` into this drive (None: unload). Returns the pending control message, or None when the
        emulator is down (the new state is then applied by `restore` when it is back)."""
        block_size = (self.medium or {}).get("block_size", 0)
        self.medium = {"path": path, "object": 0, "loaded": path is not None, "block_size": block_size}
        return self.emulator.send_control({"op": "load", "path": path} if path else {"op": "unload"})

    async def replace_medium(self, path: str | None) -> str | None:
        """An operator's media change (admin `load`/`unload`): take out what the drive holds, then load `path`
        (None: leave it empty).  Returns None when done, else why not.  The drive's own answer decides (it
        refuses to give up a medium an initiator has locked), and the core keeps the state it reports."""
        info = self.emulator.info
        if info is None or "removable" not in info.features:
            return f"{self.name} is not a removable-medium device" if info else f"{self.name} is not running"
        steps: list[str | None] = [None] if (self.medium or {}).get("path") is not None else []
        if path is not None:
            steps.append(path)
        for step in steps:
            pending = self.change_medium(step)
            if pending is None:
                return f"{self.name}: the emulator is not running; the change applies when it is back"
            await pending.done.wait()
            result = pending.result
            if result is None:
                return f"{self.name}: the emulator went away during the change"
            done = result.message or {}
            self.medium = {k: done.get(k) for k in ("path", "object", "loaded", "block_size")}
            if result.status != 0:
                return f"{self.name}: {done.get('message') or 'refused'}"
        return None

    def _relay_move(self, message: dict[str, Any]) -> None:
        """A changer moved a cartridge into or out of a drive: tell the drive before MOVE MEDIUM completes."""
        drive = self.resolve_drive(message.get("serial"), message.get("lun"))
        if drive is None:
            log.error("%s: move to unknown drive %s (LUN %s)", self.name, message.get("serial"), message.get("lun"))
            return
        pending = drive.change_medium(message.get("path") if message.get("action") == "load" else None)
        if pending is not None:
            self._moves_in_flight.append(pending)

    async def _settle_moves(self) -> None:
        moves, self._moves_in_flight = self._moves_in_flight, []
        with trio.move_on_after(self.options.move_timeout):
            for pending in moves:
                await pending.done.wait()

    def _on_emulator_event(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "position":
            self.medium = {k: message.get(k) for k in ("path", "object", "loaded", "block_size")}
            return
        if event == "move":
            self._relay_move(message)
            return
        asc = {"capacity_changed": Asc.CAPACITY_DATA_HAS_CHANGED,
               "medium_changed": Asc.NOT_READY_TO_READY_CHANGE,
               "mode_changed": Asc.MODE_PARAMETERS_CHANGED}.get(str(message.get("event")))
        if asc is None:
            return
        cause = None
        if event == "mode_changed":     # SPC-4 7.5: not to the nexus whose MODE SELECT made the change
            cause = next((n for n in self.unit_attentions.nexuses() if _nexus_id(n) == message.get("nexus")),
                         None)
        self.unit_attentions.raise_all(asc, except_for=cause)

    # ---- the pipeline -----------------------------------------------------------------------------------

    async def execute(self, cmd: Command, *, read_only: bool = False) -> Response:
        task = cmd.admitted
        if task is not None and (task.attr or self._ordering_tasks):    # all SIMPLE: nothing to wait for
            await self._wait_turn(task)
        spec = lookup(self.device_type, cmd.cdb[0])
        read_only = read_only or self.options.read_only
        wanted = self._wanted(cmd, spec)
        try:
            response = (self._unit_attention(cmd, spec)
                        or self._reservation_conflict(cmd, spec)
                        or await self._reservation_command(cmd)
                        or self._write_protect(spec, read_only)
                        or self._transfer_limit(cmd, wanted)
                        or await self._run_in_emulator(cmd, spec, read_only))
        except Conflict:
            response = Response(Status.RESERVATION_CONFLICT)
        except CheckCondition as cc:
            response = Response(Status.CHECK_CONDITION, cc.sense())
        response.wanted = wanted
        return response

    def _wanted(self, cmd: Command, spec: CommandSpec) -> int | None:
        """The transfer length the CDB asks for (None when the opcode table cannot say, or no emulator yet)."""
        if spec.length is None or self.emulator.info is None:
            return None
        try:
            return spec.length(cmd.cdb, self.block_size)
        except (IndexError, ValueError):
            return None

    def _unit_attention(self, cmd: Command, spec: CommandSpec) -> Response | None:
        if spec.ua_exempt and cmd.cdb[0] != REQUEST_SENSE:
            return None
        asc = self.unit_attentions.pop(cmd.nexus)
        if asc is None:
            return None
        sense = build_sense(SenseKey.UNIT_ATTENTION, asc)
        if cmd.cdb[0] == REQUEST_SENSE:
            return Response(Status.GOOD, data=sense[:cmd.xfer])
        return Response(Status.CHECK_CONDITION, sense)

    def _reservation_conflict(self, cmd: Command, spec: CommandSpec) -> None:
        """Raises Conflict for a command another nexus's reservation forbids; it never reaches the emulator."""
        self.reservations.check(cmd.nexus, cmd.cdb, spec.pr_class_of(cmd.cdb))

    async def _reservation_command(self, cmd: Command) -> Response | None:
        """RESERVE/RELEASE and PERSISTENT RESERVE IN/OUT belong to the core (state shared by every nexus)."""
        op = cmd.cdb[0]
        if op not in (RESERVE_6, RESERVE_10, RELEASE_6, RELEASE_10, PERSISTENT_RESERVE_IN,
                      PERSISTENT_RESERVE_OUT):
            return None
        before = self.reservations.state
        if op == PERSISTENT_RESERVE_IN:
            return Response(Status.GOOD, data=self.reservations.persistent_reserve_in(cmd.nexus, cmd.cdb, cmd.xfer))
        if op in (RESERVE_6, RESERVE_10):
            self.reservations.reserve6(cmd.nexus, cmd.cdb)
        elif op in (RELEASE_6, RELEASE_10):
            self.reservations.release6(cmd.nexus)
        else:
            effects = self.reservations.persistent_reserve_out(cmd.nexus, cmd.cdb, bytes(cmd.data_out))
            for nexus, asc in effects.attentions_for(self.unit_attentions.nexuses()):
                self.unit_attentions.raise_for(nexus, asc)
            await self.abort([t for t in self.tasks if effects.aborts(t.nexus)])
        if self.reservations.state is not before:
            await self._persist()
        return Response(Status.GOOD)

    async def _persist(self) -> None:
        """Write the reservation state (APTPL) before the command that changed it answers GOOD."""
        path = self.options.reservation_file
        if path is None:
            return
        async with self._persist_lock:
            await trio.to_thread.run_sync(pr_store.persist, path, self.reservations.state,
                                          limiter=_PERSIST_LIMITER)

    def _write_protect(self, spec: CommandSpec, read_only: bool) -> Response | None:
        if read_only and spec.writes_medium:
            raise CheckCondition(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
        return None

    def _transfer_limit(self, cmd: Command, wanted: int | None) -> None:
        """SBC-4: a transfer beyond the device's maximum is INVALID FIELD IN CDB (it could not cross the wire)."""
        info = self.emulator.info
        if info is None:
            return
        limit = info.max_transfer
        if len(cmd.data_out) > limit or min(wanted or 0, cmd.xfer) > limit:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)

    async def _run_in_emulator(self, cmd: Command, spec: CommandSpec, read_only: bool) -> Response:
        if self.options.serialize or (self.options.serialize is None
                                      and self.device_type in (DeviceType.TAPE, DeviceType.CHANGER)):
            async with self._one_at_a_time:       # tape order matters: one command at a time per LU
                return await self._run_task(cmd, spec, read_only)
        return await self._run_task(cmd, spec, read_only)

    async def _run_task(self, cmd: Command, spec: CommandSpec, read_only: bool) -> Response:
        # The abort must fit inside the command's time limit too, so no initiator waits longer than it.
        scope = trio.CancelScope(deadline=trio.current_time() + self.options.command_timeout
                                 - self.emulator.spec.abort_grace)
        task = None                    # admitted by the transport at delivery: abort cancels the transport's scope
        if cmd.admitted is None:
            task = Task(cmd.nexus, cmd.tag, scope)
            self.tasks.add(task)
        try:
            with scope:
                splice = identity.asks_for_device_identification(cmd.cdb)
                cdb, xfer = (identity.widen_allocation(cmd.cdb), 0xFFFF) if splice else (cmd.cdb, cmd.xfer)
                result = await self.emulator.execute(cdb, cmd.data_out, xfer, retry_safe=spec.retry_safe,
                                                     attr=cmd.attr, lun=cmd.lun, nexus=_nexus_id(cmd.nexus))
                if cmd.cdb[0] == PREVENT_ALLOW_MEDIUM_REMOVAL and result.status == Status.GOOD:
                    if cmd.cdb[4] & 0x03 == 0x01:
                        self.preventing.add(cmd.nexus)
                    elif not cmd.cdb[4] & 0x03:
                        self.preventing.discard(cmd.nexus)
                if self._moves_in_flight:
                    await self._settle_moves()
                data = result.data
                if splice and result.status == Status.GOOD:
                    allocation = int.from_bytes(cmd.cdb[3:5], "big")
                    data = identity.complete_page(data, cmd.nexus, min(allocation, cmd.xfer))
                if read_only and result.status == Status.GOOD and cmd.cdb[0] in _MODE_SENSE_WP_BYTE:
                    data = _set_write_protect(data, _MODE_SENSE_WP_BYTE[cmd.cdb[0]])
                if len(data) > cmd.xfer:
                    data = memoryview(data)[:cmd.xfer]
                return Response(result.status, result.sense, data)
        except EmulatorUnavailable:
            raise CheckCondition(SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION) from None
        except EmulatorLost:
            log.warning("%s: %s lost with its emulator; initiator will retry", self.name, spec.name)
            raise CheckCondition(SenseKey.ABORTED_COMMAND, Asc.LOGICAL_UNIT_COMMUNICATION_FAILURE) from None
        finally:
            if task is not None:
                self.tasks.discard(task)
                task.finish()
        if task is not None and task.aborted:
            raise TaskAborted()
        log.warning("%s: %s timed out after %.1f s", self.name, spec.name, self.options.command_timeout)
        if spec.retry_safe:
            return Response(Status.BUSY)    # Linux and QEMU retry BUSY; they fail ABORTED COMMAND/timeout
        raise CheckCondition(SenseKey.ABORTED_COMMAND, Asc.LOGICAL_UNIT_COMMUNICATION_TIMEOUT)

    # ---- task management -----------------------------------------------------------------------------------

    async def abort(self, tasks: Iterable[Task]) -> int:
        """Abort these tasks and return once every one of them has really ended."""
        victims = list(tasks)
        for task in victims:
            task.aborted = True
            task.scope.cancel()
        for task in victims:
            await task.ended.wait()
        return len(victims)

    def admit(self, nexus: Nexus, tag: int, attr: int = TaskAttribute.SIMPLE) -> Task:
        """Register a delivered command; its transport runs it inside `task.scope` and calls `release`."""
        self._delivered += 1
        task = Task(nexus, tag, trio.CancelScope(), attr=attr, seq=self._delivered)
        self.tasks.add(task)
        if attr in _ORDERING:
            self._ordering_tasks += 1
        return task

    def release(self, task: Task) -> None:
        if task in self.tasks:
            self.tasks.discard(task)
            if task.attr in _ORDERING:
                self._ordering_tasks -= 1
        task.finish()

    async def _wait_turn(self, task: Task) -> None:
        """SAM-5 8.6 (restricted reordering): a SIMPLE task waits for every older ORDERED and HEAD OF QUEUE
        task, an ORDERED task for every older task; a HEAD OF QUEUE task runs at once.  Delivery order (CmdSN
        order for iSCSI) decides what is older."""
        if task.attr == TaskAttribute.HEAD_OF_QUEUE or (task.attr != TaskAttribute.ORDERED
                                                        and not self._ordering_tasks):
            return
        every = task.attr == TaskAttribute.ORDERED
        for older in sorted((t for t in self.tasks if t.seq < task.seq and (every or t.attr in _ORDERING)),
                            key=lambda t: t.seq):
            await older.ended.wait()

    def find(self, nexus: Nexus, tag: int | None = None) -> list[Task]:
        return [t for t in self.tasks if t.nexus == nexus and (tag is None or t.tag == tag)]

    async def reset(self, victims: list[Task] | None = None) -> None:
        """LOGICAL UNIT RESET: abort every task, drop the SPC-2 reservation, tell every nexus."""
        await self.abort(list(self.tasks) if victims is None else victims)
        self.emulator.notify({"op": "reset"})      # nexus state in the emulator (PREVENT, copy lists) ends too
        self.preventing.clear()
        self.reservations.reset()
        self.unit_attentions.raise_all(Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)

    def nexus_lost(self, nexus: Nexus) -> None:
        self.emulator.notify({"op": "nexus_lost", "nexus": _nexus_id(nexus)})
        self.preventing.discard(nexus)
        self.reservations.nexus_lost(nexus)
        self.unit_attentions.forget(nexus)
