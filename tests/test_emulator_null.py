"""The null emulator: the vdisk's command set over a store that keeps nothing (for measuring the stack)."""
from __future__ import annotations

import struct

import pytest

from emulators.pyemu.client import EmuClient, parse_sense

GOOD, CHECK = 0x00, 0x02


@pytest.fixture
def null():
    with EmuClient("emulators.null") as client:
        ready = client.hello({"size": 1 << 30, "block_size": 4096}, {"serial": "n0"})
        assert ready["op"] == "ready" and ready["device_type"] == 0
        assert ready["capacity"] == {"block_size": 4096, "blocks": (1 << 30) // 4096}
        yield client
        assert client.close() == 0


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def test_reads_are_zeros_and_writes_are_discarded(null):
    assert null.cmd(rw10(0x2A, 10, 2), data=b"\xff" * 8192)["status"] == GOOD
    done = null.cmd(rw10(0x28, 10, 2), xfer=8192)
    assert done["status"] == GOOD and done["data"] == bytes(8192)
    big = null.cmd(rw10(0x28, 0, 2048), xfer=8 << 20)                 # 8 MiB: the maximum transfer
    assert big["data"] == bytes(8 << 20)


def test_same_spc_and_sbc_answers_as_the_disk(null):
    inq = null.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96)["data"]
    assert inq[0] == 0 and inq[16:25] == b"NULL-DISK"
    cap = null.cmd(bytes((0x25,)) + bytes(9), xfer=8)["data"]
    assert struct.unpack(">II", cap) == ((1 << 30) // 4096 - 1, 4096)
    assert null.cmd(bytes((0x12, 1, 0x80, 0, 255, 0)), xfer=255)["data"][4:] == b"n0"
    assert null.cmd(bytes(6))["status"] == GOOD
    assert null.cmd(bytes((0x35,)) + bytes(9))["status"] == GOOD


def test_beyond_end_and_unmap_not_supported(null):
    done = null.cmd(rw10(0x28, (1 << 30) // 4096, 1), xfer=4096)
    s = parse_sense(done["sense"])
    assert done["status"] == CHECK and (s["key"], s["asc"]) == (0x5, 0x21)
    done = null.cmd(struct.pack(">BxxxxxxHB", 0x42, 24, 0), data=bytes(24))
    assert parse_sense(done["sense"])["asc"] == 0x20                     # not thin: no UNMAP


def test_get_lba_status_answers_instead_of_spinning(null):
    """tgt's null store loops forever on GET LBA STATUS; this one reports everything mapped."""
    done = null.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, 5, 24, 0, 0), xfer=24, )
    lba, count, status = struct.unpack_from(">QIB", done["data"], 8)
    assert (lba, count, status) == (5, (1 << 30) // 4096 - 5, 0)


def test_defaults():
    with EmuClient("emulators.null") as client:
        ready = client.hello({})
        assert ready["capacity"] == {"block_size": 512, "blocks": (1 << 40) // 512}
        assert client.close() == 0
