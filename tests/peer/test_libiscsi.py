"""The default target, driven by libiscsi's command-line tools and QEMU's iSCSI client.

Each test starts from the contract in README/docs: `trioscsi serve` with no config exports
iqn.2026-11.org.trioscsi:demo, LUN 0 = 1 GiB sparse vdisk, LUN 1 = null device.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time

import pytest

from .harness import DEMO_IQN, GiB, MiB, need, pids_in_group, small_disk
from .rawiscsi import RawSession, sense_key_asc

pytestmark = pytest.mark.peer

TOOL_TIMEOUT = 60        # one libiscsi tool invocation
COPY_TIMEOUT = 300       # a 64 MiB qemu-img copy


def run(cmd: list[str], timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a client; stdout+stderr together in .out. A hang fails the test, never the suite."""
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.output or b"").decode(errors="replace")
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s (target hung?)\n{out}",
                    pytrace=False)
    r.out = r.stdout.decode(errors="replace")
    return r


def ok(cmd: list[str], timeout: float = TOOL_TIMEOUT) -> str:
    r = run(cmd, timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.out}"
    return r.out


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- discovery, INQUIRY


def test_discovery_lists_demo_target_and_luns(server):
    need("iscsi-ls")
    out = ok(["iscsi-ls", "-s", server.portal_url])
    assert re.search(rf"^Target:{re.escape(DEMO_IQN)} Portal:127\.0\.0\.1:{server.port},\d+",
                     out, re.M), f"discovery does not list {DEMO_IQN} on port {server.port}:\n{out}"
    demo = re.search(rf"^Target:{re.escape(DEMO_IQN)} .*?(?=^Target:|\Z)", out, re.M | re.S).group(0)
    luns = dict(re.findall(r"^Lun:(\d+)\s+Type:(\S+)", demo, re.M))
    assert luns.get("0") == "DIRECT_ACCESS", f"LUN 0 is not listed as a disk:\n{out}"
    assert "1" in luns, f"LUN 1 (null device) is not listed:\n{out}"
    assert (luns.get("2"), luns.get("3"), luns.get("4")) == ("MEDIA_CHANGER", "SEQUENTIAL_ACCESS",
                                                             "SEQUENTIAL_ACCESS"), f"no tape library:\n{out}"
    assert set(luns) == {"0", "1", "2", "3", "4"}, f"unexpected LUNs {sorted(luns)}:\n{out}"


def test_inquiry_lun0_is_a_disk(server):
    need("iscsi-inq")
    out = ok(["iscsi-inq", server.url(0)])
    assert "Peripheral Qualifier:CONNECTED" in out, out
    assert "Peripheral Device Type:DIRECT_ACCESS" in out, out
    m = re.search(r"^Version:(\d+)", out, re.M)
    assert m and int(m.group(1)) >= 5, f"claims no SPC-3 or later version:\n{out}"


def test_vpd_unit_serial_and_device_identification(server):
    need("iscsi-inq")
    supported = ok(["iscsi-inq", "-e", "1", "-c", "0", server.url(0)])
    for page in ("0x80", "0x83"):
        assert f"Page:{page}" in supported, f"VPD page {page} not in supported list:\n{supported}"
    serial = ok(["iscsi-inq", "-e", "1", "-c", str(0x80), server.url(0)])
    m = re.search(r"Unit Serial Number:\[(.*)\]", serial)
    assert m and m.group(1).strip(), f"empty unit serial number:\n{serial}"
    ident = ok(["iscsi-inq", "-e", "1", "-c", str(0x83), server.url(0)])
    designators = re.findall(r"Association:\((\d)\) (\S+)\s+Designator Type:\((\d+)\) (\S+)", ident)
    assert designators, f"no designators in VPD 0x83:\n{ident}"
    lu_types = {t for a, _, _, t in designators if a == "0"}
    assert lu_types & {"NAA", "EUI_64", "SCSI_NAME_STRING"}, \
        f"VPD 0x83 has no NAA/EUI-64/SCSI name designator for the logical unit:\n{ident}"
    # the two LUNs are different logical units: their VPD 0x83 must differ
    ident1 = ok(["iscsi-inq", "-e", "1", "-c", str(0x83), server.url(1)])
    assert ident1 != ident, "LUN 0 and LUN 1 report identical device identification"


def test_readcapacity16_of_default_vdisk(server):
    need("iscsi-readcapacity16")
    out = ok(["iscsi-readcapacity16", server.url(0)])
    fields = dict(re.findall(r"^([A-Z][A-Z _]+):(\d+)$", out, re.M))
    total = int(re.search(r"Total size:(\d+)", out).group(1))
    block = int(fields["LOGICAL BLOCK LENGTH IN BYTES"])
    last_lba = int(fields["RETURNED LOGICAL BLOCK ADDRESS"])
    assert block in (512, 4096), out
    assert (last_lba + 1) * block == total, out
    assert total == 1 * GiB, f"default LUN 0 should be 1 GiB, is {total} bytes:\n{out}"


# --------------------------------------------------------------------------- data through QEMU


