"""The vdisk emulator as a real subprocess, spoken to over the CBOR wire (docs/emulator-protocol.md).

Each test names the SBC-3 / SPC-4 clause it checks, after libiscsi's test names where one exists.
"""
from __future__ import annotations

import os
import struct
import tempfile

import pytest

from emulators.pyemu.client import EmuClient, parse_sense

GOOD, CHECK = 0x00, 0x02
ILLEGAL_REQUEST, DATA_PROTECT, MISCOMPARE = 0x5, 0x7, 0xE
MiB = 1 << 20


@pytest.fixture
def workdir():
    # /var/tmp, not /tmp: tmpfs refuses O_DIRECT, and SEEK_HOLE needs a real file system.
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vdisk-test-") as d:
        yield d


def start(workdir: str, **params) -> tuple[EmuClient, dict, str]:
    path = params.pop("path", os.path.join(workdir, "disk.img"))
    identity = params.pop("identity", {})
    params = {"path": path, "size": 8 * MiB, **params}
    client = EmuClient("emulators.vdisk")
    ready = client.hello(params, identity)
    assert ready["op"] == "ready", (ready, client.stderr_text())
    return client, ready, path


@pytest.fixture
def disk(workdir):
    client, ready, path = start(workdir)
    with client:
        yield client
    assert client.proc.returncode == 0


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def expect_sense(done: dict, key: int, asc: int, ascq: int) -> dict:
    assert done["status"] == CHECK, done
    s = parse_sense(done["sense"])
    assert (s["key"], s["asc"], s["ascq"]) == (key, asc, ascq), s
    return s


