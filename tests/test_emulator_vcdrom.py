"""The vcdrom emulator (MMC-6 CD/DVD-ROM drive) over the CBOR wire, then through the whole stack. Each test names
the MMC-6 / SPC-4 behaviour it checks, which is what Linux's sr and cdrom drivers read (../shared/kvm-initiator/
README.md, CD-ROM section). The discs are ISO images made by genisoimage, read back byte for byte."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from emulators.pyemu.client import ROOT, EmuClient, parse_sense
from trioscsi.emu.checker import Options, run_checks
from trioscsi.iscsi.initiator import Initiator
from trioscsi.scsi.opcodes import Direction, lookup

from test_stack import running_server, session

GOOD, CHECK = 0x00, 0x02
NOT_READY, ILLEGAL_REQUEST, UNIT_ATTENTION, DATA_PROTECT = 0x2, 0x5, 0x6, 0x7
EJECT, LOAD = bytes((0x1B, 0, 0, 0, 0x02, 0)), bytes((0x1B, 0, 0, 0, 0x03, 0))
PREVENT, ALLOW = bytes((0x1E, 0, 0, 0, 1, 0)), bytes((0x1E, 0, 0, 0, 0, 0))
TUR = bytes(6)


# -- the disc -------------------------------------------------------------------------------------------------------
def make_iso(directory: str, name: str = "disc.iso", extra: int = 0) -> str:
    """An ISO 9660 image (Rock Ridge, Joliet) of a few files of random bytes, made with genisoimage."""
    tool = shutil.which("genisoimage")
    assert tool, "genisoimage is missing: apt-get install genisoimage (scripts/test installs it)"
    tree, path = os.path.join(directory, name + ".d"), os.path.join(directory, name)
    os.makedirs(os.path.join(tree, "sub"))
    for file, content in (("random.bin", os.urandom(600_000 + extra)), ("sub/hello.txt", b"hello, vcdrom\n")):
        with open(os.path.join(tree, file), "wb") as f:
            f.write(content)
    subprocess.run([tool, "-quiet", "-r", "-J", "-V", "VCDROM_TEST", "-o", path, tree], check=True)
    return path


@pytest.fixture(scope="module")
def discs():
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vcdrom-test-") as d:
        yield d, make_iso(d, "one.iso"), make_iso(d, "two.iso", extra=100_000)


@pytest.fixture
def iso(discs):
    return discs[1]


# -- the client -----------------------------------------------------------------------------------------------------
class Drive:
    """A vcdrom subprocess; ``events`` collects the event frames seen so far (in order, with dones between)."""

    def __init__(self, params: dict | None = None, identity: dict | None = None) -> None:
        self.c = EmuClient("emulators.vcdrom")
        self.ready = self.c.hello(params or {}, identity or {})
        assert self.ready["op"] == "ready", (self.ready, self.c.stderr_text())
        self.events: list[dict] = []
        self._tag = 0

    def cmd(self, cdb: bytes, data: bytes | None = None, xfer: int = 0, nexus: str | None = None) -> dict:
        self._tag += 1
        msg: dict[str, Any] = {"op": "cmd", "tag": self._tag, "cdb": bytes(cdb), "xfer": xfer, "data": data or b""}
        self.c.send({**msg, "nexus": nexus} if nexus is not None else msg)
        return self.wait(self._tag)

    def wait(self, tag: int) -> dict:
        done = self.c.wait(tag)
        keep = []
        for m in self.c.early:
            (self.events if m.get("op") == "event" else keep).append(m)
        self.c.early[:] = keep
        return done

    def data(self, cdb: bytes, xfer: int = 255, nexus: str | None = None) -> bytes:
        done = self.cmd(cdb, xfer=xfer, nexus=nexus)
        assert done["status"] == GOOD, (cdb.hex(), done)
        return bytes(done.get("data") or b"")

    def control(self, msg: dict, tag: int = 90_000) -> dict:
        self.c.send({**msg, "tag": tag})
        return self.wait(tag)

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]

    def close(self) -> int:
        return self.c.close()


@pytest.fixture
def drive(iso):
    d = Drive({"path": iso})
    yield d
    assert d.close() == 0


def expect_sense(done: dict, key: int, asc: int, ascq: int) -> dict:
    assert done["status"] == CHECK, done
    s = parse_sense(done["sense"])
    assert (s["key"], s["asc"], s["ascq"]) == (key, asc, ascq), s
    return s


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def capacity(d: Drive) -> tuple[int, int]:
    return struct.unpack(">II", d.data(bytes((0x25,)) + bytes(9), 8))


def read12(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIIBB", 0xA8, 0, lba, blocks, 0, 0)


def toc(fmt: int = 0, track: int = 0, as_msf: bool = False, alloc: int = 255, control: int = 0) -> bytes:
    return struct.pack(">BBBxxxBHB", 0x43, 0x02 if as_msf else 0, fmt, track, alloc, control)


def get_config(rt: int = 0, start: int = 0, alloc: int = 1024) -> bytes:
    return struct.pack(">BBHxxxHB", 0x46, rt, start, alloc, 0)


def gesn(classes: int = 0x10, polled: bool = True, alloc: int = 8) -> bytes:
    return struct.pack(">BBxxBxxHB", 0x4A, 1 if polled else 0, classes, alloc, 0)


def media_event(d: Drive, nexus: str | None = None) -> tuple[int, int]:
    """(event code, media status) of a polled media-class GET EVENT STATUS NOTIFICATION."""
    out = d.data(gesn(), 8, nexus)
    assert struct.unpack_from(">H", out)[0] == 6 and out[2] == 4 and out[3] == 0x16, out.hex()
    return out[4] & 0x0F, out[5]


def features(data: bytes) -> dict[int, bytes]:
    """GET CONFIGURATION answer as {feature code: descriptor}, checking the lengths add up and the order."""
    length, profile = struct.unpack_from(">I2xH", data)
    assert length + 4 == len(data), (length, len(data))
    out, pos = {}, 8
    while pos < len(data):
        code, add = struct.unpack_from(">H", data, pos)[0], data[pos + 3]
        assert not out or code > max(out), "features not in ascending order"
        out[code] = data[pos:pos + 4 + add]
        pos += 4 + add
    assert pos == len(data)
    return out


# -- identity -------------------------------------------------------------------------------------------------------
def test_inquiry_is_a_removable_mmc6_drive(iso):
    d = Drive({"path": iso}, {"serial": "CD-0001", "vendor": "ACME"})
    std = d.data(bytes((0x12, 0, 0, 0, 96, 0)), 96)
    assert std[0] == 0x05 and std[1] & 0x80, "peripheral type 5 (CD/DVD), RMB=1"
    assert std[8:16] == b"ACME    " and std[16:32] == b"VIRTUAL-CDROM   "
    versions = struct.unpack_from(">8H", std, 58)
    assert 0x04E0 in versions and 0x0460 in versions, "MMC-6 and SPC-4 version descriptors"
    assert d.data(bytes((0x12, 1, 0x00, 0, 255, 0)))[4:] == bytes((0x00, 0x80, 0x83))
    assert d.data(bytes((0x12, 1, 0x80, 0, 255, 0)))[4:] == b"CD-0001"
    rsoc = bytes((0xA3, 0x0C, 0x01, 0x43, 0, 0, 0, 0, 0, 64, 0, 0))          # one command: READ TOC
    assert d.data(rsoc, 64)[1] & 0x07 == 3 and d.data(rsoc, 64)[4:6] == bytes((0x43, 0x02))
    assert d.data(bytes((0xA3, 0x0C, 0x01, 0xBE, 0, 0, 0, 0, 0, 64, 0, 0)), 64)[1] & 0x07 == 1, "no READ CD"
    assert d.ready["device_type"] == 5 and "removable" in d.ready["features"]
    assert d.ready["capacity"] == {"block_size": 2048, "blocks": os.path.getsize(iso) // 2048}
    assert d.ready["medium"] == {"path": iso, "object": 0, "loaded": True, "block_size": 2048}
    assert d.close() == 0


# -- reading --------------------------------------------------------------------------------------------------------
def test_iso_reads_back_byte_identical(drive, iso):
    image = Path(iso).read_bytes()
    blocks = len(image) // 2048
    assert len(image) % 2048 == 0 and blocks > 300 and capacity(drive) == (blocks - 1, 2048)
    got, lba, step = bytearray(), 0, 1
    while lba < blocks:                         # READ(10) and READ(12) alternately, in growing pieces
        n = min(step, blocks - lba)
        got += drive.data(read10(lba, n) if step % 2 else read12(lba, n), n * 2048)
        lba, step = lba + n, step + 1
    assert bytes(got) == image
    assert image[16 * 2048 + 1:16 * 2048 + 6] == b"CD001"         # it is an ISO 9660 volume


def test_read_out_of_range_and_length_zero(drive, iso):
    blocks = os.path.getsize(iso) // 2048
    expect_sense(drive.cmd(read10(blocks, 1), xfer=2048), ILLEGAL_REQUEST, 0x21, 0x00)
    expect_sense(drive.cmd(read10(blocks - 1, 2), xfer=4096), ILLEGAL_REQUEST, 0x21, 0x00)
    expect_sense(drive.cmd(read12(0xFFFFFFFF, 2), xfer=4096), ILLEGAL_REQUEST, 0x21, 0x00)   # no wrap-around
    done = drive.cmd(read10(0, 0))
    assert done["status"] == GOOD and not done.get("data")
    expect_sense(drive.cmd(read10(0, blocks + 1)), ILLEGAL_REQUEST, 0x21, 0x00)
    expect_sense(drive.cmd(bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0)), xfer=8), ILLEGAL_REQUEST, 0x24, 0x00)


def test_profile_follows_the_size_and_reads_are_limited(discs):
    big, small = os.path.join(discs[0], "big.img"), discs[1]
    with open(big, "wb") as f:
        f.truncate(1 << 30)                      # 524288 blocks, sparse: more than a CD holds
    d = Drive({"path": big})
    assert d.data(get_config(), 8)[6:8] == b"\x00\x10", "auto: a DVD-ROM beyond 449,850 blocks"
    feats = features(d.data(get_config(), 1024))
    assert feats[0x001F][2] & 1 and not feats[0x001E][2] & 1, "DVD Read current, CD Read not"
    assert struct.unpack_from(">IH", feats[0x0010], 4) == (2048, 16), "Random Readable: 2048 B, blocking 16"
    assert d.data(bytes((0x52, 1, 0, 0, 0, 1, 0, 0, 36, 0)), 36)[23] == 16, "track blocking factor 16"
    expect_sense(d.cmd(toc(fmt=2)), ILLEGAL_REQUEST, 0x24, 0x00)      # no raw TOC on a DVD
    assert d.data(read12(1000, 4096), 4096 * 2048) == bytes(4096 * 2048), "8 MiB in one READ"
    expect_sense(d.cmd(read12(0, 4097), xfer=4097 * 2048), ILLEGAL_REQUEST, 0x24, 0x00)
    assert d.close() == 0
    for path, choice, profile in ((big, "cd", b"\x00\x08"), (small, "dvd", b"\x00\x10")):
        d = Drive({"path": path, "profile": choice})
        assert d.data(get_config(), 8)[6:8] == profile
        assert d.close() == 0


def test_writes_are_refused_as_write_protected(drive):
    block = os.urandom(2048)
    expect_sense(drive.cmd(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), block), DATA_PROTECT, 0x27, 0x00)
    expect_sense(drive.cmd(struct.pack(">BBIIBB", 0xAA, 0, 0, 1, 0, 0), block), DATA_PROTECT, 0x27, 0x00)
    expect_sense(drive.cmd(struct.pack(">BBIBHB", 0x2E, 0, 0, 0, 1, 0), block), DATA_PROTECT, 0x27, 0x00)
    for opcode in (0xA1, 0x04, 0x5B, 0x35, 0xFF):      # BLANK, FORMAT UNIT, CLOSE TRACK, SYNC CACHE: not a writer
        expect_sense(drive.cmd(bytes((opcode,)) + bytes(11)), ILLEGAL_REQUEST, 0x20, 0x00)
    assert drive.cmd(TUR)["status"] == GOOD


# -- the disc's layout ----------------------------------------------------------------------------------------------
def test_read_toc_formats(drive, iso):
    blocks = os.path.getsize(iso) // 2048
    out = drive.data(toc())
    assert out == struct.pack(">HBB", 18, 1, 1) + bytes((0, 0x14, 1, 0)) + struct.pack(">I", 0) \
        + bytes((0, 0x14, 0xAA, 0)) + struct.pack(">I", blocks)
    frames = blocks + 150
    lead_out = bytes((0, frames // 4500, frames // 75 % 60, frames % 75))
    out = drive.data(toc(as_msf=True, track=1))
    assert out[8:12] == bytes((0, 0, 2, 0)) and out[16:20] == lead_out, "track 1 at 00:02:00, lead-out MSF"
    assert drive.data(toc(track=0xAA)) == struct.pack(">HBB", 10, 1, 1) + bytes((0, 0x14, 0xAA, 0)) \
        + struct.pack(">I", blocks)
    expect_sense(drive.cmd(toc(track=2), xfer=255), ILLEGAL_REQUEST, 0x24, 0x00)
    session = struct.pack(">HBB", 10, 1, 1) + bytes((0, 0x14, 1, 0, 0, 0, 0, 0))
    assert drive.data(toc(fmt=1)) == session
    assert drive.data(toc(alloc=12, control=0x40), 12) == session, "format 1 in the control byte (Linux sr_cd_check)"
    raw = drive.data(toc(fmt=2))
    assert struct.unpack_from(">H", raw)[0] == len(raw) - 2 == 2 + 4 * 11
    points = {raw[4 + 11 * i + 3]: raw[4 + 11 * i + 8:4 + 11 * i + 11] for i in range(4)}
    assert points == {0xA0: bytes((1, 0, 0)), 0xA1: bytes((1, 0, 0)), 0xA2: lead_out[1:], 1: bytes((0, 2, 0))}
    expect_sense(drive.cmd(toc(fmt=4), xfer=255), ILLEGAL_REQUEST, 0x24, 0x00)      # ATIP: not a recordable disc
    assert drive.data(toc(alloc=4), 4) == struct.pack(">HBB", 18, 1, 1), "allocation length cuts, length stays"


def test_disc_and_track_information_give_linux_the_last_block(drive, iso):
    blocks = os.path.getsize(iso) // 2048
    assert drive.data(bytes((0x51, 0, 0, 0, 0, 0, 0, 0, 2, 0)), 2) == b"\x00\x20"
    info = drive.data(bytes((0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0)), 34)
    assert len(info) == 34 and info[2] == 0x0E, "complete disc, complete last session"
    assert info[3:7] == bytes((1, 1, 1, 1)), "first track 1, one session, last session holds track 1 only"
    expect_sense(drive.cmd(bytes((0x51, 1, 0, 0, 0, 0, 0, 0, 34, 0)), xfer=34), ILLEGAL_REQUEST, 0x24, 0x00)
    track = drive.data(bytes((0x52, 1, 0, 0, 0, 1, 0, 0, 8, 0)), 8)
    assert track[:4] == bytes((0, 34, 1, 1))
    track = drive.data(bytes((0x52, 1, 0, 0, 0, 1, 0, 0, 32, 0)), 32)
    start, nwa, free, packet, size = struct.unpack_from(">5I", track, 8)
    assert (track[5] & 0x0F, track[6] & 0x4F, track[7] & 0x03) == (4, 1, 0), "data track, mode 1, not blank"
    assert (start, free, size) == (0, 0, blocks), "cdrom_get_last_written: start + size = capacity"
    assert drive.data(struct.pack(">BBIxHB", 0x52, 0, blocks - 1, 32, 0), 32) == track   # by an LBA in it
    assert drive.data(struct.pack(">BBIxHB", 0x52, 2, 1, 32, 0), 32) == track            # by its session
    for cdb in (struct.pack(">BBIxHB", 0x52, 0, blocks, 32, 0), struct.pack(">BBIxHB", 0x52, 1, 2, 32, 0),
                struct.pack(">BBIxHB", 0x52, 1, 0, 32, 0), struct.pack(">BBIxHB", 0x52, 3, 1, 32, 0)):
        expect_sense(drive.cmd(cdb, xfer=32), ILLEGAL_REQUEST, 0x24, 0x00)


def test_read_subchannel_minimal(drive):
    assert drive.data(bytes((0x42, 0, 0, 1, 0, 0, 0, 0, 16, 0)), 16) == bytes((0, 0x15, 0, 0)), "SubQ=0: header"
    pos = drive.data(bytes((0x42, 0x02, 0x40, 1, 0, 0, 0, 0, 16, 0)), 16)
    assert pos == bytes((0, 0x15, 0, 12, 1, 0x14, 1, 1, 0, 0, 2, 0, 0, 0, 0, 0))
    mcn = drive.data(bytes((0x42, 0, 0x40, 2, 0, 0, 0, 0, 24, 0)), 24)
    assert mcn[4] == 2 and not mcn[8] & 0x80, "no media catalogue number (MCVAL 0)"
    assert drive.data(bytes((0x42, 0, 0x40, 3, 0, 0, 1, 0, 24, 0)), 24)[4] == 3
    expect_sense(drive.cmd(bytes((0x42, 0, 0x40, 4, 0, 0, 0, 0, 24, 0)), xfer=24), ILLEGAL_REQUEST, 0x24, 0x00)


# -- configuration, mode pages, events ------------------------------------------------------------------------------
def test_get_configuration_profiles_and_features(drive):
    data = drive.data(get_config(), 1024)
    assert data[6:8] == b"\x00\x08", "current profile CD-ROM"
    feats = features(data)
    assert list(feats) == [0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x001D, 0x001E, 0x001F, 0x0100]
    profiles = feats[0x0000]
    assert profiles[2] & 0x03 == 0x03 and profiles[4:] == bytes((0, 0x10, 0, 0, 0, 0x08, 1, 0)), \
        "DVD-ROM and CD-ROM, CD-ROM current"
    assert feats[0x0003][4] == 0x29, "Removable Medium: tray, eject, lock"
    assert struct.unpack_from(">IH", feats[0x0010], 4) == (2048, 1) and feats[0x0010][2] & 1
    assert feats[0x001E][2] & 1 and not feats[0x001F][2] & 1
    current = features(drive.data(get_config(rt=1), 1024))
    assert 0x001F not in current and 0x001E in current
    one = drive.data(get_config(rt=2, start=0x001E), 1024)
    assert list(features(one)) == [0x001E]
    mrw = drive.data(get_config(start=0x0028, alloc=16), 16)        # Linux's cdrom_is_mrw probe
    assert struct.unpack_from(">H", mrw, 8)[0] == 0x0100, "no MRW feature: the next one follows"
    assert list(features(drive.data(get_config(rt=2, start=0x0020), 1024))) == [], "no Random Writable"
    expect_sense(drive.cmd(get_config(rt=3), xfer=1024), ILLEGAL_REQUEST, 0x24, 0x00)


def test_mode_pages_capabilities_and_error_recovery(drive):
    out = drive.data(bytes((0x1A, 0, 0x2A, 0, 128, 0)), 128)      # what sr's get_capabilities asks
    assert out[0] + 1 == len(out) and out[3] == 0, "no block descriptor"
    page = out[4:]
    assert page[0] == 0x2A and page[1] == 0x14 and len(page) == 22
    assert page[2] & 0x08 and not page[3], "reads DVD-ROM, writes nothing"
    assert page[6] >> 5 == 1 and page[6] & 0x08 and page[6] & 0x01 and not page[6] & 0x02, \
        "tray, eject, lock supported, not locked"
    assert struct.unpack_from(">H", page, 8)[0] // 176 == 40
    drive.cmd(PREVENT)
    assert drive.data(bytes((0x1A, 0, 0x2A, 0, 128, 0)), 128)[4 + 6] & 0x02, "LOCK STATE follows PREVENT"
    drive.cmd(ALLOW)
    ten = drive.data(bytes((0x5A, 0x08, 0x01, 0, 0, 0, 0, 0, 255, 0)), 255)
    assert ten[8:10] == bytes((0x01, 0x0A)) and ten[11] == 5, "read/write error recovery page, 5 retries"
    every = drive.data(bytes((0x1A, 0x08, 0x3F, 0, 255, 0)), 255)
    codes, pos = [], 4
    while pos < len(every):
        codes.append(every[pos] & 0x3F)
        pos += 2 + every[pos + 1]
    assert codes == [0x01, 0x0A, 0x2A]
    header = bytes((0, 0, 0, 8)) + bytes(5) + (512).to_bytes(3, "big")
    expect_sense(drive.cmd(bytes((0x15, 0x10, 0, 0, 12, 0)), header), ILLEGAL_REQUEST, 0x26, 0x00)
    header = bytes((0, 0, 0, 8)) + bytes(5) + (2048).to_bytes(3, "big")
    assert drive.cmd(bytes((0x15, 0x10, 0, 0, 12, 0)), header)["status"] == GOOD


def test_event_status_classes(drive):
    expect_sense(drive.cmd(gesn(polled=False), xfer=8), ILLEGAL_REQUEST, 0x24, 0x00)   # no asynchronous mode
    assert drive.data(gesn(classes=0x40), 8) == bytes((0, 2, 0x80, 0x16)), "no requested class: NEA"
    assert drive.data(gesn(classes=0x02), 8) == bytes((0, 6, 1, 0x16, 0, 0, 0, 0)), "operational change"
    assert drive.data(gesn(classes=0x04), 8) == bytes((0, 6, 2, 0x16, 0, 1, 0, 0)), "power: active"
    assert drive.data(gesn(classes=0x14), 8)[2] == 2, "no event pending: the lowest requested class"
    assert media_event(drive) == (0, 0x02), "no change, medium present, tray closed"
    assert drive.data(gesn(alloc=4), 4) == bytes((0, 6, 4, 0x16))


def test_mechanism_status_and_speed_commands(drive):
    assert drive.data(bytes((0xBD,)) + bytes(7) + bytes((0, 8, 0, 0)), 8) == bytes(8)
    assert drive.cmd(bytes((0xBB, 0, 0xFF, 0xFF, 0xFF, 0xFF)) + bytes(6))["status"] == GOOD
    streaming = bytes((0xB6,)) + bytes(7) + bytes((0, 0, 28, 0))
    assert drive.cmd(streaming, bytes(28))["status"] == GOOD
    drive.cmd(EJECT)
    assert drive.data(bytes((0xBD,)) + bytes(7) + bytes((0, 8, 0, 0)), 8)[1] & 0x10, "door open"


# -- empty drive, eject and load ------------------------------------------------------------------------------------
def test_empty_drive(discs):
    d = Drive({})
    assert d.ready["capacity"] == {"block_size": 2048, "blocks": 0}
    assert d.ready["medium"] == {"path": None, "object": 0, "loaded": False, "block_size": 2048}
    write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)
    for cdb, xfer in ((TUR, 0), (bytes((0x25,)) + bytes(9), 8), (read10(0, 1), 2048), (toc(), 255),
                      (bytes((0x51,)) + bytes(6) + bytes((0, 34, 0)), 34), (write, 0)):
        expect_sense(d.cmd(cdb, bytes(2048) if cdb is write else None, xfer), NOT_READY, 0x3A, 0x00)
    sense = d.data(bytes((0x03, 0, 0, 0, 18, 0)), 18)
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (NOT_READY, 0x3A, 0x00), "REQUEST SENSE reports it"
    assert d.data(get_config(), 8)[6:8] == b"\x00\x00", "no current profile"
    assert not features(d.data(get_config(), 1024))[0x0010][2] & 1, "Random Readable not current"
    assert media_event(d) == (0, 0x00), "no medium, tray closed"
    assert d.data(bytes((0x1A, 0, 0x2A, 0, 128, 0)), 128)[4] == 0x2A
    expect_sense(d.cmd(bytes((0xFF,)) + bytes(9)), ILLEGAL_REQUEST, 0x20, 0x00)      # unknown beats not ready
    assert d.cmd(LOAD)["status"] == GOOD and not d.named("medium_changed"), "closing an empty tray: still empty"
    assert d.close() == 0


def test_eject_then_load_the_same_disc(drive, iso):
    for byte4 in (0x12, 0x00, 0x01, 0x20):           # a power condition ignores LOEJ; START alone spins the disc
        assert drive.cmd(bytes((0x1B, 0, 0, 0, byte4, 0)))["status"] == GOOD and not drive.events
    first = drive.data(read10(16, 1), 2048)
    assert drive.cmd(EJECT)["status"] == GOOD
    assert drive.events[-1] == {"op": "event", "event": "position", "path": iso, "object": 0, "loaded": False,
                                "block_size": 2048}
    expect_sense(drive.cmd(TUR), NOT_READY, 0x3A, 0x02)                 # MEDIUM NOT PRESENT - TRAY OPEN
    expect_sense(drive.cmd(read10(16, 1), xfer=2048), NOT_READY, 0x3A, 0x02)
    assert media_event(drive) == (3, 0x01), "media removal, tray open"
    assert media_event(drive) == (0, 0x01), "reported once"
    assert drive.cmd(EJECT)["status"] == GOOD, "ejecting an open tray changes nothing"
    assert not drive.named("medium_changed")
    drive.c.send({"op": "cmd", "tag": 777, "cdb": LOAD, "xfer": 0})
    frames = [drive.c.recv() for _ in range(2)]
    assert [f.get("event", f["op"]) for f in frames] == ["position", "done"], \
        "the same disc closed in again: the new state before the done, and no unit attention"
    assert frames[0]["loaded"] is True and frames[1]["status"] == GOOD
    assert drive.cmd(TUR)["status"] == GOOD
    assert media_event(drive) == (2, 0x02), "new media, present, tray closed"
    assert drive.data(read10(16, 1), 2048) == first
    assert drive.cmd(LOAD)["status"] == GOOD and len(drive.named("medium_changed")) == 0, "already loaded"


def test_loaded_false_starts_with_the_disc_in_the_open_tray(iso):
    d = Drive({"path": iso, "loaded": False})
    assert d.ready["medium"]["loaded"] is False and d.ready["medium"]["path"] == iso
    expect_sense(d.cmd(TUR), NOT_READY, 0x3A, 0x02)
    assert d.cmd(LOAD)["status"] == GOOD and not d.named("medium_changed")
    assert d.cmd(TUR)["status"] == GOOD
    assert media_event(d) == (2, 0x02)
    assert d.close() == 0


# -- prevention -----------------------------------------------------------------------------------------------------
def test_prevention_is_per_nexus_and_blocks_eject(drive):
    assert drive.cmd(PREVENT, nexus="A")["status"] == GOOD
    expect_sense(drive.cmd(EJECT, nexus="B"), ILLEGAL_REQUEST, 0x53, 0x02)
    expect_sense(drive.cmd(EJECT, nexus="A"), ILLEGAL_REQUEST, 0x53, 0x02)
    assert drive.cmd(ALLOW, nexus="B")["status"] == GOOD, "B's ALLOW does not end A's prevention"
    expect_sense(drive.cmd(EJECT, nexus="B"), ILLEGAL_REQUEST, 0x53, 0x02)
    assert drive.cmd(TUR, nexus="B")["status"] == GOOD, "still loaded"
    assert drive.cmd(ALLOW, nexus="A")["status"] == GOOD
    assert drive.cmd(EJECT, nexus="B")["status"] == GOOD
    assert drive.cmd(LOAD, nexus="B")["status"] == GOOD
    assert drive.cmd(bytes((0x1E, 0, 0, 0, 3, 0)), nexus="A")["status"] == GOOD, "persistent prevent accepted"
    expect_sense(drive.cmd(EJECT, nexus="B"), ILLEGAL_REQUEST, 0x53, 0x02)


def test_nexus_loss_and_reset_end_prevention(drive):
    drive.cmd(PREVENT, nexus="A")
    drive.cmd(PREVENT, nexus="B")
    drive.c.send({"op": "nexus_lost", "nexus": "A"})
    expect_sense(drive.cmd(EJECT, nexus="C"), ILLEGAL_REQUEST, 0x53, 0x02)       # B still prevents
    drive.cmd(ALLOW, nexus="B")
    assert drive.cmd(EJECT, nexus="C")["status"] == GOOD, "A's prevention ended with its nexus"
    drive.cmd(LOAD, nexus="C")
    drive.cmd(PREVENT, nexus="A")
    drive.cmd(PREVENT, nexus="B")
    drive.c.send({"op": "reset"})
    assert drive.cmd(EJECT, nexus="C")["status"] == GOOD, "a reset ends every prevention"


def test_media_events_are_reported_once_per_nexus(drive):
    for nexus in ("A", "B"):
        assert media_event(drive, nexus) == (0, 0x02)
    drive.cmd(EJECT, nexus="A")
    assert media_event(drive, "C") == (0, 0x01), "a nexus first seen after the change: nothing to report"
    drive.cmd(LOAD, nexus="A")
    assert media_event(drive, "A") == (2, 0x02)
    assert media_event(drive, "A") == (0, 0x02)
    assert media_event(drive, "B") == (2, 0x02), "B missed the removal; it learns of the newest event"
    assert media_event(drive, "C") == (2, 0x02)


# -- media control (protocol §10.1) ---------------------------------------------------------------------------------
def test_media_control_load_unload_restore(discs):
    directory, one, two = discs
    d = Drive({})
    d.c.send({"op": "load", "path": one, "tag": 1})
    frames = [d.c.recv() for _ in range(3)]
    assert [f.get("event", f["op"]) for f in frames] == ["medium_changed", "position", "done"], \
        "the core queues 28/00 before the load is answered"
    assert (frames[2]["status"], frames[2]["path"], frames[2]["loaded"]) == (GOOD, one, True)
    d.events.extend(frames[:2])
    assert d.cmd(TUR)["status"] == GOOD
    assert capacity(d)[0] == os.path.getsize(one) // 2048 - 1
    refused = d.control({"op": "load", "path": two}, tag=2)
    assert refused["status"] == 2 and "unload it first" in refused["message"] and refused["path"] == one
    assert d.control({"op": "load", "path": one}, tag=3)["status"] == GOOD and len(d.named("medium_changed")) == 1
    d.cmd(PREVENT, nexus="A")
    refused = d.control({"op": "unload"}, tag=4)
    assert refused["status"] == 2 and "prevented" in refused["message"]
    d.cmd(ALLOW, nexus="A")
    done = d.control({"op": "unload"}, tag=5)
    assert (done["status"], done["unloaded"], done["path"], done["loaded"]) == (GOOD, one, None, False)
    expect_sense(d.cmd(TUR), NOT_READY, 0x3A, 0x00)
    assert media_event(d) == (3, 0x00)
    assert d.control({"op": "unload"}, tag=6)["unloaded"] is None, "an empty drive is not an error"
    done = d.control({"op": "load", "path": two}, tag=7)
    assert done["status"] == GOOD and len(d.named("medium_changed")) == 2
    assert d.data(read10(16, 4), 8192) == Path(two).read_bytes()[16 * 2048:20 * 2048], "the new disc is read"
    assert capacity(d)[0] == os.path.getsize(two) // 2048 - 1
    changes = len(d.named("medium_changed"))
    done = d.control({"op": "restore", "path": one, "object": 0, "loaded": False, "block_size": 2048}, tag=8)
    assert (done["status"], done["path"], done["loaded"]) == (GOOD, one, False)
    assert len(d.named("medium_changed")) == changes, "restore raises no unit attention"
    expect_sense(d.cmd(TUR), NOT_READY, 0x3A, 0x02)
    assert d.control({"op": "restore", "path": one, "object": 0, "loaded": True, "block_size": 2048},
                     tag=9)["loaded"] is True
    assert d.cmd(TUR)["status"] == GOOD
    assert d.control({"op": "restore", "path": "x", "loaded": "yes"}, tag=10)["status"] == 2
    assert d.close() == 0


def test_load_of_an_unreadable_image_reports_incompatible_format(discs):
    one, missing, d = discs[1], os.path.join(discs[0], "missing.iso"), Drive({})
    done = d.control({"op": "load", "path": missing}, tag=1)
    assert (done["status"], done["path"], done["loaded"]) == (GOOD, missing, False)
    assert d.named("medium_changed"), "§10.1: load emits medium_changed even for a bad image"
    expect_sense(d.cmd(TUR), NOT_READY, 0x30, 0x02)
    assert "missing.iso" in d.c.stderr_text()
    assert d.control({"op": "load", "path": one}, tag=2)["status"] == 2, "the bad disc is still in the drive"
    assert d.control({"op": "unload"}, tag=3)["unloaded"] == missing
    assert d.close() == 0


@pytest.mark.parametrize("params, phrase", [({"path": "/nonexistent/disc.iso"}, "does not exist"),
                                            ({"path": "x.iso", "loaded": "yes"}, "loaded"),
                                            ({"profile": "bluray"}, "profile")])
def test_bad_params_are_refused(params, phrase):
    c = EmuClient("emulators.vcdrom")
    reply = c.hello(params)
    assert reply["op"] == "error" and phrase in reply["message"], reply
    assert c.close() == 1


# -- the checker and the core's opcode table ------------------------------------------------------------------------
async def test_protocol_checker_passes(iso):
    for params in ({"path": iso}, {}):
        report = await run_checks(Options([sys.executable, "-m", "emulators.vcdrom"], cwd=ROOT, params=params))
        assert not report.failed, report.text()
        assert all(o.status == "PASS" for o in report.outcomes), report.text()


def test_core_opcode_table_for_mmc():
    read = lookup(5, 0x28)
    assert read.direction == Direction.READ and read.length(read10(0, 3), 2048) == 6144
    assert lookup(5, 0xA8).length(read12(0, 5), 2048) == 10240
    for opcode in (0x2A, 0xAA, 0x2E):
        assert lookup(5, opcode).writes_medium and lookup(5, opcode).direction == Direction.WRITE
    assert lookup(5, 0x43).length(toc(alloc=804), 2048) == 804 and lookup(5, 0x43).pr_class == "read"
    assert lookup(5, 0x4A).ua_exempt and lookup(5, 0x46).ua_exempt and lookup(5, 0x12).ua_exempt
    assert not lookup(5, 0x00).ua_exempt and not lookup(5, 0x25).ua_exempt
    assert lookup(5, 0xBD).length(bytes((0xBD,)) + bytes(7) + bytes((1, 2, 0, 0)), 2048) == 258
    assert lookup(5, 0xB6).direction == Direction.WRITE and lookup(5, 0xBB).direction == Direction.NONE
    assert lookup(5, 0x1B).pr_class_of(LOAD) == "none" and lookup(5, 0x1B).pr_class_of(EJECT) == "write"
    assert lookup(0, 0x4A).name == "UNKNOWN", "the disk table is unchanged"


# -- through the whole stack ----------------------------------------------------------------------------------------
TARGET = "iqn.2026-11.org.trioscsi:vcdrom"


def vcdrom_config(iso: str) -> str:
    return "\n".join(('[[portal]]', 'listen = "127.0.0.1:0"', '[[target]]', f'name = "{TARGET}"',
                      '[[target.lun]]', 'lun = 0', 'emulator = "vcdrom"', f'params = {{ path = "{iso}" }}'))


async def attention(ini: Initiator) -> int:
    """The unit attention TEST UNIT READY meets now (asc << 8 | ascq), or 0 if none."""
    result = await ini.scsi(TUR)
    return result.asc if result.sense_key == UNIT_ATTENTION else 0


async def test_through_the_stack(iso):
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vcdrom-stack-") as state:
        async with running_server(state, vcdrom_config(iso)) as (_, port), \
                session(port, TARGET, name="iqn.2026-11.test:a") as a, \
                session(port, TARGET, name="iqn.2026-11.test:b") as b:
            # GET EVENT STATUS NOTIFICATION and GET CONFIGURATION pass a pending unit attention (MMC-6 4.1.6.1)
            result = await a.scsi(gesn(), read=8)
            assert result.status == GOOD and result.data[4:6] == bytes((0, 0x02)), result
            assert (await a.scsi(get_config(alloc=8), read=8)).data[6:8] == b"\x00\x08"
            assert await attention(a) == 0x2900 and await attention(b) == 0x2900       # power on, still there
            result = await a.scsi(read10(0, 64), read=64 * 2048)
            assert result.status == GOOD and result.data == Path(iso).read_bytes()[:64 * 2048] and not result.residual
            result = await a.scsi(bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0)), write=bytes(2048))
            assert (result.status, result.sense_key, result.asc) == (CHECK, DATA_PROTECT, 0x2700)
            assert (await a.scsi(PREVENT)).status == GOOD
            result = await b.scsi(EJECT)
            assert (result.sense_key, result.asc) == (ILLEGAL_REQUEST, 0x5302), "a's lock holds for b"
            assert (await a.scsi(ALLOW)).status == GOOD
            assert (await b.scsi(EJECT)).status == GOOD
            result = await a.scsi(TUR)
            assert (result.sense_key, result.asc) == (NOT_READY, 0x3A02)
            assert (await b.scsi(LOAD)).status == GOOD
            for ini in (a, b):                    # the same disc again: a media event for each, no attention
                result = await ini.scsi(gesn(), read=8)
                assert result.status == GOOD and result.data[4:6] == bytes((2, 0x02)), result
                assert await attention(ini) == 0
            assert (await b.scsi(PREVENT)).status == GOOD
            await b.logout()
            for _ in range(100):                  # the core tells the emulator once b's session has ended
                result = await a.scsi(EJECT)
                if result.status == GOOD:
                    break
                assert (result.sense_key, result.asc) == (ILLEGAL_REQUEST, 0x5302)
                await trio.sleep(0.02)
            assert result.status == GOOD, "b's lock ended with its nexus"
