"""SANITIZE (SBC-4 5.30, 4.11): overwrite, block erase, cryptographic erase and exit failure mode.

Strategy: a sanitize operation runs on its own thread, so it outlives the command that started it, as SBC-4
requires: an aborted SANITIZE, a reset or a lost I_T nexus do not stop it. The command waits for it (IMMED=0) or
answers at once (IMMED=1). While it runs the device answers everything but INQUIRY, REPORT LUNS and REQUEST SENSE
with NOT READY, SANITIZE IN PROGRESS and a progress indication (the gate is in ``sbc``). A failed operation leaves
the logical unit in failure mode: medium access commands get MEDIUM ERROR, SANITIZE COMMAND FAILED until a sanitize
succeeds or, if the failed command had AUSE set, EXIT FAILURE MODE.

Crash safety: before the operation starts, a marker file next to the image (``<path>.sanitize``) records it; the
marker goes when the operation succeeds and says ``failed`` when it fails. An emulator that starts and finds a
marker resumes the operation from the beginning (or enters failure mode), so a crash or restart in the middle
never leaves a half-sanitized medium that reads as if nothing happened.

There is no encryption here: CRYPTOGRAPHIC ERASE makes the data unrecoverable the way BLOCK ERASE does
(deallocation on a thin logical unit, zeros otherwise), which is the outcome SBC-4 asks of it.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

from .sense import ScsiError, SenseKey, invalid_field, invalid_param, param_length_error

OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE = 0x01, 0x02, 0x03, 0x1F
ASC_SANITIZE_IN_PROGRESS = 0x041B
ASC_SANITIZE_FAILED = 0x3103
_CHUNK = 1 << 20


class Plan(NamedTuple):
    """One sanitize operation, as the command asked for it."""
    action: int
    immed: bool
    ause: bool
    pattern: bytes = b""      # OVERWRITE: the initialization pattern
    passes: int = 0           # OVERWRITE: OVERWRITE COUNT
    invert: bool = False      # OVERWRITE: invert the pattern between passes

    def to_json(self, failed: bool = False) -> str:
        return json.dumps({"action": self.action, "ause": self.ause, "pattern": self.pattern.hex(),
                           "count": self.passes, "invert": self.invert, "failed": failed})


def parse(cdb: bytes, data: Any, block_size: int, actions: frozenset[int]) -> Plan:
    """Check a SANITIZE CDB and its parameter list (SBC-4 5.30); ``actions`` are the service actions offered."""
    action, immed, ause = cdb[1] & 0x1F, bool(cdb[1] & 0x80), bool(cdb[1] & 0x20)
    if cdb[1] & 0x40:
        raise invalid_field(1, 6)
    for i in range(2, 7):
        if cdb[i]:
            raise invalid_field(i)
    if action not in actions:
        raise invalid_field(1, 4)
    length = (cdb[7] << 8) | cdb[8]
    if action != OVERWRITE:
        if length:
            raise invalid_field(7)                  # BLOCK ERASE, CRYPTO ERASE, EXIT FAILURE MODE take none
        return Plan(action, immed, ause)
    if length < 5 or length > block_size + 4:
        raise invalid_field(7)
    if len(data) < length:
        raise param_length_error()
    head = bytes(data[:4])
    count, test, invert = head[0] & 0x1F, (head[0] >> 5) & 0x03, bool(head[0] & 0x80)
    size = (head[2] << 8) | head[3]
    if not count:
        raise invalid_param(0, 4)
    if test:
        raise invalid_param(0, 6)
    if not size or size > block_size:
        raise invalid_param(2)
    if 4 + size > length:
        raise param_length_error()
    return Plan(OVERWRITE, immed, ause, bytes(data[4:4 + size]), count, invert)


class Sanitizer:
    """Runs at most one sanitize operation at a time over ``store``.

    Args:
        store: the backing store (``size``, ``write``, ``punch``, ``flush``, ``thin``).
        block_size: logical block size (an OVERWRITE pattern fills each block).
        marker: path of the crash-safety marker file, or None (no resume after a restart).
        rate: bytes per second an OVERWRITE may write (0: unlimited), so that a sanitize does not starve the
            other users of the same disk.
        changed: called whenever ``running``/``failed`` change (the device recomputes its command gate).
    """

    def __init__(self, store: Any, block_size: int, marker: str | None, rate: int,
                 changed: Callable[[], None]) -> None:
        self.store = store
        self.block_size = block_size
        self.marker = marker
        self.rate = rate
        self._changed = changed
        self.running: Plan | None = None
        self.failed: Plan | None = None
        self.done = threading.Event()
        self.done.set()
        self._progress = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state --------------------------------------------------------------------------------------------------
    def progress(self) -> int:
        """PROGRESS INDICATION: the fraction done, in 65536ths."""
        return min(0xFFFF, int(self._progress * 0x10000))

    def resume(self) -> None:
        """At start: continue an operation a previous incarnation left unfinished (see the module docstring)."""
        if self.marker is None or not os.path.exists(self.marker):
            return
        try:
            with open(self.marker) as f:
                saved = json.load(f)
            plan = Plan(int(saved["action"]), True, bool(saved["ause"]), bytes.fromhex(saved["pattern"]),
                        int(saved["count"]), bool(saved["invert"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"emulator: unreadable sanitize marker {self.marker}: {exc}; entering failure mode",
                  file=sys.stderr)
            self.failed = Plan(OVERWRITE, True, False)
            self._changed()
            return
        if saved.get("failed"):
            self.failed = plan
            self._changed()
            return
        print(f"emulator: resuming the sanitize operation interrupted by a restart ({self.marker})",
              file=sys.stderr)
        self.start(plan)

    def exit_failure_mode(self) -> None:
        """EXIT FAILURE MODE: allowed when the failed command had AUSE set (SBC-4 5.30.1)."""
        if self.failed is None:
            return
        if not self.failed.ause:
            raise invalid_field(1, 5)
        self.failed = None
        self._drop_marker()
        self._changed()

    # -- the operation ------------------------------------------------------------------------------------------
    def start(self, plan: Plan) -> threading.Event:
        """Start ``plan`` in the background; returns the event set when it ends."""
        self._write_marker(plan.to_json())
        self.done = done = threading.Event()
        self._progress = 0.0
        self._stop.clear()
        self.running = plan
        self._changed()
        self._thread = threading.Thread(target=self._run, args=(plan, done), name="sanitize", daemon=True)
        self._thread.start()
        return done

    def _run(self, plan: Plan, done: threading.Event) -> None:
        ok = False
        try:
            if getattr(self.store, "discards", False):
                pass                                # a store that keeps nothing is sanitized already
            elif plan.action == OVERWRITE:
                self._overwrite(plan)
            else:
                self._erase()
            self.store.flush()
            ok = True
        except _Stopped:
            return                                  # shutdown: the marker stays, the next start resumes
        except Exception as exc:                    # an I/O error (ScsiError from the store) or a bug
            print(f"emulator: sanitize failed: {exc}", file=sys.stderr)
        finally:
            if not self._stop.is_set():
                self.running = None
                if ok:
                    self.failed = None
                    self._drop_marker()
                else:
                    self.failed = plan
                    self._write_marker(plan.to_json(failed=True))
                self._changed()
            done.set()

    def _erase(self) -> None:
        size = self.store.size
        if self.store.thin:
            self.store.punch(0, size)               # deallocated; LBPRZ makes every block read as zeros
            self._progress = 1.0
            return
        self._fill(bytes(self.block_size), 0, 1)

    def _overwrite(self, plan: Plan) -> None:
        reps = -(-self.block_size // len(plan.pattern))
        block = (plan.pattern * reps)[:self.block_size]
        inverted = bytes(b ^ 0xFF for b in block)
        for p in range(plan.passes):
            self._fill(inverted if plan.invert and p % 2 else block, p, plan.passes)

    def _fill(self, block: bytes, p: int, passes: int) -> None:
        size = self.store.size
        chunk = block * max(1, _CHUNK // len(block))
        start = time.monotonic()
        off = 0
        while off < size:
            if self._stop.is_set():
                raise _Stopped()
            n = min(len(chunk), size - off)
            self.store.write(off, memoryview(chunk)[:n], False)
            off += n
            self._progress = (p + off / size) / passes
            if self.rate:
                ahead = off / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    self._stop.wait(ahead)
        self.store.flush()

    def stop(self) -> None:
        """Shutdown: stop the operation between two chunks, keeping the marker so that it resumes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    # -- marker -------------------------------------------------------------------------------------------------
    def _write_marker(self, text: str) -> None:
        if self.marker is None:
            return
        tmp = self.marker + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.marker)
        except OSError as exc:
            print(f"emulator: cannot write sanitize marker {self.marker}: {exc}", file=sys.stderr)

    def _drop_marker(self) -> None:
        if self.marker is None:
            return
        try:
            os.unlink(self.marker)
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"emulator: cannot remove sanitize marker {self.marker}: {exc}", file=sys.stderr)


class _Stopped(Exception):
    pass


def in_progress(progress: int) -> ScsiError:
    """NOT READY, LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS, with the progress indication."""
    return _Progress(progress)


class _Progress(ScsiError):
    def __init__(self, progress: int) -> None:
        super().__init__(SenseKey.NOT_READY, ASC_SANITIZE_IN_PROGRESS)
        self.progress = progress

    def _sks(self) -> bytes:
        return bytes((0x80, self.progress >> 8, self.progress & 0xFF))


def failed_mode() -> ScsiError:
    return ScsiError(SenseKey.MEDIUM_ERROR, ASC_SANITIZE_FAILED)
