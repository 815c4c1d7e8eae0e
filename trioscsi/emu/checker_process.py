"""The emulator under test, for the checker: outcomes, a diagnosing frame reader, the §8 schema for what an
emulator sends, and `EmulatorProcess`, which runs the command in its own process group and matches answers to
requests. `checker.py` runs the battery (`checker_cases.py`) over it and prints the report.
"""
from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio

MAX_FRAME = 16 * 1024 * 1024 + 4096
SPEC = "emulator-protocol"
F1 = f"{SPEC} §1"
IDENTITY: dict[str, Any] = {"naa": bytes.fromhex("60014050c0ffee0000000000c4ec0001"), "serial": "chk-serial-0001",
                            "vendor": "CHECKER", "product": "emu-checker", "revision": "0.1"}


# ---- outcomes ------------------------------------------------------------------------------------------------

class CheckFailed(Exception):
    """A check found a violation: `clause` is where the rule is written (§N of the protocol, or SPC/SBC)."""

    def __init__(self, message: str, clause: str = "") -> None:
        super().__init__(message)
        self.message, self.clause = message, clause


class Warned(CheckFailed):
    """Allowed by the protocol but probably not what the author meant."""


class EmulatorGone(CheckFailed):
    """The emulator exited or broke the framing: nothing more can be asked of it."""


class Unanswered(CheckFailed):
    """A cmd got no done in time (while the emulator still runs): lost, or answered under another tag."""


class FramingError(CheckFailed):
    """The byte stream is not length-prefixed CBOR maps (§1)."""


class Skipped(Exception):
    """The check does not apply (an optional command the emulator does not implement, ...)."""


@dataclass
class Outcome:
    check: str
    status: str                 # PASS, FAIL, WARN, SKIP, NOT RUN
    detail: str = ""
    clauses: list[str] = field(default_factory=list)


@dataclass
class Violation:
    message: str
    clause: str


# ---- framing -------------------------------------------------------------------------------------------------

