"""Unit attention conditions, queued per I_T nexus (SAM-5 5.14, SPC-4 5.14).

Strategy: each LU keeps one small queue per live nexus.  A nexus seen for the first time starts with POWER
ON, RESET, OR BUS DEVICE RESET OCCURRED; one whose initiator port had a nexus that was lost (session ended)
starts with I_T NEXUS LOSS OCCURRED instead (SAM-5 6.3.4), so a reconnecting initiator learns that its
nexus state (SPC-2 reservation, prevention, held copy results) is gone.
"""
from __future__ import annotations

from collections import deque

from ..scsi.sense import Asc
from .nexus import Nexus

MAX_QUEUED = 16
MAX_REMEMBERED_LOSSES = 4096        # initiator ports whose lost nexus is remembered (oldest forgotten first)


class UnitAttentions:
    def __init__(self) -> None:
        self._queues: dict[Nexus, deque[int]] = {}
        self._lost: dict[tuple[str, str], None] = {}     # (initiator port, target port), oldest first

    def _queue(self, nexus: Nexus) -> deque[int]:
        queue = self._queues.get(nexus)
        if queue is None:
            lost = self._lost.pop((nexus.initiator_port, nexus.target_port), 0) is None
            first = Asc.I_T_NEXUS_LOSS_OCCURRED if lost else Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET
            queue = self._queues[nexus] = deque([first], MAX_QUEUED)
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
        """The nexus is gone (session ended): its queue goes, and the same initiator port, when it comes back,
        is told that its nexus was lost."""
        self._queues.pop(nexus, None)
        self._lost[(nexus.initiator_port, nexus.target_port)] = None
        if len(self._lost) > MAX_REMEMBERED_LOSSES:
            del self._lost[next(iter(self._lost))]
