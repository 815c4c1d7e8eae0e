"""Robustness of the whole target (in-process server, real emulator subprocesses, loopback TCP): what a broken,
slow or hostile peer and a crashing or hung emulator may do, and what must hold anyway.

Every peer here is the project's own initiator (`trioscsi.iscsi.initiator.Initiator`) or raw bytes on a TCP
stream, so a test can send exactly the malformed PDU it is about.  The rules checked (RFC 7143 and the
issue "emulators may crash, hang or be upgraded"):

* a malformed, truncated, oversized or out-of-sequence PDU is answered (Reject, SCSI status) or the
  connection is dropped; it never disturbs another session, and it never makes the target hold memory the
  peer chose (an EDTL, a data segment, responses it does not read);
* a login that never finishes and a connection that never answers NOP-In are dropped in bounded time;
* an emulator that is killed or hung costs its initiators a retry at most: acknowledged data is on the
  medium, nothing waits longer than `command_timeout`, and an emulator that cannot start does not keep the
  target (or its other LUs) offline;
* durability: a write acknowledged GOOD went through O_DSYNC (write-through LU, FUA) or was covered by an
  fdatasync before SYNCHRONIZE CACHE answered GOOD.

Each test bounds its own time with `trio.fail_after`; the file runs in about 60 s.
"""
from __future__ import annotations

import json
import contextlib
import os
import signal
import socket
import struct
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import trio

from trioscsi import config as config_module
from trioscsi.iscsi.framing import encode_pdu
from trioscsi.iscsi.initiator import Initiator
from trioscsi.iscsi.pdu import RESERVED_TAG, DataIn, DataOut, LoginRequest, LogoutRequest, NopIn, NopOut, \
    R2T, Reject, RejectReason, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, encode_header
from trioscsi.iscsi.negotiation import encode_text
from trioscsi.server import Server

TARGET = "iqn.2026-11.org.trioscsi:robust"
QUEUE_DEPTH = 16
MRDSL = 65536                  # the target's MaxRecvDataSegmentLength
LOGIN_TIMEOUT = 1.0
BROKEN = Path(__file__).parent / "broken_emulators"


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


# ---- garbage, truncated and malformed PDUs ---------------------------------------------------------------