def pattern(blocks: int, bs: int = 512, seed: int = 0) -> bytes:
    return b"".join(struct.pack(">I", seed + i) * (bs // 4) for i in range(blocks))


def mode_sense10(c: EmuClient, page: int, pc: int = 0, sub: int = 0, dbd: bool = True) -> bytes:
    cdb = struct.pack(">BBBBxxxHB", 0x5A, 0x08 if dbd else 0, pc << 6 | page, sub, 4096, 0)
    done = c.cmd(cdb, xfer=4096)
    assert done["status"] == GOOD, done
    return done["data"]


def mode_select10(c: EmuClient, page: bytes) -> dict:
    param = struct.pack(">HBBxxH", 0, 0, 0, 0) + page
    return c.cmd(struct.pack(">BBxxxxxHB", 0x55, 0x10, len(param), 0), data=param)


def vpd(c: EmuClient, page: int) -> bytes:
    done = c.cmd(bytes((0x12, 1, page, 0x10, 0, 0)), xfer=4096)
    assert done["status"] == GOOD, done
    return done["data"]


# -- READ / WRITE ---------------------------------------------------------------------------------------------------
def test_handshake_reports_disk_identity_and_capacity(workdir):
    client, ready, _ = start(workdir, identity={"serial": "lu-7", "vendor": "ACME", "product": "Disk",
                                                "revision": "1.0"})
    with client:
        assert ready["version"] == 1 and ready["device_type"] == 0
        assert ready["capacity"] == {"block_size": 512, "blocks": 8 * MiB // 512}
        assert ready["identity"]["serial"] == "lu-7"
        assert "thin" in ready["features"]
        inq = client.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96)["data"]
        assert inq[0] == 0 and inq[2] == 0x06 and inq[7] & 0x02          # disk, SPC-4, CmdQue
        assert inq[8:16] == b"ACME    " and inq[16:32] == b"Disk".ljust(16) and inq[32:36] == b"1.0 "
        short = client.cmd(bytes((0x12, 0, 0, 0, 5, 0)), xfer=5)["data"]
        assert short == inq[:5]                                          # ALLOCATION LENGTH truncates
    assert client.proc.returncode == 0


@pytest.mark.parametrize("op_w,op_r,make", [(0x2A, 0x28, rw10), (0x8A, 0x88, rw16),
                                            (0xAA, 0xA8, lambda op, lba, n: struct.pack(">BBIIBB", op, 0, lba,
                                                                                        n, 0, 0))])
def test_write_then_read_back(disk, op_w, op_r, make):
    data = pattern(16, seed=op_w << 8)
    assert disk.cmd(make(op_w, 100, 16), data=data)["status"] == GOOD
    done = disk.cmd(make(op_r, 100, 16), xfer=len(data))
    assert done["status"] == GOOD and done["data"] == data


def test_read6_write6_zero_length_means_256_blocks(disk):
    data = pattern(256, seed=9)
    assert disk.cmd(bytes((0x0A, 0, 0, 8, 0, 0)), data=data)["status"] == GOOD
    done = disk.cmd(bytes((0x08, 0, 0, 8, 0, 0)), xfer=len(data))
    assert done["data"] == data


def test_read10_beyond_eol(disk):
    """SBC-3 5.11: LBA + length past the capacity → ILLEGAL REQUEST, LBA OUT OF RANGE (libiscsi Read10.BeyondEol)."""
    blocks = 8 * MiB // 512
    expect_sense(disk.cmd(rw10(0x28, blocks - 1, 2), xfer=1024), ILLEGAL_REQUEST, 0x21, 0x00)
    expect_sense(disk.cmd(rw10(0x28, 0xFFFFFFFF, 1), xfer=512), ILLEGAL_REQUEST, 0x21, 0x00)
    expect_sense(disk.cmd(rw16(0x88, 2**64 - 1, 2), xfer=1024), ILLEGAL_REQUEST, 0x21, 0x00)   # no overflow
    assert disk.cmd(rw10(0x28, blocks, 0))["status"] == GOOD                 # 0 blocks at the end: fine
    expect_sense(disk.cmd(rw10(0x28, blocks + 1, 0)), ILLEGAL_REQUEST, 0x21, 0x00)


def test_read10_rdprotect_is_invalid_field(disk):
    s = expect_sense(disk.cmd(rw10(0x28, 0, 1, flags=0x20), xfer=512), ILLEGAL_REQUEST, 0x24, 0x00)
    assert s["sks"][0] & 0xC0 == 0xC0 and s["sks"][2] == 1                 # SKSV, C/D, byte 1


def test_dpo_fua_accepted_and_reported(disk):
    """libiscsi Read10.DpoFua: DPOFUA set in MODE SENSE ⇒ DPO/FUA accepted and in the CDB usage data."""
    assert mode_sense10(disk, 0x3F)[3] & 0x10
    assert disk.cmd(rw10(0x28, 0, 1, flags=0x18), xfer=512)["status"] == GOOD
    assert disk.cmd(rw10(0x2A, 0, 1, flags=0x08), data=bytes(512))["status"] == GOOD
    one = disk.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0x01, 0x28, 0, 4096, 0), xfer=4096)["data"]
    assert one[1] & 0x07 == 3 and one[4] == 0x28 and one[5] & 0x18 == 0x18


def test_short_data_out_writes_only_whole_blocks(disk):
    """libiscsi iSCSI.Write10.Residuals: EDTL < transfer length writes only what arrived."""
    disk.cmd(rw10(0x2A, 0, 2), data=b"a" * 1024)
    assert disk.cmd(rw10(0x2A, 0, 2), data=b"b" * 512)["status"] == GOOD
    assert disk.cmd(rw10(0x28, 0, 2), xfer=1024)["data"] == b"b" * 512 + b"a" * 512


def test_write_to_read_only_is_write_protected(workdir):
    path = os.path.join(workdir, "ro.img")
    with open(path, "wb") as f:
        f.write(b"x" * MiB)
    client, ready, _ = start(workdir, path=path, size=None, read_only=True)
    with client:
        assert "read_only" in ready["features"]
        expect_sense(client.cmd(rw10(0x2A, 0, 1), data=bytes(512)), DATA_PROTECT, 0x27, 0x00)
        expect_sense(client.cmd(struct.pack(">BBIBHB", 0x41, 0, 0, 0, 1, 0), data=bytes(512)),
                     DATA_PROTECT, 0x27, 0x00)
        assert mode_sense10(client, 0x08)[3] & 0x80                        # WP
        assert client.cmd(rw10(0x28, 0, 1), xfer=512)["data"] == b"x" * 512
    with open(path, "rb") as f:
        assert f.read() == b"x" * MiB


