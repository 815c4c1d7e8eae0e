"""vdisk over the wire: SANITIZE (SBC-4 5.30, 4.11), after libiscsi's Sanitize.* tests, and the software write
protect of the control mode page that Sanitize.Readonly uses.
"""
from __future__ import annotations

import json
import os
import struct
import time

import pytest

from emulators.pyemu.client import EmuClient, parse_sense
from sbc_helpers import expect, start, workdir  # noqa: F401 (pytest fixtures)

GOOD, CHECK = 0x00, 0x02
NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, DATA_PROTECT = 0x2, 0x3, 0x5, 0x7
MiB = 1 << 20
BLOCKS = 8 * MiB // 512
OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE = 0x01, 0x02, 0x03, 0x1F




def sanitize(sa: int, plist: bytes = b"", immed: bool = False, ause: bool = False, length: int | None = None,
             byte1_extra: int = 0) -> bytes:
    return struct.pack(">BBxxxxxHB", 0x48, (0x80 if immed else 0) | (0x20 if ause else 0) | sa | byte1_extra,
                       len(plist) if length is None else length, 0)


def overwrite_list(pattern: bytes, count: int = 1, invert: bool = False) -> bytes:
    return bytes(((0x80 if invert else 0) | count, 0)) + struct.pack(">H", len(pattern)) + pattern


def rw10(op: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", op, 0, lba, 0, blocks, 0)


def read(c: EmuClient, lba: int, blocks: int) -> bytes:
    return c.cmd(rw10(0x28, lba, blocks), xfer=512 * blocks)["data"]


def rsoc_service_actions(c: EmuClient, op: int) -> set[int]:
    done = c.cmd(struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0, 0, 0, 65535, 0), xfer=65535)
    data = done["data"]
    rows = [struct.unpack_from(">BxHxBH", data, 4 + i) for i in range(0, struct.unpack_from(">I", data)[0], 8)]
    return {sa for o, sa, flags, _ in rows if o == op and flags & 1}