GARBAGE = {
    "http": b"GET / HTTP/1.0\r\nHost: x\r\n\r\n" + bytes(64),
    "zeros": bytes(4096),
    "tls hello": bytes.fromhex("16030100f4010000f00303") + os.urandom(240),
    "random": bytes(range(256)) * 4,
    "scsi command before login": encode_header(ScsiCommand(cdb=bytes(16), itt=1, edtl=0, cmdsn=1)),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
async def test_garbage_before_login_is_dropped_and_others_carry_on(tmp_path: Path, name: str) -> None:
    async with serve(tmp_path) as (_, port), watchdog(port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(GARBAGE[name])
        await closed_within(stream, LOGIN_TIMEOUT + 2)
        await stream.aclose()
        await still_works(port)


async def test_truncated_pdu_then_close_or_silence(tmp_path: Path) -> None:
    """Half a Login Request then EOF: closed at once; half a PDU then silence: closed by login_timeout."""
    login_pdu = b"".join(bytes(b) for b in encode_pdu(LoginRequest(
        transit=True, csg=0, nsg=1, isid=b"\x80" + bytes(5), itt=1, cmdsn=1,
        data=encode_text([("InitiatorName", "iqn.2026-11.org.example:x"), ("TargetName", TARGET)]))))
    async with serve(tmp_path) as (_, port), watchdog(port):
        for cut in (1, 20, 47, 48, len(login_pdu) - 3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(login_pdu[:cut])
            await stream.send_eof()
            await closed_within(stream, 2)
            await stream.aclose()
        began = trio.current_time()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(login_pdu[:30])
        await closed_within(stream, LOGIN_TIMEOUT + 2)
        assert trio.current_time() - began >= LOGIN_TIMEOUT * 0.9
        await stream.aclose()
        # the same in full feature phase: half a SCSI command, then EOF
        ini = await login(port)
        header = encode_header(command(ini, TUR, itt=5))
        await ini.stream.send_all(header[:40])
        await ini.stream.send_eof()
        await closed_within(ini.stream, 2)
        await still_works(port)


async def test_unknown_opcode_and_bad_ahs_are_rejected_and_the_session_goes_on(tmp_path: Path) -> None:
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        bogus = bytearray(48)
        bogus[0] = 0x1C                                    # a reserved initiator opcode
        struct.pack_into(">I", bogus, 16, 0x1234)
        await ini.stream.send_all(bytes(bogus))
        reject = await next_pdu(ini)
        assert isinstance(reject, Reject) and reject.reason == RejectReason.COMMAND_NOT_SUPPORTED
        # a SCSI Command whose AHS is of a reserved type (RFC 7143 11.2.1.2: a protocol error)
        header = bytearray(encode_header(command(ini, TUR, itt=6)))
        header[4] = 1                                      # TotalAHSLength: one word
        await ini.stream.send_all(bytes(header) + struct.pack(">HBB", 1, 0x21, 0))
        reject = await next_pdu(ini)
        assert isinstance(reject, Reject) and reject.reason == RejectReason.PROTOCOL_ERROR
        ini.cmdsn -= 1                                     # the rejected command did not consume its CmdSN
        await ini.send(nop(ini, itt=7, data=b"still here"))
        answer = await answer_of(ini, 7)
        assert isinstance(answer, NopIn) and answer.data == b"still here"


async def test_oversized_data_segment_is_rejected_discarded_and_the_session_goes_on(tmp_path: Path) -> None:
    """RFC 7143 11.2.1.5 / 7.1: a data segment over MaxRecvDataSegmentLength is a protocol error (Reject);
    the target skips it without buffering it whole, and the connection stays usable."""
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        before = rss_mib()
        for _ in range(4):
            await ini.send(nop(ini, itt=11, data=os.urandom(4 * MRDSL)))
            reject = await next_pdu(ini)
            assert isinstance(reject, Reject) and reject.reason == RejectReason.PROTOCOL_ERROR
        await ini.send(nop(ini, itt=12, data=b"x" * 100))
        answer = await answer_of(ini, 12)
        assert isinstance(answer, NopIn) and answer.data == b"x" * 100
        # the largest DataSegmentLength there is (2**24 - 1): skipped as it streams in, never held whole
        header = bytearray(encode_header(nop(ini, itt=13)))
        header[5:8] = (0xFFFFFF).to_bytes(3, "big")
        await ini.stream.send_all(bytes(header))
        chunk = bytes(1 << 20)
        for _ in range(16):                                 # 2**24 - 1 bytes of data and 1 of padding
            await ini.stream.send_all(chunk)
        reject = await next_pdu(ini)
        assert isinstance(reject, Reject) and reject.reason == RejectReason.PROTOCOL_ERROR
        await ini.send(nop(ini, itt=14, data=b"after"))
        answer = await answer_of(ini, 14)
        assert isinstance(answer, NopIn) and answer.data == b"after"
        grown = rss_mib() - before
        assert grown < 32, f"the target grew by {grown:.0f} MiB while skipping oversized segments"
        await still_works(port)


async def test_write_with_a_huge_edtl_is_not_buffered(tmp_path: Path) -> None:
    """A WRITE whose Expected Data Transfer Length is 1 GiB must not make the target allocate 1 GiB: the LU's
    maximum transfer is 16 MiB (emulator frames), so the command can be refused before its data phase."""
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        await ini.send(command(ini, TUR, itt=20, lun=0))   # the power-on unit attention
        await answer_of(ini, 20)
        before = rss_mib()
        cmd = command(ini, write16(0, 2 * 1024 * 1024), itt=21, lun=0, write=1 << 30)
        await ini.send(cmd)
        answer = await answer_of(ini, 21)
        grown = rss_mib() - before
        assert grown < 256, f"the target grew by {grown:.0f} MiB for one command's announced length"
        assert isinstance(answer, ScsiResponse) and answer.status == 2, \
            f"expected CHECK CONDITION before any data, got {answer}"


async def test_transfer_length_beyond_32_bits_does_not_bring_the_target_down(tmp_path: Path) -> None:
    """READ(16) of 0xFFFFFFFF blocks with an EDTL of 512: the overflow residual (2 TiB - 512) does not fit the
    32-bit Residual Count.  The answer must still be encodable (RFC 7143 11.4.5), and whatever goes wrong
    with one command must not end the server (found by tests/test_fuzz.py: the ValueError from encode_header
    went up through the session's nursery and stopped the whole target)."""
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        read16 = struct.pack(">BBQIBB", 0x88, 0, 0, 0xFFFFFFFF, 0, 0)
        await ini.send(command(ini, read16, itt=70, lun=3, read=512))
        answer = await answer_of(ini, 70)
        assert isinstance(answer, (ScsiResponse, DataIn)), answer
        await ini.send(command(ini, read16, itt=71, lun=3, read=512))
        answer = await answer_of(ini, 71)
        assert isinstance(answer, (ScsiResponse, DataIn)) and answer.overflow, answer
        await still_works(port)


async def test_data_out_errors_are_rejected(tmp_path: Path) -> None:
    """Data-Out for an unknown ITT, with a TTT that was never sent, or with a wrong DataSN: Reject."""
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        await ini.send(DataOut(final=True, lun=0, itt=0x4444, ttt=RESERVED_TAG, datasn=0, buffer_offset=0,
                               data=bytes(512)))
        reject = await next_pdu(ini)
        assert isinstance(reject, Reject)
        # WRITE of 2 blocks, F=0: one unsolicited block comes as immediate data, the second as Data-Out
        await ini.send(command(ini, write10(0, 2), itt=30, lun=3, write=1024, final=False, data=bytes(512)))
        await ini.send(DataOut(final=True, lun=lun_field(3), itt=30, ttt=0x1234, datasn=0, buffer_offset=512,
                               data=bytes(512)))
        reject = await next_pdu(ini)
        assert isinstance(reject, Reject) and reject.reason == RejectReason.INVALID_PDU_FIELD
        await ini.send(DataOut(final=True, lun=lun_field(3), itt=30, ttt=RESERVED_TAG, datasn=7,
                               buffer_offset=512, data=bytes(512)))
        reject = await next_pdu(ini)
        assert isinstance(reject, Reject) and reject.reason == RejectReason.PROTOCOL_ERROR
        await ini.send(DataOut(final=True, lun=lun_field(3), itt=30, ttt=RESERVED_TAG, datasn=0,
                               buffer_offset=512, data=bytes(512)))
        answer = await answer_of(ini, 30)
        assert isinstance(answer, ScsiResponse)            # unit attention or GOOD: the command completed


async def test_duplicate_itt_is_rejected_task_in_progress(tmp_path: Path) -> None:
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        # a WRITE that waits for Data-Out keeps its ITT busy
        await ini.send(command(ini, write10(0, 2), itt=40, lun=3, write=1024, final=True))
        r2t = await next_pdu(ini)
        assert isinstance(r2t, R2T)
        await ini.send(command(ini, TUR, itt=40, lun=3))
        reject = await next_pdu(ini)
        assert isinstance(reject, Reject) and reject.reason == RejectReason.TASK_IN_PROGRESS


# ---- sequence numbers -------------------------------------------------------------------------------------


async def test_cmdsn_outside_the_window_is_ignored(tmp_path: Path) -> None:
    """RFC 7143 4.2.2.1: a non-immediate command outside [ExpCmdSN, MaxCmdSN] is silently ignored."""
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        expected = ini.cmdsn
        for wrong in (expected + 1000, expected - 1, expected + QUEUE_DEPTH + 5, expected ^ 0x80000000):
            await ini.send(nop(ini, itt=50, cmdsn=wrong & 0xFFFFFFFF, immediate=False))
        await ini.send(nop(ini, itt=51, cmdsn=expected, immediate=False, data=b"in order"))
        answer = await answer_of(ini, 51)
        assert isinstance(answer, NopIn) and answer.itt == 51, f"got {answer}"
        assert answer.expcmdsn == (expected + 1) & 0xFFFFFFFF


async def test_cmdsn_gap_is_delivered_in_order_once_filled(tmp_path: Path) -> None:
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        first = ini.cmdsn
        await ini.send(nop(ini, itt=61, cmdsn=first + 1, immediate=False, data=b"second"))
        await ini.send(nop(ini, itt=60, cmdsn=first, immediate=False, data=b"first"))
        one = await answer_of(ini, 60)
        two = await answer_of(ini, 61)
        assert (one.data, two.data) == (b"first", b"second")
        assert two.expcmdsn == (first + 2) & 0xFFFFFFFF


async def test_cmdsn_gap_filled_by_another_kind_of_pdu(tmp_path: Path) -> None:
    """A command that arrived early waits for the gap before it; whatever fills the gap (a NOP-Out, a task
    management request, another command) must release the early command *as what it is*.  Each PDU must be
    answered by its own handler (found by tests/test_fuzz.py: a TMF that filled the gap ran the queued SCSI
    command as a TMF, and the AttributeError stopped the whole target)."""
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        base = ini.cmdsn
        # an early READ, released by a NOP-Out
        await ini.send(command(ini, read10(0, 1), itt=80, lun=3, read=512, cmdsn=base + 1))
        await ini.send(nop(ini, itt=81, cmdsn=base, immediate=False, data=b"gap"))
        answers = {}
        for _ in range(2):
            pdu = await next_pdu(ini)
            answers[pdu.itt] = pdu
        assert isinstance(answers[81], NopIn) and answers[81].data == b"gap", answers
        assert isinstance(answers[80], (ScsiResponse, DataIn)), answers
        # an early NOP-Out, released by a READ
        await ini.send(nop(ini, itt=83, cmdsn=base + 3, immediate=False, data=b"late"))
        await ini.send(command(ini, read10(0, 1), itt=82, lun=3, read=512, cmdsn=base + 2))
        answers = {}
        while len(answers) < 2:
            pdu = await next_pdu(ini)
            if isinstance(pdu, DataIn) and not pdu.status_present:
                continue
            answers[pdu.itt] = pdu
        assert isinstance(answers[83], NopIn) and answers[83].data == b"late", answers
        assert isinstance(answers[82], (ScsiResponse, DataIn)), answers
        # an early TEST UNIT READY, released by a (non-immediate) ABORT TASK SET
        await ini.send(command(ini, TUR, itt=85, lun=3, cmdsn=base + 5))
        await ini.send(TaskMgmtRequest(immediate=False, function=2, lun=lun_field(3), itt=84, rtt=RESERVED_TAG,
                                       cmdsn=base + 4, expstatsn=ini.expstatsn))
        answers = {}
        while len(answers) < 2:
            pdu = await next_pdu(ini)
            answers[pdu.itt] = pdu
        assert isinstance(answers[84], TaskMgmtResponse), answers
        assert isinstance(answers[85], ScsiResponse), answers
        await still_works(port)


async def test_abort_task_of_a_write_waiting_for_data_out(tmp_path: Path) -> None:
    """A WRITE whose Data-Out never comes holds its ITT and a CmdSN slot.  ABORT TASK must end it (RFC 7143
    11.5.1: FUNCTION COMPLETE) and free both, or a few such writes close the window for good."""
    async with serve(tmp_path) as (_, port):
        ini = await login(port)
        for itt in range(100, 100 + QUEUE_DEPTH):
            await ini.send(command(ini, write10(itt, 2), itt=itt, lun=3, write=1024, final=True))
            assert isinstance(await next_pdu(ini), R2T)
        for itt in range(100, 100 + QUEUE_DEPTH):
            await ini.send(TaskMgmtRequest(immediate=True, function=1, lun=lun_field(3), itt=500 + itt, rtt=itt,
                                           cmdsn=ini.cmdsn, expstatsn=ini.expstatsn))
            answer = await answer_of(ini, 500 + itt)
            assert isinstance(answer, TaskMgmtResponse) and answer.response == 0, \
                f"ABORT TASK of ITT {itt} answered {answer}"
        await ini.send(command(ini, TUR, itt=900, lun=3))
        answer = await answer_of(ini, 900)
        assert isinstance(answer, ScsiResponse), "the window stayed closed after the aborts"


# ---- logins that never finish, idle connections, a flood -------------------------------------------------


async def test_login_that_never_finishes_is_dropped_after_login_timeout(tmp_path: Path) -> None:
    async with serve(tmp_path) as (_, port), watchdog(port):
        # 1. nothing at all
        began = trio.current_time()
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        await closed_within(silent, LOGIN_TIMEOUT + 2)
        assert trio.current_time() - began >= LOGIN_TIMEOUT * 0.9
        # 2. the first login step, then silence (security stage, T=0)
        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        await stalled.send_all(b"".join(bytes(b) for b in encode_pdu(LoginRequest(
            transit=False, csg=0, nsg=0, isid=b"\x80" + bytes(5), itt=1, cmdsn=1,
            data=encode_text([("InitiatorName", "iqn.2026-11.org.example:slow"), ("SessionType", "Normal"),
                              ("TargetName", TARGET), ("AuthMethod", "None")])))))
        received = await closed_within(stalled, LOGIN_TIMEOUT + 2)
        assert received, "the first login request was not answered"
        # 3. a valid login dripped one byte at a time (slowloris): the timeout covers the whole login
        drip = await trio.open_tcp_stream("127.0.0.1", port)
        began = trio.current_time()
        payload = b"".join(bytes(b) for b in encode_pdu(LoginRequest(
            transit=True, csg=0, nsg=1, isid=b"\x80" + bytes(5), itt=1, cmdsn=1,
            data=encode_text([("InitiatorName", "iqn.2026-11.org.example:drip"), ("TargetName", TARGET)]))))
        with trio.move_on_after(LOGIN_TIMEOUT + 2):
            try:
                for byte in payload:
                    await drip.send_all(bytes([byte]))
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await closed_within(drip, 1)
        assert trio.current_time() - began < LOGIN_TIMEOUT + 2


def _failed_login(port: int) -> float:
    """Blocking: connect, send a Login Request in stage 2 (there is none), close our side; seconds until the
    target closed the connection (99 if it did not within 3 s)."""
    bad_stage = b"".join(bytes(b) for b in encode_pdu(LoginRequest(
        transit=True, csg=2, nsg=2, isid=b"\x80" + bytes(5), itt=1, cmdsn=1,
        data=encode_text([("InitiatorName", "iqn.2026-11.org.example:x")]))))
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(bad_stage)
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            return 99.0
        except ConnectionResetError:
            pass
    return time.monotonic() - began


async def test_failed_login_is_answered_and_closed(tmp_path: Path) -> None:
    """A Login Request that fails at once (here: CSG 2, a stage that does not exist) gets its Login Response and
    the connection is closed.  Sent from another thread so the request is already there when the connection
    starts: the login then fails before the connection's sender ran once, and `Connection._flush` must not wait
    for an event the sender will never set (found by tests/test_fuzz.py; the direct write in `queue()` of
    6f3843e hides it on this path, test_logout_with_answers_still_queued_closes_the_connection still shows it)."""
    async with serve(tmp_path, config(login_timeout=30)) as (_, port):
        for attempt in range(30):
            waited = await trio.to_thread.run_sync(_failed_login, port)
            assert waited < 2, f"attempt {attempt}: the connection was still open after 3 s"


def _logout_behind_other_answers(port: int) -> tuple[float, bytes]:
    """Blocking: log in, then in one write: a Data-Out nobody asked for (answered with a Reject), an immediate
    READ CAPACITY (answered by the emulator a moment later) and a Logout (reason 2: answered "recovery not
    supported", then the target closes).  Returns (seconds until the target closed, what it sent)."""
    from peer.rawiscsi import RawSession
    raw = RawSession("127.0.0.1", port, TARGET, initiator="iqn.2026-11.org.example:logout", timeout=3)
    raw.login()
    burst = [DataOut(final=True, lun=0, itt=24, ttt=1, datasn=3, data=bytes(7)),
             ScsiCommand(immediate=True, final=True, read=True, attr=1, lun=0, itt=1, edtl=8, cmdsn=raw.cmdsn,
                         cdb=bytes([0x25]).ljust(16, b"\0")),
             LogoutRequest(immediate=True, reason=2, itt=25, cid=0, cmdsn=raw.cmdsn)]
    raw.sock.sendall(b"".join(bytes(b) for pdu in burst for b in encode_pdu(pdu)))
    began = time.monotonic()
    received = b""
    try:
        while chunk := raw.sock.recv(65536):
            received += chunk
    except TimeoutError:
        return 99.0, received
    except ConnectionResetError:
        pass
    finally:
        raw.sock.close()
    return time.monotonic() - began, received


async def test_logout_with_answers_still_queued_closes_the_connection(tmp_path: Path) -> None:
    """The logout is answered and the connection closed even when other answers are queued while the sender
    is busy: `Connection._flush` must not wait on a `_drained` event that `_send_loop` replaced without
    setting (found by tests/test_fuzz.py; each hang leaks a connection task and its socket)."""
    async with serve(tmp_path) as (_, port):
        for attempt in range(10):
            waited, received = await trio.to_thread.run_sync(_logout_behind_other_answers, port)
            assert waited < 2, f"attempt {attempt}: the connection was still open 3 s after the logout"
            assert received, "nothing was answered"


async def test_idle_connection_that_ignores_nop_in_is_dropped(tmp_path: Path) -> None:
    async with serve(tmp_path, config(nop_interval=0.3, nop_timeout=0.5)) as (_, port):
        keeps = await login(port, isid=2)
        async with running(keeps):                        # answers the target's NOP-Ins
            mute = await login(port, isid=3)               # never answers them
            began = trio.current_time()
            pings = [p for p in await closed_within(mute.stream, 3)]
            assert pings, "the target dropped the connection without pinging it first"
            assert trio.current_time() - began >= 0.3
            assert await keeps.nop(b"alive") == b"alive"   # the polite one is still logged in


async def test_a_hundred_connections_at_once_while_another_session_works(tmp_path: Path) -> None:
    """100 connections opened together, each logging in (its own ISID), pinging and logging out, and 100 more
    that connect and say nothing: the target serves them all, drops the mute ones at login_timeout, and the
    session already running never waits long."""
    results: list[bytes] = []
    async with serve(tmp_path) as (server, port), watchdog(port):
        async def one(i: int) -> None:
            ini = await login(port, isid=0x1000 + i)
            async with running(ini):
                results.append(await ini.nop(f"conn {i}".encode()))
                assert await ini.logout() == 0

        async def mute() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await closed_within(stream, LOGIN_TIMEOUT + 3)
            await stream.aclose()

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
                    nursery.start_soon(mute)
        assert sorted(results) == sorted(f"conn {i}".encode() for i in range(100))
        assert server.iscsi is not None
        with trio.fail_after(2):
            while len(server.iscsi.registry) > 1:          # only the watchdog's session is left
                await trio.sleep(0.02)


async def test_client_that_stops_reading_cannot_make_the_target_buffer_without_bound(tmp_path: Path) -> None:
    """A client that keeps sending 128 KiB READs in its CmdSN window and never reads: the answers the target
    holds for it must stay bounded by that window (queue_depth × 128 KiB = 2 MiB here), not grow with the
    number of commands (600 × 128 KiB = 75 MiB)."""
    async with serve(tmp_path) as (_, port), watchdog(port):
        ini = await login(port)
        before = rss_mib()
        with trio.fail_after(20):
            for i in range(600):
                await ini.send(command(ini, read10(0, 256), itt=1000 + i, lun=3, read=256 * 512))
                if i % 8 == 7:
                    await trio.sleep(0.01)          # let the target work through its window
            await trio.sleep(0.5)
        grown = rss_mib() - before
        await ini.stream.aclose()
        assert grown < 40, f"the target holds {grown:.0f} MiB of answers for a client that does not read"


# ---- emulators that die or hang ----------------------------------------------------------------------------


async def test_writes_in_flight_survive_an_emulator_kill(tmp_path: Path) -> None:
    """A full window of writers (queue_depth 16), SIGKILL in the middle: every write answers GOOD (resubmitted
    to the next incarnation) and reads back as written."""
    async with serve(tmp_path) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            patterns = {lba: os.urandom(4096) for lba in range(0, QUEUE_DEPTH * 16 * 8, 8)}
            statuses: list[int] = []

            async def writer(lbas: list[int]) -> None:
                for lba in lbas:
                    statuses.append((await ini.scsi(write10(lba, 8), write=patterns[lba])).status)

            pid = server.emulators[0].pid
            assert pid is not None
            lbas = sorted(patterns)
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for k in range(QUEUE_DEPTH):
                        nursery.start_soon(writer, lbas[k::QUEUE_DEPTH])
                    await trio.sleep(0.05)
                    os.kill(pid, signal.SIGKILL)
            assert statuses == [0] * len(patterns)
            assert server.emulators[0].pid != pid
            for lba, pattern in patterns.items():
                assert (await ini.scsi(read10(lba, 8), read=4096)).data == pattern


async def test_nop_is_answered_while_the_emulator_is_hung(tmp_path: Path) -> None:
    async with serve(tmp_path) as (server, port):
        ini = await login(port)
        async with running(ini):
            pid = server.emulators[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                with trio.fail_after(1):
                    assert await ini.nop(b"hello") == b"hello"
            finally:
                os.kill(pid, signal.SIGCONT)


async def test_hung_emulator_is_killed_and_restarted_by_the_health_check(tmp_path: Path) -> None:
    async with serve(tmp_path, prepare=fast_health_checks) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            assert (await ini.scsi(write10(0, 1, fua=True), write=b"A" * 512)).status == 0
            emulator = server.emulators[0]
            pid = emulator.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            with trio.fail_after(5):
                result = await ini.scsi(read10(0, 1), read=512)
            assert result.status == 0 and result.data == b"A" * 512
            assert emulator.pid != pid and emulator.restarts >= 1


async def test_hung_emulator_answers_within_command_timeout(tmp_path: Path) -> None:
    """SIGSTOP and default health checks (slower than the command's deadline): the command is answered
    within command_timeout, abort included ("no initiator waits longer than the configured limit")."""
    limit = 2.0
    async with serve(tmp_path, config(command_timeout=limit)) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            pid = server.emulators[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                began = trio.current_time()
                with trio.fail_after(limit + 10):
                    result = await ini.scsi(read10(0, 8), read=4096)
                waited = trio.current_time() - began
            finally:
                with contextlib.suppress(ProcessLookupError):   # killed as hung, then restarted
                    os.kill(pid, signal.SIGCONT)
            assert result.status != 0
            assert waited <= limit + 0.5, f"answered after {waited:.1f} s, command_timeout is {limit} s"


async def test_timed_out_read_gets_a_status_initiators_retry(tmp_path: Path) -> None:
    """A READ that timed out in a hung emulator was not executed for the initiator and is safe to repeat:
    answer it with a status that Linux *and* QEMU/libiscsi retry (BUSY, TASK SET FULL or a UNIT ATTENTION).
    ABORTED COMMAND (0B/08/01) makes QEMU fail the request with ECANCELED (scripts/fault-drill --mode stop
    --command-timeout 3 shows qemu-img bench dying on it)."""
    async with serve(tmp_path, config(command_timeout=1.0)) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            pid = server.emulators[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                with trio.fail_after(15):
                    result = await ini.scsi(read10(0, 8), read=4096)
            finally:
                with contextlib.suppress(ProcessLookupError):   # the hung emulator may have been killed
                    os.kill(pid, signal.SIGCONT)
            retryable = result.status in (0x08, 0x28) or (result.status == 2 and result.sense_key == 6)
            assert retryable, f"status 0x{result.status:02x}, sense {result.sense_key:X}/{result.asc:04X}"


async def test_command_that_kills_its_emulator_is_not_resubmitted_forever(tmp_path: Path) -> None:
    """An emulator that dies on every command (tests/broken_emulators/crash_mid_reply.py): TEST UNIT READY is
    safe to repeat, but resending it to incarnation after incarnation is a crash loop.  It must be answered
    (NOT READY once the crash-loop limit is reached) long before its 30 s deadline."""
    luns = lun_command(0, [sys.executable, str(BROKEN / "crash_mid_reply.py")])
    async with serve(tmp_path, config(luns=luns)) as (server, port):
        ini = await login(port)
        async with running(ini):
            unit_attention = await ini.scsi(TUR, lun=0)     # answered by the core, no emulator involved
            assert unit_attention.sense_key == 6
            began = trio.current_time()
            with trio.fail_after(35):
                result = await ini.scsi(TUR, lun=0)
            waited = trio.current_time() - began
            assert waited < 15, f"answered after {waited:.1f} s and {server.emulators[0].restarts} restarts"
            assert result.status == 2 and result.sense_key == 2, \
                f"expected NOT READY, got status 0x{result.status:02x} sense {result.sense_key:X}/{result.asc:04X}"


async def test_emulator_that_cannot_start_does_not_keep_the_target_offline(tmp_path: Path) -> None:
    """LUN 1's emulator exits at once, every time: the portal must still open, LUN 0 must work, and LUN 1
    must answer NOT READY (not hang), once its restarts have failed often enough."""
    luns = f"""
  [[target.lun]]
  lun = 0
  emulator = "null"
  params = {{ size = 1048576 }}
{lun_command(1, [sys.executable, "-c", "import sys; sys.exit(1)"], command_timeout=30)}
"""
    with trio.move_on_after(10) as waited:
        async with serve(tmp_path, config(luns=luns)) as (_, port):
            ini = await login(port)
            async with running(ini):
                await ini.scsi(TUR, lun=0)
                assert (await ini.scsi(TUR, lun=0)).status == 0
                with trio.fail_after(8):
                    result = await ini.scsi(TUR, lun=1)
                    if result.sense_key == 6:            # the new nexus's power-on unit attention comes first
                        result = await ini.scsi(TUR, lun=1)
                assert result.status == 2 and result.sense_key == 2, f"LUN 1 answered {result}"
    assert not waited.cancelled_caught, "the target did not open its portal within 10 s"


async def test_non_repeatable_command_lost_with_its_emulator_is_answered(tmp_path: Path) -> None:
    """COMPARE AND WRITE is not safe to repeat: when its emulator dies under it, it is completed with CHECK
    CONDITION (not resent, not left hanging) and the LU serves the next command."""
    async with serve(tmp_path) as (server, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            pid = server.emulators[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            caw = struct.pack(">BBQ3xBBB", 0x89, 0, 0, 1, 0, 0)      # COMPARE AND WRITE, 1 block at LBA 0
            answers: list[Any] = []

            async def send_caw() -> None:
                answers.append(await ini.scsi(caw, write=bytes(1024)))
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_caw)
                    await trio.sleep(0.3)
                    os.kill(pid, signal.SIGKILL)
            result = answers[0]
            assert result.status == 2 and result.sense_key in (0x6, 0xB), result
            assert (await ini.scsi(read10(0, 1), read=512)).status in (0, 2)


# ---- durability ---------------------------------------------------------------------------------------------

# The vdisk emulator with its durability syscalls recorded: each line of the log is written (O_APPEND) after
# the syscall returned, so a line is in the file before the `done` that follows it reaches the core.
TRACED_VDISK = r"""
import json, os, runpy, sys
sys.path.insert(0, sys.argv[2])          # the checkout, for `emulators`
log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
flags = {}
def note(**entry):
    os.write(log, (json.dumps(entry) + "\n").encode())
real_open, real_pwrite, real_pwritev = os.open, os.pwrite, os.pwritev
real_fdatasync, real_fsync = os.fdatasync, os.fsync
def traced_open(path, f, *a, **k):
    fd = real_open(path, f, *a, **k)
    flags[fd] = f
    return fd
def traced_pwrite(fd, data, offset):
    n = real_pwrite(fd, data, offset)
    note(op="write", fd=fd, offset=offset, length=n, dsync=bool(flags.get(fd, 0) & (os.O_DSYNC | os.O_SYNC)))
    return n
def traced_pwritev(fd, buffers, offset, *a):
    n = real_pwritev(fd, buffers, offset, *a)
    note(op="write", fd=fd, offset=offset, length=n, dsync=bool(flags.get(fd, 0) & (os.O_DSYNC | os.O_SYNC)))
    return n
def traced_sync(real):
    def sync(fd):
        real(fd)
        note(op="sync", fd=fd)
    return sync
os.open, os.pwrite, os.pwritev = traced_open, traced_pwrite, traced_pwritev
os.fdatasync, os.fsync = traced_sync(real_fdatasync), traced_sync(real_fsync)
sys.argv = ["vdisk"]
runpy.run_module("emulators.vdisk", run_name="__main__")
"""


def traced_vdisk(tmp_path: Path, *, write_through: bool) -> tuple[str, Path]:
    trace = tmp_path / "syscalls.jsonl"
    params = f'{{ path = "traced.img", size = 4194304, create = true, write_through = {str(write_through).lower()} }}'
    argv = [sys.executable, "-c", TRACED_VDISK, str(trace), str(Path(__file__).resolve().parents[1])]
    return config(luns=lun_command(0, argv, params=params)), trace


def syscalls(trace: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def durable_write_at(trace: Path, offset: int, length: int) -> bool:
    """Some write covering [offset, offset+length) through O_DSYNC, or followed by a sync of its fd."""
    calls = syscalls(trace)
    for i, call in enumerate(calls):
        if call["op"] == "write" and call["offset"] <= offset and offset + length <= call["offset"] + call["length"]:
            if call["dsync"] or any(c["op"] == "sync" and c["fd"] == call["fd"] for c in calls[i + 1:]):
                return True
    return False


@pytest.mark.parametrize("case", ["write-through", "fua", "synchronize cache"])
async def test_acknowledged_write_is_on_stable_storage(tmp_path: Path, case: str) -> None:
    """A write acknowledged GOOD is durable when the LU is write-through, FUA was set, or a SYNCHRONIZE CACHE
    that covered it answered GOOD; a plain write-back write need not be (and is not) synced."""
    text, trace = traced_vdisk(tmp_path, write_through=case == "write-through")
    async with serve(tmp_path, text) as (_, port):
        ini = await login(port)
        async with running(ini):
            await ini.scsi(TUR, lun=0)
            lba = 64
            result = await ini.scsi(write10(lba, 8, fua=case == "fua"), write=os.urandom(4096))
            assert result.status == 0
            if case == "synchronize cache":
                assert not durable_write_at(trace, lba * 512, 4096), "a write-back write was synced anyway"
                assert (await ini.scsi(SYNCHRONIZE_CACHE_10)).status == 0
            assert durable_write_at(trace, lba * 512, 4096), \
                f"GOOD before the data was durable ({case}): {syscalls(trace)}"
