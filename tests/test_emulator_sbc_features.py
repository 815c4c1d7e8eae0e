"""vdisk over the wire: transfer-size checks, Block Limits, WRITE ATOMIC, READ DEFECT DATA, removable media.

Each test names the SBC-4 / SPC-4 clause it checks and, where one exists, the libiscsi test that found the gap.
"""
from __future__ import annotations

import os
import struct

import pytest

from emulators.pyemu.client import EmuClient, parse_sense
from sbc_helpers import disk, expect, start, workdir  # noqa: F401 (pytest fixtures)

GOOD, CHECK = 0x00, 0x02
NOT_READY, ILLEGAL_REQUEST, DATA_PROTECT = 0x2, 0x5, 0x7
MiB = 1 << 20
BLOCKS = 8 * MiB // 512




def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def ws10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x41, flags, lba, 0, blocks, 0)


def ws16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x93, flags, lba, blocks, 0, 0)


def caw(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQxxxBBB", 0x89, 0, lba, blocks, 0, 0)


def atomic(lba: int, blocks: int, flags: int = 0, boundary: int = 0) -> bytes:
    return struct.pack(">BBQHHBB", 0x9C, flags, lba, boundary, blocks, 0, 0)


def vpd(c: EmuClient, page: int) -> bytes:
    done = c.cmd(bytes((0x12, 1, page, 0x10, 0, 0)), xfer=4096)
    assert done["status"] == GOOD, done
    return done["data"]


def lba_status(c: EmuClient, lba: int) -> tuple[int, int, int]:
    done = c.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, lba, 24, 0, 0), xfer=24)
    assert done["status"] == GOOD, done
    return struct.unpack_from(">QIB", done["data"], 8)


def tur(c: EmuClient) -> dict:
    return c.cmd(bytes(6))


def opcode_usage(c: EmuClient, op: int, sa: int | None = None) -> bytes | None:
    """REPORT SUPPORTED OPCODES for one command: its CDB usage data, or None when unsupported."""
    options = 1 if sa is None else 2
    done = c.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, options, op, sa or 0, 4096, 0), xfer=4096)
    assert done["status"] == GOOD, done
    data = done["data"]
    if data[1] & 0x07 != 3:
        return None
    return data[4:4 + struct.unpack_from(">H", data, 2)[0]]


# -- COMPARE AND WRITE ----------------------------------------------------------------------------------------------
def test_compare_and_write_needs_exactly_twice_the_blocks(disk):
    """SBC-4 5.3: the data-out buffer holds NUMBER OF LOGICAL BLOCKS of verify data and as many of write data.
    libiscsi CompareAndWrite.Simple/.Miscompare send 256 blocks (the byte wraps to 0) with 256 KiB of data;
    CompareAndWrite.InvalidDataOutSize sends 4 blocks of data for 1 and for 3 blocks."""
    assert vpd(disk, 0xB0)[5] == 255                                         # MAXIMUM COMPARE AND WRITE LENGTH
    block = b"A" * 512
    disk.cmd(rw10(0x2A, 0, 4), data=block * 4)
    expect(disk.cmd(caw(0, 0), data=block * 512), ILLEGAL_REQUEST, 0x24, 0x00)   # 0 blocks, yet data
    expect(disk.cmd(caw(0, 1), data=block * 4), ILLEGAL_REQUEST, 0x24, 0x00)     # too much
    expect(disk.cmd(caw(0, 3), data=block * 4), ILLEGAL_REQUEST, 0x24, 0x00)     # too little
    assert disk.cmd(disk_read := rw10(0x28, 0, 4), xfer=2048)["data"] == block * 4   # nothing written
    assert disk.cmd(caw(0, 2), data=block * 2 + b"B" * 1024)["status"] == GOOD
    assert disk.cmd(disk_read, xfer=2048)["data"] == b"B" * 1024 + block * 2
    assert disk.cmd(caw(0, 0))["status"] == GOOD                             # 0 blocks, no data: nothing to do