def wait_ready(c: EmuClient, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while c.cmd(bytes(6))["status"] != GOOD:
        assert time.monotonic() < deadline, "sanitize never ended"
        time.sleep(0.05)


# -- the operations --------------------------------------------------------------------------------------------------
def test_overwrite_fills_every_block_with_the_pattern(workdir):
    """libiscsi Sanitize.Overwrite: a pattern shorter than a block repeats within each block; INVERT alternates."""
    with start(workdir) as c:
        c.cmd(rw10(0x2A, 0, 8), data=b"a" * 4096)
        assert c.cmd(sanitize(OVERWRITE, overwrite_list(b"\xaa" * 512)), data=overwrite_list(b"\xaa" * 512))[
            "status"] == GOOD
        assert read(c, 0, 8) == b"\xaa" * 4096 and read(c, BLOCKS - 8, 8) == b"\xaa" * 4096
        plist = overwrite_list(b"wxyz")
        assert c.cmd(sanitize(OVERWRITE, plist), data=plist)["status"] == GOOD
        assert read(c, 5, 1) == b"wxyz" * 128
        plist = overwrite_list(b"\x0f\x01\x02", count=2, invert=True)              # pass 2 writes the inverse
        assert c.cmd(sanitize(OVERWRITE, plist), data=plist)["status"] == GOOD
        block = (b"\x0f\x01\x02" * 171)[:512]
        assert read(c, BLOCKS - 1, 1) == bytes(b ^ 0xFF for b in block)


def test_overwrite_parameter_checks(workdir):
    with start(workdir) as c:
        plist = overwrite_list(b"\x55" * 512)
        for length in range(5):
            expect(c.cmd(sanitize(OVERWRITE, length=length), data=plist[:length]), ILLEGAL_REQUEST, 0x24)
        expect(c.cmd(sanitize(OVERWRITE, length=512 + 5), data=plist + b"\0"), ILLEGAL_REQUEST, 0x24)
        zero_count = bytes((0,)) + plist[1:]
        expect(c.cmd(sanitize(OVERWRITE, zero_count), data=zero_count), ILLEGAL_REQUEST, 0x26)
        no_pattern = bytes((1, 0, 0, 0)) + plist[4:]
        expect(c.cmd(sanitize(OVERWRITE, no_pattern), data=no_pattern), ILLEGAL_REQUEST, 0x26)
        too_long = bytes((1, 0)) + struct.pack(">H", 516) + plist[4:]
        expect(c.cmd(sanitize(OVERWRITE, too_long), data=too_long), ILLEGAL_REQUEST, 0x26)


def test_block_and_crypto_erase_deallocate(workdir):
    """libiscsi Sanitize.BlockErase/.CryptoErase: the LU reads as zeros and is deallocated from end to end."""
    with start(workdir) as c:
        b1 = c.cmd(bytes((0x12, 1, 0xB1, 0, 64, 0)), xfer=64)["data"]
        assert b1[7] >> 4 == 0x5                                            # WABEREQ 01b, WACEREQ 01b
        assert rsoc_service_actions(c, 0x48) == {OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE}
        for action in (BLOCK_ERASE, CRYPTO_ERASE):
            c.cmd(rw10(0x2A, 0, 256), data=b"a" * 512 * 256)
            c.cmd(rw10(0x2A, BLOCKS - 256, 256), data=b"a" * 512 * 256)
            assert c.cmd(sanitize(action))["status"] == GOOD
            assert read(c, 0, 256) == bytes(512 * 256) and read(c, BLOCKS - 256, 256) == bytes(512 * 256)
            status = c.cmd(struct.pack(">BBQIBB", 0x9E, 0x12, 0, 256, 0, 0), xfer=256)["data"]
            lba, count, provisioning = struct.unpack_from(">QIB", status, 8)
            assert (lba, count, provisioning) == (0, BLOCKS, 1)
            expect(c.cmd(sanitize(action, length=8), data=bytes(8)), ILLEGAL_REQUEST, 0x24)


def test_fully_provisioned_lu_offers_no_block_erase(workdir):
    with start(workdir, thin=False) as c:
        assert BLOCK_ERASE not in rsoc_service_actions(c, 0x48)
        expect(c.cmd(sanitize(BLOCK_ERASE)), ILLEGAL_REQUEST, 0x24)
        c.cmd(rw10(0x2A, 0, 8), data=b"a" * 4096)
        assert c.cmd(sanitize(CRYPTO_ERASE))["status"] == GOOD
        assert read(c, 0, 8) == bytes(4096)


def test_cdb_checks(workdir):
    """libiscsi Sanitize.InvalidServiceAction/.BlockEraseReserved/.ExitFailureMode."""
    with start(workdir) as c:
        for sa in set(range(0x20)) - {OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE}:
            expect(c.cmd(sanitize(sa)), ILLEGAL_REQUEST, 0x24)
        expect(c.cmd(sanitize(BLOCK_ERASE, byte1_extra=0x40)), ILLEGAL_REQUEST, 0x24)
        for i in range(2, 7):
            cdb = bytearray(sanitize(BLOCK_ERASE))
            cdb[i] = i
            expect(c.cmd(bytes(cdb)), ILLEGAL_REQUEST, 0x24)
        expect(c.cmd(sanitize(EXIT_FAILURE_MODE, length=8), data=bytes(8)), ILLEGAL_REQUEST, 0x24)
        assert c.cmd(sanitize(EXIT_FAILURE_MODE))["status"] == GOOD       # not in failure mode: nothing to do


def test_read_only_lu_refuses(workdir):
    path = os.path.join(workdir, "ro.img")
    with open(path, "wb") as f:
        f.truncate(MiB)
    client = EmuClient("emulators.vdisk")
    with client:
        assert client.hello({"path": path, "read_only": True})["op"] == "ready"
        expect(client.cmd(sanitize(BLOCK_ERASE)), DATA_PROTECT, 0x27)


# -- while it runs, after it failed, across restarts -----------------------------------------------------------------
def test_in_progress_gate_and_abort(workdir):
    """SBC-4 4.11: during a sanitize only INQUIRY, REPORT LUNS and REQUEST SENSE work; others get NOT READY,
    SANITIZE IN PROGRESS with a progress indication; an aborted SANITIZE goes on (libiscsi Sanitize.Reset)."""
    with start(workdir, sanitize_rate=4 * MiB, workers=2) as c:
        plist = overwrite_list(b"\x11")
        tag = c.submit(sanitize(OVERWRITE, plist), data=plist)
        time.sleep(0.3)
        s = expect(c.cmd(bytes(6)), NOT_READY, 0x04, 0x1B)
        assert s["sks"][0] & 0x80 and 0 < struct.unpack(">H", s["sks"][1:])[0] < 0xFFFF
        expect(c.cmd(rw10(0x28, 0, 1), xfer=512), NOT_READY, 0x04, 0x1B)
        expect(c.cmd(bytes((0x1B, 1, 0, 0, 0x02, 0))), NOT_READY, 0x04, 0x1B)
        expect(c.cmd(sanitize(BLOCK_ERASE)), NOT_READY, 0x04, 0x1B)
        assert c.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96)["status"] == GOOD
        sense = c.cmd(bytes((0x03, 0, 0, 0, 18, 0)), xfer=18)
        assert sense["status"] == GOOD and parse_sense(sense["data"])["asc"] == 0x04
        c.send({"op": "abort", "tag": tag})
        assert c.wait(tag, timeout=10) == {"op": "done", "tag": tag, "status": 0, "aborted": True}
        expect(c.cmd(bytes(6)), NOT_READY, 0x04, 0x1B)                      # the operation goes on
        wait_ready(c)
        assert read(c, BLOCKS - 1, 1) == b"\x11" * 512


