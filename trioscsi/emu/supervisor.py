"""One emulator process: start it, restart it when it dies, and multiplex tagged commands over its pipes.

Strategy: `Emulator.run()` is a restart loop owned by the server's nursery.  Each incarnation gets its own
nursery with three tasks (frame reader, frame writer, stderr logger) plus a health pinger; when any of them
ends (EOF, bad frame, hung emulator) the incarnation is torn down, the process killed and reaped, and every
command in flight is told its emulator was lost.  `execute()` is what the core calls: it waits until an
incarnation is up, sends `cmd`, and waits for `done`; a command that is safe to repeat is resent to the next
incarnation, any other fails with `EmulatorLost` so the core can answer it with a retryable status.

Invariants: a tag is in `_pending` from the moment its `cmd` is queued until its `done` arrives or its
incarnation ends; every `execute()` returns or raises exactly once; a cancelled `execute()` sends `abort` and
waits (shielded, bounded) for the command to really end before it lets the cancellation through.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .wire import MAX_FRAME, FrameDecoder, encode

log = logging.getLogger("trioscsi.emulator")

PROTOCOL_VERSIONS = [1]


class EmulatorLost(Exception):
    """The emulator exited or hung while this command was in flight, and the command is not safe to repeat."""


class EmulatorUnavailable(Exception):
    """The emulator could not be brought up within the caller's patience."""


@dataclass(slots=True)
class Result:
    status: int
    sense: bytes = b""
    data: bytes = b""
    aborted: bool = False
    message: dict[str, Any] | None = None     # the whole `done` map (control messages carry more keys)


class _Pending:
    """One tag awaiting its `done`.  A command's task parks on it directly (`wait`, no Event per command);
    control callers that want an Event get one made on demand (`done`)."""
    __slots__ = ("result", "lost", "finished", "nexus", "_event", "_waiter")

    def __init__(self, nexus: str | None = None) -> None:
        self.result: Result | None = None
        self.nexus = nexus              # the I_T nexus whose command this is (events name it by tag)
        self.lost = False
        self.finished = False
        self._event: trio.Event | None = None
        self._waiter: Any = None

    @property
    def done(self) -> trio.Event:
        event = self._event
        if event is None:
            event = self._event = trio.Event()
            if self.finished:
                event.set()
        return event

    def finish(self) -> None:
        self.finished = True
        if self._event is not None:
            self._event.set()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    async def wait(self) -> None:
        """Park until `finish` (raises Cancelled like any checkpoint; the caller then aborts the tag)."""
        if self.finished:
            await trio.lowlevel.checkpoint()
            return
        self._waiter = trio.lowlevel.current_task()

        def abort_fn(_: Any) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED
        await trio.lowlevel.wait_task_rescheduled(abort_fn)


@dataclass
class EmulatorSpec:
    """How to start an emulator and what to tell it in `hello`."""
    name: str
    argv: Sequence[str]
    params: dict[str, Any]
    identity: dict[str, Any]
    cwd: str | None = None
    ready_timeout: float = 30.0
    ping_interval: float = 5.0
    ping_timeout: float = 10.0
    abort_grace: float = 5.0
    env: dict[str, str] | None = None  # environment overrides for the child
    crash_loop_limit: int = 5          # consecutive short-lived incarnations before the LU reports NOT READY


@dataclass
class DeviceInfo:
    """What the emulator said about itself in `ready`."""
    device_type: int
    identity: dict[str, Any]
    capacity: dict[str, int] | None
    features: list[str]
    max_inflight: int
    max_frame: int = MAX_FRAME
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def max_transfer(self) -> int:
        """The largest data buffer one frame can carry, leaving room for the rest of the map."""
        return self.max_frame - 4096


class _Incarnation:
    """The pipes and bookkeeping of one running emulator process."""

    def __init__(self, proc: trio.Process, info: DeviceInfo, decoder: FrameDecoder) -> None:
        self.proc = proc
        self.info = info
        self.decoder = decoder
        self.pending: dict[int, _Pending] = {}
        self.outbox: list[bytes | memoryview] = []
        self.outbox_ready = trio.Event()
        self.slots = trio.Semaphore(info.max_inflight)
        self.pongs: dict[int, trio.Event] = {}
        self.dead = False
        self.writing = False               # the writer task holds frames it has not finished writing
        assert proc.stdin is not None
        self._fd = proc.stdin.fileno()     # non-blocking (trio set it so)

    def send(self, frame: bytes) -> None:
        """With one command in flight, write now (saves waking the writer task); with more, leave it to the
        writer, which batches frames into one write (one wake-up of the emulator per batch).  Whatever the
        pipe does not take now goes to the writer too, which also reports a broken pipe."""
        if len(self.pending) <= 1 and not self.outbox and not self.writing and not self.dead:
            try:
                written = os.write(self._fd, frame)
            except OSError:                # EAGAIN, or EPIPE: the writer retries and raises the latter
                written = 0
            if written == len(frame):
                return
            if written:
                frame = memoryview(frame)[written:]
        self.outbox.append(frame)
        self.outbox_ready.set()


