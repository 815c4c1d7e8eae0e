"""The vtape emulator's media handling, as a real subprocess over the CBOR wire (docs/emulator-protocol.md,
docs/tape.md): load and unload by protocol message and by LOAD/UNLOAD with PREVENT, restoring the position after
the emulator was killed, the cartridge index across many objects, and cartridge crash safety (torn header, stale
records).
"""
from __future__ import annotations

import os

import pytest

from emulators.pyemu import cartridge as cartmod
from emulators.pyemu.cartridge import Cartridge
from vtape_helpers import (BLANK_CHECK, CHECK, GOOD, ILLEGAL_REQUEST, NOT_READY, MiB, Tape, expect, good, new_cart,
                           rec)
from vtape_helpers import tape, workdir  # noqa: F401 (pytest fixtures)


# -- media control over the protocol --------------------------------------------------------------------------------
def test_load_and_unload_messages(workdir):
    a, b = new_cart(workdir, "TAPEA"), new_cart(workdir, "TAPEB")
    t = Tape()
    try:
        done = t.control({"op": "load", "path": a}, tag=1)
        assert done["status"] == GOOD and done["path"] == a and done["object"] == 0
        assert t.named("medium_changed")
        assert t.named("position")[-1] == {"op": "event", "event": "position", "path": a, "object": 0,
                                           "loaded": True, "block_size": 0}
        good(t.cmd(bytes(6)))
        good(t.write(b"on A"))
        assert t.control({"op": "load", "path": b}, tag=2)["status"] == CHECK   # the drive is full
        done = t.control({"op": "unload"}, tag=3)
        assert done["status"] == GOOD and done["unloaded"] == a and done["path"] is None
        expect(t.cmd(bytes(6)), NOT_READY, 0x3A, 0x00)
        assert good(t.control({"op": "unload"}, tag=4))["unloaded"] is None      # idempotent
        good(t.control({"op": "load", "path": b}, tag=5))
        good(t.cmd(bytes(6)))
        expect(t.read(10), BLANK_CHECK, 0x00, 0x05)
        good(t.control({"op": "unload"}, tag=6))
        good(t.control({"op": "load", "path": a}, tag=7))
        assert good(t.read(4))["data"] == b"on A"                 # the unload flushed it
    finally:
        t.close()
    with _Open(a) as cart:
        assert cart.meta["loads"] == 2


class _Open:
    def __init__(self, path: str) -> None:
        self.cart = Cartridge(path)

    def __enter__(self) -> Cartridge:
        return self.cart

    def __exit__(self, *exc) -> None:
        self.cart.close()


def test_load_unload_command_and_prevent(tape):
    good(tape.write(b"x"))
    good(tape.cmd(bytes((0x1E, 0, 0, 0, 1, 0))))                  # PREVENT
    expect(tape.cmd(bytes((0x1B, 0, 0, 0, 0, 0))), ILLEGAL_REQUEST, 0x53, 0x02)
    good(tape.cmd(bytes((0x1E, 0, 0, 0, 0, 0))))
    good(tape.cmd(bytes((0x1B, 0, 0, 0, 0, 0))))                  # UNLOAD
    expect(tape.cmd(bytes(6)), NOT_READY, 0x3A, 0x00)
    assert tape.named("position")[-1]["loaded"] is False
    good(tape.cmd(bytes((0x1B, 0, 0, 0, 1, 0))))                  # LOAD
    assert tape.named("medium_changed")
    assert good(tape.read(1))["data"] == b"x"


def test_position_survives_an_emulator_kill(workdir):
    """Protocol §10: the core restores {path, object, loaded, block_size} from the last `position` event; records
    written since the last flush survive a killed process (roll-forward)."""
    path = new_cart(workdir)
    t = Tape({"cartridge": path})
    for i in range(5):
        good(t.write(rec(i, 777)))
    good(t.wfm())
    good(t.write(rec(5, 777)))                                    # never flushed by a filemark or motion
    last = t.named("position")[-1]
    assert last["object"] == 7
    t.c.proc.kill()
    t.c.proc.wait()
    t.close()
    t = Tape()
    try:
        done = t.control({"op": "restore", **{k: last[k] for k in ("path", "object", "loaded", "block_size")}})
        assert done["status"] == GOOD and not done.get("moved")
        assert not t.named("medium_changed")                      # restoring is invisible to initiators
        assert t.position() == {"bop": False, "eop": False, "object": 7, "file": 1}
        good(t.space(0, -1))
        assert good(t.read(777))["data"] == rec(5, 777)         # rolled forward after the kill
        good(t.locate10(2))
        assert good(t.read(777))["data"] == rec(2, 777)
        done = t.control({"op": "restore", "path": path, "object": 99, "loaded": True, "block_size": 0}, tag=2)
        assert done["moved"] and done["object"] == 7 and t.named("medium_changed")
    finally:
        t.close()


def test_index_spans_many_objects(workdir):
    """LOCATE and SPACE across several index records, before and after reopening the cartridge."""
    path = new_cart(workdir, capacity=64 * MiB)
    cart = Cartridge(path)
    for i in range(1800):
        cart.append(cartmod.DATA, [rec(i, 16 + i % 50)])
        if i % 100 == 99:
            cart.append(cartmod.FILEMARK, [b""])
    cart.close()
    t = Tape({"cartridge": path})
    try:
        good(t.locate10(1234))
        pos = t.position()
        assert pos["file"] == 1234 // 101
        expected = 1234 - pos["file"]
        assert good(t.read(100, sili=True))["data"] == rec(expected, 16 + expected % 50)
        expect(t.space(1, 100), BLANK_CHECK, 0x00, 0x05, info=100 - (18 - pos["file"]))
        assert t.position() == {"bop": False, "eop": False, "object": 1818, "file": 18}
        good(t.space(1, -10))
        assert t.position()["object"] == cart_fm_object(8)
    finally:
        t.close()


def cart_fm_object(n: int) -> int:
    """Object number of filemark n in test_index_spans_many_objects."""
    return 100 * (n + 1) + n


def test_cartridge_survives_torn_header_and_stale_records(workdir):
    """The header is the commit point: a header torn while being written leaves the previous one in force, and
    records of an earlier epoch are never rolled forward into a shorter tape."""
    path = new_cart(workdir)
    cart = Cartridge(path)
    cart.append(cartmod.DATA, [b"a" * 100] * 10)
    cart.flush()
    cart.seek(4)
    cart.truncate()                                               # commits "end of data at 4" (a new epoch)
    os.close(cart.fd)                                             # crash right after, with that header torn:
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"\xff" * 64, (cart.seq & 1) * cartmod.SLOT_SIZE + 40)
    os.close(fd)
    cart = Cartridge(path)
    assert cart.eod == 10                                         # the previous header is in force, data intact
    cart.seek(9)
    assert bytes(cart.read(1)[0][1]) == b"a" * 100
    cart.seek(4)
    cart.append(cartmod.DATA, [b"b" * 100])                       # truncate + overwrite, never flushed
    os.close(cart.fd)                                             # crash
    cart = Cartridge(path)
    try:
        assert cart.eod == 5                                      # object 4 rolled forward; old 5..9 stay dead
        cart.seek(4)
        assert bytes(cart.read(1)[0][1]) == b"b" * 100
    finally:
        cart.close()
    with pytest.raises(cartmod.CartridgeError):
        Cartridge(os.path.join(workdir, "missing.img"))
