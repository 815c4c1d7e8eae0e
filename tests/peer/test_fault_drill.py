"""Short forms of scripts/fault-drill: QEMU's iSCSI client (qemu-img bench, queue depth 32) writes a pattern
while the vdisk emulator is killed or hung every 2 s; every acknowledged block is read back and compared, the
session must never drop, and no command may wait longer than its limit.  See docs/robustness.md.

Each drill runs the server in-process (the drill reads the supervisor's counters) for 5 to 12 s of writing;
its report is printed at the end of the pytest run.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

from .harness import need

pytestmark = pytest.mark.peer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fault_drill.py"


def fault_drill() -> ModuleType:
    name = "trioscsi_fault_drill"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


async def run(tmp_path: Path, run_summary: list[tuple[str, str]], title: str, *, duration: float = 5.0,
              **options: object) -> object:
    need("qemu-img")
    drill = fault_drill()
    opts = drill.DrillOptions(duration=duration, interval=2.0, size_mib=16, workdir=str(tmp_path),
                              tool_timeout=60, **options)
    with trio.fail_after(150):
        report = await drill.drill(opts)
    run_summary.append((title, report.summary()))
    return report


async def test_fault_drill_sigkill(tmp_path: Path, run_summary: list[tuple[str, str]]) -> None:
    """SIGKILL every 2 s for 12 s: writes in flight are resubmitted to the next incarnation; nothing
    acknowledged is lost; the session stays up.  Six kills or so: more than the supervisor's crash-loop limit
    (5), which must not take an emulator that works between kills for a crash loop."""
    report = await run(tmp_path, run_summary, "fault drill: SIGKILL every 2 s", mode="kill", duration=12.0)
    assert report.kills >= 5, report.summary()
    assert report.ok, report.summary()


async def test_fault_drill_sigstop(tmp_path: Path, run_summary: list[tuple[str, str]]) -> None:
    """SIGSTOP every 2 s with a fast health check (ping every 0.5 s, 1 s to answer): the supervisor kills the
    hung emulator and resubmits its commands; every command completes within the hang detection time."""
    report = await run(tmp_path, run_summary, "fault drill: SIGSTOP every 2 s, health check 0.5 s / 1 s",
                       mode="stop", ping_interval=0.5, ping_timeout=1.0)
    assert report.kills >= 2, report.summary()
    assert report.ok, report.summary()


async def test_fault_drill_sigstop_command_timeout_first(tmp_path: Path,
                                                         run_summary: list[tuple[str, str]]) -> None:
    """SIGSTOP with the server's default health check (5 s + 10 s) and command_timeout = 2 s: the commands'
    deadlines expire before the hang is detected.  Each must be answered within 2 s (abort included), with a
    status QEMU retries, so qemu-img still completes every write."""
    report = await run(tmp_path, run_summary, "fault drill: SIGSTOP, command_timeout 2 s < hang detection",
                       mode="stop", command_timeout=2.0)
    assert report.ok, report.summary()
