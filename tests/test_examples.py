"""The example emulators in other languages (emulators/examples/): built, checked, and served to real clients.

* c-ramdisk: `make` with the system cc; the checker passes it; qemu-img copies random data onto it through
  `trioscsi serve` and back, and the copy is identical.
* js-readonly: `npm ci` (cbor-x) in a temporary copy; the checker passes it; libiscsi's iscsi-inq and
  iscsi-readcapacity16 see the file's identity and size, qemu-img reads the file back through it, and refuses to
  write (the emulator's MODE SENSE reports WP).

A missing tool (cc, make, node, npm, qemu-img, iscsi-inq) fails these tests with the package to install; they
are never skipped.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from trioscsi.emu.checker import Options, run_checks

from peer.harness import TrioscsiServer, need, start_or_fail

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "emulators" / "examples"
IQN = "iqn.2026-11.org.trioscsi:examples"
MiB = 1 << 20
TOOLS = {"cc": "build-essential", "make": "make", "node": "nodejs", "npm": "npm (or nodejs from NodeSource)"}


def need_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            pytest.fail(f"{name} is not on PATH: install it (apt-get install -y {TOOLS[name]})", pytrace=False)


def run(cmd: list[str], timeout: float = 120, **kw) -> str:
    """Run a command; a failure or a hang fails the test with its output."""
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           timeout=timeout, text=True, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s\n{e.output or ''}", pytrace=False)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}", pytrace=False)
    return r.stdout


def sha256(path: Path, limit: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(limit) if limit else f.read()).hexdigest()


@pytest.fixture(scope="module")
def ramdisk() -> Path:
    need_tool("cc", "make")
    run(["make", "-C", str(EXAMPLES / "c-ramdisk")])
    return EXAMPLES / "c-ramdisk" / "ramdisk"


@pytest.fixture(scope="module")
def js_readonly(tmp_path_factory) -> Path:
    """index.js in a temporary copy of the example with its npm dependencies installed."""
    need_tool("node", "npm")
    copy = tmp_path_factory.mktemp("js") / "js-readonly"
    shutil.copytree(EXAMPLES / "js-readonly", copy, ignore=shutil.ignore_patterns("node_modules"))
    run(["npm", "ci", "--no-audit", "--no-fund"], timeout=300, cwd=copy)
    return copy / "index.js"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """8 MiB of random data for the read-only disk to serve."""
    path = tmp_path_factory.mktemp("img") / "served.img"
    path.write_bytes(os.urandom(8 * MiB))
    return path


async def test_c_ramdisk_passes_the_checker(ramdisk):
    report = await run_checks(Options([str(ramdisk)], params={"size": 8 * MiB}))
    assert not report.failed, report.text()
    skipped = [o.check for o in report.outcomes if o.status != "PASS"]
    assert not skipped, report.text()          # it implements every optional disk command the checker tries


async def test_c_ramdisk_4k_read_only_passes_the_checker(ramdisk):
    report = await run_checks(Options([str(ramdisk)], params={"size": 8 * MiB, "block_size": 4096,
                                                              "read_only": True}))
    assert not report.failed, report.text()
    assert "read_only" in report.summary and "4096" in report.summary, report.summary


async def test_js_readonly_passes_the_checker(js_readonly, image):
    report = await run_checks(Options(["node", str(js_readonly)], params={"path": str(image)}))
    assert not report.failed, report.text()
    assert "refused with DATA PROTECT" in report.outcome("sbc.read_write10").detail


@pytest.fixture(scope="module")
def server(tmp_path_factory, ramdisk, js_readonly, image):
    """trioscsi serve with LUN 0 = the C RAM disk (16 MiB) and LUN 1 = the JS read-only disk on `image`."""
    workdir = tmp_path_factory.mktemp("examples-server")
    config = workdir / "config.toml"
    config.write_text(f"""
[[target]]
name = "{IQN}"
  [[target.lun]]
  lun = 0
  emulator = "c-ramdisk"
  command = [{str(ramdisk)!r}]
  params = {{ size = {16 * MiB} }}
  [[target.lun]]
  lun = 1
  emulator = "js-readonly"
  serial = "js-ro-0001"
  command = ["node", {str(js_readonly)!r}]
  params = {{ path = {str(image)!r} }}
""".replace("'", '"'))
    srv = start_or_fail(TrioscsiServer(workdir, config=config, iqn=IQN))
    yield srv
    srv.stop()


@pytest.mark.peer
def test_qemu_img_round_trip_through_the_c_ramdisk(server, tmp_path):
    need("qemu-img")
    data = tmp_path / "random.bin"
    data.write_bytes(os.urandom(4 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(data), server.url(0)])
    back = tmp_path / "back.bin"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.url(0), str(back)])
    assert back.stat().st_size == 16 * MiB
    assert sha256(back, 4 * MiB) == sha256(data), f"data read back differs\n{server.log_tail()}"


@pytest.mark.peer
def test_libiscsi_sees_the_js_readonly_disk(server, image):
    need("iscsi-inq", "iscsi-readcapacity16")
    inq = run(["iscsi-inq", server.url(1)], timeout=60)
    assert "Peripheral Device Type:DIRECT_ACCESS" in inq, inq
    assert re.search(r"^Product:js-readonly\s*$", inq, re.M), inq
    serial = run(["iscsi-inq", "-e", "1", "-c", "128", server.url(1)], timeout=60)
    assert "Unit Serial Number:[js-ro-0001]" in serial, serial
    size = run(["iscsi-readcapacity16", "-s", server.url(1)], timeout=60)
    assert size.split() == [str(image.stat().st_size)], size


@pytest.mark.peer
def test_qemu_img_reads_and_cannot_write_the_js_readonly_disk(server, image, tmp_path):
    need("qemu-img")
    back = tmp_path / "back.bin"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.url(1), str(back)])
    assert sha256(back) == sha256(image)
    r = subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), server.url(1)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "write protected" in (r.stdout + r.stderr), r.stdout + r.stderr
    assert server.alive(), server.log_tail()
