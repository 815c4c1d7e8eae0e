"""libiscsi's conformance suite (`iscsi-test-cu -d -v -t ALL`) against a fresh server.

One run per pytest session (module fixture), on a 64 MiB vdisk LUN 0 (small, so that WRITE SAME
with 0 blocks, which writes to the end of the LUN, stays quick), over two sessions to the same
LUN (the second URL enables the SCSI.MultipathIO tests) and libiscsi's two default initiator
names (reservation tests need two I_T nexuses).

The gate is a regression gate against docs/conformance-results.json (written by
`scripts/conformance --record`): every test that passed there must still pass. Known failures
and skips don't make the suite red; see docs/conformance.md.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .cu_results import load_baseline, regressions, report, run_cu
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
