#!/usr/bin/env python3
"""Fault drill: a real initiator writes a known pattern at queue depth 32 while the emulator is killed.

usage: scripts/fault-drill [--mode kill|stop|both] [--duration S] [--interval S] [--size-mib N]
                           [--depth N] [--block BYTES] [--command-timeout S] [--ping-interval S]
                           [--ping-timeout S] [--write-through] [--workdir DIR] [--json FILE]

What it does (one drill per mode):
  * runs the trioscsi server *in this process* (the real `Server`, real emulator subprocesses, a real TCP
    portal on 127.0.0.1), with one vdisk LU of `--size-mib` MiB, so the drill can read the supervisor's
    counters (restarts, commands resubmitted) and the session registry directly;
  * writes with QEMU's libiscsi client: rounds of `qemu-img bench -w --pattern=P -d 32` over the whole
    region, a new pattern byte P each round, so a write that was acknowledged and then lost shows up as
    the previous round's byte;
  * meanwhile, every `--interval` seconds, sends the vdisk emulator (`Emulator.pid`, a child of the
    server) SIGKILL (`--mode kill`: a crash) or SIGSTOP (`--mode stop`: a hung emulator, which the
    supervisor must detect by its missing pong and kill);
  * after each round reads the whole LU back through iSCSI (`qemu-img convert`, the killer still at work)
    and compares every block with the round's pattern, and compares the backing file too;
  * watches the session registry: each qemu-img run must have been served by exactly one session (libiscsi
    reconnecting after a dropped connection would show up as a second login).

It prints kills, emulator restarts, commands the supervisor resubmitted, non-GOOD answers the initiator
saw, the slowest command (seconds from reaching the core to its answer), sessions per qemu-img run and the
blocks verified, then `fault drill <mode>: PASS` or `FAIL` with the reasons; the exit status is 0 only if
every drill passed.  `--ping-interval/--ping-timeout` set the supervisor's health check on the emulator
(`EmulatorSpec`; the configuration file has no keys for them yet), which bounds how long a SIGSTOPped
emulator can hold commands.  tests/peer/test_fault_drill.py runs a short form of both drills in the suite.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))      # run from a checkout without installing

from trioscsi import config as config_module  # noqa: E402
from trioscsi.server import Server  # noqa: E402

IQN = "iqn.2026-11.org.trioscsi:drill"
log = logging.getLogger("fault-drill")


@dataclass
class DrillOptions:
    mode: str = "kill"                  # "kill" (SIGKILL) or "stop" (SIGSTOP)
    duration: float = 30.0              # seconds of writing (whole rounds: the last one may run over)
    interval: float = 2.0               # seconds between two signals to the emulator
    size_mib: int = 64                  # the LU; every round rewrites all of it but the last block
    block: int = 4096                   # bytes per write
    depth: int = 32                     # qemu-img bench queue depth
    command_timeout: float = 30.0       # [[target.lun]] command_timeout
    ping_interval: float | None = None  # EmulatorSpec.ping_interval (None: the server's default)
    ping_timeout: float | None = None   # EmulatorSpec.ping_timeout
    write_through: bool = False         # vdisk write_through (O_DSYNC)
    workdir: str | None = None
    tool_timeout: float = 600.0         # one qemu-img run; a hang fails the drill instead of hanging it
    max_rounds: int = 1000


@dataclass
class DrillReport:
    mode: str
    duration: float = 0.0
    rounds: int = 0
    kills: int = 0
    restarts: int = 0
    commands_resubmitted: int = 0       # the supervisor's Emulator.retried_commands
    commands: int = 0                   # commands that reached the core
    initiator_errors: dict[str, int] = field(default_factory=dict)   # non-GOOD answers, by status/sense
    max_latency: float = 0.0
    command_limit: float = 0.0          # the limit a command may take (see `limit()`)
    writes_acknowledged: int = 0
    blocks_verified: int = 0
    blocks_bad: int = 0
    file_blocks_bad: int = 0
    sessions: list[int] = field(default_factory=list)   # distinct sessions that served each qemu-img run
    tool_failures: list[str] = field(default_factory=list)
    busy_connects: int = 0              # qemu-img runs that could not open the LU because it answered BUSY
    problems: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(self.initiator_errors.items())) or "none"
        lines = [
            f"fault drill {self.mode}: {self.duration:.1f} s, {self.rounds} rounds",
            f"  emulator {'SIGKILLs' if self.mode == 'kill' else 'SIGSTOPs'}: {self.kills}, "
            f"restarts: {self.restarts}",
            f"  commands: {self.commands}, resubmitted by the supervisor (retried): "
            f"{self.commands_resubmitted}",
            f"  non-GOOD answers to the initiator: {errors}",
            f"  slowest command: {self.max_latency:.2f} s (limit {self.command_limit:.1f} s)",
            f"  writes acknowledged: {self.writes_acknowledged}, blocks verified: {self.blocks_verified}, "
            f"bad blocks (iSCSI read-back / backing file): {self.blocks_bad} / {self.file_blocks_bad}",
            f"  sessions per qemu-img run: {self.sessions}",
            f"  qemu-img runs opened again after a BUSY at connect: {self.busy_connects}",
        ]
        lines += [f"  qemu-img: {f}" for f in self.tool_failures]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        lines.append(f"fault drill {self.mode}: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def config_text(options: DrillOptions, image: str) -> str:
    params = {"path": image, "size": options.size_mib << 20, "block_size": 512, "create": True}
    if options.write_through:
        params["write_through"] = True
    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
    return f"""
