"""The harness shared by the target robustness tests (test_robustness.py, test_robustness_pdus.py,
test_robustness_connections.py): the real server in this process (`serve`) with real emulator subprocesses on
loopback TCP, its configuration (`config`, `lun_command`), the project's own initiator logged in (`login`,
`running`) or driven PDU by PDU (`command`, `nop`, `next_pdu`, `answer_of`), and a `watchdog` session that must
keep being served while a test abuses the target.

Every peer is the project's own initiator (`trioscsi.iscsi.initiator.Initiator`) or raw bytes on a TCP stream,
so a test can send exactly the malformed PDU it is about.
"""
from __future__ import annotations

import json
import os
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import trio

from trioscsi import config as config_module
from trioscsi.iscsi.initiator import Initiator
from trioscsi.iscsi.pdu import RESERVED_TAG, DataIn, NopIn, NopOut, R2T, Reject, ScsiCommand
from trioscsi.server import Server

TARGET = "iqn.2026-11.org.trioscsi:robust"
QUEUE_DEPTH = 16
MRDSL = 65536                  # the target's MaxRecvDataSegmentLength
LOGIN_TIMEOUT = 1.0


def config(*, luns: str | None = None, login_timeout: float = LOGIN_TIMEOUT, nop_interval: float = 0,
           nop_timeout: float = 30, command_timeout: float = 30) -> str:
    """One target: LUN 0 a 16 MiB vdisk, LUN 3 a null device (or `luns`, TOML of [[target.lun]] tables)."""
    luns = luns or f"""
  [[target.lun]]
  lun = 0
  emulator = "vdisk"
  command_timeout = {command_timeout}
  params = {{ path = "lun0.img", size = 16777216, create = true }}
  [[target.lun]]
  lun = 3
  emulator = "null"
  command_timeout = {command_timeout}
  params = {{ size = 1073741824 }}
"""
    return f"""
[[portal]]
listen = "127.0.0.1:0"

[[target]]
name = "{TARGET}"
queue_depth = {QUEUE_DEPTH}
  [target.iscsi]
  max_recv_data_segment_length = {MRDSL}
  first_burst_length = 65536
  max_burst_length = 131072
  login_timeout = {login_timeout}
  nop_interval = {nop_interval}
  nop_timeout = {nop_timeout}
{luns}
"""


def lun_command(lun: int, argv: list[str], *, command_timeout: float = 30, params: str = "{}") -> str:
    return f"""
  [[target.lun]]
  lun = {lun}
  command = {json.dumps(argv)}
  command_timeout = {command_timeout}
  params = {params}
"""


@asynccontextmanager
async def serve(tmp_path: Path, text: str | None = None,
                prepare: Callable[[Server], None] | None = None) -> AsyncIterator[tuple[Server, int]]:
    """The real server in this process on a free loopback port; `prepare` may adjust it before it starts."""
    server = Server(config_module.parse(text or config(), "robustness.toml"), str(tmp_path))
    server.build()
    if prepare is not None:
        prepare(server)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        yield server, bound[0][1]
        nursery.cancel_scope.cancel()


def fast_health_checks(server: Server) -> None:
    """Ping every emulator often (the configuration has no key for it yet; see docs/robustness.md)."""
    for emulator in server.emulators:
        emulator.spec.ping_interval = 0.2
        emulator.spec.ping_timeout = 0.5


async def login(port: int, isid: int = 1, **kwargs: Any) -> Initiator:
    """A logged-in initiator that nobody reads for yet (tests drive `send`/`receive` themselves)."""
    ini = await Initiator.connect("127.0.0.1", port, isid=b"\x80\x00\x00\x00" + isid.to_bytes(2, "big"),
                                  **kwargs)
    await ini.login(TARGET)
    return ini


@asynccontextmanager
async def running(ini: Initiator) -> AsyncIterator[Initiator]:
    """Dispatch `ini`'s answers (and answer target NOP-Ins) while the block runs."""
    async with trio.open_nursery() as nursery:
        await nursery.start(ini.run)
        yield ini
        nursery.cancel_scope.cancel()
    await ini.stream.aclose()


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


SYNCHRONIZE_CACHE_10 = bytes([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])
TUR = bytes(6)


def lun_field(lun: int) -> int:
    return lun << 48


