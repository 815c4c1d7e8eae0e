"""The Linux kernel initiator (sd, st, ch drivers in a QEMU guest) against trioscsi: dd, mkfs and e2fsck on
the disk; mt, dd and tar on the tape (including `mt tell` and the file number after `mt eod`, which tgt gets
wrong); mtx load/unload/transfer on the changer. See scripts/kvm-test and ../shared/kvm-initiator."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KVM = Path(os.environ.get("KVM_DIR", ROOT.parent / "shared" / "kvm-initiator"))


@pytest.mark.peer
def test_kernel_initiator_drives_disk_cdrom_tape_and_changer() -> None:
    assert (KVM / "run-guest.sh").exists(), f"the kernel-initiator harness is missing at {KVM}"
    run = subprocess.run([str(ROOT / "scripts" / "kvm-test")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PORT": "3362"}, stdin=subprocess.DEVNULL)
    print(run.stdout[-4000:])
    summary = re.search(r"KVMI-SUMMARY: (\d+) passed, (\d+) failed", run.stdout)
    assert summary, f"no guest summary (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    passed, failed = int(summary.group(1)), int(summary.group(2))
    failures = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == 0 and run.returncode == 0, "\n".join(failures) or run.stdout[-3000:]
    assert passed >= 48, f"only {passed} checks ran"
    for check in ("tape tell", "tape status at eod", "changer mtx load 1 0", "disk e2fsck -fn", "cd size",
                  "cd dd md5"):
        assert f"PASS {check}" in run.stdout, f"{check} did not pass"


@pytest.mark.peer
def test_kernel_initiator_mutual_chap() -> None:
    """open-iscsi in the guest: a wrong initiator secret is refused by trioscsi, a target that proves the wrong
    secret is refused by Linux, and the right pair logs in and attaches the disk (tests/kvm/chap.toml)."""
    assert (KVM / "run-guest.sh").exists(), f"the kernel-initiator harness is missing at {KVM}"
    run = subprocess.run([str(ROOT / "scripts" / "kvm-test"), "chap"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PORT": "3363"}, stdin=subprocess.DEVNULL)
    print(run.stdout[-3000:])
    assert "KVMI-SUMMARY: 5 passed, 0 failed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0
