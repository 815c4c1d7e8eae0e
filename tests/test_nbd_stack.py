"""The NBD transport in-process (server, core, real vdisk emulator) driven by a small NBD client written here,
side by side with the project's iSCSI initiator on the same LU: round trips, errors, the same data seen over
both transports, reservations and unit attentions applying to both."""
from __future__ import annotations

import itertools
import os
import struct
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

from trioscsi import config as config_module
from trioscsi.config import ConfigError
from trioscsi.core.nexus import TmfFunction
from trioscsi.nbd.protocol import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, \
    Cmd, CmdFlag, Errno, Info, Option, Reply, TransmissionFlag
from trioscsi.server import Server

from reservation_helpers import KA, REGISTER, RELEASE, RESERVE, WE, params, prout_cdb
from test_stack import TARGET, read10, session, write10

SIZE = 16 << 20
CONFIG = f"""
[[portal]]
listen = "127.0.0.1:0"

[[target]]
name = "{TARGET}"
  [[target.lun]]
  lun = 0
  emulator = "vdisk"
  params = {{ path = "lun0.img", size = {SIZE}, block_size = 512, create = true }}

[[nbd]]
listen = "127.0.0.1:0"
export = "disk"
target = "{TARGET}"
lun = 0

[[nbd]]
listen = "127.0.0.1:0"
export = "ro"
target = "{TARGET}"
read_only = true
"""