def command(ini: Initiator, cdb: bytes, *, itt: int, lun: int = 0, read: int = 0, write: int = 0,
            cmdsn: int | None = None, final: bool = True, data: bytes = b"") -> ScsiCommand:
    """A SCSI Command PDU; takes the next CmdSN from `ini` unless one is given."""
    if cmdsn is None:
        cmdsn = ini.cmdsn
        ini.cmdsn = (ini.cmdsn + 1) & 0xFFFFFFFF
    return ScsiCommand(immediate=False, final=final, read=bool(read), write=bool(write), attr=1,
                       lun=lun_field(lun), itt=itt, edtl=read or write, cmdsn=cmdsn, expstatsn=ini.expstatsn,
                       cdb=cdb.ljust(16, b"\0"), data=data)


def nop(ini: Initiator, itt: int, *, cmdsn: int | None = None, data: bytes = b"",
        immediate: bool = True) -> NopOut:
    if cmdsn is None:
        cmdsn = ini.cmdsn
        if not immediate:
            ini.cmdsn = (ini.cmdsn + 1) & 0xFFFFFFFF
    return NopOut(immediate=immediate, lun=0, itt=itt, ttt=RESERVED_TAG, cmdsn=cmdsn, expstatsn=ini.expstatsn,
                  data=data)


async def next_pdu(ini: Initiator, within: float = 5.0, *, skip_pings: bool = True) -> Any:
    """The next PDU from the target (answering its NOP-In pings), failing the test after `within` s."""
    with trio.fail_after(within):
        while True:
            pdu = await ini.receive()
            if skip_pings and isinstance(pdu, NopIn) and pdu.itt == RESERVED_TAG:
                await ini.send(NopOut(immediate=True, lun=0, itt=RESERVED_TAG, ttt=pdu.ttt, cmdsn=ini.cmdsn,
                                      expstatsn=ini.expstatsn))
                continue
            return pdu


async def answer_of(ini: Initiator, itt: int, within: float = 5.0) -> Any:
    """The final answer (SCSI Response, Data-In with status, NOP-In, Reject, ...) to `itt`."""
    while True:
        pdu = await next_pdu(ini, within)
        if isinstance(pdu, Reject):
            return pdu
        if getattr(pdu, "itt", None) != itt:
            continue
        if isinstance(pdu, DataIn) and not pdu.status_present:
            continue
        if hasattr(pdu, "statsn") and not isinstance(pdu, (R2T, DataIn)) or \
                isinstance(pdu, DataIn) and pdu.status_present:
            ini.expstatsn = (pdu.statsn + 1) & 0xFFFFFFFF
        return pdu


async def closed_within(stream: trio.abc.Stream, seconds: float) -> list[bytes]:
    """Read until the target closes the connection; fail if it is still open after `seconds`."""
    received = []
    with trio.fail_after(seconds):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:     # a reset is a close too
                return received
            if not chunk:
                return received
            received.append(chunk)


async def still_works(port: int, isid: int = 999) -> None:
    """A fresh session logs in and runs a read: the target as a whole is fine."""
    with trio.fail_after(10):
        ini = await login(port, isid=isid)
        async with running(ini):
            await ini.scsi(TUR, lun=3)               # the power-on unit attention
            result = await ini.scsi(read10(0, 8), lun=3, read=4096)
            assert result.status == 0 and result.data == bytes(4096)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


@dataclass
class Watchdog:
    """Another session that keeps reading while a test abuses the target; records its slowest command."""
    ini: Initiator
    commands: int = 0
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.ini.scsi(TUR, lun=3)
        task_status.started()
        while True:
            began = trio.current_time()
            result = await self.ini.scsi(read10(self.commands % 1024, 8), lun=3, read=4096)
            self.slowest = max(self.slowest, trio.current_time() - began)
            self.commands += 1
            if result.status != 0:
                self.failures.append(f"status 0x{result.status:02x}")
            await trio.sleep(0.01)


@asynccontextmanager
async def watchdog(port: int) -> AsyncIterator[Watchdog]:
    ini = await login(port, isid=0x7777)
    dog = Watchdog(ini)
    async with running(ini), trio.open_nursery() as nursery:
        await nursery.start(dog.run)
        yield dog
        nursery.cancel_scope.cancel()
    assert not dog.failures, dog.failures
    assert dog.commands > 0
    assert dog.slowest < 2.0, f"the other session waited {dog.slowest:.2f} s for one read"
