"""The main loop of a Python emulator: handshake, dispatch, ping, abort, shutdown (docs/emulator-protocol.md).

Strategy: one reader thread (the main thread) owns stdin: it answers ``ping`` itself, so health checks never wait
behind a command, and hands ``cmd`` to a few worker threads through a SimpleQueue. Storage I/O goes through
``os.pread``/``os.pwritev``, which release the GIL, so commands overlap. Every thread writes its own ``done``
through one locked FrameWriter. When nothing is in flight and the device calls a command quick (a small
READ/WRITE on a page-cached file), the reader runs it inline: a thread hand-off costs more than the command.

Ops the runner does not know (the media control of protocol §10: ``load``, ``unload``, ``restore``) go to the
device's ``control(msg)`` when it has one, through the same queue as commands, so they keep their order relative to
commands on a one-worker device; whatever map ``control`` returns is sent back as one frame.

Invariants: each ``cmd`` gets exactly one ``done``. A command is *pending* from its read until a worker starts it;
``abort`` removes a pending command and answers it ``aborted``; a started command runs to its end, unless the device
has ``cancel(tag)``: then ``abort`` of a started command calls it, and a long handler (it learns its tag from
``current_tag()``) may stop early and return a Result with status ``ABORTED``, answered ``aborted``. At end of input
``cancel(None)`` asks every long handler to stop, so shutdown never waits for one.
The pending map is touched only under ``_lock``, so the worker and ``abort`` never both answer one command.

I_T nexus state (PREVENT ALLOW MEDIUM REMOVAL, EXTENDED COPY list identifiers): a ``cmd`` may carry ``nexus``, the
core's identifier of the I_T nexus that sent it, which a handler reads with ``current_nexus()`` (None when the core
sends none). The notifications ``nexus_lost {nexus}`` and ``reset`` (no answer) go to the device's ``nexus_lost``
and ``reset`` when it has them; the core sends them once the commands they concern have ended.
"""
from __future__ import annotations

import fcntl
import io
import os
import queue
import sys
import threading
import traceback
from typing import Any, Callable, Protocol

from .sense import CHECK_CONDITION, build_sense, internal_failure
from .wire import FrameReader, FrameWriter, ProtocolError, encode_done

VERSIONS = (1,)
Emit = Callable[..., None]
ABORTED = 0x100                     # a handler's Result status meaning "stopped by cancel(tag)": answered aborted
_running = threading.local()


def current_tag() -> int | None:
    """The tag of the command the calling thread is executing (for handlers that honour ``cancel``)."""
    return getattr(_running, "command", (None, None))[0]


def current_nexus() -> Any:
    """The ``nexus`` of the command the calling thread is executing, or None."""
    return getattr(_running, "command", (None, None))[1]


class Device(Protocol):
    device_type: int

    def execute(self, cdb: bytes, data: Any, xfer: int) -> Any: ...   # -> spc.Result
    def ready_info(self) -> dict[str, Any]: ...                       # identity/capacity/features


class ParamError(Exception):
    """A bad ``hello.params`` value: answered with ``error`` and exit status 1."""


def _sense_for(device: Any, err: Any) -> bytes:
    build = getattr(device, "sense_of", None)
    return build(err) if build else build_sense(err.sense_key, err.asc)