# -- Block Limits and WRITE SAME ------------------------------------------------------------------------------------
def test_block_limits_are_sane_and_enforced(workdir):
    """SBC-4 6.6.4; libiscsi Inquiry.BlockLimits (MAXIMUM UNMAP LBA COUNT 0xFFFFFFFF or <= 1 Mi) and
    WriteSame16.Unmap (a MAXIMUM WRITE SAME LENGTH below 65536 means 65536 blocks are refused)."""
    with start(workdir, size=64 * MiB) as disk:
        check_block_limits(disk, 64 * MiB // 512)


def check_block_limits(disk: EmuClient, blocks: int) -> None:
    b0 = vpd(disk, 0xB0)
    assert struct.unpack_from(">H", b0, 2)[0] == 0x3C
    max_xfer, max_unmap = struct.unpack_from(">I", b0, 8)[0], struct.unpack_from(">I", b0, 20)[0]
    assert max_unmap == 0xFFFFFFFF or max_unmap <= 1 << 20
    assert struct.unpack_from(">I", b0, 24)[0] > 0                           # UNMAP descriptors
    max_ws = struct.unpack_from(">Q", b0, 36)[0]
    assert 0 < max_ws < 65536 and max_ws == max_xfer
    max_atomic, align, gran, with_boundary, boundary = struct.unpack_from(">IIIII", b0, 44)
    assert 0 < max_atomic <= max_xfer and (align, gran, with_boundary, boundary) == (0, 0, 0, 0)
    block = b"\x5a" * 512
    expect(disk.cmd(ws16(0, max_ws + 1), data=block), ILLEGAL_REQUEST, 0x24, 0x00)
    expect(disk.cmd(ws16(0, 65536, flags=0x08), data=bytes(512)), ILLEGAL_REQUEST, 0x24, 0x00)
    expect(disk.cmd(ws10(0, 0), data=block), ILLEGAL_REQUEST, 0x24, 0x00)    # 0 blocks = to the end: too many
    assert disk.cmd(ws16(blocks - max_ws, max_ws), data=block)["status"] == GOOD
    assert disk.cmd(ws10(blocks - max_ws, 0), data=block)["status"] == GOOD
    assert disk.cmd(rw10(0x28, blocks - 1, 1), xfer=512)["data"] == block


@pytest.mark.parametrize("cdb", [ws10(0, 1, 0x08), ws16(0, 1, 0x08), ws10(0, 1), ws16(0, 1)])
def test_write_same_refuses_a_data_out_that_is_not_one_block(disk, cdb):
    """SBC-4 5.50: the data-out buffer is one logical block (libiscsi WriteSame10/16.InvalidDataOutSize)."""
    expect(disk.cmd(cdb, data=b"\xa6" * 256), ILLEGAL_REQUEST, 0x1A)
    expect(disk.cmd(cdb, data=b"\xa6" * 1024), ILLEGAL_REQUEST, 0x1A)
    assert disk.cmd(cdb, data=b"\xa6" * 512)["status"] == GOOD


def test_write_same_unmap_to_the_end_reads_zeros_whatever_the_block(disk):
    """SBC-3 5.42: UNMAP=1 deallocates; with LBPRZ the blocks read as zeros even when the data-out block is not
    zero (libiscsi WriteSame10.UnmapUntilEnd sends 0xFF blocks with NUMBER OF LOGICAL BLOCKS 0)."""
    for n in (1, 7, 64):
        disk.cmd(rw10(0x2A, BLOCKS - n, n), data=b"\xff" * 512 * n)
        assert disk.cmd(ws10(BLOCKS - n, 0, flags=0x08), data=b"\xff" * 512)["status"] == GOOD
        assert disk.cmd(rw10(0x28, BLOCKS - n, n), xfer=512 * n)["data"] == bytes(512 * n)
    lba, count, status = lba_status(disk, BLOCKS - 64)
    assert (lba, status) == (BLOCKS - 64, 1) and count == 64


def test_get_lba_status_starts_at_the_requested_lba(disk):
    """SBC-4 5.8: the first descriptor holds the STARTING LOGICAL BLOCK ADDRESS; with the default
    physical_block_size (= logical) libiscsi GetLBAStatus.UnmapSingle asks at i+1 after unmapping 0..i-1."""
    cap = disk.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), xfer=32)["data"]
    assert cap[13] & 0x0F == 0                                               # LBPPBE: one block per physical
    disk.cmd(rw10(0x2A, 0, 257), data=b"A" * 512 * 257)
    for i in (1, 8, 9, 200):
        disk.cmd(rw10(0x2A, 0, 257), data=b"A" * 512 * 257)
        param = struct.pack(">HHxxxx", 22, 16) + struct.pack(">QIxxxx", 0, i)
        assert disk.cmd(struct.pack(">BxxxxxxHB", 0x42, len(param), 0), data=param)["status"] == GOOD
        lba, count, status = lba_status(disk, i + 1)
        assert lba == i + 1 and status == 0 and count > 0


def test_physical_block_size_parameter(workdir):
    with start(workdir, physical_block_size=4096) as c:
        cap = c.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), xfer=32)["data"]
        assert cap[13] & 0x0F == 3
    c = EmuClient("emulators.vdisk")
    with c:
        reply = c.hello({"path": os.path.join(workdir, "disk.img"), "physical_block_size": 1000})
        assert reply["op"] == "error" and "physical_block_size" in reply["message"]


