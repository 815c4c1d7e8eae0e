"""QEMU's NBD client against the real server (a subprocess): `qemu-img convert -n` writes 16 MiB of random data
into an NBD export of a vdisk LU and reads it back identical; iSCSI sees the same bytes."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from .harness import DEMO_IQN, HOST, MiB, config_text, free_port, need, port_accepts, vdisk

pytestmark = pytest.mark.peer

COPY_TIMEOUT = 300


def run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           timeout=COPY_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {COPY_TIMEOUT} s (target hung?)\n"
                    f"{(e.output or b'').decode(errors='replace')}", pytrace=False)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{out}"
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_qemu_img_writes_and_reads_16_mib_over_nbd(start_server, tmp_path):
    need("qemu-img")
    nbd_port = free_port()
    config = tmp_path / "nbd.toml"
    config.write_text(config_text(f"{HOST}:0", [vdisk(0, tmp_path / "disk0.img", 16 * MiB)], portal=False)
                      + f'\n[[nbd]]\nlisten = "{HOST}:{nbd_port}"\nexport = "disk"\ntarget = "{DEMO_IQN}"\n')
    server = start_server(config=config)
    assert port_accepts(HOST, nbd_port), f"nothing listens on the NBD port {nbd_port}\n{server.log_tail()}"
    source, back = tmp_path / "source.img", tmp_path / "back.img"
    source.write_bytes(os.urandom(16 * MiB))
    url = f"nbd://{HOST}:{nbd_port}/disk"
    info = run(["qemu-img", "info", "--output=json", url])
    assert '"virtual-size": 16777216' in info, info
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), url])
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(back)])
    assert digest(back) == digest(source), "the data read back over NBD differs from what was written"
    assert "NBD export 'disk' (16777216 bytes)" in server.log(), server.log_tail()
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.url(0), str(tmp_path / "iscsi.img")])
    assert digest(tmp_path / "iscsi.img") == digest(source), "iSCSI does not see what NBD wrote"
