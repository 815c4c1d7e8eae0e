"""Robustness of the whole target when its emulators crash or hang, and durability of acknowledged writes, with
the in-process server, real emulator subprocesses and loopback TCP (harness: robustness_helpers.py; malformed
PDUs are in test_robustness_pdus.py, misbehaving connections in test_robustness_connections.py).

The rules checked (the issue "emulators may crash, hang or be upgraded"):

* an emulator that is killed or hung costs its initiators a retry at most: acknowledged data is on the
  medium, nothing waits longer than `command_timeout`, and an emulator that cannot start does not keep the
  target (or its other LUs) offline;
* durability: a write acknowledged GOOD went through O_DSYNC (write-through LU, FUA) or was covered by an
  fdatasync before SYNCHRONIZE CACHE answered GOOD.

Each test bounds its own time with `trio.fail_after`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from robustness_helpers import QUEUE_DEPTH, SYNCHRONIZE_CACHE_10, TUR, config, fast_health_checks, login, \
    lun_command, read10, running, serve, write10

BROKEN = Path(__file__).parent / "broken_emulators"


# ---- emulators that die or hang ----------------------------------------------------------------------------


async def test_writes_in_flight_survive_an_emulator_kill(tmp_path: Path) -> None:
    """A full window of writers (queue_depth 16), SIGKILL in the middle: every write answers GOOD (resubmitted
    to the next incarnation) and reads back as written."""
    async with serve(tmp_path) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            patterns = {lba: os.urandom(4096) for lba in range(0, QUEUE_DEPTH * 16 * 8, 8)}
            statuses: list[int] = []

            async def writer(lbas: list[int]) -> None:
                for lba in lbas:
                    statuses.append((await ini.scsi(write10(lba, 8), write=patterns[lba])).status)

            pid = server.emulators[0].pid
            assert pid is not None
            lbas = sorted(patterns)
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for k in range(QUEUE_DEPTH):
                        nursery.start_soon(writer, lbas[k::QUEUE_DEPTH])
                    await trio.sleep(0.05)
                    os.kill(pid, signal.SIGKILL)
            assert statuses == [0] * len(patterns)
            assert server.emulators[0].pid != pid
            for lba, pattern in patterns.items():
                assert (await ini.scsi(read10(lba, 8), read=4096)).data == pattern


async def test_nop_is_answered_while_the_emulator_is_hung(tmp_path: Path) -> None:
    async with serve(tmp_path) as (server, port):
        ini = await login(port)
        async with running(ini):
            pid = server.emulators[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                with trio.fail_after(1):
                    assert await ini.nop(b"hello") == b"hello"
            finally:
                os.kill(pid, signal.SIGCONT)


async def test_hung_emulator_is_killed_and_restarted_by_the_health_check(tmp_path: Path) -> None:
    async with serve(tmp_path, prepare=fast_health_checks) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            assert (await ini.scsi(write10(0, 1, fua=True), write=b"A" * 512)).status == 0
            emulator = server.emulators[0]
            pid = emulator.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            with trio.fail_after(5):
                result = await ini.scsi(read10(0, 1), read=512)
            assert result.status == 0 and result.data == b"A" * 512
            assert emulator.pid != pid and emulator.restarts >= 1


async def test_hung_emulator_answers_within_command_timeout(tmp_path: Path) -> None:
    """SIGSTOP and default health checks (slower than the command's deadline): the command is answered
    within command_timeout, abort included ("no initiator waits longer than the configured limit")."""
    limit = 2.0
    async with serve(tmp_path, config(command_timeout=limit)) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            pid = server.emulators[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                began = trio.current_time()
                with trio.fail_after(limit + 10):
                    result = await ini.scsi(read10(0, 8), read=4096)
                waited = trio.current_time() - began
            finally:
                with contextlib.suppress(ProcessLookupError):   # killed as hung, then restarted
                    os.kill(pid, signal.SIGCONT)
            assert result.status != 0
            assert waited <= limit + 0.5, f"answered after {waited:.1f} s, command_timeout is {limit} s"


async def test_timed_out_read_gets_a_status_initiators_retry(tmp_path: Path) -> None:
    """A READ that timed out in a hung emulator was not executed for the initiator and is safe to repeat:
    answer it with a status that Linux *and* QEMU/libiscsi retry (BUSY, TASK SET FULL or a UNIT ATTENTION).
    ABORTED COMMAND (0B/08/01) makes QEMU fail the request with ECANCELED (scripts/fault-drill --mode stop
    --command-timeout 3 shows qemu-img bench dying on it)."""
    async with serve(tmp_path, config(command_timeout=1.0)) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            pid = server.emulators[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                with trio.fail_after(15):
                    result = await ini.scsi(read10(0, 8), read=4096)
            finally:
                with contextlib.suppress(ProcessLookupError):   # the hung emulator may have been killed
                    os.kill(pid, signal.SIGCONT)
            retryable = result.status in (0x08, 0x28) or (result.status == 2 and result.sense_key == 6)
            assert retryable, f"status 0x{result.status:02x}, sense {result.sense_key:X}/{result.asc:04X}"


async def test_command_that_kills_its_emulator_is_not_resubmitted_forever(tmp_path: Path) -> None:
    """An emulator that dies on every command (tests/broken_emulators/crash_mid_reply.py): TEST UNIT READY is
    safe to repeat, but resending it to incarnation after incarnation is a crash loop.  It must be answered
    (NOT READY once the crash-loop limit is reached) long before its 30 s deadline."""
    luns = lun_command(0, [sys.executable, str(BROKEN / "crash_mid_reply.py")])
    async with serve(tmp_path, config(luns=luns)) as (server, port):
        ini = await login(port)
        async with running(ini):
            unit_attention = await ini.scsi(TUR, lun=0)     # answered by the core, no emulator involved
            assert unit_attention.sense_key == 6
            began = trio.current_time()
            with trio.fail_after(35):
                result = await ini.scsi(TUR, lun=0)
            waited = trio.current_time() - began
            assert waited < 15, f"answered after {waited:.1f} s and {server.emulators[0].restarts} restarts"
            assert result.status == 2 and result.sense_key == 2, \
                f"expected NOT READY, got status 0x{result.status:02x} sense {result.sense_key:X}/{result.asc:04X}"


async def test_emulator_that_cannot_start_does_not_keep_the_target_offline(tmp_path: Path) -> None:
    """LUN 1's emulator exits at once, every time: the portal must still open, LUN 0 must work, and LUN 1
    must answer NOT READY (not hang), once its restarts have failed often enough."""
    luns = f"""
  [[target.lun]]
  lun = 0
  emulator = "null"
  params = {{ size = 1048576 }}
{lun_command(1, [sys.executable, "-c", "import sys; sys.exit(1)"], command_timeout=30)}
"""
    with trio.move_on_after(10) as waited:
        async with serve(tmp_path, config(luns=luns)) as (_, port):
            ini = await login(port)
            async with running(ini):
                await ini.scsi(TUR, lun=0)
                assert (await ini.scsi(TUR, lun=0)).status == 0
                with trio.fail_after(8):
                    result = await ini.scsi(TUR, lun=1)
                    if result.sense_key == 6:            # the new nexus's power-on unit attention comes first
                        result = await ini.scsi(TUR, lun=1)
                assert result.status == 2 and result.sense_key == 2, f"LUN 1 answered {result}"
    assert not waited.cancelled_caught, "the target did not open its portal within 10 s"


async def test_non_repeatable_command_lost_with_its_emulator_is_answered(tmp_path: Path) -> None:
    """COMPARE AND WRITE is not safe to repeat: when its emulator dies under it, it is completed with CHECK
    CONDITION (not resent, not left hanging) and the LU serves the next command."""
    async with serve(tmp_path) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            pid = server.emulators[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            caw = struct.pack(">BBQ3xBBB", 0x89, 0, 0, 1, 0, 0)      # COMPARE AND WRITE, 1 block at LBA 0
            answers: list[Any] = []

            async def send_caw() -> None:
                answers.append(await ini.scsi(caw, write=bytes(1024)))
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_caw)
                    await trio.sleep(0.3)
                    os.kill(pid, signal.SIGKILL)
            result = answers[0]
            assert result.status == 2 and result.sense_key in (0x6, 0xB), result
            assert (await ini.scsi(read10(0, 1), read=512)).status in (0, 2)


# ---- durability ---------------------------------------------------------------------------------------------

# The vdisk emulator with its durability syscalls recorded: each line of the log is written (O_APPEND) after
# the syscall returned, so a line is in the file before the `done` that follows it reaches the core.
TRACED_VDISK = r"""
import json, os, runpy, sys
sys.path.insert(0, sys.argv[2])          # the checkout, for `emulators`
log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
flags = {}
def note(**entry):
    os.write(log, (json.dumps(entry) + "\n").encode())
real_open, real_pwrite, real_pwritev = os.open, os.pwrite, os.pwritev
real_fdatasync, real_fsync = os.fdatasync, os.fsync
def traced_open(path, f, *a, **k):
    fd = real_open(path, f, *a, **k)
    flags[fd] = f
    return fd
def traced_pwrite(fd, data, offset):
    n = real_pwrite(fd, data, offset)
    note(op="write", fd=fd, offset=offset, length=n, dsync=bool(flags.get(fd, 0) & (os.O_DSYNC | os.O_SYNC)))
    return n
def traced_pwritev(fd, buffers, offset, *a):
    n = real_pwritev(fd, buffers, offset, *a)
    note(op="write", fd=fd, offset=offset, length=n, dsync=bool(flags.get(fd, 0) & (os.O_DSYNC | os.O_SYNC)))
    return n
def traced_sync(real):
    def sync(fd):
        real(fd)
        note(op="sync", fd=fd)
    return sync
os.open, os.pwrite, os.pwritev = traced_open, traced_pwrite, traced_pwritev
os.fdatasync, os.fsync = traced_sync(real_fdatasync), traced_sync(real_fsync)
sys.argv = ["vdisk"]
runpy.run_module("emulators.vdisk", run_name="__main__")
"""


def traced_vdisk(tmp_path: Path, *, write_through: bool) -> tuple[str, Path]:
    trace = tmp_path / "syscalls.jsonl"
    params = f'{{ path = "traced.img", size = 4194304, create = true, write_through = {str(write_through).lower()} }}'
    argv = [sys.executable, "-c", TRACED_VDISK, str(trace), str(Path(__file__).resolve().parents[1])]
    return config(luns=lun_command(0, argv, params=params)), trace


def syscalls(trace: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def durable_write_at(trace: Path, offset: int, length: int) -> bool:
    """Some write covering [offset, offset+length) through O_DSYNC, or followed by a sync of its fd."""
    calls = syscalls(trace)
    for i, call in enumerate(calls):
        if call["op"] == "write" and call["offset"] <= offset and offset + length <= call["offset"] + call["length"]:
            if call["dsync"] or any(c["op"] == "sync" and c["fd"] == call["fd"] for c in calls[i + 1:]):
                return True
    return False


@pytest.mark.parametrize("case", ["write-through", "fua", "synchronize cache"])
async def test_acknowledged_write_is_on_stable_storage(tmp_path: Path, case: str) -> None:
    """A write acknowledged GOOD is durable when the LU is write-through, FUA was set, or a SYNCHRONIZE CACHE
    that covered it answered GOOD; a plain write-back write need not be (and is not) synced."""
    text, trace = traced_vdisk(tmp_path, write_through=case == "write-through")
    async with serve(tmp_path, text) as (_, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            lba = 64
            result = await ini.scsi(write10(lba, 8, fua=case == "fua"), write=os.urandom(4096))
            assert result.status == 0
            if case == "synchronize cache":
                assert not durable_write_at(trace, lba * 512, 4096), "a write-back write was synced anyway"
                assert (await ini.scsi(SYNCHRONIZE_CACHE_10)).status == 0
            assert durable_write_at(trace, lba * 512, 4096), \
                f"GOOD before the data was durable ({case}): {syscalls(trace)}"