[[portal]]
listen = "127.0.0.1:0"

[[target]]
name = "{IQN}"
queue_depth = 128
  [target.iscsi]
  header_digest = ["None"]
  data_digest = ["None"]
  [[target.lun]]
  lun = 0
  emulator = "vdisk"
  command_timeout = {options.command_timeout}
  params = {{ {inline} }}
"""


# ---- instrumentation ------------------------------------------------------------------------------------


class CommandWatch:
    """Wraps the target's `execute` (an instance attribute shadowing the method) to time every command
    and count what the initiator was answered."""

    def __init__(self) -> None:
        self.count = 0
        self.answers: Counter[str] = Counter()
        self.max_latency = 0.0
        self.in_flight = 0

    def install(self, target: Any) -> None:
        original = target.execute

        async def execute(cmd: Any) -> Any:
            self.count += 1
            self.in_flight += 1
            began = trio.current_time()
            try:
                response = await original(cmd)
            except BaseException as exc:
                self.answers[f"no answer ({type(exc).__name__})"] += 1
                raise
            finally:
                self.in_flight -= 1
                self.max_latency = max(self.max_latency, trio.current_time() - began)
            if response.status:
                self.answers[describe_status(response.status, response.sense)] += 1
            return response

        target.execute = execute


def describe_status(status: int, sense: bytes) -> str:
    names = {0x02: "CHECK CONDITION", 0x08: "BUSY", 0x18: "RESERVATION CONFLICT", 0x28: "TASK SET FULL"}
    text = names.get(status, f"status 0x{status:02x}")
    if sense and len(sense) >= 14 and sense[0] & 0x7F in (0x70, 0x71):
        text += f" {sense[2] & 0xF:X}/{sense[12]:02X}/{sense[13]:02X}"
    elif sense and len(sense) >= 4 and sense[0] & 0x7F in (0x72, 0x73):
        text += f" {sense[1] & 0xF:X}/{sense[2]:02X}/{sense[3]:02X}"
    return text


class SessionWatch:
    """Samples the session registry; `begin()`/`end()` bracket one client run and count its sessions."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._seen: set[int] = set()

    def begin(self) -> None:
        self._seen = set()

    def end(self) -> int:
        self._sample()
        return len(self._seen)

    def _sample(self) -> None:
        assert self.server.iscsi is not None
        for session in self.server.iscsi.registry:
            if not session.is_discovery:
                self._seen.add(id(session))

    async def run(self) -> None:
        while True:
            self._sample()
            await trio.sleep(0.01)


# ---- the drill --------------------------------------------------------------------------------------------


def limit(options: DrillOptions, server: Server) -> float:
    """How long one command may take: its own deadline, or (SIGSTOP) the hang detection plus a restart."""
    spec = server.emulators[0].spec
    hang = spec.ping_interval + spec.ping_timeout + 2.0      # detection, then the restart and the retry
    return min(options.command_timeout, hang) + 1.0 if options.mode == "stop" else options.command_timeout


