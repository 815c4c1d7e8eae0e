"""Start, watch and stop the iSCSI targets the peer tests and scripts talk to.

* `TrioscsiServer`: the project's server as a subprocess
  (`python -m trioscsi serve --listen 127.0.0.1:PORT --state-dir DIR [--config FILE]`),
  in its own process group, stopped with SIGTERM then SIGKILL.
* `Tgtd`: a private tgtd (Debian `tgt`) on its own control port and a free iSCSI port, for
  side-by-side runs (scripts/conformance --tgtd, scripts/bench). Never touches another tgtd.
* `write_config`: a trioscsi TOML config with chosen LUNs (small vdisks make tests fast).
* Process-tree CPU accounting from /proc, used by scripts/bench.

Everything listens on 127.0.0.1 only. Standard library only: scripts import this module
without the project installed.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
DEMO_IQN = "iqn.2026-11.org.trioscsi:demo"
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")

# binary -> Debian package that provides it (scripts/test installs these)
CLIENT_PACKAGES = {
    "iscsi-ls": "libiscsi-bin",
    "iscsi-inq": "libiscsi-bin",
    "iscsi-readcapacity16": "libiscsi-bin",
    "iscsi-test-cu": "libiscsi-bin",
    "qemu-img": "qemu-utils",
    "tgtd": "tgt",
    "tgtadm": "tgt",
}


class HarnessError(RuntimeError):
    """A target could not be started or stopped; the message carries its log tail."""


# --------------------------------------------------------------------------- ports, /proc


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [0] = state (field 3)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return s[s.rindex(")") + 2:].split()


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants (zombies included until reaped)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat_fields(pid)
        if st:
            children.setdefault(int(st[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pids_in_group(pgid: int) -> list[int]:
    out = []
    for pid in _all_pids():
        st = _stat_fields(pid)
        if st and int(st[2]) == pgid and st[0] != "Z":
            out.append(pid)
    return out


def tree_cpu_seconds(root: int) -> float:
    """utime+stime+cutime+cstime summed over the live process tree of `root` (all threads).

    A live process's own times plus the times of the children it has reaped: an emulator
    that ran and was restarted during a measurement still counts (via its parent's c-times),
    and nothing is counted twice because reaped processes are no longer in the tree.
    """
    total = 0
    for pid in process_tree(root):
        st = _stat_fields(pid)
        if st:
            # after the name: [11] utime, [12] stime, [13] cutime, [14] cstime (fields 14-17)
            total += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
    return total / CLK_TCK


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# --------------------------------------------------------------------------- config


@dataclass
class Lun:
    lun: int
    emulator: str
    params: dict = field(default_factory=dict)


def vdisk(lun: int, path: str | Path, size: int, block_size: int = 512, create: bool = True) -> Lun:
    return Lun(lun, "vdisk", {"path": str(path), "size": size, "block_size": block_size,
                              "create": create})


def null(lun: int, size: int = GiB) -> Lun:
    return Lun(lun, "null", {"size": size})


def small_disk(workdir: str | Path, size: int = 64 * MiB, with_null: bool = True,
               removable: bool = False, **params: object) -> list[Lun]:
    """LUN 0 = `size` vdisk file in workdir (the server creates it), LUN 1 = null of that size.
    `removable` makes LUN 0 a removable-medium disk (the conformance run uses it for the PreventAllow,
    StartStopUnit and NoMedia tests, which skip on a fixed disk); `params` are more vdisk parameters."""
    luns = [vdisk(0, Path(workdir) / "disk0.img", size)]
    if removable:
        luns[0].params["removable"] = True
    luns[0].params.update(params)
    if with_null:
        luns.append(null(1, size))
    return luns


def need(*binaries: str) -> None:
    """Fail the current pytest test (never skip it) when a third-party client is missing."""
    import pytest
    for b in binaries:
        if shutil.which(b) is None:
            pkg = CLIENT_PACKAGES.get(b, "?")
            pytest.fail(f"{b} is not on PATH: scripts/test should have installed it "
                        f"(apt-get install -y {pkg})", pytrace=False)
    if "qemu-img" in binaries and not qemu_has_iscsi():
        pytest.fail("qemu-img has no iscsi block driver: scripts/test should have installed it "
                    "(apt-get install -y qemu-block-extra)", pytrace=False)


def start_or_fail(srv: "TrioscsiServer") -> "TrioscsiServer":
    """srv.start(), or fail the current pytest test with the command and the log tail."""
    import pytest
    try:
        return srv.start()
    except HarnessError as e:
        error = str(e)
    pytest.fail(f"could not start trioscsi ({' '.join(srv.command())}):\n{error}", pytrace=False)


def qemu_has_iscsi() -> bool:
    if glob.glob("/usr/lib/*/qemu/block-iscsi.so") or glob.glob("/usr/lib/qemu/block-iscsi.so"):
        return True
    r = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True, timeout=30)
    return " iscsi " in " " + " ".join(r.stdout.split()) + " "


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)          # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def config_text(listen: str, luns: list[Lun], iqn: str = DEMO_IQN, queue_depth: int = 64,
                iscsi_params: dict | None = None, portal: bool = True) -> str:
    """A trioscsi config (trioscsi/config.py checks it; unknown keys are errors).

    `iscsi_params` go to the target's `[target.iscsi]` table, with trioscsi's key names, e.g.
    {"max_recv_data_segment_length": 262144, "initial_r2t": True}. `--listen` on the
    command line replaces the `[[portal]]` list, so the portal written here is informational.
    """
    out = ["# written by tests/peer/harness.py"]
    if portal:
        out += ["[[portal]]", f"listen = {_toml_value(listen)}", ""]
    out += ["[[target]]", f"name = {_toml_value(iqn)}", f"queue_depth = {queue_depth}"]
    if iscsi_params:
        out.append("  [target.iscsi]")
        out += [f"  {_toml_key(k)} = {_toml_value(v)}" for k, v in iscsi_params.items()]
    for lun in luns:
        out += ["  [[target.lun]]", f"  lun = {lun.lun}", f"  emulator = {_toml_value(lun.emulator)}",
                f"  params = {_toml_value(lun.params)}"]
    return "\n".join(out) + "\n"


def write_config(path: str | Path, listen: str, luns: list[Lun], **kw) -> Path:
    path = Path(path)
    path.write_text(config_text(listen, luns, **kw))
    return path


# --------------------------------------------------------------------------- trioscsi


def server_command() -> list[str]:
    """How to run `trioscsi`: $TRIOSCSI_CMD (shell words) or `<this python> -m trioscsi`."""
    cmd = os.environ.get("TRIOSCSI_CMD")
    return shlex.split(cmd) if cmd else [sys.executable, "-m", "trioscsi"]


class TrioscsiServer:
    """The real server as a subprocess on a free loopback port.

    workdir/state is the --state-dir, workdir/server.log gets stdout+stderr, and
    workdir/config.toml the config when `luns` are given (else the built-in default:
    LUN 0 = 1 GiB sparse vdisk, LUN 1 = null).
    """

    def __init__(self, workdir: str | Path, *, luns: list[Lun] | None = None,
                 config: str | Path | None = None, port: int | None = None,
                 iqn: str = DEMO_IQN, cpus: str | None = None, startup_timeout: float = 60.0,
                 config_kw: dict | None = None, extra_args: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "state"
        self.log_path = self.workdir / "server.log"
        self.host = HOST
        self.port = port or free_port()
        self.iqn = iqn
        self.cpus = cpus
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.config = Path(config) if config else None
        if luns is not None:
            self.config = write_config(self.workdir / "config.toml", f"{self.host}:{self.port}",
                                       luns, iqn=iqn, **(config_kw or {}))
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.killed = False            # needed SIGKILL (did not stop on SIGTERM in time)
        self.leftovers: list[int] = []  # processes of its group still alive after it exited
        self.stop_seconds: float | None = None
        self._logf = None

    # -- lifecycle
    def command(self) -> list[str]:
        cmd = server_command() + ["serve", "--listen", f"{self.host}:{self.port}",
                                  "--state-dir", str(self.state_dir)]
        if self.config:
            cmd += ["--config", str(self.config)]
        cmd += list(self.extra_args)
        if self.cpus is not None:
            cmd = ["taskset", "-c", str(self.cpus)] + cmd
        return cmd

    def start(self) -> "TrioscsiServer":
        self._logf = open(self.log_path, "ab")
        self._logf.write(("$ " + shlex.join(self.command()) + "\n").encode())
        self._logf.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.command(), cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise HarnessError(f"trioscsi exited with status {rc} before listening on "
                                   f"{self.host}:{self.port}\n{self._tail_block()}")
            if port_accepts(self.host, self.port):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"trioscsi did not listen on {self.host}:{self.port} within "
                                   f"{self.startup_timeout:.0f} s\n{self._tail_block()}")
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace` s, then SIGKILL the whole process group."""
        if self.proc is None:
            return None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.killed = True
                self._kill_group()
                self.proc.wait(timeout=10)
            self.stop_seconds = time.monotonic() - t0
        self.returncode = self.proc.returncode
        # emulators (or anything else it spawned) left behind in its process group
        for _ in range(20):
            self.leftovers = pids_in_group(self.proc.pid)
            if not self.leftovers:
                break
            time.sleep(0.05)
        if self.leftovers:
            self._kill_group()
        if self._logf:
            self._logf.close()
            self._logf = None
        return self.returncode

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TrioscsiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection
    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, lun: int = 0, iqn: str | None = None) -> str:
        return f"iscsi://{self.host}:{self.port}/{iqn or self.iqn}/{lun}"

    @property
    def portal_url(self) -> str:
        """The discovery URL (iscsi-ls)."""
        return f"iscsi://{self.host}:{self.port}/"

    def log(self) -> str:
        if self._logf:
            self._logf.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _tail_block(self, lines: int = 40) -> str:
        return f"--- {self.log_path} (last {lines} lines) ---\n{self.log_tail(lines) or '(empty)'}"

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def tree(self) -> list[int]:
        return process_tree(self.pid)