# -- provisioning ---------------------------------------------------------------------------------------------------
def lba_status(c: EmuClient, lba: int) -> tuple[int, int, int]:
    done = c.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, lba, 24, 0, 0), xfer=24)
    assert done["status"] == GOOD, done
    return struct.unpack_from(">QIB", done["data"], 8)


def test_unmap_punches_a_hole(workdir):
    client, _, path = start(workdir)
    with client:
        client.cmd(rw10(0x2A, 0, 64), data=pattern(64))
        client.cmd(bytes((0x35,)) + bytes(9))
        assert lba_status(client, 16) == (16, 48, 0)                      # mapped to the end of the data
        param = struct.pack(">HHxxxx", 22, 16) + struct.pack(">QIxxxx", 16, 16)
        assert client.cmd(struct.pack(">BxxxxxxHB", 0x42, len(param), 0), data=param)["status"] == GOOD
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, 16 * 512, os.SEEK_HOLE) == 16 * 512
            assert os.lseek(fd, 16 * 512, os.SEEK_DATA) == 32 * 512
        finally:
            os.close(fd)
        lba, count, status = lba_status(client, 16)
        assert (lba, count, status) == (16, 16, 1)                        # deallocated
        assert client.cmd(rw10(0x28, 16, 16), xfer=8192)["data"] == bytes(8192)   # LBPRZ
        assert client.cmd(rw10(0x28, 0, 16), xfer=8192)["data"] == pattern(16)


def test_unmap_checks_its_parameter_list(disk):
    blocks = 8 * MiB // 512
    param = struct.pack(">HHxxxx", 22, 16) + struct.pack(">QIxxxx", blocks - 1, 2)
    expect_sense(disk.cmd(struct.pack(">BxxxxxxHB", 0x42, len(param), 0), data=param),
                 ILLEGAL_REQUEST, 0x21, 0x00)
    expect_sense(disk.cmd(struct.pack(">BxxxxxxHB", 0x42, 4, 0), data=bytes(4)), ILLEGAL_REQUEST, 0x1A, 0x00)
    assert disk.cmd(struct.pack(">BxxxxxxHB", 0x42, 0, 0))["status"] == GOOD


def test_provisioning_vpd_and_capacity16(workdir):
    disk, _, path = start(workdir)
    with disk:
        check_provisioning(disk, os.stat(path).st_blksize)