# -- WRITE ATOMIC(16) -----------------------------------------------------------------------------------------------
def test_write_atomic(workdir):
    """SBC-4 5.48 (libiscsi WriteAtomic16.*): written whole, reported in REPORT SUPPORTED OPCODES with DPO/FUA."""
    with start(workdir) as disk:
        check_write_atomic(disk)
    with start(workdir, path=os.path.join(workdir, "big.img"), size=64 * MiB) as disk:
        max_atomic = struct.unpack_from(">I", vpd(disk, 0xB0), 44)[0]
        expect(disk.cmd(atomic(0, max_atomic + 1), data=bytes(512 * (max_atomic + 1))), ILLEGAL_REQUEST, 0x24)


def check_write_atomic(disk: EmuClient) -> None:
    data = bytes(range(256)) * 2 * 256
    assert disk.cmd(atomic(10, 256), data=data)["status"] == GOOD
    assert disk.cmd(rw10(0x28, 10, 256), xfer=len(data))["data"] == data
    assert disk.cmd(atomic(BLOCKS - 1, 1, flags=0x18), data=b"z" * 512)["status"] == GOOD       # DPO FUA
    assert disk.cmd(atomic(BLOCKS, 0))["status"] == GOOD
    expect(disk.cmd(atomic(BLOCKS - 1, 2), data=b"z" * 1024), ILLEGAL_REQUEST, 0x21)
    expect(disk.cmd(atomic(2**63, 1), data=b"z" * 512), ILLEGAL_REQUEST, 0x21)
    expect(disk.cmd(atomic(2**64 - 1, 1), data=b"z" * 512), ILLEGAL_REQUEST, 0x21)
    expect(disk.cmd(atomic(0, 1, flags=0x20), data=b"z" * 512), ILLEGAL_REQUEST, 0x24)         # WRPROTECT
    expect(disk.cmd(atomic(0, 1, boundary=1), data=b"z" * 512), ILLEGAL_REQUEST, 0x24)         # no boundaries
    expect(disk.cmd(atomic(0, 2), data=b"z" * 512), ILLEGAL_REQUEST, 0x24)                     # partial data
    usage = opcode_usage(disk, 0x9C)
    assert usage is not None and len(usage) == 16 and usage[1] & 0x18 == 0x18


def test_write_atomic_on_read_only(workdir):
    path = os.path.join(workdir, "ro.img")
    with open(path, "wb") as f:
        f.truncate(MiB)
    client = EmuClient("emulators.vdisk")
    with client:
        assert client.hello({"path": path, "read_only": True})["op"] == "ready"
        expect(client.cmd(atomic(0, 1), data=bytes(512)), DATA_PROTECT, 0x27)
        # a read-only thin LU still has UNMAP, and refuses it (libiscsi ReadOnly.ReadOnlySBC)
        param = struct.pack(">HHxxxx", 22, 16) + struct.pack(">QIxxxx", 0, 1)
        expect(client.cmd(struct.pack(">BxxxxxxHB", 0x42, len(param), 0), data=param), DATA_PROTECT, 0x27)


# -- READ DEFECT DATA ----------------------------------------------------------------------------------------------
def test_read_defect_data_returns_empty_lists(disk):
    """SBC-3 5.18/5.19 (libiscsi ReadDefectData10/12.Simple): lists asked for are valid and empty."""
    done = disk.cmd(bytes((0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0)), xfer=32)          # PLIST + GLIST, short block
    assert done["status"] == GOOD and done["data"] == bytes((0, 0x18, 0, 0))
    done = disk.cmd(bytes((0x37, 0, 0x0B, 0, 0, 0, 0, 0, 2, 0)), xfer=2)            # GLIST, long block, cut
    assert done["data"] == bytes((0, 0x0B))
    done = disk.cmd(struct.pack(">BBIIxB", 0xB7, 0x10, 0, 64, 0), xfer=64)
    assert done["status"] == GOOD and done["data"] == bytes((0, 0x10)) + bytes(6)
    expect(disk.cmd(bytes((0x37, 0, 0x06, 0, 0, 0, 0, 0, 32, 0)), xfer=32), ILLEGAL_REQUEST, 0x24)


