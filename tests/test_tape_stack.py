"""Tapes through the whole stack (iSCSI, core, changer and drive emulators), with the sense and residual
details backup software depends on, and the core's sharing rules between two initiators."""
from __future__ import annotations

import os
import struct

import trio

from trioscsi.iscsi.initiator import Initiator, ScsiResult
from test_stack import running_server, session

TARGET = "iqn.2026-11.org.trioscsi:stack"
SLOT1, DRIVE0 = 1000, 500

LIBRARY = f"""
[[portal]]
listen = "127.0.0.1:0"

[[target]]
name = "{TARGET}"
  [[target.lun]]
  lun = 0
  emulator = "vchanger"
    [target.lun.params]
    slots = 4
    media_dir = "tapes"
    state = "tapes/state.json"
    capacity = 1048576
    drives = [ {{ serial = "DRV1", lun = 1 }} ]
    cartridges = [ {{ barcode = "AAA001L6", path = "a.img" }}, {{ barcode = "AAA002L6", path = "b.img" }} ]
  [[target.lun]]
  lun = 1
  emulator = "vtape"
  serial = "DRV1"
"""


async def clear_attentions(ini: Initiator, lun: int) -> None:
    for _ in range(4):
        if (await ini.scsi(bytes(6), lun=lun)).sense_key != 6:
            return


def move_medium(source: int, destination: int) -> bytes:
    return struct.pack(">BxHHHxxBx", 0xA5, 0, source, destination, 0)


def write6(data_len: int) -> bytes:        # variable block mode
    return bytes([0x0A, 0]) + data_len.to_bytes(3, "big") + b"\0"


def read6(length: int, sili: bool = False) -> bytes:
    return bytes([0x08, 0x02 if sili else 0]) + length.to_bytes(3, "big") + b"\0"


def information(result: ScsiResult) -> int:
    return struct.unpack_from(">i", result.sense, 3)[0]


async def load(ini: Initiator) -> None:
    await clear_attentions(ini, 0)
    assert (await ini.scsi(move_medium(SLOT1, DRIVE0), lun=0)).status == 0
    await clear_attentions(ini, 1)
    assert (await ini.scsi(bytes(6), lun=1)).status == 0                 # the drive is ready at once


async def test_no_cartridge_is_not_ready_then_move_medium_loads_the_drive(tmp_path: object) -> None:
    async with running_server(tmp_path, LIBRARY) as (_, port), session(port, name="iqn.2026-11.org.example:a") as a:
        await clear_attentions(a, 1)
        empty = await a.scsi(bytes(6), lun=1)
        assert (empty.status, empty.sense_key, empty.asc) == (2, 2, 0x3A00)
        await load(a)


async def test_variable_block_read_sense_and_residuals(tmp_path: object) -> None:
    async with running_server(tmp_path, LIBRARY) as (_, port), session(port, name="iqn.2026-11.org.example:a") as a:
        await load(a)
        record = os.urandom(1000)
        assert (await a.scsi(write6(1000), lun=1, write=record)).status == 0
        assert (await a.scsi(bytes([0x10, 0, 0, 0, 1, 0]), lun=1)).status == 0        # WRITE FILEMARKS 1
        assert (await a.scsi(bytes([0x01, 0, 0, 0, 0, 0]), lun=1)).status == 0        # REWIND
        short = await a.scsi(read6(4096), lun=1, read=4096)       # the record is shorter than asked: ILI
        assert short.status == 2 and short.sense[2] & 0x20 and information(short) == 4096 - 1000
        assert short.data == record and short.underflow and short.residual == 4096 - 1000
        mark = await a.scsi(read6(4096), lun=1, read=4096)        # the filemark: FILEMARK bit, 00/01
        assert mark.status == 2 and mark.sense[2] & 0x80 and mark.asc == 0x0001
        eod = await a.scsi(read6(4096), lun=1, read=4096)         # past the data: BLANK CHECK, 00/05
        assert (eod.status, eod.sense_key, eod.asc) == (2, 8, 0x0005)
        space = await a.scsi(bytes([0x11, 0x01, 0, 0, 5, 0]), lun=1)   # SPACE 5 filemarks past end of data
        assert (space.status, space.sense_key, space.asc) == (2, 8, 0x0005) and information(space) == 5
        pos = await a.scsi(bytes([0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0]), lun=1, read=20)   # READ POSITION short
        assert pos.status == 0 and not pos.data[0] & 0x04                             # block position known


async def test_early_warning_and_end_of_medium(tmp_path: object) -> None:
    async with running_server(tmp_path, LIBRARY) as (_, port), session(port, name="iqn.2026-11.org.example:a") as a:
        await load(a)
        block = os.urandom(64 * 1024)
        results = [await a.scsi(write6(len(block)), lun=1, write=block) for _ in range(24)]   # 1.5 MiB > 1 MiB
        warnings = [r for r in results if r.status == 2 and r.sense[2] & 0x40 and r.sense_key == 0]
        overflow = [r for r in results if r.sense_key == 0xD]
        assert warnings, "no early warning (EOM bit with NO SENSE) before the end of the medium"
        assert overflow and overflow[0].asc == 0x0002                         # VOLUME OVERFLOW, end of medium
        assert results.index(warnings[0]) < results.index(overflow[0])


async def test_reservation_keeps_a_second_initiator_off_the_drive(tmp_path: object) -> None:
    async with running_server(tmp_path, LIBRARY) as (_, port), \
            session(port, name="iqn.2026-11.org.example:backup1") as one, \
            session(port, name="iqn.2026-11.org.example:backup2") as two:
        await load(one)
        await clear_attentions(two, 1)
        await clear_attentions(two, 0)
        assert (await one.scsi(bytes([0x16, 0, 0, 0, 0, 0]), lun=1)).status == 0          # RESERVE(6)
        assert (await one.scsi(write6(512), lun=1, write=os.urandom(512))).status == 0
        assert (await two.scsi(write6(512), lun=1, write=bytes(512))).status == 0x18
        assert (await two.scsi(bytes([0x01, 0, 0, 0, 0, 0]), lun=1)).status == 0x18       # REWIND refused too
        assert (await two.scsi(bytes([0x12, 0, 0, 0, 36, 0]), lun=1, read=36)).status == 0   # INQUIRY allowed
        assert (await one.scsi(bytes([0x17, 0, 0, 0, 0, 0]), lun=1)).status == 0          # RELEASE(6)
        assert (await two.scsi(bytes([0x01, 0, 0, 0, 0, 0]), lun=1)).status == 0


async def test_drive_restart_keeps_the_position(tmp_path: object) -> None:
    async with running_server(tmp_path, LIBRARY) as (server, port), \
            session(port, name="iqn.2026-11.org.example:a") as a:
        await load(a)
        for n in range(3):
            assert (await a.scsi(write6(100), lun=1, write=bytes([n]) * 100)).status == 0
        before = await a.scsi(bytes([0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0]), lun=1, read=20)
        drive = server.emulators[1]
        pid = drive.pid
        assert pid is not None
        os.kill(pid, 9)
        with trio.fail_after(20):
            while drive.pid in (None, pid) or drive.info is None:
                await trio.sleep(0.05)
            after = await a.scsi(bytes([0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0]), lun=1, read=20)
        assert after.status == 0 and after.data[4:8] == before.data[4:8] == (3).to_bytes(4, "big")