def check_provisioning(disk: EmuClient, fs_block: int) -> None:
    cap = disk.cmd(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), xfer=32)["data"]
    last, bs, _, exp, lbp = struct.unpack(">QIBBH", cap[:16])
    assert (last, bs) == (8 * MiB // 512 - 1, 512) and lbp & 0xC000 == 0xC000   # LBPME, LBPRZ
    assert exp == 0                                  # physical_block_size defaults to the logical block size
    b2 = vpd(disk, 0xB2)
    assert b2[5] & 0xE4 == 0xE4 and b2[6] & 0x07 == 2                        # LBPU LBPWS LBPWS10 LBPRZ; thin
    b0 = vpd(disk, 0xB0)
    assert struct.unpack_from(">I", b0, 20)[0] > 0 and struct.unpack_from(">Q", b0, 36)[0] > 0
    # a hole is punched in whole file-system blocks: that is the optimal unmap granularity
    assert struct.unpack_from(">I", b0, 28)[0] == max(fs_block, 512) // 512


def test_get_lba_status_beyond_eol(disk):
    expect_sense(disk.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, 8 * MiB // 512, 24, 0, 0), xfer=24),
                 ILLEGAL_REQUEST, 0x21, 0x00)


def test_write_same(workdir):
    client, _, path = start(workdir)
    with client:
        block = b"WS" * 256
        assert client.cmd(struct.pack(">BBIBHB", 0x41, 0, 8, 0, 24, 0), data=block)["status"] == GOOD
        assert client.cmd(rw10(0x28, 8, 24), xfer=24 * 512)["data"] == block * 24
        # UNMAP bit with a zero block deallocates
        ws16 = struct.pack(">BBQIBB", 0x93, 0x08, 16, 16, 0, 0)
        assert client.cmd(ws16, data=bytes(512))["status"] == GOOD
        assert lba_status(client, 16)[2] == 1
        assert client.cmd(rw10(0x28, 8, 24), xfer=24 * 512)["data"] == block * 8 + bytes(16 * 512)
        # NDOB: no data-out, zeros
        assert client.cmd(struct.pack(">BBQIBB", 0x93, 0x01, 8, 8, 0, 0))["status"] == GOOD
        assert client.cmd(rw10(0x28, 8, 8), xfer=4096)["data"] == bytes(4096)
        # beyond the end, and 0 blocks past the end
        blocks = 8 * MiB // 512
        expect_sense(client.cmd(struct.pack(">BBIBHB", 0x41, 0, blocks - 1, 0, 2, 0), data=block),
                     ILLEGAL_REQUEST, 0x21, 0x00)
        expect_sense(client.cmd(struct.pack(">BBIBHB", 0x41, 0, blocks + 1, 0, 0, 0), data=block),
                     ILLEGAL_REQUEST, 0x21, 0x00)
        # 0 blocks: to the end of the LU
        assert client.cmd(struct.pack(">BBIBHB", 0x41, 0, blocks - 4, 0, 0, 0), data=block)["status"] == GOOD
        assert client.cmd(rw10(0x28, blocks - 4, 4), xfer=2048)["data"] == block * 4


# -- COMPARE AND WRITE, VERIFY --------------------------------------------------------------------------------------
def caw(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQxxxBBB", 0x89, 0, lba, blocks, 0, 0)


def test_compare_and_write(disk):
    old, new = pattern(2, seed=1), pattern(2, seed=2)
    disk.cmd(rw10(0x2A, 40, 2), data=old)
    assert disk.cmd(caw(40, 2), data=old + new)["status"] == GOOD
    assert disk.cmd(rw10(0x28, 40, 2), xfer=1024)["data"] == new
    wrong = bytearray(new)
    wrong[700] ^= 0xFF
    s = expect_sense(disk.cmd(caw(40, 2), data=bytes(wrong) + old), MISCOMPARE, 0x1D, 0x00)
    assert s["info"] == 700                                                   # offset of the first difference
    assert disk.cmd(rw10(0x28, 40, 2), xfer=1024)["data"] == new              # nothing written


def test_verify_bytchk(disk):
    data = pattern(4, seed=5)
    disk.cmd(rw10(0x2A, 60, 4), data=data)
    assert disk.cmd(rw10(0x2F, 60, 4, flags=0x02), data=data)["status"] == GOOD
    bad = bytearray(data)
    bad[1500] ^= 1
    s = expect_sense(disk.cmd(rw10(0x2F, 60, 4, flags=0x02), data=bytes(bad)), MISCOMPARE, 0x1D, 0x00)
    assert s["info"] == 1500
    assert disk.cmd(rw10(0x2F, 60, 4), data=None)["status"] == GOOD         # BYTCHK 0: range check only
    expect_sense(disk.cmd(rw10(0x2F, 8 * MiB // 512, 1)), ILLEGAL_REQUEST, 0x21, 0x00)


# -- mode pages and sense format ------------------------------------------------------------------------------------
def test_mode_sense_caching_page(disk):
    page = mode_sense10(disk, 0x08)[8:]
    assert page[0] == 0x08 and page[1] == 0x12 and page[2] & 0x04            # WCE: write-back
    changeable = mode_sense10(disk, 0x08, pc=1)[8:]
    assert changeable[2] == 0x04
    expect_sense(disk.cmd(struct.pack(">BBBBxxxHB", 0x5A, 0x08, 0xC8, 0, 255, 0), xfer=255),
                 ILLEGAL_REQUEST, 0x39, 0x00)                                   # saved values
    # WCE off, then a non-changeable bit → INVALID FIELD IN PARAMETER LIST
    assert mode_select10(disk, bytes((0x08, 0x12)) + bytes(18))["status"] == GOOD
    assert not mode_sense10(disk, 0x08)[8 + 2] & 0x04
    expect_sense(mode_select10(disk, bytes((0x08, 0x12, 0x01)) + bytes(17)), ILLEGAL_REQUEST, 0x26, 0x00)
    # six-byte form with block descriptor
    six = disk.cmd(bytes((0x1A, 0, 0x3F, 0, 255, 0)), xfer=255)["data"]
    assert six[3] == 8 and struct.unpack_from(">I", six, 4)[0] == 8 * MiB // 512 and six[9:12] == b"\0\2\0"
    assert six[0] + 1 == len(six)


def test_write_through_reports_wce_off(workdir):
    client, ready, _ = start(workdir, write_through=True)
    with client:
        assert "write_back" not in ready["features"]
        assert not mode_sense10(client, 0x08)[8 + 2] & 0x04
        assert client.cmd(rw10(0x2A, 0, 1), data=b"z" * 512)["status"] == GOOD


def test_d_sense_switches_sense_format(disk):
    """SPC-4 7.5.8: D_SENSE=1 → descriptor-format sense (0x72)."""
    bad_read = rw10(0x28, 0xFFFFFFF0, 1)
    assert parse_sense(disk.cmd(bad_read, xfer=512)["sense"])["format"] == 0x70
    control = mode_sense10(disk, 0x0A)[8:]
    assert control[0] == 0x0A and mode_sense10(disk, 0x0A, pc=1)[8 + 2] & 0x04
    assert mode_select10(disk, control[:2] + bytes((control[2] | 0x04,)) + control[3:])["status"] == GOOD
    event = disk.recv()                                 # the change is announced to the core
    assert event["op"] == "event" and event["event"] == "mode_changed" and event.get("tag") is not None
    s = expect_sense(disk.cmd(bad_read, xfer=512), ILLEGAL_REQUEST, 0x21, 0x00)
    assert s["format"] == 0x72
    assert mode_select10(disk, control)["status"] == GOOD
    disk.recv()
    assert parse_sense(disk.cmd(bad_read, xfer=512)["sense"])["format"] == 0x70


def test_request_sense_reports_no_sense(disk):
    done = disk.cmd(bytes((0x03, 0, 0, 0, 18, 0)), xfer=18)
    assert done["status"] == GOOD and parse_sense(done["data"])["key"] == 0


# -- VPD, capacity, opcodes ------------------------------------------------------------------------------------------
def test_vpd_pages_listed_and_present(workdir):
    naa = bytes.fromhex("6001405abcdef0123456789abcdef012")
    client, _, _ = start(workdir, identity={"serial": "SER-1", "naa": naa})
    with client:
        listed = list(vpd(client, 0x00)[4:])
        for page in (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2):
            assert page in listed
            assert vpd(client, page)[1] == page
        assert vpd(client, 0x80)[4:] == b"SER-1"
        ids = vpd(client, 0x83)
        assert ids[4:8] == bytes((0x01, 0x03, 0, 16)) and ids[8:24] == naa
        assert vpd(client, 0xB1)[4:6] == b"\x00\x01"                           # non-rotating
        expect_sense(client.cmd(bytes((0x12, 1, 0x42, 0, 255, 0)), xfer=255), ILLEGAL_REQUEST, 0x24, 0x00)
        expect_sense(client.cmd(bytes((0x12, 0, 0x80, 0, 255, 0)), xfer=255), ILLEGAL_REQUEST, 0x24, 0x00)


def test_derived_naa_is_stable_ieee_extended(workdir):
    first, _, path = start(workdir, identity={"serial": "abc"})
    with first:
        a = vpd(first, 0x83)[8:24]
    second, _, _ = start(workdir, path=path, identity={"serial": "abc"})
    with second:
        assert vpd(second, 0x83)[8:24] == a
    assert a[0] >> 4 == 6


def test_read_capacity10(disk):
    done = disk.cmd(bytes((0x25,)) + bytes(9), xfer=8)
    assert struct.unpack(">II", done["data"]) == (8 * MiB // 512 - 1, 512)


def test_report_supported_opcodes(disk):
    done = disk.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0, 0, 0, 65535, 0), xfer=65535)
    data = done["data"]
    length = struct.unpack_from(">I", data)[0]
    rows = [struct.unpack_from(">BxHxBH", data, 4 + i) for i in range(0, length, 8)]
    ops = {(op, sa if flags & 1 else None) for op, sa, flags, _ in rows}
    assert {(0x28, None), (0x2A, None), (0x89, None), (0x42, None), (0x9E, 0x10), (0x9E, 0x12)} <= ops
    with_timeouts = disk.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0x80, 0, 0, 65535, 0), xfer=65535)["data"]
    assert struct.unpack_from(">I", with_timeouts)[0] == len(rows) * 20
    assert struct.unpack_from(">H", with_timeouts, 12)[0] == 0x0A
    # one command with service actions: option 1 refused, option 2 answered
    expect_sense(disk.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 1, 0x9E, 0x10, 4096, 0), xfer=4096),
                 ILLEGAL_REQUEST, 0x24, 0x00)
    one = disk.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 2, 0x9E, 0x10, 4096, 0), xfer=4096)["data"]
    assert one[1] & 7 == 3 and one[4:6] == b"\x9e\x10"


