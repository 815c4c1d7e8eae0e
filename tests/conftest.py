"""Suite-wide pytest hooks.

`run_summary` lets a test or fixture add a block of text that is printed in pytest's terminal
summary at the end of the run, whether or not output capture (-s) is on. The peer conformance
test uses it for its passed/failed/skipped counts.
"""
from __future__ import annotations

import pytest

_SUMMARY = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def run_summary(pytestconfig):
    """A list; append (title, text) to have it printed at the end of the run."""
    return pytestconfig.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, text in config.stash.get(_SUMMARY, []):
        terminalreporter.write_sep("-", title)
        for line in text.splitlines():
            terminalreporter.write_line(line)
