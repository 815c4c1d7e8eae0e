"""Unit attention conditions, queued per I_T nexus (SAM-5 5.14, SPC-4 5.14).

Strategy: each LU keeps one small queue per nexus that has ever addressed it.  A nexus seen for the first
time starts with POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.  Conditions raised for "all nexuses" are
also remembered for nexuses that appear later only when they describe the LU (not the nexus).
"""
from __future__ import annotations

from collections import deque

from ..scsi.sense import Asc
from .nexus import Nexus

MAX_QUEUED = 16


class UnitAttentions:
    def __init__(self) -> None:
        self._queues: dict[Nexus, deque[int]] = {}

    def _queue(self, nexus: Nexus) -> deque[int]:
        queue = self._queues.get(nexus)
        if queue is None:
            queue = self._queues[nexus] = deque([Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET], MAX_QUEUED)
        return queue

    def pending(self, nexus: Nexus) -> bool:
        return bool(self._queue(nexus))

    def pop(self, nexus: Nexus) -> int | None:
        queue = self._queue(nexus)
        return queue.popleft() if queue else None

    def clear(self, nexus: Nexus, asc: int) -> None:
        queue = self._queue(nexus)
        if asc in queue:
            queue.remove(asc)

    def raise_for(self, nexus: Nexus, asc: int) -> None:
        queue = self._queue(nexus)
        if asc not in queue:
            queue.append(asc)

    def raise_all(self, asc: int, *, except_for: Nexus | None = None) -> None:
        for nexus in list(self._queues):
            if nexus != except_for:
                self.raise_for(nexus, asc)

    def nexuses(self) -> list[Nexus]:
        return list(self._queues)

    def forget(self, nexus: Nexus) -> None:
        """The nexus is gone (session ended); a later one with the same name starts afresh."""
        self._queues.pop(nexus, None)