BUSY_AT_CONNECT = "Failed to connect to LUN : BUSY"
MAX_BUSY_CONNECTS = 3


async def run_tool(argv: list[str], timeout: float) -> tuple[int, str]:
    with trio.move_on_after(timeout) as scope:
        result = await trio.run_process(argv, capture_stdout=True, stderr=subprocess.STDOUT, check=False)
        return result.returncode, result.stdout.decode(errors="replace")
    assert scope.cancelled_caught
    return -1, f"{' '.join(argv)}: no answer within {timeout:.0f} s (killed)"


async def killer(options: DrillOptions, server: Server, report: DrillReport) -> None:
    emulator = server.emulators[0]
    sig = signal.SIGKILL if options.mode == "kill" else signal.SIGSTOP
    while True:
        await trio.sleep(options.interval)
        pid = emulator.pid
        if pid is None or not _running(pid):
            continue
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        report.kills += 1
        log.info("sent %s to emulator pid %d", sig.name, pid)


def _running(pid: int) -> bool:
    """Alive and not already stopped (a SIGSTOPped emulator waits for the supervisor to notice)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("T", "t", "Z", "X")


def verify(path: Path, pattern: int, region: int, block: int) -> tuple[int, int]:
    """(good blocks, bad blocks) of the first `region` bytes of `path` against the pattern byte."""
    expected = bytes([pattern]) * block
    good = bad = 0
    with open(path, "rb") as f:
        for _ in range(region // block):
            if f.read(block) == expected:
                good += 1
            else:
                bad += 1
    return good, bad


async def drill(options: DrillOptions) -> DrillReport:
    """Run one drill (options.mode) and return its report; see the module docstring."""
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix=f"trioscsi-drill-{options.mode}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = DrillReport(options.mode, workdir=str(workdir))
    config = config_module.parse(config_text(options, "drill.img"), "fault-drill.toml")
    server = Server(config, str(workdir / "state"))
    server.build()
    watch = CommandWatch()
    assert server.iscsi is not None
    for exported in server.iscsi.targets.values():
        watch.install(exported.scsi)
    for emulator in server.emulators:
        if options.ping_interval is not None:
            emulator.spec.ping_interval = options.ping_interval
        if options.ping_timeout is not None:
            emulator.spec.ping_timeout = options.ping_timeout
    image = workdir / "state" / "drill.img"
    size = options.size_mib << 20
    region = size - options.block       # qemu-img bench wraps offsets modulo (size - block)
    count = region // options.block
    began = time.monotonic()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        url = f"iscsi://127.0.0.1:{bound[0][1]}/{IQN}/0"
        report.command_limit = limit(options, server)
        sessions = SessionWatch(server)
        nursery.start_soon(sessions.run)
        nursery.start_soon(killer, options, server, report)
        readback = workdir / "readback.raw"
        while report.rounds < options.max_rounds:
            pattern = report.rounds % 255 + 1
            bench = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", f"--pattern={pattern}",
                     "-d", str(options.depth), "-s", str(options.block), "-S", str(options.block),
                     "-c", str(count), url]
            sessions.begin()
            code, out = await run_tool(bench, options.tool_timeout)
            report.sessions.append(sessions.end())
            if code != 0 and BUSY_AT_CONNECT in out and report.busy_connects < MAX_BUSY_CONNECTS:
                # libiscsi's login TEST UNIT READY met a hung emulator and got BUSY, which it does not retry;
                # an initiator that retries BUSY (Linux) would have gone on. Nothing was written: run it again.
                report.busy_connects += 1
                continue
            report.rounds += 1
            if code != 0:
                report.tool_failures.append(f"bench round {report.rounds} exited {code}: {_tail(out)}")
                break
            report.writes_acknowledged += count
            sessions.begin()
            readback.unlink(missing_ok=True)
            code, out = await run_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", "-T", "none", url,
                                        str(readback)], options.tool_timeout)
            report.sessions.append(sessions.end())
            if code != 0:
                report.tool_failures.append(f"read-back after round {report.rounds} exited {code}: "
                                            f"{_tail(out)}")
                break
            good, bad = await trio.to_thread.run_sync(verify, readback, pattern, region, options.block)
            report.blocks_verified += good
            report.blocks_bad += bad
            _, file_bad = await trio.to_thread.run_sync(verify, image, pattern, region, options.block)
            report.file_blocks_bad += file_bad
            if bad or file_bad:
                break
            if time.monotonic() - began >= options.duration:
                break
        report.duration = time.monotonic() - began
        emulator = server.emulators[0]
        pid = emulator.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)    # leave nothing stopped behind us
            except ProcessLookupError:
                pass
        report.restarts = emulator.restarts
        report.commands_resubmitted = emulator.retried_commands
        nursery.cancel_scope.cancel()
    readback_path = workdir / "readback.raw"
    readback_path.unlink(missing_ok=True)
    report.commands = watch.count
    report.initiator_errors = dict(watch.answers)
    report.max_latency = watch.max_latency
    judge(options, report)
    return report


def judge(options: DrillOptions, report: DrillReport) -> None:
    p = report.problems
    if report.tool_failures:
        p.append("a qemu-img run failed (an acknowledged error or a hang reached the initiator)")
    if report.blocks_bad or report.file_blocks_bad:
        p.append(f"{report.blocks_bad} blocks read back and {report.file_blocks_bad} blocks of the backing "
                 "file do not hold the pattern their acknowledged write put there")
    if report.kills == 0:
        p.append("the emulator was never signalled (the drill was too short)")
    elif report.restarts == 0:
        p.append("the emulator was signalled but never restarted")
    if any(n > 1 for n in report.sessions):
        p.append(f"a qemu-img run was served by more than one session: {report.sessions} "
                 "(the session dropped and libiscsi logged in again)")
    if report.max_latency > report.command_limit:
        p.append(f"a command took {report.max_latency:.1f} s, over the limit of {report.command_limit:.1f} s")
    # A unit attention (every new nexus starts with 6/29/00) and BUSY (a command that timed out in a hung
    # emulator, not executed) are answers initiators retry, not errors; the read-back proves nothing was lost.
    errors = {k: v for k, v in report.initiator_errors.items()
              if not k.startswith("CHECK CONDITION 6/") and k != "BUSY"}
    if errors:
        p.append(f"the initiator was answered with errors: {errors}")


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fault-drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["kill", "stop", "both"], default="both")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of writing per drill (30)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between signals (2)")
    parser.add_argument("--size-mib", type=int, default=64, help="LU size in MiB (64)")
    parser.add_argument("--block", type=int, default=4096, help="bytes per write (4096)")
    parser.add_argument("--depth", type=int, default=32, help="queue depth (32)")
    parser.add_argument("--command-timeout", type=float, default=30.0, help="the LU's command_timeout (30)")
    parser.add_argument("--ping-interval", type=float, help="supervisor ping interval (default: server's)")
    parser.add_argument("--ping-timeout", type=float, help="supervisor pong timeout (default: server's)")
    parser.add_argument("--write-through", action="store_true", help="vdisk write_through = true")
    parser.add_argument("--workdir", help="keep the image, log and state here (default: a temp dir)")
    parser.add_argument("--json", help="also write the reports to this file")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    modes = ["kill", "stop"] if args.mode == "both" else [args.mode]
    reports = []
    for mode in modes:
        workdir = Path(args.workdir) / mode if args.workdir else None
        options = DrillOptions(mode=mode, duration=args.duration, interval=args.interval,
                               size_mib=args.size_mib, block=args.block, depth=args.depth,
                               command_timeout=args.command_timeout, ping_interval=args.ping_interval,
                               ping_timeout=args.ping_timeout, write_through=args.write_through,
                               workdir=str(workdir) if workdir else None)
        log_file = Path(options.workdir or tempfile.mkdtemp(prefix=f"trioscsi-drill-{mode}-")) / "server.log"
        options.workdir = str(log_file.parent)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(args.log_level.upper())
        root.addHandler(console)
        print(f"fault drill {mode}: writing for {options.duration:.0f} s, "
              f"{'SIGKILL' if mode == 'kill' else 'SIGSTOP'} every {options.interval:g} s "
              f"(server log: {log_file})", flush=True)
        report = trio.run(drill, options)
        reports.append(report)
        print(report.summary(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"ok": r.ok} for r in reports], indent=2))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