def test_unknown_opcode_and_sync_cache(disk):
    expect_sense(disk.cmd(bytes((0xC5,)) + bytes(9)), ILLEGAL_REQUEST, 0x20, 0x00)
    assert disk.cmd(bytes((0x35,)) + bytes(9))["status"] == GOOD
    assert disk.cmd(bytes((0x91,)) + bytes(15))["status"] == GOOD
    assert disk.cmd(bytes((0x00,)) + bytes(5))["status"] == GOOD
    assert disk.cmd(bytes((0x1B, 0, 0, 0, 1, 0)))["status"] == GOOD


# -- variants: block size, O_DIRECT, lifetime ------------------------------------------------------------------------
def test_4096_byte_blocks(workdir):
    client, ready, _ = start(workdir, block_size=4096)
    with client:
        assert ready["capacity"] == {"block_size": 4096, "blocks": 8 * MiB // 4096}
        data = pattern(3, 4096, seed=77)
        assert client.cmd(rw10(0x2A, 5, 3), data=data)["status"] == GOOD
        assert client.cmd(rw10(0x28, 5, 3), xfer=len(data))["data"] == data
        cap = client.cmd(bytes((0x25,)) + bytes(9), xfer=8)["data"]
        assert struct.unpack(">II", cap) == (8 * MiB // 4096 - 1, 4096)
        expect_sense(client.cmd(rw10(0x28, 8 * MiB // 4096, 1), xfer=4096), ILLEGAL_REQUEST, 0x21, 0x00)


def o_direct_refused(directory: str) -> str | None:
    probe = os.path.join(directory, "probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT)
    except OSError as exc:
        return f"{directory} refuses O_DIRECT: {os.strerror(exc.errno)}"
    os.close(fd)
    return None


@pytest.mark.parametrize("block_size", [512, 4096])
def test_o_direct(workdir, block_size):
    why = o_direct_refused(workdir)
    if why:
        pytest.skip(why)
    client, ready, path = start(workdir, o_direct=True, block_size=block_size)
    with client:
        for lba, blocks in ((0, 1), (3, 7), (100, 256)):
            data = pattern(blocks, block_size, seed=lba)
            assert client.cmd(rw10(0x2A, lba, blocks), data=data)["status"] == GOOD
            assert client.cmd(rw10(0x2A, lba, blocks, flags=0x08), data=data)["status"] == GOOD   # FUA
            done = client.cmd(rw10(0x28, lba, blocks), xfer=len(data))
            assert done["status"] == GOOD and done["data"] == data
    assert client.proc.returncode == 0
    with open(path, "rb") as f:
        f.seek(100 * block_size)
        assert f.read(256 * block_size) == pattern(256, block_size, seed=100)


def test_data_is_on_disk_after_end_of_input(workdir):
    client, _, path = start(workdir)
    data = pattern(8, seed=3)
    tags = [client.submit(rw10(0x2A, 8 * i, 8), data=data) for i in range(4)]
    assert client.close() == 0                          # end of input: finish, flush, exit 0
    answered = {client.recv()["tag"] for _ in tags}
    assert answered == set(tags)
    with open(path, "rb") as f:
        assert f.read(4 * len(data)) == data * 4


def test_bad_params_answer_error(workdir):
    with EmuClient("emulators.vdisk") as client:
        reply = client.hello({"size": MiB})                                   # no path
        assert reply["op"] == "error" and "path" in reply["message"]
        assert client.close() == 1
    with EmuClient("emulators.vdisk") as client:
        reply = client.hello({"path": os.path.join(workdir, "x.img"), "size": MiB, "block_size": 1000})
        assert reply["op"] == "error"
        assert client.close() == 1


def test_missing_file_without_create(workdir):
    with EmuClient("emulators.vdisk") as client:
        reply = client.hello({"path": os.path.join(workdir, "nope.img"), "size": MiB, "create": False})
        assert reply["op"] == "error" and "nope.img" in reply["message"]
        assert client.close() == 1


@pytest.fixture
def loop_device(workdir):
    """A 16 MiB loop device, or a skip saying why there is none."""
    import shutil
    import subprocess
    image = os.path.join(workdir, "loop.img")
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    made = subprocess.run(["losetup", "-f", "--show", image], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a loop device: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.mark.parametrize("o_direct", [False, True])
def test_block_device(workdir, loop_device, o_direct):
    """Size from BLKGETSIZE64; no thin provisioning on a block device (UNMAP is not offered)."""
    client, ready, _ = start(workdir, path=loop_device, size=None, o_direct=o_direct)
    with client:
        assert ready["capacity"] == {"block_size": 512, "blocks": 16 * MiB // 512}
        assert "thin" not in ready["features"]
        data = pattern(64, seed=11)
        assert client.cmd(rw10(0x2A, 1000, 64), data=data)["status"] == GOOD
        assert client.cmd(rw10(0x28, 1000, 64), xfer=len(data))["data"] == data
        expect_sense(client.cmd(struct.pack(">BxxxxxxHB", 0x42, 24, 0), data=bytes(24)), ILLEGAL_REQUEST,
                     0x20, 0x00)
        assert lba_status(client, 0) == (0, 16 * MiB // 512, 0)
    assert client.proc.returncode == 0


def test_report_supported_opcodes_one_command_for_every_command(disk):
    """libiscsi ReportSupportedOpcodes.OneCommand: each listed command answers the one-command form."""
    data = disk.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0, 0, 0, 65535, 0), xfer=65535)["data"]
    rows = [struct.unpack_from(">BxHxBH", data, 4 + i) for i in range(0, struct.unpack_from(">I", data)[0], 8)]
    for op, sa, flags, cdb_len in rows:
        has_sa = flags & 1
        plain = disk.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 1, op, sa, 65535, 0), xfer=65535)
        by_sa = disk.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 2, op, sa, 65535, 0), xfer=65535)
        good, bad = (by_sa, plain) if has_sa else (plain, by_sa)
        expect_sense(bad, ILLEGAL_REQUEST, 0x24, 0x00)
        one = good["data"]
        assert one[1] & 7 == 3 and struct.unpack_from(">H", one, 2)[0] == cdb_len and one[4] == op, hex(op)
