#!/usr/bin/env python3
"""Load test: many concurrent sessions from loopback doing NOP-Outs and small reads; memory per session.

usage: scripts/load-test [--sessions N] [--duration S] [--read-size BYTES] [--lun N] [--ramp S]
                         [--workdir DIR] [--json FILE]

It starts the real server as a subprocess (`python -m trioscsi serve`, tests/peer/harness.py) with LUN 0 a
64 MiB vdisk and LUN 1 a null device, so the server's own memory can be read from /proc.  Then, from this
process (the project's initiator, one Trio task per session):
  1. the server's RSS and open descriptors are read at rest (the emulators are separate processes and are
     reported apart);
  2. `--sessions` sessions (200) connect and log in at once (each its own ISID), over `--ramp` seconds (0: all
     together, which also shows what a flood of connections costs: the listen backlog is 128);
  3. RSS is read again: (logged in - at rest) / sessions is the memory one idle session costs;
  4. every session alternates a NOP-Out (64 bytes of ping data) and a READ(10) of `--read-size` bytes at a
     random LBA of `--lun`, as fast as it is answered, for `--duration` seconds; RSS is sampled throughout;
  5. every session logs out; RSS and descriptors are read once more (descriptors must be back where they were).
It prints logins (time to log all in, slowest login), commands, NOPs and reads per second, latency
percentiles, errors, and RSS at each step with the cost per session, and exits non-zero if a session failed,
a command failed or descriptors leaked.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from peer.harness import MiB, GiB, TrioscsiServer, null, process_tree, vdisk  # noqa: E402
from trioscsi.iscsi.initiator import Initiator  # noqa: E402

IQN = "iqn.2026-11.org.trioscsi:load"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Snapshot:
    label: str
    server_rss_kib: int
    emulators_rss_kib: int
    fds: int


@dataclass
class LoadReport:
    sessions: int
    duration: float
    read_size: int
    logged_in: int = 0
    login_seconds: float = 0.0            # from the first connect to the last session logged in
    slowest_login: float = 0.0
    nops: int = 0
    reads: int = 0
    errors: list[str] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    snapshots: list[Snapshot] = field(default_factory=list)
    peak_rss_kib: int = 0

    def snap(self, label: str) -> Snapshot:
        return next(s for s in self.snapshots if s.label == label)

    @property
    def per_session_kib(self) -> float:
        return (self.snap("logged in").server_rss_kib - self.snap("at rest").server_rss_kib) / max(self.sessions, 1)

    @property
    def per_session_loaded_kib(self) -> float:
        return (self.peak_rss_kib - self.snap("at rest").server_rss_kib) / max(self.sessions, 1)

    @property
    def ok(self) -> bool:
        fd_leak = self.snap("logged out").fds > self.snap("at rest").fds
        return not self.errors and self.logged_in == self.sessions and not fd_leak

    def summary(self) -> str:
        lines = [f"load test: {self.sessions} sessions, {self.duration:.0f} s of NOP-Out + READ({self.read_size} B)",
                 f"  logged in: {self.logged_in}/{self.sessions} in {self.login_seconds:.2f} s "
                 f"(slowest login {self.slowest_login:.2f} s)",
                 f"  commands: {self.nops} NOPs + {self.reads} reads = "
                 f"{(self.nops + self.reads) / max(self.duration, 1e-9):.0f}/s",
                 "  one NOP-Out + READ pair (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in self.latency_ms.items()),
                 f"  errors: {len(self.errors)}" + (f" (first: {self.errors[0]})" if self.errors else "")]
        for s in self.snapshots:
            lines.append(f"  {s.label:11}: server RSS {s.server_rss_kib / 1024:7.1f} MiB, "
                         f"emulators {s.emulators_rss_kib / 1024:6.1f} MiB, {s.fds} descriptors")
        lines.append(f"  peak server RSS under load: {self.peak_rss_kib / 1024:.1f} MiB")
        lines.append(f"  memory per session: {self.per_session_kib:.0f} KiB logged in and idle, "
                     f"{self.per_session_loaded_kib:.0f} KiB at peak under load")
        lines.append(f"load test: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def snapshot(srv: TrioscsiServer, label: str) -> Snapshot:
    emulators = [pid for pid in process_tree(srv.pid) if pid != srv.pid]
    total = 0
    for pid in emulators:
        try:
            total += rss_kib(pid)
        except OSError:
            pass
    return Snapshot(label, rss_kib(srv.pid), total, fds(srv.pid))


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


async def one_session(i: int, port: int, args: argparse.Namespace, report: LoadReport, latencies: list[float],
                      all_in: trio.Event, go: trio.Event, stop: trio.Event, counter: list[int],
                      begin: float) -> None:
    await trio.sleep(args.ramp * i / max(args.sessions, 1))
    try:
        with trio.fail_after(60):
            ini = await Initiator.connect("127.0.0.1", port, name="iqn.2026-11.org.trioscsi:load-initiator",
                                          isid=b"\x80\x00" + i.to_bytes(4, "big"))
            await ini.login(IQN)
    except Exception as exc:  # noqa: BLE001 - a failed session is counted, not fatal
        report.errors.append(f"session {i}: login: {type(exc).__name__}: {exc}")
        counter[0] += 1
        if counter[0] == args.sessions:
            all_in.set()
        return
    report.logged_in += 1
    report.slowest_login = max(report.slowest_login, trio.current_time() - begin)
    counter[0] += 1
    if counter[0] == args.sessions:
        all_in.set()
    rng = random.Random(i)
    blocks = max(args.read_size // 512, 1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ini.run)
            await ini.scsi(bytes(6), lun=args.lun)                 # the power-on unit attention
            await go.wait()
            while not stop.is_set():
                began = trio.current_time()
                with trio.fail_after(30):
                    if await ini.nop(b"p" * 64) != b"p" * 64:
                        report.errors.append(f"session {i}: NOP-In data differs")
                report.nops += 1
                result = await ini.scsi(read10(rng.randrange(0, 60000), blocks), lun=args.lun,
                                        read=blocks * 512)
                latencies.append(trio.current_time() - began)
                if result.status != 0 or len(result.data) != blocks * 512:
                    report.errors.append(f"session {i}: READ status 0x{result.status:02x}")
                report.reads += 1
            with trio.fail_after(30):
                if await ini.logout() != 0:
                    report.errors.append(f"session {i}: logout refused")
            nursery.cancel_scope.cancel()
    except Exception as exc:  # noqa: BLE001
        report.errors.append(f"session {i}: {type(exc).__name__}: {exc}")
    finally:
        await ini.stream.aclose()


async def load(srv: TrioscsiServer, args: argparse.Namespace) -> LoadReport:
    report = LoadReport(args.sessions, args.duration, args.read_size)
    latencies: list[float] = []
    report.snapshots.append(snapshot(srv, "at rest"))
    all_in, go, stop = trio.Event(), trio.Event(), trio.Event()
    counter = [0]
    async with trio.open_nursery() as nursery:
        begin = trio.current_time()
        for i in range(args.sessions):
            nursery.start_soon(one_session, i, srv.port, args, report, latencies, all_in, go, stop, counter,
                               begin)
        await all_in.wait()
        report.login_seconds = trio.current_time() - begin
        await trio.sleep(1.0)                                   # let every first command finish
        report.snapshots.append(snapshot(srv, "logged in"))
        go.set()
        started = trio.current_time()
        while trio.current_time() - started < args.duration:
            report.peak_rss_kib = max(report.peak_rss_kib, rss_kib(srv.pid))
            await trio.sleep(0.2)
        report.snapshots.append(snapshot(srv, "under load"))
        report.peak_rss_kib = max(report.peak_rss_kib, report.snapshots[-1].server_rss_kib)
        report.duration = trio.current_time() - started
        stop.set()
    await trio.sleep(1.0)                                       # the server closes the connections
    report.snapshots.append(snapshot(srv, "logged out"))
    if latencies:
        ordered = sorted(latencies)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
        report.latency_ms = {"p50": pick(0.50), "p99": pick(0.99), "max": ordered[-1] * 1000,
                             "mean": statistics.fmean(ordered) * 1000}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/load-test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (10)")
    parser.add_argument("--read-size", type=int, default=4096, help="bytes per READ(10) (4096)")
    parser.add_argument("--lun", type=int, default=0, help="0: 64 MiB vdisk (default), 1: null device")
    parser.add_argument("--ramp", type=float, default=0.0, help="spread the logins over this many seconds")
    parser.add_argument("--workdir", help="server state and log (default: a temp dir)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="trioscsi-load-"))
    srv = TrioscsiServer(workdir, luns=[vdisk(0, workdir / "disk0.img", 64 * MiB), null(1, GiB)], iqn=IQN,
                         config_kw={"queue_depth": 32})
    print(f"load test: server log {srv.log_path}", flush=True)
    srv.start()
    try:
        report = trio.run(load, srv, args)
    finally:
        srv.stop()
    print(report.summary(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report) | {"ok": report.ok,
                                                                "per_session_kib": report.per_session_kib},
                                              indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
