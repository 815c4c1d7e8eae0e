"""Shared by the vtape wire tests (test_emulator_vtape*.py): the `workdir` and `tape` fixtures, cartridge
creation, a `Tape` driver (a vtape subprocess over the CBOR wire with SSC CDB builders and the event frames it
sent), sense checks (`expect`, `good`) and numbered test records (`rec`).
"""
from __future__ import annotations

import os
import struct
import tempfile

import pytest

from emulators.pyemu.cartridge import create_cartridge
from emulators.pyemu.client import EmuClient, parse_sense

GOOD, CHECK = 0x00, 0x02
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, DATA_PROTECT, BLANK_CHECK, VOLUME_OVERFLOW = \
    0x0, 0x2, 0x3, 0x5, 0x7, 0x8, 0xD
FM, EOM, ILI = 0x80, 0x40, 0x20
MiB = 1 << 20


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vtape-test-") as d:
        yield d


def new_cart(workdir: str, name: str = "TAPE0001", capacity: int = 16 * MiB, **kw) -> str:
    return create_cartridge(os.path.join(workdir, name + ".img"), name, capacity, **kw)


class Tape:
    """A vtape subprocess with CDB builders; ``events`` collects the event frames seen so far."""

    def __init__(self, params: dict | None = None, identity: dict | None = None) -> None:
        self.c = EmuClient("emulators.vtape")
        self.ready = self.c.hello(params or {}, identity or {})
        assert self.ready["op"] == "ready", (self.ready, self.c.stderr_text())
        self.events: list[dict] = []

    def cmd(self, cdb: bytes, data: bytes | None = None, xfer: int = 0) -> dict:
        done = self.c.cmd(bytes(cdb), data, xfer)
        self._drain()
        return done

    def control(self, msg: dict, tag: int = 9000) -> dict:
        self.c.send({**msg, "tag": tag})
        done = self.c.wait(tag)
        self._drain()
        return done

    def _drain(self) -> None:
        keep = []
        for m in self.c.early:
            (self.events if m.get("op") == "event" else keep).append(m)
        self.c.early[:] = keep

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]

    # -- CDBs -----------------------------------------------------------------------------------------------------
    def write(self, data: bytes) -> dict:
        return self.cmd(bytes((0x0A, 0)) + len(data).to_bytes(3, "big") + b"\0", data)

    def write_fixed(self, data: bytes, blocks: int) -> dict:
        return self.cmd(bytes((0x0A, 1)) + blocks.to_bytes(3, "big") + b"\0", data)

    def read(self, n: int, fixed: bool = False, sili: bool = False, xfer: int | None = None) -> dict:
        cdb = bytes((0x08, (1 if fixed else 0) | (2 if sili else 0))) + n.to_bytes(3, "big") + b"\0"
        return self.cmd(cdb, xfer=xfer if xfer is not None else n)

    def wfm(self, n: int = 1, immed: bool = False, setmark: bool = False) -> dict:
        return self.cmd(bytes((0x10, (1 if immed else 0) | (2 if setmark else 0))) + n.to_bytes(3, "big") + b"\0")

    def space(self, code: int, count: int) -> dict:
        return self.cmd(bytes((0x11, code)) + (count & 0xFFFFFF).to_bytes(3, "big") + b"\0")

    def space16(self, code: int, count: int) -> dict:
        return self.cmd(bytes((0x91, code, 0, 0)) + struct.pack(">q", count) + bytes(4))

    def rewind(self) -> dict:
        return self.cmd(bytes((0x01, 0, 0, 0, 0, 0)))

    def locate10(self, n: int) -> dict:
        return self.cmd(struct.pack(">BBxIxBB", 0x2B, 0, n, 0, 0))

    def locate16(self, n: int, dest_type: int = 0) -> dict:
        return self.cmd(struct.pack(">BBBBQxxBB", 0x92, dest_type << 3, 0, 0, n, 0, 0))

    def position(self) -> dict:
        """READ POSITION long form: bop, eop, object, file."""
        done = self.cmd(bytes((0x34, 6)) + bytes(8), xfer=32)
        assert done["status"] == GOOD, done
        d = done["data"]
        obj, fileno = struct.unpack_from(">QQ", d, 8)
        return {"bop": bool(d[0] & 0x80), "eop": bool(d[0] & 0x40), "object": obj, "file": fileno}

    def close(self) -> None:
        self.c.__exit__(None, None, None)


@pytest.fixture
def tape(workdir):
    t = Tape({"cartridge": new_cart(workdir)})
    yield t
    t.close()


def expect(done: dict, key: int, asc: int, ascq: int, info: int | None = None, flags: int = 0) -> dict:
    """Check CHECK CONDITION sense (key, ASC/ASCQ, VALID + INFORMATION, stream bits); returns ``done``."""
    assert done["status"] == CHECK, done
    s = parse_sense(done["sense"])
    assert (s["key"], s["asc"], s["ascq"]) == (key, asc, ascq), s
    assert done["sense"][2] & 0xE0 == flags, f"stream bits {done['sense'][2] & 0xE0:#x}, wanted {flags:#x}"
    if info is not None:
        assert s["info"] is not None, "VALID must be set"
        assert s["info"] == info & 0xFFFFFFFF, (s["info"], info)
    return done


def good(done: dict) -> dict:
    assert done["status"] == GOOD, done
    return done


def rec(i: int, size: int) -> bytes:
    return (struct.pack(">I", i) * (size // 4 + 1))[:size]
