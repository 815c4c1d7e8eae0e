"""libiscsi's write-protect test (iscsi-test-cu SCSI.ReadOnly) against a read-only *mapping*: the device is
writable, only this initiator group's view of it is read-only, and the core enforces it."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = "iqn.2026-11.org.trioscsi:ro"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.peer
def test_iscsi_test_cu_read_only_passes_on_a_read_only_mapping(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "ro.toml"
    config.write_text(f'''
[[target]]
name = "{TARGET}"
  [[target.lun]]
  lun = 0
  name = "disk"
  emulator = "vdisk"
  params = {{ path = "ro.img", size = 16777216, create = true }}
  [[target.group]]
  name = "readers"
  initiators = ["*"]
  luns = [ {{ lun = 0, device = "disk", read_only = true }} ]
''')
    server = subprocess.Popen([sys.executable, "-m", "trioscsi", "serve", "--config", str(config), "--listen",
                               f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        run = subprocess.run(["iscsi-test-cu", "-d", "-V", "-t", "ALL.ReadOnly",
                              f"iscsi://127.0.0.1:{port}/{TARGET}/0"], capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=15)
    out = run.stdout
    assert re.search(r"tests\s+1\s+1\s+1\s+0", out), f"ReadOnlySBC did not pass:\n{out[-3000:]}"
    assert run.returncode == 0
    assert "SKIPPED" not in out, out[-3000:]
    for command in ("WRITE10", "WRITESAME16", "UNMAP", "COMPAREANDWRITE", "ORWRITE"):
        assert f"[OK] {command} returned CHECK_CONDITION DATA PROTECTION(0x07) WRITE_PROTECTED(0x2700)" in out