# --------------------------------------------------------------------------- tgtd

TGTD_SOCKET_DIR = Path("/var/run/tgtd")


def _free_control_port() -> int:
    env = os.environ.get("TGTD_CPORT")
    if env:
        return int(env)
    for n in range(40, 1000):
        if not (TGTD_SOCKET_DIR / f"socket.{n}").exists() and \
                not (TGTD_SOCKET_DIR / f"socket.{n}.lock").exists():
            return n
    raise HarnessError("no free tgtd control port in 40..999 under /var/run/tgtd")


class Tgtd:
    """A private tgtd: `tgtd -f -C CPORT --iscsi portal=127.0.0.1:PORT`, owned by PID.

    tgt's LUN 0 is its controller LUN; put disks on LUN 1 and up.
    """

    def __init__(self, workdir: str | Path, *, port: int | None = None, cport: int | None = None,
                 cpus: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "tgtd.log"
        self.host = HOST
        self.port = port or free_port()
        self.cport = cport
        self.cpus = cpus
        self.proc: subprocess.Popen | None = None
        self.tids: list[int] = []
        self.killed = False
        self._logf = None

    def start(self, timeout: float = 10.0) -> "Tgtd":
        if self.cport is None:
            self.cport = _free_control_port()
        cmd = ["tgtd", "-f", "-C", str(self.cport), "--iscsi", f"portal={self.host}:{self.port}"]
        if self.cpus is not None:
            cmd = ["taskset", "-c", str(self.cpus)] + cmd
        self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"tgtd exited with {self.proc.returncode}\n"
                                   f"{log_tail(self.log_path)}")
            r = subprocess.run(self._ta("--mode", "sys", "--op", "show"), capture_output=True,
                               timeout=5)
            if r.returncode == 0 and port_accepts(self.host, self.port):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"tgtd did not come up within {timeout} s\n"
                                   f"{log_tail(self.log_path)}")
            time.sleep(0.05)

    def _ta(self, *args: str) -> list[str]:
        return ["tgtadm", "-C", str(self.cport), "--lld", "iscsi", *args]

    def tgtadm(self, *args: str, timeout: float = 10.0) -> str:
        r = subprocess.run(self._ta(*args), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise HarnessError(f"tgtadm {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stdout}{r.stderr}")
        return r.stdout

    def add_target(self, tid: int, name: str, luns: list[tuple[int, str, str]],
                   params: dict | None = None) -> None:
        """luns: (lun, bstype, backing store), e.g. (1, "rdwr", "/dev/shm/x.img"), (1, "null", "null-dev")."""
        self.tgtadm("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", name)
        self.tids.append(tid)
        for lun, bstype, backing in luns:
            self.tgtadm("--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                        "--lun", str(lun), "--bstype", bstype, "--backing-store", backing)
        self.tgtadm("--mode", "target", "--op", "bind", "--tid", str(tid),
                    "--initiator-address", "ALL")
        for k, v in (params or {}).items():
            self.tgtadm("--mode", "target", "--op", "update", "--tid", str(tid),
                        "--name", k, "--value", str(v))

    def url(self, name: str, lun: int = 1) -> str:
        return f"iscsi://{self.host}:{self.port}/{name}/{lun}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def stop(self) -> None:
        """Like ../shared/peer/tgtd-down.sh: offline, delete targets and system (each tgtadm
        call bounded by 3 s), then SIGTERM, then SIGKILL. tgtd ignores SIGTERM while it
        still has targets, hence the deletes first."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            calls = [("--op", "update", "--mode", "sys", "--name", "State", "--value", "offline")]
            calls += [("--mode", "target", "--op", "delete", "--force", "--tid", str(t))
                      for t in self.tids]
            calls += [("--mode", "sys", "--op", "delete")]
            for args in calls:
                try:
                    subprocess.run(["tgtadm", "-C", str(self.cport), *args], capture_output=True,
                                   timeout=3)
                except subprocess.TimeoutExpired:
                    pass   # tgtd spinning (e.g. GET LBA STATUS on a null LUN): signals below
            for sig, wait in ((None, 3), (signal.SIGTERM, 3), (signal.SIGKILL, 10)):
                if sig is not None and self.proc.poll() is None:
                    self.killed = sig == signal.SIGKILL
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for pid in pids_in_group(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._logf:
            self._logf.close()
            self._logf = None
        for suffix in ("", ".lock"):
            try:
                (TGTD_SOCKET_DIR / f"socket.{self.cport}{suffix}").unlink()
            except (FileNotFoundError, PermissionError):
                pass

    def __enter__(self) -> "Tgtd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