def test_qemu_img_round_trip_64mib_lun0(server, tmp_path):
    """The acceptance 'foundation' check: 64 MiB random data in via qemu-img convert, back
    via qemu-img dd, identical sha256."""
    need("qemu-img")
    src, back = tmp_path / "in.raw", tmp_path / "out.raw"
    src.write_bytes(os.urandom(64 * MiB))
    ok(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), server.url(0)],
       COPY_TIMEOUT)
    ok(["qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=1M", "count=64",
        f"if={server.url(0)}", f"of={back}"], COPY_TIMEOUT)
    assert back.stat().st_size == 64 * MiB
    assert sha256(src) == sha256(back), "data read back from LUN 0 differs from what was written"


def test_null_lun_accepts_writes_and_reads(server, tmp_path):
    need("qemu-img", "iscsi-inq", "iscsi-readcapacity16")
    out = ok(["iscsi-inq", server.url(1)])
    assert "Peripheral Device Type:DIRECT_ACCESS" in out, out
    cap = ok(["iscsi-readcapacity16", server.url(1)])
    size = int(re.search(r"Total size:(\d+)", cap).group(1))
    assert size >= 16 * MiB, f"null LUN too small for this test:\n{cap}"
    src, back = tmp_path / "in.raw", tmp_path / "out.raw"
    src.write_bytes(os.urandom(16 * MiB))
    ok(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), server.url(1)],
       COPY_TIMEOUT)
    ok(["qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=1M", "count=16",
        f"if={server.url(1)}", f"of={back}"], COPY_TIMEOUT)
    assert back.stat().st_size == 16 * MiB


# --------------------------------------------------------------------------- errors


def test_login_to_missing_target_fails(server):
    need("iscsi-inq")
    r = run(["iscsi-inq", f"iscsi://127.0.0.1:{server.port}/iqn.2026-11.org.trioscsi:nosuch/0"])
    assert r.returncode != 0, f"login to a missing target succeeded:\n{r.out}"
    # RFC 7143 11.13.5: 0x0203 Not Found, or 0x0202 Authorization Failure, which trioscsi answers
    # on purpose (portal.py: the same answer for hidden and absent targets). libiscsi prints
    # "Status: Target not found(515)" / "Authorization failure(514)".
    m = re.search(r"Failed to log in to target\. Status: .*\((\d+)\)", r.out)
    assert m and int(m.group(1)) in (0x0202, 0x0203), \
        f"expected a Login Response with status 0x0202 or 0x0203:\n{r.out}"
    assert server.alive()
    assert "DIRECT_ACCESS" in ok(["iscsi-inq", server.url(0)])


def test_missing_lun_answers_while_another_session_works(server):
    """LUN 7 does not exist: commands to it get CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT
    NOT SUPPORTED (libiscsi's post-login TEST UNIT READY shows it); INQUIRY to it answers
    peripheral qualifier 3 / type 1Fh (SPC-4 6.6.2). A concurrent session on LUN 0 must
    not notice."""
    need("iscsi-inq", "qemu-img")
    bench = subprocess.Popen(
        ["qemu-img", "bench", "-f", "raw", "-t", "none", "-d", "4", "-s", "4096",
         "-c", "20000", server.url(0)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        r = run(["iscsi-inq", server.url(7)])
        assert r.returncode != 0, f"iscsi-inq on missing LUN 7 succeeded:\n{r.out}"
        assert "LOGICAL_UNIT_NOT_SUPPORTED" in r.out, \
            f"expected ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED (0x2500):\n{r.out}"

        with RawSession("127.0.0.1", server.port, DEMO_IQN) as s:
            s.login()
            status, data, sense = s.inquiry(7)
            assert status == 0, f"INQUIRY to missing LUN 7: status {status:#x}, sense {sense.hex()}"
            assert data and data[0] == 0x7F, \
                f"INQUIRY to missing LUN 7: byte 0 = {data[:1].hex()}, want 7f (PQ 3, type 1Fh)"
            status, _, sense = s.scsi(7, bytes(6))          # TEST UNIT READY
            assert status == 2 and sense_key_asc(sense)[:2] == (0x5, 0x25), \
                f"TUR to missing LUN 7: status {status:#x}, sense {sense.hex()}"
            status, data, _ = s.inquiry(0)                   # same session, real LUN
            assert status == 0 and data[0] == 0x00, "INQUIRY to LUN 0 in the same session"
        out, _ = bench.communicate(timeout=COPY_TIMEOUT)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    out = out.decode(errors="replace")
    assert bench.returncode == 0 and "Run completed" in out, \
        f"the concurrent qemu-img bench session on LUN 0 failed:\n{out}"
    assert server.alive()


def test_sigterm_stops_server_and_its_children(start_server, tmp_path):
    """SIGTERM stops the server within 10 s, with a clean exit status and no process left
    behind in its process group (emulators included)."""
    need("iscsi-inq")
    srv = start_server(luns=small_disk(tmp_path))
    assert "DIRECT_ACCESS" in ok(["iscsi-inq", srv.url(0)])
    group_before = pids_in_group(srv.pid)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 10 s after SIGTERM (group {group_before})")
    took = time.monotonic() - t0
    leftovers = []
    for _ in range(40):
        leftovers = pids_in_group(srv.pid)
        if not leftovers:
            break
        time.sleep(0.05)
    assert not leftovers, f"processes left after the server exited: {leftovers}"
    assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM), f"exit status {rc} after SIGTERM"
    assert took < 10