class Dispatcher:
    """Runs commands on ``workers`` threads (0: all inline) and answers them."""

    def __init__(self, device: Any, writer: FrameWriter, workers: int) -> None:
        self.device = device
        self.writer = writer
        self._execute = device.execute
        self._quick = getattr(device, "quick", None)
        self._cancel = getattr(device, "cancel", None)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[Any, ...]] = {}
        self._busy = 0                      # commands queued or running on workers
        self._threads = [threading.Thread(target=self._work, name=f"emu-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, tag: int, cdb: bytes, data: Any, xfer: int, nexus: Any = None) -> None:
        if not self._threads or (self._busy == 0 and self._quick is not None and self._quick(cdb, xfer)):
            self.run(tag, cdb, data, xfer, nexus)
            return
        job = (tag, cdb, data, xfer, nexus)
        with self._lock:
            self._pending[tag] = job
            self._busy += 1
        self._queue.put(job)

    def submit_control(self, msg: dict[str, Any]) -> None:
        """Queue a control message behind the commands already submitted (inline when there are no workers)."""
        if not self._threads:
            self.run_control(msg)
            return
        with self._lock:
            self._busy += 1
        self._queue.put(msg)

    def run_control(self, msg: dict[str, Any]) -> None:
        try:
            reply = self.device.control(msg)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            tag = msg.get("tag")
            reply = {"op": "done", "tag": tag, "status": CHECK_CONDITION, "message": str(exc)} \
                if isinstance(tag, int) else None
        if reply is not None:
            try:
                self.writer.send(reply)
            except OSError as exc:
                print(f"emulator: cannot answer {msg.get('op')}: {exc}", file=sys.stderr)

    def abort(self, tag: int) -> None:
        with self._lock:
            job = self._pending.pop(tag, None)
        if job is not None:
            self.writer.write(encode_done(tag, 0, aborted=True))
        elif self._cancel is not None:
            self._cancel(tag)                   # started: the device may stop it (or ignore the request)

    def run(self, tag: int, cdb: bytes, data: Any, xfer: int, nexus: Any = None) -> None:
        """Execute one command and write its ``done``; never raises for a handler's bug."""
        release = None
        _running.command = (tag, nexus)     # read only while this command runs, so never cleared
        try:
            status, sense, out, release = self._execute(cdb, data, xfer)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            status, sense, out = CHECK_CONDITION, _sense_for(self.device, internal_failure()), None
        try:
            if status == ABORTED:
                self.writer.write(encode_done(tag, 0, aborted=True))
            else:
                self.writer.write(encode_done(tag, status, sense, out))
        except OSError as exc:            # the core went away; the reader will see EOF
            print(f"emulator: cannot answer tag {tag}: {exc}", file=sys.stderr)
        finally:
            if release is not None:
                release()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.__class__ is dict:
                try:
                    self.run_control(job)
                finally:
                    with self._lock:
                        self._busy -= 1
                continue
            with self._lock:
                started = self._pending.get(job[0]) is job
                if started:
                    del self._pending[job[0]]
            try:
                if started:
                    self.run(*job)
            finally:
                with self._lock:
                    self._busy -= 1

    def close(self) -> None:
        """Finish every queued and running command (long ones are asked to stop), then stop the workers."""
        if self._cancel is not None:
            self._cancel(None)
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()


F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


def _take_stdio() -> tuple[Any, int]:
    """The protocol's stdin and stdout, with fd 1 pointed at stderr so a stray print cannot corrupt a frame.

    Pipes grow to 1 MiB where the system allows it: with the default 64 KiB, a 128 KiB data-in frame costs
    several context switches between the emulator and the core.
    """
    in_fd, out_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for fd in (in_fd, out_fd):
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass                                   # not a pipe, or over /proc/sys/fs/pipe-max-size
    return io.open(in_fd, "rb", buffering=1 << 16), out_fd


def _hello(msg: dict[str, Any] | None) -> tuple[int, dict[str, Any], dict[str, Any]]:
    if msg is None:
        raise EOFError
    if msg.get("op") != "hello":
        raise ProtocolError(f"first frame must be hello, got {msg.get('op')!r}")
    versions, params, identity = msg.get("versions"), msg.get("params", {}), msg.get("identity", {})
    if not isinstance(versions, list) or not isinstance(params, dict) or not isinstance(identity, dict):
        raise ProtocolError("hello needs versions [uint], params {}, identity {}")
    common = [v for v in versions if v in VERSIONS]
    return (max(common) if common else 0), params, identity


def serve(factory: Callable[[dict[str, Any], dict[str, Any], Emit], Any],
          stdin: Any = None, stdout_fd: int | None = None) -> int:
    """Serve one LU until end of input; return the process exit status.

    Args:
        factory: ``factory(params, identity, emit) -> device``; ``emit(event, **keys)`` sends an ``event``.
            It raises ParamError (or ValueError/OSError) for bad parameters.
        stdin, stdout_fd: the protocol streams; default: the process's own, with fd 1 moved to stderr.
    Returns:
        0 after end of input, 1 after a protocol or parameter error, 2 when no version fits.
    """
    if stdin is None or stdout_fd is None:
        stdin, stdout_fd = _take_stdio()
    reader, writer = FrameReader(stdin), FrameWriter(stdout_fd)

    def fail(message: str, code: int, tag: int | None = None) -> int:
        print(f"emulator: {message}", file=sys.stderr)
        msg: dict[str, Any] = {"op": "error", "message": message}
        if tag is not None:
            msg["tag"] = tag
        try:
            writer.send(msg)
        except OSError:
            pass
        return code

    try:
        version, params, identity = _hello(reader.read())
    except EOFError:
        return 0
    except ProtocolError as exc:
        return fail(str(exc), 1)
    if not version:
        return fail(f"no common protocol version (emulator speaks {list(VERSIONS)})", 2)

    def emit(event: str, **keys: Any) -> None:
        writer.send({"op": "event", "event": event, **keys})

    try:
        device = factory(params, identity, emit)
        workers = int(params.get("workers", getattr(device, "default_workers", 4)))
        max_inflight = int(params.get("max_inflight", 64))
        if workers < 0 or max_inflight < 1:
            raise ParamError("workers must be >= 0 and max_inflight >= 1")
    except (ParamError, ValueError, TypeError, OSError) as exc:
        return fail(f"bad params: {exc}", 1)
    writer.send({"op": "ready", "version": version, "device_type": device.device_type,
                 "max_inflight": max_inflight, **device.ready_info()})
    dispatcher = Dispatcher(device, writer, workers)
    code = 0
    try:
        code = _loop(reader, writer, dispatcher, fail)
    finally:
        dispatcher.close()
        close = getattr(device, "close", None)
        if close is not None:
            close()
    return code


def _loop(reader: FrameReader, writer: FrameWriter, dispatcher: Dispatcher, fail: Callable[..., int]) -> int:
    """Read frames until end of input (0) or a protocol error (1)."""
    submit = dispatcher.submit
    while True:
        try:
            msg = reader.read()
        except ProtocolError as exc:
            return fail(str(exc), 1)
        if msg is None:
            return 0
        op = msg.get("op")
        if op == "cmd":
            try:
                tag, cdb, xfer = msg["tag"], msg["cdb"], msg["xfer"]
                if (not isinstance(tag, int) or not isinstance(xfer, int)
                        or not isinstance(cdb, (bytes, memoryview)) or not 6 <= len(cdb) <= 260):
                    raise TypeError
                nexus = msg.get("nexus")
                submit(tag, bytes(cdb), msg.get("data") or b"", xfer, nexus if nexus is None else _nexus(msg))
            except (KeyError, TypeError):
                return fail("cmd needs tag uint, cdb bytes (6..260), xfer uint", 1, msg.get("tag"))
        elif op == "ping":
            writer.send({"op": "pong", "tag": msg.get("tag", 0)})
        elif op == "abort":
            dispatcher.abort(msg.get("tag", -1))
        elif op in ("nexus_lost", "reset"):
            notify = getattr(dispatcher.device, op, None)
            if notify is not None:
                notify(*((_nexus(msg),) if op == "nexus_lost" else ()))
        elif op == "error":
            print(f"emulator: core reported a protocol error: {msg.get('message')}", file=sys.stderr)
            return 1
        elif getattr(dispatcher.device, "control", None) is not None:
            dispatcher.submit_control(msg)
        else:
            print(f"emulator: ignoring unknown op {op!r}", file=sys.stderr)


def _nexus(msg: dict[str, Any]) -> Any:
    """The message's ``nexus`` as a dictionary key (an int or text identifier; anything else is ignored)."""
    nexus = msg.get("nexus")
    if isinstance(nexus, memoryview):
        nexus = bytes(nexus)
    return nexus if isinstance(nexus, (int, str, bytes)) else None


def main(factory: Callable[[dict[str, Any], dict[str, Any], Emit], Any]) -> None:
    """Entry point of ``python -m emulators.X``."""
    sys.exit(serve(factory))
