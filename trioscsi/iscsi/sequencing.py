"""Command numbering for one session (RFC 7143 4.2.2): the CmdSN window and in-order delivery, sans I/O.

Strategy: commands arrive with a CmdSN; `accept()` returns the commands that may now be delivered, in CmdSN
order (possibly none, if this one came early and waits for a gap to fill).  Immediate commands are delivered
at once and do not advance ExpCmdSN.  The window (MaxCmdSN) is the configured queue depth less the commands
still running, and it never moves backwards, so an initiator can never have more than `queue_depth`
commands in the target.
"""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")
MOD = 1 << 32
HALF = 1 << 31


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32-bit sequence numbers."""
    return a != b and ((b - a) % MOD) < HALF


def sn_in_window(sn: int, low: int, high: int) -> bool:
    """low <= sn <= high in serial arithmetic."""
    return (sn - low) % MOD <= (high - low) % MOD and not sn_lt(high, low)


class CmdSnWindow(Generic[T]):
    def __init__(self, expcmdsn: int, queue_depth: int) -> None:
        self.expcmdsn = expcmdsn % MOD
        self.queue_depth = queue_depth
        self.active = 0
        self._maxcmdsn = (self.expcmdsn + queue_depth - 1) % MOD
        self._early: dict[int, T] = {}

    @property
    def maxcmdsn(self) -> int:
        proposed = (self.expcmdsn + max(self.queue_depth - self.active - len(self._early), 0) - 1) % MOD
        if sn_lt(self._maxcmdsn, proposed):
            self._maxcmdsn = proposed
        return self._maxcmdsn

    def accept(self, cmdsn: int, immediate: bool, item: T) -> list[T] | None:
        """The items now deliverable, or None if `cmdsn` is outside the window (the PDU is dropped)."""
        if immediate:
            return [item]
        if not sn_in_window(cmdsn, self.expcmdsn, self.maxcmdsn):
            return None
        if cmdsn != self.expcmdsn:
            if cmdsn in self._early:
                return None
            self._early[cmdsn] = item
            return []
        ready = [item]
        self.expcmdsn = (self.expcmdsn + 1) % MOD
        while self.expcmdsn in self._early:
            ready.append(self._early.pop(self.expcmdsn))
            self.expcmdsn = (self.expcmdsn + 1) % MOD
        return ready

    def started(self) -> None:
        self.active += 1

    def finished(self) -> None:
        self.active -= 1