class NbdClient:
    """Just enough of an NBD client: fixed newstyle, NBD_OPT_GO, simple replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.handles = itertools.count(1)
        self.size = 0
        self.flags = 0
        self.block_sizes: tuple[int, int, int] | None = None

    @classmethod
    async def connect(cls, port: int, export: str = "disk") -> NbdClient:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        magic, opt_magic, flags = struct.unpack(">QQH", await client.exact(18))
        assert (magic, opt_magic, flags) == (NBDMAGIC, IHAVEOPT, 3)
        await client.stream.send_all(struct.pack(">I", 3))
        reply, data = await client.option(Option.GO, struct.pack(">I", len(export)) + export.encode()
                                          + struct.pack(">HH", 1, Info.BLOCK_SIZE))
        while reply == Reply.INFO:
            if data[:2] == struct.pack(">H", Info.EXPORT):
                client.size, client.flags = struct.unpack(">QH", data[2:])
            elif data[:2] == struct.pack(">H", Info.BLOCK_SIZE):
                client.block_sizes = struct.unpack(">III", data[2:])
            reply, data = await client.read_option_reply(Option.GO)
        if reply != Reply.ACK:
            await client.stream.aclose()
            raise ConnectionRefusedError(f"NBD_OPT_GO answered 0x{reply:08x}: {data.decode(errors='replace')}")
        return client

    async def exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buffer += chunk
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    async def option(self, option: int, data: bytes = b"") -> tuple[int, bytes]:
        await self.stream.send_all(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        return await self.read_option_reply(option)

    async def read_option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply, length = struct.unpack(">QIII", await self.exact(20))
        assert (magic, opt) == (OPTION_REPLY_MAGIC, option)
        return reply, await self.exact(length)

    async def send(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        handle = next(self.handles)
        await self.stream.send_all(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)
        return handle

    async def reply(self, lengths: dict[int, int]) -> tuple[int, int, bytes]:
        """The next reply: (handle, error, data); `lengths` says how much data each READ handle brings."""
        magic, error, handle = struct.unpack(">IIQ", await self.exact(16))
        assert magic == SIMPLE_REPLY_MAGIC
        return handle, error, (await self.exact(lengths.get(handle, 0)) if not error else b"")

    async def call(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
                   ) -> tuple[int, bytes]:
        handle = await self.send(cmd, offset, length, data, flags)
        got, error, payload = await self.reply({handle: length if cmd == Cmd.READ else 0})
        assert got == handle
        return error, payload

    async def read(self, offset: int, length: int) -> tuple[int, bytes]:
        return await self.call(Cmd.READ, offset, length)

    async def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        return (await self.call(Cmd.WRITE, offset, len(data), data, flags))[0]

    async def close(self) -> None:
        await self.send(Cmd.DISC)
        assert await self.stream.receive_some(1) == b""      # the server closes after DISC
        await self.stream.aclose()


@asynccontextmanager
async def running(tmp_path: object, text: str = CONFIG) -> AsyncIterator[tuple[int, int]]:
    """(iSCSI port, NBD port) of a server running `text`."""
    server = Server(config_module.parse(text, "test.toml"), str(tmp_path))
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        assert server.nbd is not None
        yield bound[0][1], server.nbd.bound[0][1]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def nbd(port: int, export: str = "disk") -> AsyncIterator[NbdClient]:
    client = await NbdClient.connect(port, export)
    try:
        yield client
    finally:
        await client.stream.aclose()


async def test_handshake_reports_size_flags_and_block_sizes(tmp_path: object) -> None:
    async with running(tmp_path) as (_, port), nbd(port) as client:
        assert client.size == SIZE
        assert client.flags & TransmissionFlag.SEND_FLUSH and client.flags & TransmissionFlag.SEND_FUA
        assert client.flags & TransmissionFlag.SEND_TRIM        # vdisk files are thin: UNMAP works
        assert not client.flags & TransmissionFlag.READ_ONLY
        assert client.block_sizes == (512, 4096, 32 << 20)
        await client.close()


async def test_unknown_export_is_refused_and_list_names_both(tmp_path: object) -> None:
    async with running(tmp_path) as (_, port):
        with pytest.raises(ConnectionRefusedError, match="0x80000006"):
            await NbdClient.connect(port, "nope")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = NbdClient(stream)
        await client.exact(18)
        await stream.send_all(struct.pack(">I", 1))
        reply, data = await client.option(Option.LIST)
        names = []
        while reply == Reply.SERVER:
            names.append(data[4:].decode())
            reply, data = await client.read_option_reply(Option.LIST)
        assert (names, reply) == (["disk", "ro"], Reply.ACK)
        assert await client.option(Option.STRUCTURED_REPLY) == (Reply.ERR_UNSUP, b"option 8 is not supported")
        assert await client.option(Option.ABORT) == (Reply.ACK, b"")
        await stream.aclose()


async def test_write_read_flush_round_trip(tmp_path: object) -> None:
    pattern = os.urandom(3 << 20)
    async with running(tmp_path) as (_, port), nbd(port) as client:
        assert await client.write(1 << 20, pattern, flags=CmdFlag.FUA) == 0
        assert await client.call(Cmd.FLUSH) == (0, b"")
        assert await client.read(1 << 20, len(pattern)) == (0, pattern)
        assert await client.call(Cmd.WRITE_ZEROES, 1 << 20, 4096) == (0, b"")
        assert await client.call(Cmd.TRIM, (1 << 20) + 4096, 4096) == (0, b"")
        error, data = await client.read(1 << 20, 16384)
        assert error == 0 and data == bytes(8192) + pattern[8192:16384]
        await client.close()


async def test_concurrent_requests_answer_by_handle(tmp_path: object) -> None:
    blocks = [os.urandom(65536) for _ in range(8)]
    async with running(tmp_path) as (_, port), nbd(port) as client:
        handles = [await client.send(Cmd.WRITE, i * 65536, 65536, data) for i, data in enumerate(blocks)]
        done = {(await client.reply({}))[:2] for _ in handles}
        assert done == {(h, 0) for h in handles}
        reads = {await client.send(Cmd.READ, i * 65536, 65536): i for i in range(8)}
        for _ in reads:
            handle, error, data = await client.reply({h: 65536 for h in reads})
            assert error == 0 and data == blocks[reads[handle]]


async def test_out_of_range_and_unaligned_errors(tmp_path: object) -> None:
    async with running(tmp_path) as (_, port), nbd(port) as client:
        assert await client.read(SIZE - 512, 1024) == (Errno.EINVAL, b"")
        assert await client.write(SIZE - 512, bytes(1024)) == Errno.ENOSPC
        assert await client.call(Cmd.WRITE_ZEROES, SIZE, 512) == (Errno.ENOSPC, b"")
        assert await client.read(100, 512) == (Errno.EINVAL, b"")
        assert await client.call(Cmd.CACHE, 0, 512) == (Errno.EINVAL, b"")
        assert (await client.read(SIZE - 512, 512))[0] == 0      # the connection is still good
        await client.close()


async def test_read_only_export_refuses_writes(tmp_path: object) -> None:
    async with running(tmp_path) as (_, port), nbd(port, "ro") as client:
        assert client.flags & TransmissionFlag.READ_ONLY
        assert await client.write(0, bytes(512)) == Errno.EPERM
        assert (await client.read(0, 512))[0] == 0


async def test_malformed_request_ends_the_connection(tmp_path: object) -> None:
    async with running(tmp_path) as (_, port), nbd(port) as client:
        await client.stream.send_all(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
        assert await client.stream.receive_some(16) == b""


async def test_written_over_nbd_read_over_iscsi_and_back(tmp_path: object) -> None:
    over_nbd, over_iscsi = os.urandom(64 * 512), os.urandom(64 * 512)
    async with running(tmp_path) as (iscsi_port, nbd_port), nbd(nbd_port) as client, session(iscsi_port) as ini:
        assert await client.write(100 * 512, over_nbd) == 0
        result = await ini.scsi(read10(100, 64), read=len(over_nbd))
        if result.status == 2 and result.sense_key == 6:          # the new nexus's power-on unit attention
            result = await ini.scsi(read10(100, 64), read=len(over_nbd))
        assert result.status == 0 and result.data == over_nbd
        written = await ini.scsi(write10(1000, 64), write=over_iscsi)
        assert written.status == 0
        assert await client.read(1000 * 512, len(over_iscsi)) == (0, over_iscsi)


async def test_iscsi_write_exclusive_reservation_blocks_nbd_writes_not_reads(tmp_path: object) -> None:
    async with running(tmp_path) as (iscsi_port, nbd_port), nbd(nbd_port) as client, session(iscsi_port) as ini:
        await ini.scsi(bytes(6))                                   # the power-on unit attention
        registered = await ini.scsi(prout_cdb(REGISTER), write=params(0, KA))
        reserved = await ini.scsi(prout_cdb(RESERVE, WE), write=params(KA))
        assert (registered.status, reserved.status) == (0, 0)
        assert await client.write(0, bytes(512)) == Errno.EPERM
        assert await client.call(Cmd.WRITE_ZEROES, 0, 512) == (Errno.EPERM, b"")
        assert (await client.read(0, 512))[0] == 0
        released = await ini.scsi(prout_cdb(RELEASE, WE), write=params(KA))
        assert released.status == 0
        assert await client.write(0, b"\x5a" * 512) == 0


async def test_unit_attention_is_consumed_and_the_command_retried(tmp_path: object) -> None:
    async with running(tmp_path) as (iscsi_port, nbd_port), nbd(nbd_port) as client, session(iscsi_port) as ini:
        assert await client.write(0, b"\xa5" * 512) == 0
        response = await ini.task_management(TmfFunction.LOGICAL_UNIT_RESET, lun=0)
        assert response == 0                                       # queues 29/03 for the NBD nexus too
        assert await client.read(0, 512) == (0, b"\xa5" * 512)


async def test_acl_refuses_an_initiator_the_target_does_not_allow(tmp_path: object) -> None:
    text = CONFIG.replace('  [[target.lun]]', '  default_access = false\n  [[target.group]]\n'
                          '  initiators = ["nbd:allowed"]\n  [[target.lun]]', 1)
    text += '\n[[nbd]]\nlisten = "127.0.0.1:0"\nexport = "named"\ntarget = "' + TARGET + \
        '"\ninitiator = "nbd:allowed"\n'
    async with running(tmp_path, text) as (_, port):
        with pytest.raises(ConnectionRefusedError, match="0x80000002"):
            await NbdClient.connect(port, "disk")                  # nbd:127.0.0.1 is in no group
        async with nbd(port, "named") as client:
            assert (await client.read(0, 512))[0] == 0


@pytest.mark.parametrize("table, key, offset, message", [
    ('export = "x"\ntarget = "iqn.2026-11.org.trioscsi:none"', "nbd[0].target", 2, "no [[target]]"),
    (f'export = "x"\ntarget = "{TARGET}"\nlun = 5', "nbd[0].lun", 3, "has no LUN 5"),
    (f'target = "{TARGET}"', "nbd[0].export", 0, "required key"),
    (f'export = "x"\ntarget = "{TARGET}"\nlisten = "localhost:99999"', "nbd[0].listen", 3, "out of range"),
    (f'export = "x"\ntarget = "{TARGET}"\ncolour = 1', "nbd[0].colour", 3, "unknown key"),
])
def test_config_errors_name_file_line_and_key(table: str, key: str, offset: int, message: str) -> None:
    base = CONFIG.split("[[nbd]]")[0]
    with pytest.raises(ConfigError) as info:
        config_module.parse(base + "[[nbd]]\n" + table + "\n", "nbd.toml")
    header = base.count("\n") + 1                                 # the [[nbd]] line
    assert (info.value.file, info.value.line, info.value.key) == ("nbd.toml", header + offset, key)
    assert message in str(info.value)


def test_config_defaults_and_duplicates() -> None:
    base = CONFIG.split("[[nbd]]")[0]
    config = config_module.parse(base + f'[[nbd]]\nexport = "d"\ntarget = "{TARGET}"\n', "x.toml")
    [export] = config.nbd
    assert (export.listen, export.lun, export.read_only, export.initiator) == (("127.0.0.1", 10809), 0, False,
                                                                                None)
    with pytest.raises(ConfigError, match="already offered"):
        config_module.parse(base + f'[[nbd]]\nexport = "d"\ntarget = "{TARGET}"\n' * 2, "x.toml")
    assert config_module.parse(config_module.DEFAULT_CONFIG, "default").nbd == []


async def test_reload_closes_the_nbd_connections_that_lost_their_lun(tmp_path: object) -> None:
    """SIGHUP reload (`Server.apply_access`): a connection whose initiator may no longer use the LUN is closed,
    as is one whose LUN became read-only; the others keep working."""
    group = ('  default_access = false\n  [[target.group]]\n  initiators = ["nbd:*"]\n'
             '  luns = [ { lun = 0, device = "lun0" } ]\n  [[target.lun]]')
    text = CONFIG.replace('  [[target.lun]]', group, 1)
    server = Server(config_module.parse(text, "test.toml"), str(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert server.nbd is not None
        port = server.nbd.bound[0][1]
        async with nbd(port) as client:
            assert await client.write(0, b"\x11" * 512) == 0
            server.apply_access(config_module.parse(text, "same.toml"))          # nothing changed: stays
            assert await client.read(0, 512) == (0, b"\x11" * 512)
            read_only = text.replace('{ lun = 0, device = "lun0" }', '{ lun = 0, device = "lun0", read_only = true }')
            server.apply_access(config_module.parse(read_only, "ro.toml"))
            with trio.fail_after(5), pytest.raises((EOFError, trio.BrokenResourceError)):
                await client.read(0, 512)
        async with nbd(port) as client:                                         # a new connection is read-only
            assert client.flags & 0x02                                           # NBD_FLAG_READ_ONLY
            gone = read_only.replace('initiators = ["nbd:*"]', 'initiators = ["nbd:nobody"]')
            server.apply_access(config_module.parse(gone, "gone.toml"))
            with trio.fail_after(5), pytest.raises((EOFError, trio.BrokenResourceError)):
                await client.read(0, 512)
        nursery.cancel_scope.cancel()