# -- removable medium ----------------------------------------------------------------------------------------------
def test_removable_eject_and_load(workdir):
    """SBC-3 5.25 / SPC-4 6.13 (libiscsi StartStopUnit.*, NoMedia.NoMediaSBC, PreventAllow.Simple/Eject)."""
    with start(workdir, removable=True) as c:
        inq = c.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96)["data"]
        assert inq[1] & 0x80                                                # RMB
        c.cmd(rw10(0x2A, 3, 1), data=b"m" * 512)
        for pc in range(1, 16):                                             # a power condition ignores LOEJ
            assert c.cmd(bytes((0x1B, 1, 0, 0, pc << 4 | 0x02, 0)))["status"] == GOOD
            assert tur(c)["status"] == GOOD
        assert c.cmd(bytes((0x1B, 0, 0, 0, 0x00, 0)))["status"] == GOOD     # LOEJ 0: nothing happens
        assert tur(c)["status"] == GOOD
        assert c.cmd(bytes((0x1B, 1, 0, 0, 0x02, 0)))["status"] == GOOD     # eject
        expect(tur(c), NOT_READY, 0x3A)
        expect(c.cmd(rw10(0x28, 0, 1), xfer=512), NOT_READY, 0x3A)
        expect(c.cmd(rw10(0x2A, 0, 1), data=bytes(512)), NOT_READY, 0x3A)
        expect(c.cmd(bytes((0x25,)) + bytes(9), xfer=8), NOT_READY, 0x3A)
        expect(c.cmd(bytes((0x35,)) + bytes(9)), NOT_READY, 0x3A)
        assert c.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96)["status"] == GOOD
        sense = c.cmd(bytes((0x03, 0, 0, 0, 18, 0)), xfer=18)
        assert sense["status"] == GOOD and parse_sense(sense["data"])["asc"] == 0x3A
        assert c.cmd(bytes((0x1B, 0, 0, 0, 0x02, 0)))["status"] == GOOD     # eject again: fine
        assert c.cmd(bytes((0x1B, 0, 0, 0, 0x03, 0)))["status"] == GOOD     # load: the same image
        assert tur(c)["status"] == GOOD
        assert c.cmd(rw10(0x28, 3, 1), xfer=512)["data"] == b"m" * 512
        # PREVENT blocks both eject and load; ALLOW lifts it
        assert c.cmd(bytes((0x1E, 0, 0, 0, 1, 0)))["status"] == GOOD
        expect(c.cmd(bytes((0x1B, 0, 0, 0, 0x02, 0))), ILLEGAL_REQUEST, 0x53, 0x02)
        assert tur(c)["status"] == GOOD
        expect(c.cmd(bytes((0x1B, 0, 0, 0, 0x03, 0))), ILLEGAL_REQUEST, 0x53, 0x02)
        assert c.cmd(bytes((0x1E, 0, 0, 0, 0, 0)))["status"] == GOOD
        assert c.cmd(bytes((0x1B, 0, 0, 0, 0x02, 0)))["status"] == GOOD
        expect(tur(c), NOT_READY, 0x3A)
        assert c.cmd(bytes((0x1B, 0, 0, 0, 0x03, 0)))["status"] == GOOD
        expect(c.cmd(bytes((0x1E, 0, 0, 0, 2, 0))), ILLEGAL_REQUEST, 0x24)  # changer prevention: not a changer


def test_fixed_disk_ignores_loej(disk):
    inq = disk.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96)["data"]
    assert not inq[1] & 0x80
    assert disk.cmd(bytes((0x1E, 0, 0, 0, 1, 0)))["status"] == GOOD
    assert disk.cmd(bytes((0x1B, 0, 0, 0, 0x02, 0)))["status"] == GOOD
    assert tur(disk)["status"] == GOOD


def submit_as(c: EmuClient, nexus, cdb: bytes) -> dict:
    c._tag += 1
    c.send({"op": "cmd", "tag": c._tag, "cdb": cdb, "xfer": 0, "nexus": nexus})
    return c.wait(c._tag)


def test_prevention_is_per_nexus_and_ends_with_it(workdir):
    """SPC-4 6.13: removal is prevented while any I_T nexus prevents it; a nexus loss or a reset ends that
    nexus's prevention (libiscsi PreventAllow.2ITNexuses, .ITNexusLoss, .Logout, .LUNReset, .WarmReset)."""
    eject, load = bytes((0x1B, 0, 0, 0, 0x02, 0)), bytes((0x1B, 0, 0, 0, 0x03, 0))
    with start(workdir, removable=True) as c:
        assert submit_as(c, "a", bytes((0x1E, 0, 0, 0, 1, 0)))["status"] == GOOD
        assert submit_as(c, 7, bytes((0x1E, 0, 0, 0, 1, 0)))["status"] == GOOD
        expect(submit_as(c, "b", eject), ILLEGAL_REQUEST, 0x53, 0x02)
        assert submit_as(c, "b", bytes((0x1E, 0, 0, 0, 0, 0)))["status"] == GOOD   # b's ALLOW: not a's
        expect(submit_as(c, "b", eject), ILLEGAL_REQUEST, 0x53, 0x02)
        c.send({"op": "nexus_lost", "nexus": "a"})
        expect(submit_as(c, "b", eject), ILLEGAL_REQUEST, 0x53, 0x02)              # 7 still prevents
        c.send({"op": "reset"})
        assert submit_as(c, "b", eject)["status"] == GOOD
        assert submit_as(c, "b", load)["status"] == GOOD
