"""Task attributes in the core (SAM-5 8.6, restricted reordering): ORDERED waits for every older task, SIMPLE
for older ORDERED and HEAD OF QUEUE tasks, HEAD OF QUEUE for nothing.  An emulator stand-in records the order
in which commands reach it and holds each one until the test lets it finish."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from trioscsi.core.lu import LogicalUnit
from trioscsi.core.nexus import Command, Nexus, TaskAttribute
from trioscsi.emu.supervisor import Result

NEXUS = Nexus("iqn.2026-11.org.trioscsi.test:ini,i,0x1", "iqn.2026-11.org.trioscsi.test:tgt,t,0x1",
              "iqn.2026-11.org.trioscsi.test:ini")


class HeldEmulator:
    """Receives commands and answers each one only when its marker (CDB byte 2) is released."""

    def __init__(self) -> None:
        self.spec = SimpleNamespace(name="held", abort_grace=1.0)
        self.info = None
        self.on_event: Any = None
        self.on_ready: Any = None
        self.reached: list[int] = []
        self.release = {marker: trio.Event() for marker in range(1, 10)}

    async def execute(self, cdb: bytes, data: Any, xfer: int, **_: Any) -> Result:
        self.reached.append(cdb[2])
        await self.release[cdb[2]].wait()
        return Result(0, b"", b"", False, {})

    def notify(self, message: dict[str, Any]) -> None:
        pass


def new_lu(emulator: HeldEmulator) -> LogicalUnit:
    lu = LogicalUnit("lu", emulator)  # type: ignore[arg-type]
    assert lu.unit_attentions.pop(NEXUS) is not None     # the new nexus's power-on unit attention, consumed
    return lu


async def test_ordered_waits_for_older_tasks_and_holds_newer_simple_ones() -> None:
    emulator = HeldEmulator()
    lu = new_lu(emulator)
    finished: list[int] = []
    attrs = {1: TaskAttribute.SIMPLE, 2: TaskAttribute.ORDERED, 3: TaskAttribute.SIMPLE,
             4: TaskAttribute.HEAD_OF_QUEUE}

    async def command(marker: int) -> None:
        task = lu.admit(NEXUS, marker, attrs[marker])
        await lu.execute(Command(NEXUS, 0, bytes((0, 0, marker, 0, 0, 0)), tag=marker, attr=attrs[marker],
                                 admitted=task))
        lu.release(task)
        finished.append(marker)

    async with trio.open_nursery() as nursery:
        for marker in attrs:                      # delivered in this order
            nursery.start_soon(command, marker)
            await trio.testing.wait_all_tasks_blocked()
        assert emulator.reached == [1, 4]        # the ORDERED task and the SIMPLE one after it are dormant
        emulator.release[4].set()
        await trio.testing.wait_all_tasks_blocked()
        assert emulator.reached == [1, 4]
        emulator.release[1].set()
        await trio.testing.wait_all_tasks_blocked()
        assert emulator.reached == [1, 4, 2]     # the older task ended: the ORDERED one runs alone
        emulator.release[2].set()
        await trio.testing.wait_all_tasks_blocked()
        assert emulator.reached == [1, 4, 2, 3]
        emulator.release[3].set()
    assert finished == [4, 1, 2, 3]


async def test_simple_tasks_do_not_wait_for_each_other() -> None:
    emulator = HeldEmulator()
    lu = new_lu(emulator)

    async def command(marker: int) -> None:
        task = lu.admit(NEXUS, marker)
        await lu.execute(Command(NEXUS, 0, bytes((0, 0, marker, 0, 0, 0)), tag=marker, admitted=task))
        lu.release(task)

    async with trio.open_nursery() as nursery:
        for marker in (1, 2, 3):
            nursery.start_soon(command, marker)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(emulator.reached) == [1, 2, 3]
        for marker in (1, 2, 3):
            emulator.release[marker].set()


async def test_an_aborted_dormant_task_never_reaches_the_emulator() -> None:
    emulator = HeldEmulator()
    lu = new_lu(emulator)
    tasks = {}

    async def command(marker: int, attr: int) -> None:
        task = tasks[marker] = lu.admit(NEXUS, marker, attr)
        with task.scope:
            await lu.execute(Command(NEXUS, 0, bytes((0, 0, marker, 0, 0, 0)), tag=marker, attr=attr,
                                     admitted=task))
        lu.release(task)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(command, 1, TaskAttribute.SIMPLE)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(command, 2, TaskAttribute.ORDERED)
        await trio.testing.wait_all_tasks_blocked()
        assert await lu.abort([tasks[2]]) == 1
        emulator.release[1].set()
    assert emulator.reached == [1]


def test_the_iscsi_transport_maps_rfc_7143_attributes_to_sam() -> None:
    """RFC 7143 numbers ATTR 0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA; SAM 0 simple, 1 ordered,
    2 head of queue, 4 ACA.  Initiators (libiscsi, Linux) send 1 for an ordinary command: it must stay SIMPLE."""
    from trioscsi.iscsi.connection import _task_attribute
    assert [_task_attribute(a) for a in range(5)] == [TaskAttribute.SIMPLE, TaskAttribute.SIMPLE,
                                                      TaskAttribute.ORDERED, TaskAttribute.HEAD_OF_QUEUE,
                                                      TaskAttribute.ACA]