class FrameReader:
    """Sans-I/O: `feed(bytes)`, then `next()` -> one decoded map or None; raises `FramingError` with a hint."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buf = bytearray()
        self.max_frame = max_frame
        self.frames = 0

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> dict[str, Any] | None:
        if len(self.buf) < 4:
            return None
        (length,) = struct.unpack_from(">I", self.buf)
        if length > self.max_frame:
            raise FramingError(self._bad_length(length), F1)
        if len(self.buf) < 4 + length:
            return None
        body = bytes(self.buf[4:4 + length])
        del self.buf[:4 + length]
        self.frames += 1
        stream = io.BytesIO(body)
        try:
            item = cbor2.CBORDecoder(stream).decode()
        except Exception as exc:
            raise FramingError(f"frame {self.frames} ({length} bytes) is not one CBOR item: {exc}; does the "
                               "length prefix count the CBOR bytes only?", F1) from None
        if stream.tell() != length:
            raise FramingError(f"frame {self.frames}: the CBOR item ends {length - stream.tell()} bytes before the "
                               "frame does (the length prefix must count the CBOR bytes only, never itself)", F1)
        if not isinstance(item, dict):
            raise FramingError(f"frame {self.frames} is a CBOR {type(item).__name__}, not a map", F1)
        bad = [k for k in item if not isinstance(k, str)]
        if bad:
            raise FramingError(f"frame {self.frames} has non-text keys {bad[:3]!r} (every map key is text)", F1)
        if not isinstance(item.get("op"), str):
            raise FramingError(f"frame {self.frames} has no text 'op': {_short(item)}", f"{SPEC} §2")
        return item

    def _bad_length(self, length: int) -> str:
        head = bytes(self.buf[:4])
        text = f"length prefix {head.hex()} = {length} bytes exceeds max_frame {self.max_frame}"
        little = int.from_bytes(head, "little")
        if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            line = bytes(self.buf[:80]).split(b"\n")[0].decode(errors="replace")
            return (f"stdout starts with the text {line!r} where a frame should be: stdout carries frames only; "
                    "log on stderr")
        if little <= self.max_frame:
            return f"{text}; read little-endian it would be {little}: the length is a big-endian uint32"
        if 0xA0 <= head[0] <= 0xBF:
            return f"{text}; the bytes look like a CBOR map head: is the 4-byte big-endian length prefix missing?"
        return text

    def describe_partial(self) -> str:
        if not self.buf:
            return ""
        if len(self.buf) < 4:
            return f"stdout ended {len(self.buf)} bytes into a length prefix"
        (length,) = struct.unpack_from(">I", self.buf)
        return f"stdout ended {len(self.buf) - 4} bytes into a {length}-byte frame"


def encode(message: dict[str, Any]) -> bytes:
    body = cbor2.dumps(message)
    return struct.pack(">I", len(body)) + body


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- the §8 schema for what an emulator sends ---------------------------------------------------------------

def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_TYPES = {"uint": (_uint, "an unsigned integer"), "text": (lambda v: isinstance(v, str), "a text string"),
          "bytes": (lambda v: isinstance(v, bytes), "a byte string (major type 2)"),
          "bool": (lambda v: isinstance(v, bool), "true or false"), "map": (lambda v: isinstance(v, dict), "a map"),
          "texts": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "an array of text"),
          "text/null": (lambda v: v is None or isinstance(v, str), "text or null"),
          "uint/null": (lambda v: v is None or _uint(v), "an unsigned integer or null")}
SCHEMA: dict[str, dict[str, str]] = {
    "ready": {"version": "uint", "device_type": "uint", "identity": "map", "capacity?": "map",
              "features?": "texts", "max_inflight?": "uint"},
    "done": {"tag": "uint", "status": "uint", "sense?": "bytes", "data?": "bytes", "aborted?": "bool"},
    "pong": {"tag": "uint"},
    "event": {"event": "text"},
    "error": {"message": "text", "tag?": "uint"},
}
EVENT_KEYS = {"capacity_changed": {"blocks": "uint", "block_size": "uint"}, "medium_changed": {},
              "mode_changed": {}, "log": {"level": "text", "message": "text"},
              "position": {"path": "text/null", "object": "uint", "loaded": "bool", "block_size": "uint"},   # §10.2
              "move": {"action": "text", "drive": "uint", "lun": "uint/null", "serial": "text", "path": "text",
                       "barcode": "text"}}


def schema_problems(message: dict[str, Any]) -> list[str]:
    """What is wrong with a frame an emulator sent, by the CDDL of §8 (an empty list when nothing)."""
    op = message["op"]
    if op not in SCHEMA:
        return [f"op {op!r} is not a message an emulator sends (ready, done, pong, event, error)"]
    problems = []
    keys = dict(SCHEMA[op])
    if op == "event":
        keys.update(EVENT_KEYS.get(str(message.get("event")), {}))
    for key, kind in keys.items():
        name = key.rstrip("?")
        if name not in message:
            if not key.endswith("?"):
                problems.append(f"{op} lacks the required key {name!r}")
            continue
        check, wanted = _TYPES[kind]
        if not check(message[name]):
            problems.append(f"{op}.{name} must be {wanted}, got {type(message[name]).__name__} "
                            f"{_short(message[name], 40)}")
    if op == "done" and _uint(message.get("status")) and message["status"] > 255:
        problems.append(f"done.status {message['status']} is not a status byte (.le 255)")
    if op == "ready" and _uint(message.get("device_type")) and message["device_type"] > 31:
        problems.append(f"ready.device_type {message['device_type']} is not a peripheral device type (.le 31)")
    if op == "ready" and isinstance(message.get("capacity"), dict):
        for k in ("block_size", "blocks"):
            if not _uint(message["capacity"].get(k)):
                problems.append(f"ready.capacity.{k} must be an unsigned integer, got {message['capacity'].get(k)!r}")
    return problems


# ---- the emulator under test ---------------------------------------------------------------------------------

@dataclass
class Done:
    tag: int
    status: int
    sense: bytes
    data: bytes
    aborted: bool
    raw: dict[str, Any]
    seq: int = 0


@dataclass
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] | None = None
    problem: str = ""           # the reply came but broke the schema
    seq: int = 0                # arrival order among replies
    count: int = 0              # dones received for this cmd

    @property
    def in_flight(self) -> bool:
        return self.result is None and not self.problem


class EmulatorProcess:
    """The child process, its pipes, and the tag bookkeeping that detects lost, unknown and duplicate replies."""

    def __init__(self, argv: list[str], cwd: str | None, timeout: float, max_frame: int = MAX_FRAME) -> None:
        self.argv, self.cwd, self.timeout = argv, cwd, timeout
        self.reader = FrameReader(max_frame)
        self.proc: trio.Process | None = None
        self.ready = trio.Event()
        self.ready_message: dict[str, Any] | None = None
        self.first_frame: dict[str, Any] | None = None
        self.waiters: dict[int, _Waiter] = {}   # tag -> its latest cmd (kept after the done, to spot a second)
        self.pongs: dict[int, _Waiter] = {}
        self.violations: list[Violation] = []
        self.events: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.stderr: deque[str] = deque(maxlen=40)
        self.gone = trio.Event()
        self.gone_reason = ""
        self.stdin_closed = False
        self.expect_error = False    # the version check wants an `error` frame
        self.seq = 0
        self._send_lock = trio.Lock()
        self._next_tag = 1
        self._ping_tag = 1000

    async def start(self, nursery: trio.Nursery) -> None:
        self.proc = await trio.lowlevel.open_process(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE, cwd=self.cwd, start_new_session=True)
        nursery.start_soon(self._read_stdout)
        nursery.start_soon(self._read_stderr)

    # -- sending
    async def send(self, message: dict[str, Any] | bytes, *, chunks: int = 1) -> None:
        frame = message if isinstance(message, bytes) else encode(message)
        if self.gone.is_set() and self.proc is not None and self.proc.returncode is not None:
            raise EmulatorGone(self.gone_reason, f"{SPEC} §7")
        assert self.proc is not None and self.proc.stdin is not None
        step = max(1, -(-len(frame) // chunks))
        try:
            with trio.fail_after(self.timeout):
                async with self._send_lock:
                    for i in range(0, len(frame), step):
                        await self.proc.stdin.send_all(frame[i:i + step])
                        if chunks > 1:
                            await trio.sleep(0.02)
        except trio.TooSlowError:
            raise CheckFailed(f"the emulator read none of a {len(frame)}-byte frame for {self.timeout:g} s "
                              "(is it reading stdin?)", f"{SPEC} §7") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            with trio.move_on_after(2):       # let the reader see EOF, so the report says how it ended
                await self.gone.wait()
            raise EmulatorGone(self.gone_reason or "the emulator closed its stdin", f"{SPEC} §7") from None

    def new_tag(self) -> int:
        while self._next_tag in self.waiters and self.waiters[self._next_tag].in_flight:
            self._next_tag += 1
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        return tag

    async def submit(self, cdb: bytes, data: bytes = b"", xfer: int = 0, tag: int | None = None,
                     **extra: Any) -> int:
        tag = self.new_tag() if tag is None else tag
        message: dict[str, Any] = {"op": "cmd", "tag": tag, "cdb": bytes(cdb), "xfer": xfer, **extra}
        if data:
            message["data"] = bytes(data)
        self.expect(tag)
        await self.send(message)
        return tag

    def expect(self, tag: int) -> None:
        """Register `tag` as in flight (before its cmd is sent, so a fast reply finds it)."""
        self.waiters[tag] = _Waiter()

    async def wait_done(self, tag: int, timeout: float | None = None) -> Done:
        waiter = self.waiters.get(tag)
        if waiter is None:
            raise CheckFailed(f"internal: tag {tag} was never sent")
        with trio.move_on_after(self.timeout if timeout is None else timeout):
            await waiter.event.wait()
        if waiter.problem:
            raise CheckFailed(f"the done for tag {tag} is malformed: {waiter.problem}", f"{SPEC} §8")
        if waiter.result is None:
            if self.gone.is_set():
                raise EmulatorGone(f"no done for tag {tag}: {self.gone_reason}", f"{SPEC} §4, §7")
            raise Unanswered(f"no done for tag {tag} within {self.timeout if timeout is None else timeout:g} s",
                             f"{SPEC} §4 (each cmd gets exactly one done)")
        m = waiter.result
        return Done(m["tag"], m["status"], m.get("sense") or b"", m.get("data") or b"", bool(m.get("aborted")), m,
                    waiter.seq)

    async def wait_many(self, tags: list[int], timeout: float) -> tuple[dict[int, Done], list[int]]:
        """Wait (one deadline for all) for the dones of `tags`: (answers by tag, tags left unanswered)."""
        with trio.move_on_after(timeout):
            for tag in tags:
                await self.waiters[tag].event.wait()
        results: dict[int, Done] = {}
        missing = []
        for tag in tags:
            if self.waiters[tag].in_flight:
                missing.append(tag)
                continue
            results[tag] = await self.wait_done(tag, 0)
        return results, missing

    async def execute(self, cdb: bytes, data: bytes = b"", xfer: int = 0, **extra: Any) -> Done:
        return await self.wait_done(await self.submit(cdb, data, xfer, **extra))

    async def ping(self, timeout: float | None = None) -> float:
        """Send a ping, return the seconds until its pong; raise CheckFailed if none comes in time."""
        self._ping_tag += 1
        tag = self._ping_tag
        waiter = self.pongs[tag] = _Waiter()
        began = trio.current_time()
        await self.send({"op": "ping", "tag": tag})
        with trio.move_on_after(self.timeout if timeout is None else timeout):
            await waiter.event.wait()
        if waiter.result is None:
            if self.gone.is_set():
                raise EmulatorGone(f"no pong: {self.gone_reason}", f"{SPEC} §7")
            raise CheckFailed(f"no pong for ping tag {tag} within {self.timeout if timeout is None else timeout:g} s",
                              f"{SPEC} §7 (ping must be answered promptly)")
        return trio.current_time() - began

    async def close_stdin(self) -> None:
        self.stdin_closed = True
        if self.proc is not None and self.proc.stdin is not None:
            async with self._send_lock:
                try:
                    await self.proc.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        with trio.move_on_after(timeout):
            await self.proc.wait()
        return self.proc.returncode

    async def kill(self) -> None:
        """SIGKILL the whole process group and reap the child (bounded)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        with trio.move_on_after(5):
            await self.proc.wait()

    def exit_text(self) -> str:
        code = self.proc.returncode if self.proc is not None else None
        if code is None:
            return "still running"
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"

    # -- receiving
    def violate(self, message: str, clause: str) -> None:
        self.violations.append(Violation(message, clause))

    def _set_gone(self, reason: str) -> None:
        if not self.gone.is_set():
            self.gone_reason = reason
            self.gone.set()
        for waiter in list(self.waiters.values()) + list(self.pongs.values()):
            waiter.event.set()
        self.ready.set()

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while True:
                chunk = await self.proc.stdout.receive_some(1 << 20)
                if not chunk:
                    break
                self.reader.feed(chunk)
                while (message := self.reader.next()) is not None:
                    self._dispatch(message)
        except FramingError as exc:
            self.violate(exc.message, exc.clause)
            self._set_gone(f"broken framing: {exc.message}")
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        partial = self.reader.describe_partial()
        with trio.move_on_after(2):
            await self.proc.wait()
        how = self.exit_text()
        if partial:
            reason = f"{partial} ({how}): crashed mid-reply, or a frame was not flushed"
            self.violate(reason, f"{SPEC} §1, §7")
            self._set_gone(reason)
        else:
            self._set_gone(f"the emulator closed stdout ({how})")

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        text = b""
        try:
            while chunk := await self.proc.stderr.receive_some(65536):
                *lines, text = (text + chunk).split(b"\n")
                self.stderr.extend(line.decode(errors="replace") for line in lines)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.stderr.extend([text.decode(errors="replace")] if text else [])

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if self.first_frame is None:
            self.first_frame = message
        problems = schema_problems(message)
        for problem in problems:
            self.violate(problem, f"{SPEC} §8" if op in SCHEMA else f"{SPEC} §2")
        if op == "ready":
            if self.ready_message is not None:
                self.violate("a second ready", f"{SPEC} §3")
            else:
                self.ready_message = message
                self.ready.set()
        elif not self.ready.is_set() and op != "error":
            self.violate(f"{op!r} before ready", f"{SPEC} §3, §6")
        if problems:
            waiter = self.waiters.get(message.get("tag")) if op == "done" else None   # type: ignore[arg-type]
            if waiter is not None and waiter.in_flight:
                waiter.problem = "; ".join(problems)
                waiter.event.set()
            return
        self.seq += 1
        if op == "done":
            self._on_done(message)
        elif op == "pong":
            waiter = self.pongs.pop(message["tag"], None)
            if waiter is None:
                self.violate(f"pong for tag {message['tag']}, which no ping carried", f"{SPEC} §2 (pong)")
            else:
                waiter.result = message
                waiter.event.set()
        elif op == "event":
            self.events.append(message)
            if message["event"] not in EVENT_KEYS:
                self.violate(f"unknown event {message['event']!r} (the core logs and ignores it)", "WARN")
        elif op == "error":
            self.errors.append(message)
            if not self.expect_error:
                    self.violate(f"the emulator sent error: {message.get('message')!r}", f"{SPEC} §2 (error)")

    def _on_done(self, message: dict[str, Any]) -> None:
        tag = message["tag"]
        waiter = self.waiters.get(tag)
        if waiter is not None:
            waiter.count += 1
        if waiter is not None and waiter.count == 1:
            waiter.result, waiter.seq = message, self.seq
            waiter.event.set()
        elif waiter is not None:
            self.violate(f"done #{waiter.count} for tag {tag}: a second done for one cmd",
                         f"{SPEC} §4 (each cmd gets exactly one done)")
        else:
            self.violate(f"done for tag {tag}, which is not in flight (done.tag must echo cmd.tag)",
                         f"{SPEC} §4")
