"""vdisk over the wire: EXTENDED COPY (LID1), RECEIVE COPY RESULTS and the Third-party Copy VPD page (SPC-4 6.4,
6.18, 7.8.17), after libiscsi's ExtendedCopy.* and ReceiveCopyResults.* tests.
"""
from __future__ import annotations

import os
import struct

import pytest

from emulators.pyemu.client import EmuClient, parse_sense
import sbc_helpers
from sbc_helpers import expect, workdir  # noqa: F401 (pytest fixtures)

GOOD, CHECK = 0x00, 0x02
ILLEGAL_REQUEST, DATA_PROTECT, COPY_ABORTED = 0x5, 0x7, 0xA
MiB = 1 << 20
BLOCKS = 8 * MiB // 512
NAA = bytes.fromhex("6001405abcdef0123456789abcdef012")
PEER_NAA = bytes.fromhex("60014051111111112222222233333333")


def start(workdir: str, **params) -> EmuClient:
    """The shared vdisk, with the NAA designator EXTENDED COPY descriptors name it by."""
    return sbc_helpers.start(workdir, identity={"naa": NAA}, **params)


@pytest.fixture
def disk(workdir):
    with start(workdir) as client:
        yield client
    assert client.proc.returncode == 0


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def cscd(naa: bytes = NAA, code: int = 0xE4, byte1: int = 0, block_size: int = 512) -> bytes:
    """An identification CSCD descriptor naming an LU by its NAA designator."""
    return bytes((code, byte1, 0, 0, 0x01, 0x03, 0, len(naa))) + naa.ljust(20, b"\0") + struct.pack(">I",
                                                                                                     block_size)


def segment(blocks: int, src_lba: int, dst_lba: int, src: int = 0, dst: int = 0, kind: int = 0x02) -> bytes:
    return struct.pack(">BBHHHxxHQQ", kind, 0, 0x18, src, dst, blocks, src_lba, dst_lba)


def params(cscds: list[bytes], segments: list[bytes], list_id: int = 1, usage: int = 0) -> bytes:
    c, s = b"".join(cscds), b"".join(segments)
    return struct.pack(">BBHxxxxII", list_id, usage << 3, len(c), len(s), 0) + c + s


def xcopy(c: EmuClient, data: bytes, length: int | None = None, nexus=None) -> dict:
    cdb = struct.pack(">BBxxxxxxxxIxB", 0x83, 0, len(data) if length is None else length, 0)
    if nexus is None:
        return c.cmd(cdb, data=data)
    c._tag += 1
    c.send({"op": "cmd", "tag": c._tag, "cdb": cdb, "data": data, "xfer": 0, "nexus": nexus})
    return c.wait(c._tag)


def copy_results(c: EmuClient, sa: int, list_id: int = 0, nexus=None) -> dict:
    cdb = struct.pack(">BBBxxxxxxxIxB", 0x84, sa, list_id, 1024, 0)
    if nexus is None:
        return c.cmd(cdb, xfer=1024)
    c._tag += 1
    c.send({"op": "cmd", "tag": c._tag, "cdb": cdb, "xfer": 1024, "nexus": nexus})
    return c.wait(c._tag)


def read(c: EmuClient, lba: int, blocks: int) -> bytes:
    return c.cmd(rw10(0x28, lba, blocks), xfer=512 * blocks)["data"]


def pattern(blocks: int, seed: int = 0) -> bytes:
    return b"".join(struct.pack(">I", seed + i) * 128 for i in range(blocks))


# -- copying --------------------------------------------------------------------------------------------------------
def test_copy_within_the_lu(disk):
    """libiscsi ExtendedCopy.Simple: 2048 blocks from the start to the end of the LU."""
    data = pattern(2048)
    disk.cmd(rw10(0x2A, 0, 2048), data=data)
    assert xcopy(disk, params([cscd()], [segment(2048, 0, BLOCKS - 2048)], usage=2))["status"] == GOOD
    assert read(disk, BLOCKS - 2048, 2048) == data
    assert xcopy(disk, b"", length=0)["status"] == GOOD                     # an empty list is not an error


def test_overlapping_copy_behaves_like_a_buffered_copy(disk):
    data = pattern(4096, seed=9)
    disk.cmd(rw10(0x2A, 0, 4096), data=data)
    assert xcopy(disk, params([cscd()], [segment(4096, 0, 1000)]))["status"] == GOOD
    assert read(disk, 1000, 4096) == data
    disk.cmd(rw10(0x2A, 0, 4096), data=data)
    assert xcopy(disk, params([cscd()], [segment(3000, 1000, 0)]))["status"] == GOOD
    assert read(disk, 0, 3000) == data[1000 * 512:4000 * 512]


def test_copy_of_a_hole_stays_sparse(workdir):
    with start(workdir) as c:
        c.cmd(rw10(0x2A, 8192, 4096), data=b"\x77" * 512 * 4096)
        assert xcopy(c, params([cscd()], [segment(4096, 0, 8192)]))["status"] == GOOD    # 0..4095 never written
        assert read(c, 8192, 4096) == bytes(512 * 4096)
        status = c.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, 8192, 24, 0, 0), xfer=24)["data"]
        assert status[20] == 1                                                          # deallocated


