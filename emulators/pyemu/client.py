"""A small synchronous client of the emulator protocol, for tests and benchmarks (not for the core).

It frames with cbor2 and struct only, independently of ``wire``, so tests exercise the emulator's codec against
a second implementation. Every read has a deadline: a hung emulator fails a test instead of hanging it.
"""
from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import cbor2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class EmulatorTimeout(AssertionError):
    pass


class EmuClient:
    """Starts ``python -m <module>`` (or ``argv``) and speaks to it over its stdin/stdout."""

    def __init__(self, module: str = "emulators.vdisk", timeout: float = 10.0, argv: list[str] | None = None) -> None:
        self.stderr = tempfile.TemporaryFile()
        argv = argv or [sys.executable, "-m", module]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, bufsize=0)
        self.timeout = timeout
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin = self.proc.stdin
        self._fd = self.proc.stdout.fileno()
        self._buf = bytearray()
        self._tag = 0
        self.early: list[dict[str, Any]] = []      # frames read while waiting for another tag

    # -- framing ------------------------------------------------------------------------------------------------
    def send_raw(self, raw: bytes) -> None:
        self._stdin.write(raw)
        self._stdin.flush()

    def send(self, msg: dict[str, Any]) -> None:
        body = cbor2.dumps(msg)
        self.send_raw(struct.pack(">I", len(body)) + body)

    def _fill(self, need: int, deadline: float) -> bool:
        while len(self._buf) < need:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise EmulatorTimeout(f"no frame from the emulator; stderr: {self.stderr_text()[-2000:]}")
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                return False
            self._buf += chunk
        return True

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next frame, or None at end of output."""
        if self.early:
            return self.early.pop(0)
        deadline = time.monotonic() + (timeout or self.timeout)
        if not self._fill(4, deadline):
            return None
        (n,) = struct.unpack_from(">I", self._buf)
        if not self._fill(4 + n, deadline):
            raise AssertionError("end of output inside a frame")
        msg = cbor2.loads(bytes(self._buf[4:4 + n]))
        del self._buf[:4 + n]
        return msg

    # -- protocol -----------------------------------------------------------------------------------------------
    def hello(self, params: dict[str, Any], identity: dict[str, Any] | None = None,
              versions: list[int] | None = None) -> dict[str, Any]:
        self.send({"op": "hello", "versions": versions or [1], "params": params, "identity": identity or {}})
        ready = self.recv()
        assert ready is not None, self.stderr_text()
        return ready

    def submit(self, cdb: bytes, data: bytes | None = None, xfer: int = 0, tag: int | None = None) -> int:
        if tag is None:
            self._tag += 1
            tag = self._tag
        msg: dict[str, Any] = {"op": "cmd", "tag": tag, "cdb": bytes(cdb), "xfer": xfer}
        if data:
            msg["data"] = bytes(data)
        self.send(msg)
        return tag

    def wait(self, tag: int, timeout: float | None = None) -> dict[str, Any]:
        """The ``done`` for ``tag``; other frames that arrive first are kept for later ``recv``s."""
        kept: list[dict[str, Any]] = []
        for i, msg in enumerate(self.early):
            if msg.get("op") == "done" and msg.get("tag") == tag:
                return self.early.pop(i)
        while True:
            deadline = time.monotonic() + (timeout or self.timeout)
            if not self._fill(4, deadline):
                raise AssertionError(f"emulator exited before answering tag {tag}")
            (n,) = struct.unpack_from(">I", self._buf)
            self._fill(4 + n, deadline)
            msg = cbor2.loads(bytes(self._buf[4:4 + n]))
            del self._buf[:4 + n]
            if msg.get("op") == "done" and msg.get("tag") == tag:
                self.early.extend(kept)
                return msg
            kept.append(msg)

    def cmd(self, cdb: bytes, data: bytes | None = None, xfer: int = 0) -> dict[str, Any]:
        return self.wait(self.submit(cdb, data, xfer))

    def close(self, timeout: float = 10.0) -> int:
        """Close stdin (end of input) and return the exit status."""
        if not self._stdin.closed:
            self._stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise EmulatorTimeout("emulator did not exit after end of input")

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def __enter__(self) -> "EmuClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc.poll() is None:
            try:
                self.close(5)
            except EmulatorTimeout:
                pass
        self.stderr.close()


def parse_sense(sense: bytes) -> dict[str, Any]:
    """key, asc, ascq, info (or None), format (0x70/0x72) and field pointer sks (or None) of sense data."""
    fmt = sense[0] & 0x7F
    if fmt in (0x72, 0x73):
        out: dict[str, Any] = {"format": fmt, "key": sense[1] & 0x0F, "asc": sense[2], "ascq": sense[3],
                               "info": None, "sks": None}
        pos = 8
        while pos + 2 <= len(sense):
            kind, n = sense[pos], sense[pos + 1]
            if kind == 0x00:
                out["info"] = int.from_bytes(sense[pos + 4:pos + 12], "big")
            elif kind == 0x02:
                out["sks"] = sense[pos + 4:pos + 7]
            pos += 2 + n
        return out
    return {"format": fmt, "key": sense[2] & 0x0F, "asc": sense[12], "ascq": sense[13],
            "info": int.from_bytes(sense[3:7], "big") if sense[0] & 0x80 else None,
            "sks": sense[15:18] if sense[15] & 0x80 else None}
