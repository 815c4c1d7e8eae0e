"""Run libiscsi's `iscsi-test-cu` and turn its `-v` text into one result per test.

Why the text and not CUnit's XML: libiscsi skips a test with CU_PASS("[SKIPPED] ..."),
so CUnit counts a skip as *passed*. Only the log says which tests really ran. Here:

* passed  - CUnit "passed" and the test's log has no "[SKIPPED]" / "Skipping test"
* skipped - CUnit "passed" and the log has one of those (reason = that line)
* failed  - CUnit "FAILED" (reason = the first "[FAILED]" line, else the first assert)
* incomplete - "Test: X ..." was printed but no result followed (the run hung or was killed)
* a registered test with no "Test:" line at all is *missing* (it never started)

`-v` prints "Suite: NAME", then per test "  Test: NAME ..." followed on the same line or
the next lines by indented log text, and then "passed"/"FAILED" flush-left (or right after
the "...", when the test logged nothing). Teardown text may follow "passed" on its line.

Also: the run is always wrapped in `timeout` (libiscsi's sync calls have no timeout, so an
unresponsive target would hang forever), with stdout unbuffered so each line gets a wall
clock stamp (CUnit's own "Elapsed time" is CPU time).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = ("passed", "failed", "skipped", "incomplete")
SKIP_MARKS = ("[SKIPPED]", "Skipping test")
FAIL_MARKS = ("[FAILED]", "[FAILURE]")


@dataclass
class TestResult:
    name: str                 # FAMILY.Suite.Test as in `iscsi-test-cu -l`, e.g. ALL.Read10.Simple
    result: str               # one of RESULTS
    reason: str = ""          # skip reason / failure message
    seconds: float | None = None
    logged_failure: str = ""  # CUnit "passed" but the log says [FAILED] (body or teardown)


@dataclass(repr=False)
class CuRun:
    command: list[str]
    exit_code: int | None
    timed_out: bool
    wall_s: float
    registered: list[str]
    results: dict[str, TestResult]
    log_path: str = ""
    cunit_summary: dict = field(default_factory=dict)
    libiscsi_version: str = ""
    output_tail: list[str] = field(default_factory=list)   # last lines of the tool's output

    def __repr__(self) -> str:
        return f"<CuRun {counts_line(self)}>"

    @property
    def missing(self) -> list[str]:
        return [n for n in self.registered if n not in self.results]

    @property
    def incomplete(self) -> list[str]:
        return [n for n, r in self.results.items() if r.result == "incomplete"]

    @property
    def complete(self) -> bool:
        """Every registered test ended with passed/failed/skipped, and nothing was killed."""
        return (not self.timed_out and bool(self.registered) and not self.missing
                and not self.incomplete)

    def names(self, result: str) -> list[str]:
        return [n for n, r in self.results.items() if r.result == result]

    def counts(self) -> dict:
        c = Counter(r.result for r in self.results.values())
        return {"registered": len(self.registered), "passed": c["passed"], "failed": c["failed"],
                "skipped": c["skipped"], "incomplete": c["incomplete"],
                "missing": len(self.missing)}

    def last_started(self) -> str | None:
        return next(reversed(self.results), None) if self.results else None

    def to_json(self) -> dict:
        d = asdict(self)
        d["counts"] = self.counts()
        d["complete"] = self.complete
        d["missing"] = self.missing
        return d


# --------------------------------------------------------------------------- listing


def list_tests(binary: str = "iscsi-test-cu") -> list[str]:
    r = subprocess.run([binary, "-l"], capture_output=True, text=True, timeout=60)
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def select(listing: list[str], tests: str) -> list[str]:
    """Names (FAMILY.Suite.Test) a `-t` selection registers: comma-separated fnmatch
    patterns FAMILY[.SUITE[.TEST]], like iscsi-test-cu itself (a pattern file is not
    supported here)."""
    pats = []
    for p in tests.split(","):
        p = p.strip()
        pats.append(p + ".*.*" if p.count(".") == 0 else p + ".*" if p.count(".") == 1 else p)
    seen, out = set(), []
    for name in listing:
        if name.count(".") == 2 and name not in seen and any(fnmatch.fnmatchcase(name, p) for p in pats):
            seen.add(name)
            out.append(name)
    return out


# --------------------------------------------------------------------------- parsing

_SUITE = re.compile(r"^Suite: (\S+)")
_TEST = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
_RESULT = re.compile(r"^(passed|FAILED)(.*)$")
_ASSERT = re.compile(r"^\d+\. \S+:\d+")


def parse(lines, registered: list[str]) -> tuple[dict[str, TestResult], dict]:
    """lines: iterable of (seconds since start, text) or plain text lines.

    Returns ({name: TestResult} in run order, CUnit's run summary)."""
    by_key: dict[tuple[str, str], list[str]] = {}
    for name in registered:
        _, suite, test = name.split(".")
        by_key.setdefault((suite, test), []).append(name)

    results: dict[str, TestResult] = {}
    summary: dict = {}
    suite = None
    cur: dict | None = None
    last_t = 0.0
    in_summary = False

    def finish(c):
        if c is None:
            return
        msgs, post = c["msgs"], c["post"]
        skip = next((m for m in msgs if any(k in m for k in SKIP_MARKS)), None)
        fail = next((m for m in msgs + post if any(k in m for k in FAIL_MARKS)), None)
        if c["result"] is None:
            res = TestResult(c["name"], "incomplete", (msgs[-1] if msgs else ""))
        elif c["result"] == "FAILED":
            detail = fail or next((m for m in post + msgs if _ASSERT.match(m)), "")
            detail = re.split(r"\s{3,}\[", detail)[0]      # text of the next test glued on
            res = TestResult(c["name"], "failed", detail, c["seconds"])
        elif skip is not None:
            res = TestResult(c["name"], "skipped", skip_reason(skip), c["seconds"])
        else:
            res = TestResult(c["name"], "passed", "", c["seconds"], fail or "")
        results[c["name"]] = res

    for item in lines:
        t, line = item if isinstance(item, tuple) else (0.0, item)
        line = line.rstrip("\n")
        if line.startswith("Run Summary:"):
            in_summary = True
            continue
        if in_summary:
            m = re.match(r"^\s*(suites|tests|asserts)\s+(.*)$", line)
            if m:
                keys = ("total", "ran", "passed", "failed", "inactive")
                summary[m.group(1)] = {k: (int(v) if v.isdigit() else v)
                                       for k, v in zip(keys, m.group(2).split())}
            continue
        m = _SUITE.match(line)
        if m:
            suite = m.group(1)
            continue
        m = _TEST.match(line)
        if m:
            finish(cur)
            key = (suite or "?", m.group(1))
            cands = by_key.get(key)
            name = cands.pop(0) if cands else f"?.{key[0]}.{key[1]}"
            cur = {"name": name, "result": None, "msgs": [], "post": [], "start": last_t,
                   "seconds": None}
            line = m.group(2)
        if cur is None:
            continue
        m = _RESULT.match(line)
        if cur["result"] is None and m:
            cur["result"] = m.group(1)
            cur["seconds"] = round(t - cur["start"], 3)
            last_t = t
            if m.group(2).strip():
                cur["post"].append(m.group(2).strip())
            continue
        if line.strip():
            (cur["msgs"] if cur["result"] is None else cur["post"]).append(line.strip())
    finish(cur)
    return results, summary


def skip_reason(msg: str) -> str:
    msg = re.sub(r"^\[SKIPPED\]\s*", "", msg.strip())
    msg = re.sub(r"\s*Skipping test\.?$", "", msg)
    return msg.strip() or "(no reason given)"


# --------------------------------------------------------------------------- running


def libiscsi_version() -> str:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libiscsi-bin"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# The main run (-t ALL, two paths, no -S) skips these by design; each runs on a LU of the kind it needs.
LBPPB_TESTS = ("ALL.CompareAndWrite.InvalidDataOutSize", "ALL.WriteSame10.InvalidDataOutSize",
               "ALL.WriteSame16.InvalidDataOutSize", "ALL.WriteSame10.UnmapUnaligned",
               "ALL.WriteSame16.UnmapUnaligned")
READ_ONLY_TESTS = ("ALL.ReadOnly.ReadOnlySBC",)
# vdisk parameters for the Sanitize run: Sanitize.Reset needs the overwrite of the 64 MiB LU still running
# about 5 s after it started (8 s at this rate), Sanitize.Readonly a changeable SWP bit.
SANITIZE_PARAMS = {"sanitize_rate": 8 * 1024 * 1024, "software_write_protect": True}


def run_cu(urls: list[str], out_dir: str | Path, *, tests: str = "ALL", timeout: float = 600,
           stall: float = 120, dataloss: bool = True, initiator: str | None = None,
           initiator2: str | None = None, extra: tuple[str, ...] = (), echo=None) -> CuRun:
    """Run `iscsi-test-cu [-d] -v -t TESTS URL [URL2]` under `timeout`, stamp each line,
    write OUT/cu.log and OUT/summary.json, and return the parsed run.

    timeout: limit for the whole run (`timeout -k 10`). stall: kill the run when it printed
    nothing for that long (a hung test; the slowest healthy test, WRITE SAME to the end of
    a 1 GiB LUN, takes ~14 s on tgtd), so a hang costs minutes, not the whole limit.
    `echo`: optional callable(str) fed each output line as it arrives."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listing = list_tests()
    registered = select(listing, tests)
    args = ["iscsi-test-cu"] + (["-d"] if dataloss else []) + ["-v", "-t", tests]
    if initiator:
        args += ["-i", initiator]
    if initiator2:
        args += ["-I", initiator2]
    args += list(extra) + list(urls)
    cmd = ["timeout", "-k", "10", str(int(timeout)), "stdbuf", "-o0", "-e0"] + args
    stamped: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with open(out / "cu.log", "w") as log:
        log.write("# " + " ".join(args) + "\n")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        last = [time.monotonic()]
        stalled = threading.Event()
        done = threading.Event()

        def watchdog():
            while not done.wait(1.0):
                if time.monotonic() - last[0] > stall:
                    stalled.set()
                    try:
                        os.killpg(p.pid, signal.SIGKILL)     # timeout + iscsi-test-cu
                    except ProcessLookupError:
                        pass
                    return

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            for raw in p.stdout:
                last[0] = time.monotonic()
                t = last[0] - t0
                line = raw.decode(errors="replace").rstrip("\n")
                stamped.append((t, line))
                log.write(f"{t:9.3f} {line}\n")
                log.flush()
                if echo:
                    echo(line)
            rc = p.wait()
        finally:
            done.set()
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if stalled.is_set():
            msg = f"# killed: no output for {stall:.0f} s (stalled)"
            log.write(f"{time.monotonic() - t0:9.3f} {msg}\n")
            stamped.append((time.monotonic() - t0, msg))
    wall = time.monotonic() - t0
    results, summary = parse(stamped, registered)
    run = CuRun(command=args, exit_code=rc, timed_out=stalled.is_set() or rc in (124, 137, -9),
                wall_s=round(wall, 1),
                registered=registered, results=results, log_path=str(out / "cu.log"),
                cunit_summary=summary, libiscsi_version=libiscsi_version(),
                output_tail=[line for _, line in stamped[-15:]])
    (out / "summary.json").write_text(json.dumps(run.to_json(), indent=1) + "\n")
    return run


# --------------------------------------------------------------------------- baseline


def load_baseline(path: str | Path) -> dict | None:
    p = Path(path)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def baseline_record(run: CuRun, target: str) -> dict:
    """What `scripts/conformance --record` writes to docs/conformance-results.json."""
    return {
        "what": "libiscsi iscsi-test-cu per-test results; the regression gate of "
                "tests/peer/test_conformance.py (see docs/conformance.md)",
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": target,
        "libiscsi": run.libiscsi_version,
        "command": " ".join(run.command),
        "wall_s": run.wall_s,
        "complete": run.complete,
        "counts": run.counts(),
        "not_run": run.incomplete + run.missing,
        "results": {n: r.result for n, r in run.results.items() if r.result != "incomplete"},
        "reasons": {n: r.reason for n, r in run.results.items() if r.reason},
    }


def regressions(run: CuRun, baseline: dict | None) -> list[tuple[str, str, str]]:
    """(name, baseline result, current result) for every test that passed in the baseline
    and does not pass now (failed, skipped, incomplete or never ran)."""
    if not baseline:
        return []
    out = []
    for name, was in baseline.get("results", {}).items():
        if was != "passed":
            continue
        now = run.results[name].result if name in run.results else "missing"
        if now != "passed":
            out.append((name, was, now))
    return out


def improvements(run: CuRun, baseline: dict | None) -> list[tuple[str, str]]:
    """Tests that pass now but did not in the baseline (re-record to lock them in)."""
    if not baseline:
        return []
    base = baseline.get("results", {})
    return [(n, base.get(n, "absent")) for n, r in run.results.items()
            if r.result == "passed" and base.get(n) != "passed"]


# --------------------------------------------------------------------------- reporting


def counts_line(run: CuRun) -> str:
    c = run.counts()
    s = (f"{c['registered']} registered: {c['passed']} passed, {c['failed']} failed, "
         f"{c['skipped']} skipped")
    if c["incomplete"] or c["missing"]:
        s += f", {c['incomplete']} incomplete, {c['missing']} never ran"
    s += f"  (exit {run.exit_code}, {run.wall_s:.0f} s wall"
    s += ", TIMED OUT)" if run.timed_out else ")"
    return s


def report(run: CuRun, baseline: dict | None = None, max_list: int = 60) -> str:
    lines = [counts_line(run)]
    failed = run.names("failed")
    if failed:
        lines.append(f"failed ({len(failed)}):")
        lines += [f"  {n}  {run.results[n].reason}" for n in failed[:max_list]]
    if run.incomplete:
        lines.append(f"incomplete (started, no result): {', '.join(run.incomplete)}")
    if run.missing:
        lines.append(f"never ran ({len(run.missing)}): {', '.join(run.missing[:10])}"
                     + (", ..." if len(run.missing) > 10 else ""))
    if not run.complete:
        lines.append("last output lines:")
        lines += [f"  | {x}" for x in run.output_tail]
    reasons = Counter(r.reason for r in run.results.values() if r.result == "skipped")
    if reasons:
        lines.append(f"skipped ({sum(reasons.values())}) by reason:")
        lines += [f"  {n:3d}  {r}" for r, n in reasons.most_common()]
    if baseline is not None:
        reg = regressions(run, baseline)
        imp = improvements(run, baseline)
        lines.append(f"against baseline ({baseline.get('recorded_at', '?')}): "
                     f"{len(reg)} regressions, {len(imp)} newly passing")
        lines += [f"  REGRESSION {n}: {was} -> {now}" for n, was, now in reg]
        if imp:
            lines.append("  newly passing (run scripts/conformance --record to lock in): "
                         + ", ".join(n for n, _ in imp[:max_list]))
    lines.append(f"log: {run.log_path}")
    return "\n".join(lines)


def side_by_side(runs: dict[str, CuRun]) -> str:
    labels = list(runs)
    rows = ["registered", "passed", "failed", "skipped", "incomplete", "missing"]
    w = max(12, *(len(x) for x in labels))
    out = [f"{'':12s} " + " ".join(f"{x:>{w}s}" for x in labels)]
    for r in rows:
        out.append(f"{r:12s} " + " ".join(f"{runs[x].counts()[r]:>{w}d}" for x in labels))
    out.append(f"{'wall s':12s} " + " ".join(f"{runs[x].wall_s:>{w}.1f}" for x in labels))
    if len(labels) == 2:
        a, b = labels
        ra, rb = runs[a], runs[b]
        names = [n for n in ra.registered]
        diff = [(n, ra.results[n].result if n in ra.results else "missing",
                 rb.results[n].result if n in rb.results else "missing") for n in names]
        diff = [d for d in diff if d[1] != d[2]]
        if diff:
            out.append(f"tests with different results ({a} vs {b}):")
            out += [f"  {n:50s} {x:>10s} {y:>10s}" for n, x, y in diff]
    return "\n".join(out)
