"""Shared by the wire-level SBC feature tests: a vdisk emulator in a scratch directory, and sense checks."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from emulators.pyemu.client import EmuClient, parse_sense

MiB = 1 << 20
CHECK = 0x02


@pytest.fixture
def workdir() -> Iterator[str]:
    """On the real disk, not tmpfs, so O_DIRECT and hole punching behave as in production."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="sbc-test-") as d:
        yield d


def start(workdir: str, identity: dict[str, Any] | None = None, **params: Any) -> EmuClient:
    """An 8 MiB vdisk emulator past its handshake."""
    client = EmuClient("emulators.vdisk")
    ready = client.hello({"path": os.path.join(workdir, "disk.img"), "size": 8 * MiB, **params}, identity or {})
    assert ready["op"] == "ready", (ready, client.stderr_text())
    return client


@pytest.fixture
def disk(workdir: str) -> Iterator[EmuClient]:
    with start(workdir) as client:
        yield client
    assert client.proc.returncode == 0


def expect(done: dict[str, Any], key: int, asc: int, ascq: int | None = None) -> dict[str, Any]:
    """The command ended in CHECK CONDITION with this sense key and ASC (and ASCQ when given)."""
    assert done["status"] == CHECK, done
    s = parse_sense(done["sense"])
    assert (s["key"], s["asc"]) == (key, asc), s
    if ascq is not None:
        assert s["ascq"] == ascq, s
    return s
