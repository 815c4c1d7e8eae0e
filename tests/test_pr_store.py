"""APTPL persistence: the reservation state file, replaced atomically (write, fsync, rename, fsync dir)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from trioscsi.core import pr_store
from trioscsi.core.nexus import Nexus
from trioscsi.core.pr_state import PrState, Registration
from trioscsi.core.reservations import Reservations

A = Nexus("iqn.x:a,i,0x000000000001", "iqn.t,t,0x0001", "iqn.x:a", 1)
B = Nexus("iqn.x:b,i,0x000000000002", "iqn.t,t,0x0001", "iqn.x:b", 1)
KA, KB = 0xA1, 0xB2


def out(r: Reservations, who: Nexus, action: int, key: int = 0, sa_key: int = 0, ptype: int = 0,
        aptpl: bool = False) -> None:
    cdb = struct.pack(">BBBxxIB", 0x5F, action, ptype, 24, 0)
    r.persistent_reserve_out(who, cdb, struct.pack(">QQ4xBxxx", key, sa_key, 1 if aptpl else 0))


def state() -> PrState:
    regs = [Registration(KA, "iqn.x:a,i,0x000000000001", 1, b"\x45\x00\x00\x1c" + bytes(28)),
            Registration(KB, "iqn.x:b", None, b"")]
    return PrState(7, {r.id: r for r in regs}, regs[0].id, 3, 0, True, "iqn.x:c,i,0x000000000003|1")


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lun0.pr"
    assert pr_store.load(path) is None
    pr_store.save(path, state())
    loaded = pr_store.load(path)
    assert loaded is not None
    # A power on: registrations, reservation and APTPL survive; PRgeneration restarts; SPC-2 reservations go.
    assert loaded == PrState(0, state().registrations, state().holder, 3, 0, True, None)
    document = json.loads(path.read_text())
    assert document["format"] == "trioscsi-pr" and document["version"] == 1
    assert os.listdir(tmp_path) == ["lun0.pr"]


def test_save_replaces_and_persist_follows_aptpl(tmp_path: Path) -> None:
    path = tmp_path / "lun0.pr"
    pr_store.persist(path, state())
    assert pr_store.load(path) is not None
    cleared = state()
    cleared.aptpl = False
    pr_store.persist(path, cleared)
    assert not path.exists() and pr_store.load(path) is None
    pr_store.persist(path, cleared)                               # nothing to remove: no error


def test_crash_between_write_and_rename_keeps_the_old_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lun0.pr"
    pr_store.save(path, state())
    old = path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("power lost")
    monkeypatch.setattr(os, "replace", crash)
    newer = state()
    newer.registrations = {}
    newer.holder, newer.type = None, 0
    with pytest.raises(OSError):
        pr_store.save(path, newer)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["lun0.pr"]                    # the temporary file was cleaned up


def test_a_left_over_temporary_file_is_never_read(tmp_path: Path) -> None:
    """A hard crash after the temporary file was written: the next load still reads the old state."""
    path = tmp_path / "lun0.pr"
    pr_store.save(path, state())
    (tmp_path / ".lun0.pr.abc123.tmp").write_bytes(b'{"half": ')
    assert pr_store.load(path) == pr_store.decode(pr_store.encode(state()))
    pr_store.save(path, state())


def test_write_fsync_rename_fsync_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lun0.pr"
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append("rename")
        assert Path(src).parent == tmp_path and Path(src).read_bytes() == pr_store.encode(state())
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    pr_store.save(path, state())
    assert calls == ["fsync-file", "rename", "fsync-dir"]


def test_corrupt_files_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "lun0.pr"
    good = json.loads(pr_store.encode(state()))
    for content in (b"", b"not json", json.dumps({**good, "version": 2}).encode(),
                    json.dumps({**good, "format": "other"}).encode(), json.dumps([1]).encode(),
                    json.dumps({**good, "state": {**good["state"], "holder": "nobody|1"}}).encode()):
        path.write_bytes(content)
        with pytest.raises(pr_store.PrStoreError, match="lun0.pr"):
            pr_store.load(path)


def test_aptpl_survives_a_restart(tmp_path: Path) -> None:
    """REGISTER with APTPL=1, RESERVE; a new process restores both; APTPL=0 removes the file."""
    path = tmp_path / "lun0.pr"
    r = Reservations(on_change=lambda st: pr_store.persist(path, st))
    out(r, A, 0, 0, KA, aptpl=True)
    out(r, B, 0, 0, KB, aptpl=True)
    out(r, A, 1, KA, ptype=1)
    restarted = Reservations(pr_store.load(path))
    assert restarted.state.registrations == r.state.registrations
    assert (restarted.state.holder, restarted.state.type, restarted.state.aptpl) == (r.state.holder, 1, True)
    assert restarted.state.generation == 0
    out(r, B, 0, KB, KB, aptpl=False)                             # the last REGISTER said APTPL=0
    assert not path.exists()
    assert Reservations(pr_store.load(path)).state == PrState()
