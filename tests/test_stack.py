"""The whole target in-process (server, iSCSI, core, real emulator subprocesses) driven by the project's own
initiator over loopback TCP: what third-party clients cannot easily show (sense bytes, residuals, rejects,
emulator restarts, task management)."""
from __future__ import annotations

import functools
import os
import signal
import struct
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

from trioscsi import config as config_module
from trioscsi.iscsi.initiator import Initiator, LoginRefused
from trioscsi.server import Server

TARGET = "iqn.2026-11.org.trioscsi:stack"

CONFIG = f"""
[[portal]]
listen = "127.0.0.1:0"

[[target]]
name = "{TARGET}"
queue_depth = 16
  [target.iscsi]
  max_recv_data_segment_length = 65536
  first_burst_length = 65536
  max_burst_length = 131072
  [[target.lun]]
  lun = 0
  emulator = "vdisk"
  params = {{ path = "lun0.img", size = 16777216, block_size = 512, create = true }}
  [[target.lun]]
  lun = 3
  emulator = "null"
  params = {{ size = 1073741824 }}
"""


@asynccontextmanager
async def running_server(tmp_path: object, text: str = CONFIG) -> AsyncIterator[tuple[Server, int]]:
    config = config_module.parse(text, "test.toml")
    server = Server(config, str(tmp_path))
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        yield server, bound[0][1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def session(port: int, target: str = TARGET, **kwargs: object) -> AsyncIterator[Initiator]:
    """A logged-in session of the project's initiator (`kwargs`: its name, ISID) with its reader running."""
    initiator = await Initiator.connect("127.0.0.1", port, **kwargs)  # type: ignore[arg-type]
    await initiator.login(target)
    async with trio.open_nursery() as nursery:
        await nursery.start(initiator.run)
        yield initiator
        nursery.cancel_scope.cancel()
    await initiator.stream.aclose()


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


async def first_command(ini: Initiator) -> None:
    """Consume the power-on unit attention every new nexus starts with, checking that it is there."""
    result = await ini.scsi(bytes(6), lun=0)
    assert (result.status, result.sense_key, result.asc) == (2, 6, 0x2900)


async def test_login_and_unit_attention_then_ready(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        await first_command(ini)
        result = await ini.scsi(bytes(6), lun=0)
        assert result.status == 0


async def test_write_read_round_trip_with_r2t(tmp_path: object) -> None:
    pattern = os.urandom(512 * 600)      # 300 KiB: immediate data, unsolicited data-out and R2Ts
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        await first_command(ini)
        written = await ini.scsi(write10(100, 600), write=pattern)
        assert written.status == 0, written
        read = await ini.scsi(read10(100, 600), read=len(pattern))
        assert read.status == 0 and read.data == pattern
        assert not read.underflow and read.residual == 0


async def test_read_beyond_end_is_lba_out_of_range(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        await first_command(ini)
        result = await ini.scsi(read10(32768 - 1, 2), read=1024)
        assert (result.status, result.sense_key, result.asc) == (2, 5, 0x2100)


async def test_underflow_residual_when_initiator_accepts_more(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        await first_command(ini)
        result = await ini.scsi(read10(0, 1), read=4096)
        assert result.status == 0 and result.underflow and result.residual == 4096 - 512
        result = await ini.scsi(read10(0, 8), read=1024)
        assert result.status == 0 and result.overflow and result.residual == 4096 - 1024
        assert len(result.data) == 1024


async def test_missing_lun(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        inquiry = await ini.scsi(bytes([0x12, 0, 0, 0, 96, 0]), lun=7, read=96)
        assert inquiry.status == 0 and inquiry.data[0] == 0x7F
        tur = await ini.scsi(bytes(6), lun=7)
        assert (tur.status, tur.sense_key, tur.asc) == (2, 5, 0x2500)


async def test_report_luns(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        result = await ini.scsi(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), read=256)
        assert result.status == 0
        length = struct.unpack_from(">I", result.data)[0]
        assert length == 16
        assert result.data[8:16] == bytes(8) and result.data[16:24] == bytes([0, 3]) + bytes(6)


async def test_null_lun_reads_zeros(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        await ini.scsi(bytes(6), lun=3)
        result = await ini.scsi(read10(12345, 16), lun=3, read=8192)
        assert result.status == 0 and result.data == bytes(8192)


async def test_nop_and_text_and_logout(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        assert await ini.nop(b"ping-data") == b"ping-data"
        targets = await ini.text({"SendTargets": ""})
        assert ("TargetName", TARGET) in targets
        assert await ini.logout() == 0


async def test_discovery_lists_targets(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port):
        ini = await Initiator.connect("127.0.0.1", port)
        await ini.login(None, discovery=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(ini.run)
            pairs = await ini.text({"SendTargets": "All"})
            assert ("TargetName", TARGET) in pairs
            assert any(k == "TargetAddress" and v.startswith(f"127.0.0.1:{port},") for k, v in pairs)
            nursery.cancel_scope.cancel()


async def test_login_to_unknown_target_fails_with_not_found(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port):
        ini = await Initiator.connect("127.0.0.1", port)
        with pytest.raises(LoginRefused) as refused:
            await ini.login("iqn.2026-11.org.trioscsi:nope")
        assert refused.value.status == 0x0202   # the same answer as for a hidden target


async def test_garbage_does_not_disturb_other_sessions(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        await first_command(ini)
        bad = await trio.open_tcp_stream("127.0.0.1", port)
        await bad.send_all(b"GET / HTTP/1.0\r\n\r\n" + bytes(100))
        with trio.fail_after(5):
            assert await bad.receive_some(100) in (b"",) or True
        await bad.aclose()
        assert (await ini.scsi(bytes(6), lun=0)).status == 0


async def test_emulator_killed_session_survives(tmp_path: object) -> None:
    async with running_server(tmp_path) as (server, port), session(port) as ini:
        await first_command(ini)
        pattern = os.urandom(4096)
        assert (await ini.scsi(write10(8, 8, fua=True), write=pattern)).status == 0
        emulator = server.emulators[0]
        pid = emulator.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(20):
            result = await ini.scsi(read10(8, 8), read=4096)
        assert result.status == 0 and result.data == pattern
        assert emulator.pid != pid and emulator.restarts >= 1


async def test_abort_task_set_and_lun_reset_answered(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        await first_command(ini)
        assert await ini.task_management(2, lun=0) == 0      # ABORT TASK SET
        assert await ini.task_management(5, lun=0) == 0      # LOGICAL UNIT RESET
        ua = await ini.scsi(bytes(6), lun=0)
        assert (ua.sense_key, ua.asc) == (6, 0x2903)
        assert await ini.task_management(1, lun=0, rtt=999) == 1   # ABORT TASK of an unknown task
        assert await ini.task_management(8, lun=0) in (4, 5)       # TASK REASSIGN: not supported


ACCESS_CONFIG = f"""
[[portal]]
listen = "127.0.0.1:0"

[[target]]
name = "{TARGET}"
default_access = false
  [[target.lun]]
  lun = 0
  name = "disk"
  emulator = "vdisk"
  params = {{ path = "shared.img", size = 4194304, create = true }}
  [[target.lun]]
  lun = 1
  name = "scratch"
  emulator = "null"
  [[target.group]]
  name = "writers"
  initiators = ["iqn.2026-11.org.example:w*"]
  addresses = ["127.0.0.0/8"]
  luns = [ {{ lun = 0, device = "disk" }}, {{ lun = 5, device = "scratch" }} ]
  [[target.group]]
  name = "readers"
  initiators = ["iqn.2026-11.org.example:reader"]
  luns = [ {{ lun = 3, device = "disk", read_only = true }} ]
"""


async def test_target_warm_reset_keeps_sessions_and_cold_reset_closes_every_session(tmp_path: object) -> None:
    """RFC 7143 11.5.1: both resets answer FUNCTION COMPLETE; after a cold reset the target closes every
    connection of every session of that target, the other initiator's included."""
    async with running_server(tmp_path) as (server, port), session(port) as ini, \
            session(port, name="iqn.2026-11.org.trioscsi.test:other") as other:
        await first_command(ini)
        await first_command(other)
        assert await ini.task_management(6) == 0                  # TARGET WARM RESET
        for nexus in (ini, other):
            ua = await nexus.scsi(bytes(6), lun=0)
            assert (ua.sense_key, ua.asc) == (6, 0x2903)
        assert await ini.task_management(7) == 0                  # TARGET COLD RESET
        with trio.fail_after(5):
            await ini.closed.wait()
            await other.closed.wait()
        assert len(server.iscsi.registry) == 0
        async with session(port) as again:            # the same initiator port: its nexus was lost
            ua = await again.scsi(bytes(6))
            assert (ua.sense_key, ua.asc) == (6, 0x2907)



async def report_luns(ini: Initiator) -> list[int]:
    result = await ini.scsi(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), read=256)
    length = struct.unpack_from(">I", result.data)[0]
    return [result.data[8 + i + 1] for i in range(0, length, 8)]


async def test_groups_see_their_own_luns_and_read_only_refuses_writes(tmp_path: object) -> None:
    async with running_server(tmp_path, ACCESS_CONFIG) as (_, port):
        async with session(port, name="iqn.2026-11.org.example:writer1") as writer, \
                session(port, name="iqn.2026-11.org.example:reader") as reader:
            assert await report_luns(writer) == [0, 5]
            assert await report_luns(reader) == [3]
            await first_command(writer)
            pattern = os.urandom(512)
            assert (await writer.scsi(write10(0, 1), write=pattern)).status == 0
            await reader.scsi(bytes(6), lun=3)
            refused = await reader.scsi(write10(0, 1), lun=3, write=pattern)
            assert (refused.status, refused.sense_key, refused.asc) == (2, 7, 0x2700)
            read = await reader.scsi(read10(0, 1), lun=3, read=512)
            assert read.status == 0 and read.data == pattern
            mode = await reader.scsi(bytes([0x1A, 0, 0x3F, 0, 255, 0]), lun=3, read=255)
            assert mode.status == 0 and mode.data[2] & 0x80          # WP in the mode parameter header
            mode = await writer.scsi(bytes([0x1A, 0, 0x3F, 0, 255, 0]), lun=0, read=255)
            assert mode.status == 0 and not mode.data[2] & 0x80
        stranger = await Initiator.connect("127.0.0.1", port, name="iqn.2026-11.org.example:stranger")
        with pytest.raises(LoginRefused) as refused_login:
            await stranger.login(TARGET)
        assert refused_login.value.status == 0x0202
        ini = await Initiator.connect("127.0.0.1", port, name="iqn.2026-11.org.example:stranger")
        await ini.login(None, discovery=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(ini.run)
            assert await ini.text({"SendTargets": "All"}) == []
            nursery.cancel_scope.cancel()


def prout(action: int, key: int = 0, sa_key: int = 0, ptype: int = 0, aptpl: bool = False) -> tuple[bytes, bytes]:
    params = struct.pack(">QQ4xBxxx", key, sa_key, 0x01 if aptpl else 0)
    return struct.pack(">BBBxxIx", 0x5F, action, ptype, len(params)), params


async def test_persistent_reservation_blocks_other_initiator_and_survives_restart(tmp_path: object) -> None:
    async with running_server(tmp_path) as (_, port):
        async with session(port, name="iqn.2026-11.org.example:one") as one, \
                session(port, name="iqn.2026-11.org.example:two") as two:
            await first_command(one)
            await first_command(two)
            cdb, params = prout(0x00, sa_key=0xABC, aptpl=True)                   # REGISTER, APTPL
            assert (await one.scsi(cdb, write=params)).status == 0
            cdb, params = prout(0x01, key=0xABC, ptype=0x1)                       # RESERVE, Write Exclusive
            assert (await one.scsi(cdb, write=params)).status == 0
            assert (await two.scsi(write10(0, 1), write=bytes(512))).status == 0x18
            assert (await two.scsi(read10(0, 1), read=512)).status == 0           # reads are allowed
            assert (await one.scsi(write10(0, 1), write=bytes(512))).status == 0
    async with running_server(tmp_path) as (_, port), session(port, name="iqn.2026-11.org.example:two") as two:
        await first_command(two)
        keys = await two.scsi(bytes([0x5E, 0x01, 0, 0, 0, 0, 0, 0x10, 0, 0]), read=4096)   # READ RESERVATION
        assert keys.status == 0 and struct.unpack_from(">Q", keys.data, 8)[0] == 0xABC
        assert keys.data[21] & 0x0F == 0x1
        assert (await two.scsi(write10(0, 1), write=bytes(512))).status == 0x18


async def test_reload_changes_only_the_sessions_whose_access_changed(tmp_path: object) -> None:
    async with running_server(tmp_path, ACCESS_CONFIG) as (server, port):
        async with session(port, name="iqn.2026-11.org.example:writer1") as writer, \
                session(port, name="iqn.2026-11.org.example:reader") as reader:
            await first_command(writer)
            await reader.scsi(bytes(6), lun=3)
            changed = ACCESS_CONFIG.replace('luns = [ { lun = 3, device = "disk", read_only = true } ]',
                                            'luns = [ { lun = 4, device = "disk", read_only = true } ]')
            changed = changed.replace('initiators = ["iqn.2026-11.org.example:w*"]',
                                      'initiators = ["iqn.2026-11.org.example:w*", "iqn.2026-11.org.example:x"]')
            server.apply_access(config_module.parse(changed, "changed.toml"))
            ua = await reader.scsi(bytes(6), lun=4)
            assert (ua.status, ua.sense_key, ua.asc) == (2, 6, 0x3F0E)      # REPORTED LUNS DATA HAS CHANGED
            assert await report_luns(reader) == [4]
            assert (await writer.scsi(bytes(6), lun=0)).status == 0          # unaffected: no unit attention
            gone = changed.replace('initiators = ["iqn.2026-11.org.example:reader"]',
                                   'initiators = ["iqn.2026-11.org.example:nobody"]')
            server.apply_access(config_module.parse(gone, "gone.toml"))
            with trio.fail_after(5):
                with pytest.raises((EOFError, RuntimeError, trio.BrokenResourceError, AssertionError)):
                    while True:
                        await reader.scsi(bytes(6), lun=4)
            assert (await writer.scsi(bytes(6), lun=0)).status == 0


async def test_live_restart_of_an_emulator_fails_no_command(tmp_path: object) -> None:
    """Live upgrade: the operator restarts LUN 0's emulator while commands run; every one answers GOOD."""
    async with running_server(tmp_path) as (server, port), session(port) as ini:
        await first_command(ini)
        emulator = server.emulators[0]
        old_pid = emulator.pid
        statuses: list[int] = []

        async def io(n: int) -> None:
            for i in range(40):
                result = await ini.scsi(write10(64 * n + i % 64, 1), write=bytes([n]) * 512)
                statuses.append(result.status)

        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(io, n)
            await trio.sleep(0.05)
            await emulator.restart()
            await emulator.wait_ready()
        assert emulator.pid != old_pid
        assert len(statuses) == 160 and set(statuses) == {0}


async def test_mode_parameters_changed_reaches_every_nexus_but_the_one_that_changed_them(tmp_path: object) -> None:
    """SPC-4 7.5 (MODE SELECT): the change raises MODE PARAMETERS CHANGED for the other I_T nexuses only."""
    async with running_server(tmp_path) as (_, port), session(port) as changer, \
            session(port, name="iqn.2026-11.org.trioscsi.test:other") as other:
        await first_command(changer)
        await first_command(other)
        sense = await changer.scsi(bytes((0x1A, 0x08, 0x08, 0, 0xFF, 0)), read=255)   # MODE SENSE(6), DBD, caching
        assert sense.status == 0
        page = bytearray(sense.data[4:4 + 20])
        page[0] &= 0x3F
        page[2] ^= 0x04                                                               # toggle WCE
        params = bytes(4) + bytes(page)
        select = await changer.scsi(bytes((0x15, 0x10, 0, 0, len(params), 0)), write=params)
        assert select.status == 0
        assert (await changer.scsi(bytes(6))).status == 0
        ua = await other.scsi(bytes(6))
        assert (ua.status, ua.sense_key, ua.asc) == (2, 6, 0x2A01)
        assert (await other.scsi(bytes(6))).status == 0


async def test_ordered_command_sees_every_older_write(tmp_path: object) -> None:
    """An ORDERED READ delivered after a burst of SIMPLE WRITEs runs only after all of them ended."""
    async with running_server(tmp_path) as (_, port), session(port) as ini:
        await first_command(ini)
        blocks = {lba: os.urandom(512) for lba in range(0, 64, 8)}     # 8 + 1 commands: within queue_depth
        results: dict[str, object] = {}

        async def read_ordered() -> None:
            results["read"] = await ini.scsi(read10(0, 64), read=64 * 512, attr=2)    # iSCSI ATTR 2: ORDERED

        async with trio.open_nursery() as nursery:
            for lba, data in blocks.items():
                nursery.start_soon(functools.partial(ini.scsi, write10(lba, 1), write=data))
            await trio.sleep(0)                      # every WRITE has its CmdSN before the READ takes one
            nursery.start_soon(read_ordered)
        read = results["read"]
        assert read.status == 0  # type: ignore[attr-defined]
        for lba, data in blocks.items():
            assert read.data[lba * 512:(lba + 1) * 512] == data  # type: ignore[attr-defined]


async def test_a_reconnecting_initiator_port_is_told_its_nexus_was_lost(tmp_path: object) -> None:
    """SAM-5 6.3.4: the same initiator port (name and ISID) logging in again after its session ended gets
    I_T NEXUS LOSS OCCURRED; a new ISID is a new nexus and gets the power-on unit attention."""
    isid = b"\x80\x00\x00\x00\x00\x07"
    async with running_server(tmp_path) as (_, port):
        async with session(port, isid=isid) as ini:
            await first_command(ini)
        async with session(port, isid=isid) as again:
            ua = await again.scsi(bytes(6))
            assert (ua.status, ua.sense_key, ua.asc) == (2, 6, 0x2907)
            assert (await again.scsi(bytes(6))).status == 0
        async with session(port, isid=b"\x80\x00\x00\x00\x00\x08") as other_port:
            await first_command(other_port)