def test_immed_answers_at_once(workdir):
    with start(workdir, sanitize_rate=16 * MiB) as c:
        plist = overwrite_list(b"\x22")
        started = time.monotonic()
        assert c.cmd(sanitize(OVERWRITE, plist, immed=True), data=plist)["status"] == GOOD
        assert time.monotonic() - started < 0.4
        expect(c.cmd(bytes(6)), NOT_READY, 0x04, 0x1B)
        wait_ready(c)
        assert read(c, 100, 1) == b"\x22" * 512


def test_restart_resumes_an_interrupted_sanitize(workdir):
    """A crash in the middle leaves the marker; the next incarnation starts the operation again."""
    c = start(workdir, sanitize_rate=2 * MiB)
    with c:
        plist = overwrite_list(b"\x33")
        assert c.cmd(sanitize(OVERWRITE, plist, immed=True), data=plist)["status"] == GOOD
        time.sleep(0.3)
        c.proc.kill()
        c.proc.wait()
    marker = os.path.join(workdir, "disk.img.sanitize")
    assert json.load(open(marker))["action"] == OVERWRITE
    with start(workdir, sanitize_rate=64 * MiB) as c:
        expect(c.cmd(bytes(6)), NOT_READY, 0x04, 0x1B)
        wait_ready(c)
        assert read(c, BLOCKS - 1, 1) == b"\x33" * 512
    assert not os.path.exists(marker)


@pytest.mark.parametrize("ause", [True, False])
def test_failure_mode_and_exit(workdir, ause):
    """A failed sanitize (here: the marker a failed operation left) keeps medium access in MEDIUM ERROR,
    SANITIZE COMMAND FAILED; EXIT FAILURE MODE leaves it only if the failed command had AUSE set."""
    with open(os.path.join(workdir, "disk.img.sanitize"), "w") as f:
        json.dump({"action": BLOCK_ERASE, "ause": ause, "pattern": "", "count": 0, "invert": False,
                   "failed": True}, f)
    with start(workdir) as c:
        expect(c.cmd(rw10(0x28, 0, 1), xfer=512), MEDIUM_ERROR, 0x31, 0x03)
        expect(c.cmd(bytes(6)), MEDIUM_ERROR, 0x31, 0x03)
        assert c.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96)["status"] == GOOD
        if ause:
            assert c.cmd(sanitize(EXIT_FAILURE_MODE))["status"] == GOOD
        else:
            expect(c.cmd(sanitize(EXIT_FAILURE_MODE)), ILLEGAL_REQUEST, 0x24)
            assert c.cmd(sanitize(BLOCK_ERASE))["status"] == GOOD          # a successful sanitize ends it
        assert c.cmd(bytes(6))["status"] == GOOD
    assert not os.path.exists(os.path.join(workdir, "disk.img.sanitize"))


# -- software write protect -------------------------------------------------------------------------------------------
def mode_select_control(c: EmuClient, control: bytes) -> dict:
    param = bytes(4) + control
    return c.cmd(bytes((0x15, 0x10, 0, 0, len(param), 0)), data=param)


def test_software_write_protect(workdir):
    """SPC-4 7.5.8 SWP (libiscsi Sanitize.Readonly): set, every write is DATA PROTECT and MODE SENSE shows WP;
    the change is announced with the tag of the command that made it."""
    with start(workdir, software_write_protect=True) as c:
        changeable = c.cmd(bytes((0x1A, 0x08, 0x4A, 0, 255, 0)), xfer=255)["data"][4:]
        assert changeable[4] & 0x08
        control = bytearray(c.cmd(bytes((0x1A, 0x08, 0x0A, 0, 255, 0)), xfer=255)["data"][4:])
        control[4] |= 0x08
        assert mode_select_control(c, bytes(control))["status"] == GOOD
        event = c.recv()
        assert event["event"] == "mode_changed" and isinstance(event["tag"], int)
        assert c.cmd(bytes((0x1A, 0x08, 0x0A, 0, 255, 0)), xfer=255)["data"][2] & 0x80       # WP
        expect(c.cmd(rw10(0x2A, 0, 1), data=bytes(512)), DATA_PROTECT, 0x27)
        expect(c.cmd(sanitize(BLOCK_ERASE)), DATA_PROTECT, 0x27)
        control[4] &= ~0x08
        assert mode_select_control(c, bytes(control))["status"] == GOOD
        assert c.cmd(rw10(0x2A, 0, 1), data=bytes(512))["status"] == GOOD
    with start(workdir) as c:                                               # off by default: SWP not changeable
        assert not c.cmd(bytes((0x1A, 0x08, 0x4A, 0, 255, 0)), xfer=255)["data"][4 + 4] & 0x08