class Emulator:
    """Supervisor and client of one emulator process (one LU)."""

    def __init__(self, spec: EmulatorSpec, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.spec = spec
        self.on_event = on_event or (lambda message: None)
        self.info: DeviceInfo | None = None
        self.restarts = 0
        self.retried_commands = 0
        self.consecutive_failures = 0
        self._served_commands = 0
        self._current: _Incarnation | None = None
        self._up = trio.Event()
        self._next_tag = 1
        # Control messages (docs/emulator-protocol.md 10) a new incarnation gets before its first command.
        self.on_ready: Callable[[DeviceInfo], list[dict[str, Any]]] = lambda info: []

    # ---- the core's side -------------------------------------------------------------------------------

    async def wait_ready(self) -> DeviceInfo:
        await self._up.wait()
        assert self.info is not None
        return self.info

    @property
    def crash_looping(self) -> bool:
        """The emulator keeps dying young: commands get NOT READY at once instead of waiting for it."""
        return self.consecutive_failures >= self.spec.crash_loop_limit and not self._up.is_set()

    async def execute(self, cdb: bytes, data: bytes | memoryview = b"", xfer: int = 0, *,
                      retry_safe: bool = True, attr: int = 0, lun: int = 0, nexus: str | None = None) -> Result:
        """Run one command in the emulator; see the module docstring for the retry and abort rules."""
        while True:
            if self.crash_looping:
                raise EmulatorUnavailable(self.spec.name)
            if not self._up.is_set():       # the common case (up) skips this checkpoint: `done` waits anyway
                await self._up.wait()
            inc = self._current
            assert inc is not None
            result = await self._execute_once(inc, cdb, data, xfer, attr, lun, nexus)
            if result is not None:
                return result
            if not retry_safe:
                raise EmulatorLost(self.spec.name)
            self.retried_commands += 1

    async def _execute_once(self, inc: _Incarnation, cdb: bytes, data: bytes | memoryview, xfer: int,
                            attr: int, lun: int, nexus: str | None = None) -> Result | None:
        slots = inc.slots
        try:
            slots.acquire_nowait()          # no checkpoint when a slot is free: the wait for `done` is one
        except trio.WouldBlock:
            await slots.acquire()
        try:
            if inc.dead:
                return None
            tag = self._next_tag
            self._next_tag = (tag + 1) & 0xFFFFFFFFFFFF
            pending = inc.pending[tag] = _Pending(nexus)
            message: dict[str, Any] = {"op": "cmd", "tag": tag, "cdb": bytes(cdb), "xfer": xfer}
            if data:
                message["data"] = data if isinstance(data, bytes) else bytes(data)
            if attr:
                message["attr"] = attr
            if lun:
                message["lun"] = lun
            if nexus is not None:
                message["nexus"] = nexus
            inc.send(encode(message))
            try:
                await pending.wait()
            except trio.Cancelled:
                await self._abort(inc, tag, pending)
                raise
            if pending.lost:
                return None
            return pending.result
        finally:
            slots.release()

    def send_control(self, message: dict[str, Any]) -> _Pending | None:
        """Queue a control message (load, unload, restore) now, ahead of any later command; None when the
        emulator is not running (the caller keeps the state and `on_ready` applies it on restart)."""
        inc = self._current
        if inc is None or inc.dead or not self._up.is_set():
            return None
        return self._queue_control(inc, message)

    def _queue_control(self, inc: _Incarnation, message: dict[str, Any]) -> _Pending:
        tag = self._next_tag
        self._next_tag = (tag + 1) & 0xFFFFFFFFFFFF
        pending = inc.pending[tag] = _Pending()
        inc.send(encode({**message, "tag": tag}))
        return pending

    async def _abort(self, inc: _Incarnation, tag: int, pending: _Pending) -> None:
        """Tell the emulator to stop `tag` and wait until it has really ended (SCST's safe TMF semantics)."""
        if pending.finished or inc.dead:
            return
        inc.send(encode({"op": "abort", "tag": tag}))
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.spec.abort_grace) as waited:
                await pending.done.wait()
            if waited.cancelled_caught:
                log.warning("%s: command tag %d did not end %.0f s after abort; restarting the emulator",
                            self.spec.name, tag, self.spec.abort_grace)
                self.kill()
                await pending.done.wait()

    def notify(self, message: dict[str, Any]) -> None:
        """Send a message that has no answer (nexus_lost, reset); dropped when the emulator is down, since a
        new incarnation starts without that state anyway."""
        inc = self._current
        if inc is not None and not inc.dead and self._up.is_set():
            inc.send(encode(message))

    async def restart(self, patience: float = 30.0) -> None:
        """Live upgrade: hold new commands, let those in flight finish, then close stdin so the emulator
        exits after them (protocol 7); the next incarnation takes the held commands. No command fails."""
        inc = self._current
        if inc is None or inc.dead or not self._up.is_set():
            return
        self._up = trio.Event()
        with trio.move_on_after(patience):
            while inc.pending and not inc.dead:
                await trio.sleep(0.01)
        log.info("%s: restarting the emulator for an operator (%d commands held)", self.spec.name,
                 len(inc.pending))
        if inc.proc.stdin is not None:
            await inc.proc.stdin.aclose()

    def kill(self) -> None:
        """Kill the running incarnation (hung emulator, operator restart); the supervisor starts a new one."""
        inc = self._current
        if inc is not None and inc.proc.returncode is None:
            inc.proc.kill()

    @property
    def pid(self) -> int | None:
        inc = self._current
        return inc.proc.pid if inc is not None else None

    # ---- the supervisor ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the emulator running until cancelled; `started()` once the first incarnation is ready."""
        backoff = 0.1
        started = False
        while True:
            began = trio.current_time()
            try:
                await self._run_incarnation(task_status if not started else None)
                started = True
            except Exception as exc:   # noqa: BLE001 - whatever ended this incarnation, the next one starts
                log.error("%s: emulator incarnation failed: %s", self.spec.name, _reason(exc))
            if trio.current_time() - began > 10 or self._served_commands:
                # It did real work: a kill during service (fault drill, upgrade) is not a crash loop.
                backoff = 0.1
                self.consecutive_failures = 0
            else:
                self.consecutive_failures += 1
            self.restarts += 1
            if self.consecutive_failures == self.spec.crash_loop_limit:
                log.error("%s: emulator failed %d times in a row; the LU reports NOT READY until it stays up "
                          "(still retrying every %.0f s; fix it or its parameters)", self.spec.name,
                          self.consecutive_failures, 30.0)
            log.warning("%s: emulator exited; restarting in %.1f s (restart %d)", self.spec.name, backoff,
                        self.restarts)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 5.0 if self.consecutive_failures < self.spec.crash_loop_limit else 30.0)

    async def _run_incarnation(self, task_status: trio.TaskStatus[None] | None) -> None:
        self._served_commands = 0
        # Its own process group (a terminal's ^C is for the server, which stops emulators in order), but the
        # server's session, so operators and tools find it with the server (`ps -s`).
        proc = await trio.lowlevel.open_process(
            list(self.spec.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=self.spec.cwd, process_group=0,
            env={**os.environ, **self.spec.env} if self.spec.env else None)
        log.info("%s: started emulator pid %d: %s", self.spec.name, proc.pid, " ".join(self.spec.argv))
        _grow_pipes(proc)
        inc: _Incarnation | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._log_stderr, proc)
                decoder = FrameDecoder()
                with trio.fail_after(self.spec.ready_timeout):
                    info = await self._handshake(proc, decoder)
                inc = _Incarnation(proc, info, decoder)
                self.info = info
                self._current = inc
                reader_ended = trio.Event()
                nursery.start_soon(self._writer, inc)
                nursery.start_soon(self._read_until_eof, inc, reader_ended)
                for message in self.on_ready(info):
                    pending = self._queue_control(inc, message)
                    with trio.fail_after(self.spec.ready_timeout):
                        await pending.done.wait()
                    if pending.result is None or pending.result.status:
                        log.error("%s: %s refused: %s", self.spec.name, message.get("op"),
                                  (pending.result.message or {}).get("message") if pending.result else "lost")
                self._up.set()
                if task_status is not None:
                    task_status.started()
                nursery.start_soon(self._pinger, inc)
                await reader_ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if self._up.is_set():        # (a graceful restart already put an unset one in place)
                    self._up = trio.Event()
                if inc is not None:
                    inc.dead = True
                    for pending in inc.pending.values():
                        pending.lost = True
                        pending.finish()
                    inc.pending.clear()
                await _reap(proc)
                log.warning("%s: emulator pid %d ended with %s", self.spec.name, proc.pid,
                            _describe_exit(proc.returncode))

    async def _handshake(self, proc: trio.Process, decoder: FrameDecoder) -> DeviceInfo:
        assert proc.stdin is not None and proc.stdout is not None
        await proc.stdin.send_all(encode({"op": "hello", "versions": PROTOCOL_VERSIONS,
                                          "params": self.spec.params, "identity": self.spec.identity}))
        while True:
            message = decoder.next_message()
            if message is None:
                chunk = await proc.stdout.receive_some(65536)
                if not chunk:
                    raise _HandshakeError("emulator exited before 'ready'")
                decoder.feed(chunk)
                continue
            if message["op"] == "error":
                raise _HandshakeError(f"emulator refused hello: {message.get('message')}")
            if message["op"] != "ready":
                raise _HandshakeError(f"expected 'ready', got {message['op']!r}")
            if message.get("version") not in PROTOCOL_VERSIONS:
                raise _HandshakeError(f"emulator chose unsupported version {message.get('version')!r}")
            info = DeviceInfo(int(message["device_type"]), dict(message.get("identity") or {}),
                              message.get("capacity"), list(message.get("features") or []),
                              int(message.get("max_inflight") or 64),
                              min(int(message.get("max_frame") or MAX_FRAME), MAX_FRAME), message)
            log.info("%s: emulator ready: device type 0x%02x, %s", self.spec.name, info.device_type,
                     info.capacity or "no capacity")
            return info

    async def _read_until_eof(self, inc: _Incarnation, ended: trio.Event) -> None:
        try:
            await self._reader(inc)
        finally:
            ended.set()

    async def _reader(self, inc: _Incarnation) -> None:
        stdout = inc.proc.stdout
        assert stdout is not None
        decoder = inc.decoder
        while True:
            message = decoder.next_message()
            if message is None:
                chunk = await stdout.receive_some(1 << 20)
                if not chunk:
                    return
                decoder.feed(chunk)
                continue
            op = message["op"]
            if op == "done":
                self._served_commands += 1
                pending = inc.pending.pop(message.get("tag"), None)
                if pending is None:
                    log.error("%s: 'done' for unknown tag %r", self.spec.name, message.get("tag"))
                    continue
                pending.result = Result(message.get("status", 0), message.get("sense") or b"",
                                        message.get("data") or b"", bool(message.get("aborted")), message)
                pending.finish()
            elif op == "pong":
                event = inc.pongs.pop(message.get("tag"), None)
                if event is not None:
                    event.set()
            elif op == "event":
                log.info("%s: event %s", self.spec.name, message.get("event"))
                cause = inc.pending.get(message.get("tag")) if "tag" in message else None
                if cause is not None and cause.nexus is not None and "nexus" not in message:
                    message = {**message, "nexus": cause.nexus}    # the nexus whose command caused it
                self.on_event(message)
            elif op == "error":
                log.error("%s: emulator reports a protocol error: %s", self.spec.name, message.get("message"))
            else:
                log.error("%s: unexpected message %r", self.spec.name, op)

    async def _writer(self, inc: _Incarnation) -> None:
        stdin = inc.proc.stdin
        assert stdin is not None
        while True:
            await inc.outbox_ready.wait()
            inc.outbox_ready = trio.Event()
            frames, inc.outbox = inc.outbox, []
            if not frames:
                continue
            inc.writing = True
            await stdin.send_all(frames[0] if len(frames) == 1 else b"".join(frames))
            inc.writing = False

    async def _pinger(self, inc: _Incarnation) -> None:
        tag = 0
        while True:
            await trio.sleep(self.spec.ping_interval)
            tag += 1
            event = inc.pongs[tag] = trio.Event()
            inc.send(encode({"op": "ping", "tag": tag}))
            with trio.move_on_after(self.spec.ping_timeout):
                await event.wait()
            if not event.is_set():
                log.error("%s: no pong within %.0f s; killing the hung emulator", self.spec.name,
                          self.spec.ping_timeout)
                inc.proc.kill()
                return

    async def _log_stderr(self, proc: trio.Process) -> None:
        assert proc.stderr is not None
        emulog = logging.getLogger(f"trioscsi.emulator.{self.spec.name}")
        pending = b""
        while True:
            chunk = await proc.stderr.receive_some(65536)
            if not chunk:
                if pending:
                    emulog.info("%s", pending.decode(errors="replace"))
                return
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                emulog.info("%s", line.decode(errors="replace"))


class _HandshakeError(Exception):
    pass


def _reason(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


async def _reap(proc: trio.Process) -> None:
    """Make sure the process is gone: EOF on stdin first, then SIGKILL after a short grace."""
    if proc.stdin is not None:
        try:
            await proc.stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    with trio.move_on_after(2):
        await proc.wait()
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        await proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            await stream.aclose()


PIPE_SIZE = 1 << 20


def _grow_pipes(proc: trio.Process) -> None:
    """Larger pipes to and from the emulator: fewer EAGAINs, fewer wake-ups, more frames per read."""
    for stream in (proc.stdin, proc.stdout):
        if stream is None:
            continue
        try:
            fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, AttributeError, ValueError):
            pass      # not Linux, or above /proc/sys/fs/pipe-max-size: keep the default


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


