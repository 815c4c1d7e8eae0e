"""Robustness of the whole target against connections that misbehave, with the in-process server, real
emulator subprocesses and loopback TCP (harness: robustness_helpers.py).

* a login that never finishes (silent, stalled or dripped a byte at a time) and a connection that never answers
  NOP-In are dropped in bounded time;
* a failed login and a logout are answered and the connection closed, even when other answers are queued;
* a hundred connections at once are all served while another session keeps working;
* a client that stops reading cannot make the target buffer answers without bound.

Each test bounds its own time with `trio.fail_after`.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import trio

from robustness_helpers import LOGIN_TIMEOUT, TARGET, closed_within, command, config, login, read10, \
    rss_mib, running, serve, watchdog
from trioscsi.iscsi.framing import encode_pdu
from trioscsi.iscsi.pdu import DataOut, LoginRequest, LogoutRequest, ScsiCommand
from trioscsi.iscsi.negotiation import encode_text

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
