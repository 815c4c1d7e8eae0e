"""Fixtures that run the real trioscsi server for the peer tests.

* `trioscsi_server` (session): one server with the built-in default config
  (target iqn.2026-11.org.trioscsi:demo, LUN 0 = 1 GiB sparse vdisk, LUN 1 = null).
* `server`: that server, checked to be still alive before each test.
* `start_server(luns=None, **kw)`: a fresh server for one test, e.g. with small LUNs
  (`harness.small_disk(tmp_path)`); stopped after the test.
* `harness.need(*binaries)`: fail (never skip) when a client is missing: scripts/test
  installs them.

A failing peer test gets the tail of every involved server's log attached to its report.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .harness import TrioscsiServer, start_or_fail

STARTUP_TIMEOUT = 60.0


def _start(workdir: Path, **kw) -> TrioscsiServer:
    srv = TrioscsiServer(workdir, startup_timeout=STARTUP_TIMEOUT, **kw)
    return start_or_fail(srv)


@pytest.fixture(scope="session")
def trioscsi_server(tmp_path_factory):
    srv = _start(tmp_path_factory.mktemp("trioscsi-default"))
    yield srv
    srv.stop()


@pytest.fixture
def server(trioscsi_server, request):
    """The shared default server; fails fast (with its log) if an earlier test killed it."""
    _track(request.node, trioscsi_server)
    if not trioscsi_server.alive():
        pytest.fail(f"the shared trioscsi server is no longer running (exit status "
                    f"{trioscsi_server.proc.returncode})\n{trioscsi_server._tail_block()}",
                    pytrace=False)
    return trioscsi_server


@pytest.fixture
def start_server(tmp_path, request):
    """Factory: start_server(luns=None, config=None, **TrioscsiServer kwargs) -> started server."""
    started: list[TrioscsiServer] = []

    def start(**kw) -> TrioscsiServer:
        workdir = tmp_path / f"server{len(started)}"
        srv = TrioscsiServer(workdir, startup_timeout=STARTUP_TIMEOUT, **kw)
        started.append(srv)
        _track(request.node, srv)
        return start_or_fail(srv)

    yield start
    for srv in started:
        srv.stop()


def _track(node, srv: TrioscsiServer) -> None:
    node.__dict__.setdefault("_peer_servers", []).append(srv)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("call", "setup"):
        for srv in getattr(item, "_peer_servers", []):
            rep.sections.append((f"trioscsi log {srv.log_path} (tail)", srv.log_tail(60)))
