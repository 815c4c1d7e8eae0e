"""libiscsi's conformance suite (`iscsi-test-cu`) against fresh servers.

The main run is `-d -v -t ALL` on a 64 MiB removable vdisk LUN 0 (small, so that WRITE SAME with 0 blocks,
which writes to the end of the LUN, stays quick), over two sessions to the same LUN (the second URL enables
the SCSI.MultipathIO tests) and libiscsi's two default initiator names (reservation tests need two I_T
nexuses).  No test may fail.  The tests it skips are exactly those that need a LU of another kind, and each
of them runs where it applies, and must pass there:

* `ALL.Sanitize.*` need `-S`; they run on one path (with two, `Sanitize.Reservations` leaves its RESERVE(6)
  on the shared second session and `Sanitize.Reset` then meets the conflict) on a LU whose overwrite is
  slowed (`sanitize_rate`) so that `Sanitize.Reset` finds it still running, with a changeable SWP bit.
* five tests run only when a physical block holds several logical blocks: they run on a 4096-byte-physical
  LU (the main LU keeps LBPPB 1 because `GetLBAStatus.UnmapSingle` cannot pass otherwise).
* `ReadOnly.ReadOnlySBC` runs on a read-only mapping (tests/peer/test_read_only_mapping.py).

Every test that passed in docs/conformance-results.json (written by `scripts/conformance --record`) must
still pass.  See docs/conformance.md.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .cu_results import LBPPB_TESTS, READ_ONLY_TESTS, SANITIZE_PARAMS, load_baseline, regressions, report, \
    run_cu
from .harness import MiB, REPO, TrioscsiServer, need, small_disk, start_or_fail

pytestmark = pytest.mark.peer

BASELINE = REPO / "docs" / "conformance-results.json"
LUN_SIZE = 64 * MiB
TIMEOUT = float(os.environ.get("TRIOSCSI_CU_TIMEOUT", "600"))   # whole run
STALL = float(os.environ.get("TRIOSCSI_CU_STALL", "120"))        # no output for this long = hung
ARTIFACTS = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "trioscsi-conformance" / "pytest-last"


@pytest.fixture(scope="module")
def cu(tmp_path_factory, run_summary):
    """Runs the suite once: yields (run, server facts)."""
    need("iscsi-test-cu", "timeout", "stdbuf")
    work = tmp_path_factory.mktemp("conformance")
    srv = TrioscsiServer(work / "server", luns=small_disk(work, LUN_SIZE, with_null=False, removable=True))
    start_or_fail(srv)
    try:
        url = srv.url(0)
        run = run_cu([url, url], work / "cu", tests="ALL", timeout=TIMEOUT, stall=STALL)
        facts = {"alive_after_run": srv.alive(), "exit_during_run": srv.proc.returncode,
                 "log_tail": srv.log_tail(60), "log": str(srv.log_path)}
    finally:
        srv.stop()
    # pytest keeps only its last 3 temporary directories (shared by everyone running pytest as
    # this user): keep this run's evidence where the summary says
    keep = ARTIFACTS
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True, exist_ok=True)
    for f in (work / "cu" / "cu.log", work / "cu" / "summary.json", srv.log_path, srv.config):
        if f and Path(f).exists():
            shutil.copy(f, keep / Path(f).name)
    run.log_path = str(keep / "cu.log")
    facts.update(stop_returncode=srv.returncode, killed=srv.killed, leftovers=srv.leftovers)
    baseline = load_baseline(BASELINE)
    text = report(run, baseline)
    if baseline is None:
        text += f"\nno baseline {BASELINE.relative_to(REPO)}: run scripts/conformance --record"
    run_summary.append(("trioscsi conformance: iscsi-test-cu -d -t ALL (2 paths, 64 MiB vdisk)",
                        text))
    yield run, facts, baseline


def test_run_completed_without_hang(cu):
    run, facts, _ = cu
    assert run.registered, "iscsi-test-cu -l listed no ALL.* tests"
    tail = "\n".join(run.output_tail)
    assert run.results, f"iscsi-test-cu ran no test (exit {run.exit_code}):\n{tail}"
    assert not run.timed_out, (
        f"iscsi-test-cu was killed (limit {TIMEOUT:.0f} s, or no output for {STALL:.0f} s) after "
        f"{run.wall_s:.0f} s; the last test started was {run.last_started()} "
        + ("(it hung there)" if facts["alive_after_run"] else
           f"(the server had exited with status {facts['exit_during_run']}; libiscsi keeps "
           f"reconnecting)")
        + f"\n{run.log_path}\n--- server log ---\n{facts['log_tail']}")
    assert run.cunit_summary.get("tests"), \
        f"iscsi-test-cu ended without CUnit's run summary (exit {run.exit_code}); see {run.log_path}"


def test_every_registered_test_has_a_result(cu):
    run, _, _ = cu
    assert not run.incomplete, f"tests that started but never finished: {run.incomplete}"
    assert not run.missing, f"{len(run.missing)} registered tests never ran, e.g. {run.missing[:10]}"
    c = run.counts()
    assert c["passed"] + c["failed"] + c["skipped"] == c["registered"]


def test_server_survived_the_suite(cu):
    _, facts, _ = cu
    assert facts["alive_after_run"], (
        f"trioscsi exited during the conformance run (status {facts['exit_during_run']})\n"
        f"{facts['log_tail']}")
    assert not facts["killed"], "trioscsi did not stop on SIGTERM within 10 s after the run"
    assert not facts["leftovers"], f"processes left behind after stop: {facts['leftovers']}"


def test_no_regression_against_recorded_baseline(cu):
    run, _, baseline = cu
    assert baseline is not None, (
        f"no baseline at {BASELINE}: record today's results with `scripts/conformance --record` "
        f"and commit the file")
    assert baseline.get("results"), f"{BASELINE} has no per-test results"
    reg = regressions(run, baseline)
    assert not reg, (f"{len(reg)} tests passed in the baseline "
                     f"({baseline.get('recorded_at')}) and do not now:\n"
                     + "\n".join(f"  {n}: {was} -> {now} {run.results[n].reason if n in run.results else ''}"
                                 for n, was, now in reg))


def test_no_test_fails(cu):
    run, _, _ = cu
    failed = run.names("failed")
    assert not failed, "\n".join(f"{n}: {run.results[n].reason}" for n in failed)


def test_the_main_run_skips_only_what_runs_elsewhere(cu):
    """A skip is accepted only for a test that needs another kind of LU and runs on one below."""
    run, _, _ = cu
    elsewhere = set(LBPPB_TESTS) | set(READ_ONLY_TESTS)
    unexplained = [n for n in run.names("skipped") if n not in elsewhere and not n.startswith("ALL.Sanitize.")]
    assert not unexplained, "\n".join(f"{n}: {run.results[n].reason}" for n in unexplained)


def _run_on(tmp_path_factory, name: str, tests: str, paths: int, extra: tuple[str, ...] = (), **params):
    need("iscsi-test-cu", "timeout", "stdbuf")
    work = tmp_path_factory.mktemp(name)
    srv = TrioscsiServer(work / "server", luns=small_disk(work, LUN_SIZE, with_null=False, **params))
    start_or_fail(srv)
    try:
        run = run_cu([srv.url(0)] * paths, work / "cu", tests=tests, timeout=TIMEOUT, stall=STALL, extra=extra)
        alive = srv.alive()
    finally:
        srv.stop()
    return run, alive, srv


def _assert_all_passed(run, alive, srv) -> None:
    assert alive, f"trioscsi exited during the run:\n{srv.log_tail(40)}"
    assert run.complete, f"incomplete run (timed out: {run.timed_out}); see {run.log_path}"
    bad = {n: (r.result, r.reason) for n, r in run.results.items() if r.result != "passed"}
    assert not bad, "\n".join(f"{n}: {result} {reason}" for n, (result, reason) in bad.items())
    assert len(run.results) == len(run.registered) > 0


def test_sanitize_tests_pass_with_sanitize_allowed(tmp_path_factory, run_summary):
    run, alive, srv = _run_on(tmp_path_factory, "sanitize", "ALL.Sanitize", 1, ("-S",), **SANITIZE_PARAMS)
    run_summary.append(("trioscsi conformance: iscsi-test-cu -S -t ALL.Sanitize (1 path)", report(run)))
    _assert_all_passed(run, alive, srv)
    assert len(run.registered) == 11


def test_multi_block_physical_tests_pass_on_a_4096_byte_physical_lu(tmp_path_factory, run_summary):
    run, alive, srv = _run_on(tmp_path_factory, "lbppb", ",".join(LBPPB_TESTS), 2, physical_block_size=4096)
    run_summary.append(("trioscsi conformance: LBPPB > 1 tests (physical_block_size = 4096)", report(run)))
    _assert_all_passed(run, alive, srv)
    assert sorted(run.registered) == sorted(LBPPB_TESTS)
