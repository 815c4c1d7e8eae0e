"""Robustness of the whole target against malformed and out-of-sequence PDUs (RFC 7143), with the in-process
server, real emulator subprocesses and loopback TCP (harness: robustness_helpers.py).

* garbage, a truncated PDU, an unknown opcode or AHS, an oversized data segment, a huge EDTL, a bad Data-Out or a
  duplicate ITT is answered (Reject, SCSI status) or the connection is dropped; it never disturbs another session,
  and it never makes the target hold memory the peer chose (an EDTL, a data segment);
* CmdSN: a command outside the window is ignored, a gap is delivered in order once filled (by whatever PDU), and
  ABORT TASK frees a write that waits for Data-Out.

Each test bounds its own time with `trio.fail_after`.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from robustness_helpers import LOGIN_TIMEOUT, MRDSL, QUEUE_DEPTH, TARGET, TUR, answer_of, closed_within, \
    command, login, lun_field, next_pdu, nop, read10, rss_mib, serve, still_works, watchdog, write10, write16
from trioscsi.iscsi.framing import encode_pdu
from trioscsi.iscsi.pdu import RESERVED_TAG, DataIn, DataOut, LoginRequest, NopIn, R2T, Reject, RejectReason, \
    ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, encode_header
from trioscsi.iscsi.negotiation import encode_text

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