def test_copy_between_lus_named_in_xcopy_peers(workdir):
    peer = os.path.join(workdir, "peer.img")
    with open(peer, "wb") as f:
        f.write(pattern(64, seed=500))
        f.truncate(4 * MiB)
    peers = [{"naa": PEER_NAA.hex(), "path": peer}]
    with start(workdir, xcopy_peers=peers) as c:
        c.cmd(rw10(0x2A, 0, 16), data=pattern(16, seed=1))
        plist = params([cscd(), cscd(PEER_NAA)], [segment(16, 0, 100, src=0, dst=1),
                                                   segment(64, 0, 200, src=1, dst=0)])
        assert xcopy(c, plist)["status"] == GOOD
        assert read(c, 200, 64) == pattern(64, seed=500)
        unknown = params([cscd(bytes(16))], [segment(1, 0, 0)])
        s = expect(xcopy(c, unknown), COPY_ABORTED, 0x0D, 0x02)             # COPY TARGET DEVICE NOT REACHABLE
        assert s["format"] == 0x70
    with open(peer, "rb") as f:
        f.seek(100 * 512)
        assert f.read(16 * 512) == pattern(16, seed=1)
    c = EmuClient("emulators.vdisk")
    with c:
        reply = c.hello({"path": os.path.join(workdir, "x.img"), "size": MiB, "xcopy_peers": [{"path": peer}]})
        assert reply["op"] == "error" and "xcopy_peers" in reply["message"]


# -- refused parameter lists ----------------------------------------------------------------------------------------
def test_parameter_list_errors(disk):
    """libiscsi ExtendedCopy.ParamHdr/.DescrLimits/.DescrType/.ValidSegDescr."""
    good = params([cscd()], [segment(8, 0, 100)])
    for cut in (16 + 31, len(good) - 1):                                     # a truncated descriptor
        expect(xcopy(disk, good[:cut]), ILLEGAL_REQUEST, 0x1A, 0x00)
    op = copy_results(disk, 0x03)["data"]
    max_cscd, max_seg, max_list = struct.unpack_from(">HHI", op, 8)
    expect(xcopy(disk, params([cscd()] * (max_cscd + 1), [segment(8, 0, 100)])), ILLEGAL_REQUEST, 0x26, 0x06)
    expect(xcopy(disk, params([cscd()], [segment(8, 0, 100)] * (max_seg + 1))), ILLEGAL_REQUEST, 0x26, 0x08)
    assert (max_cscd + 1) * 32 + (max_seg + 1) * 28 > max_list
    expect(xcopy(disk, params([cscd()] * (max_cscd + 1), [segment(8, 0, 100)] * (max_seg + 1))),
           ILLEGAL_REQUEST, 0x1A, 0x00)                                      # over MAXIMUM DESCRIPTOR LIST LENGTH
    expect(xcopy(disk, params([cscd(code=0xE0)], [segment(8, 0, 100)])), ILLEGAL_REQUEST, 0x26, 0x07)
    stream = struct.pack(">BBHHH", 0x03, 0, 0x10, 0, 0) + bytes(12)
    expect(xcopy(disk, params([cscd()], [stream])), ILLEGAL_REQUEST, 0x26, 0x09)
    expect(xcopy(disk, params([cscd()], [segment(8, 0, 100, dst=1)])), COPY_ABORTED, 0x0D, 0x02)   # no CSCD 1
    expect(xcopy(disk, params([cscd()], [segment(2048, 0, BLOCKS - 1)])), COPY_ABORTED, 0x00, 0x00)
    expect(xcopy(disk, params([cscd()], [segment(8, 0, 0)], list_id=5, usage=3)), ILLEGAL_REQUEST, 0x26)
    # SPC-4: LU ID TYPE and NUL are obsolete, the designator alone names the LU (libiscsi ValidTgtDescr)
    assert xcopy(disk, params([cscd(byte1=0x80)], [segment(8, 0, 100)], usage=2))["status"] == GOOD


def test_copy_aborted_names_the_segment(disk):
    done = xcopy(disk, params([cscd()], [segment(8, 0, 0), segment(8, 0, 100, dst=3)]))
    assert done["status"] == CHECK
    sense = done["sense"]
    assert sense[2] & 0x0F == COPY_ABORTED and struct.unpack_from(">I", sense, 8)[0] == 1    # segment 1
    assert read(disk, 100, 8) == bytes(4096)                                 # refused before anything moved


def test_copy_to_a_read_only_lu_is_write_protected(workdir):
    path = os.path.join(workdir, "ro.img")
    with open(path, "wb") as f:
        f.truncate(MiB)
    client = EmuClient("emulators.vdisk")
    with client:
        assert client.hello({"path": path, "read_only": True}, {"naa": NAA})["op"] == "ready"
        expect(xcopy(client, params([cscd()], [segment(8, 0, 100)])), DATA_PROTECT, 0x27)


# -- RECEIVE COPY RESULTS, VPD --------------------------------------------------------------------------------------
def test_operating_parameters(disk):
    done = copy_results(disk, 0x03)
    assert done["status"] == GOOD
    data = done["data"]
    assert struct.unpack_from(">I", data)[0] == len(data) - 4
    snlid, max_cscd, max_seg, max_list, max_seg_len = struct.unpack_from(">BxxxHHII", data, 4)
    assert snlid & 1 and max_cscd >= 2 and max_seg >= 1 and max_list >= 2 * 32 + 28 and max_seg_len > 0
    assert data[37] == 9                                                     # DATA SEGMENT GRANULARITY: 512
    implemented = data[44:44 + data[43]]
    assert set(implemented) == {0x02, 0xE4}


def test_copy_status_is_held_per_nexus_until_read(disk):
    """libiscsi ReceiveCopyResults.CopyStatus; SPC-4: list identifiers belong to an I_T nexus, and a nexus loss
    or a reset discards what is held for it."""
    expect(copy_results(disk, 0x00, 1, nexus="a"), ILLEGAL_REQUEST, 0x24)
    disk.cmd(rw10(0x2A, 0, 8), data=pattern(8))
    assert xcopy(disk, params([cscd()], [segment(8, 0, 100)]), nexus="a")["status"] == GOOD
    expect(copy_results(disk, 0x00, 1, nexus="b"), ILLEGAL_REQUEST, 0x24)   # another nexus's list
    done = copy_results(disk, 0x00, 1, nexus="a")
    assert done["status"] == GOOD
    length, status, segments, units, count = struct.unpack(">IBHBI", done["data"])
    assert (length, status, segments, units, count) == (8, 0x01, 1, 0, 4096)
    expect(copy_results(disk, 0x00, 1, nexus="a"), ILLEGAL_REQUEST, 0x24)   # reported once, then forgotten
    # LIST ID USAGE 10b: nothing held
    assert xcopy(disk, params([cscd()], [segment(8, 0, 100)], usage=2), nexus="a")["status"] == GOOD
    expect(copy_results(disk, 0x00, 1, nexus="a"), ILLEGAL_REQUEST, 0x24)
    # a nexus loss, then a reset, discard held results
    assert xcopy(disk, params([cscd()], [segment(8, 0, 100)], list_id=2), nexus="a")["status"] == GOOD
    assert xcopy(disk, params([cscd()], [segment(8, 0, 100)], list_id=2), nexus="b")["status"] == GOOD
    disk.send({"op": "nexus_lost", "nexus": "a"})
    expect(copy_results(disk, 0x00, 2, nexus="a"), ILLEGAL_REQUEST, 0x24)
    disk.send({"op": "reset"})
    expect(copy_results(disk, 0x00, 2, nexus="b"), ILLEGAL_REQUEST, 0x24)
    # a failed copy is held as failed
    assert xcopy(disk, params([cscd()], [segment(8, 0, BLOCKS)], list_id=3), nexus="a")["status"] == CHECK
    expect(copy_results(disk, 0x00, 3, nexus="a"), ILLEGAL_REQUEST, 0x24)   # refused up front: nothing ran


def test_third_party_copy_vpd_and_3pc(disk):
    inq = disk.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96)["data"]
    assert inq[5] & 0x08                                                     # 3PC
    pages = disk.cmd(bytes((0x12, 1, 0, 0, 255, 0)), xfer=255)["data"]
    assert 0x8F in pages[4:]
    page = disk.cmd(bytes((0x12, 1, 0x8F, 4, 0, 0)), xfer=1024)["data"]
    assert page[1] == 0x8F and struct.unpack_from(">H", page, 2)[0] == len(page) - 4
    descriptors, pos = {}, 4
    while pos < len(page):
        kind, length = struct.unpack_from(">HH", page, pos)
        assert (4 + length) % 4 == 0
        descriptors[kind] = page[pos + 4:pos + 4 + length]
        pos += 4 + length
    assert {0x0001, 0x0004, 0x0008, 0x000C, 0x8001} <= set(descriptors)
    body = descriptors[0x0001]
    commands, i = {}, 1
    while i < 1 + body[0]:
        op, n = body[i], body[i + 1]
        commands[op] = set(body[i + 2:i + 2 + n])
        i += 2 + n
    assert commands == {0x83: {0x00}, 0x84: {0x00, 0x03}}


def test_abort_stops_a_copy(workdir):
    """An abort of a running EXTENDED COPY answers ``aborted`` (protocol §5) instead of running to the end."""
    with start(workdir, size=64 * MiB, workers=2) as c:
        plist = params([cscd()], [segment(65535, 0, 65536)] * 16)            # 16 x 32 MiB, over one another
        tag = c.submit(struct.pack(">BBxxxxxxxxIxB", 0x83, 0, len(plist), 0), data=plist)
        c.send({"op": "abort", "tag": tag})
        done = c.wait(tag, timeout=60)
        assert done.get("aborted") or done["status"] == GOOD
        assert c.cmd(bytes(6))["status"] == GOOD
