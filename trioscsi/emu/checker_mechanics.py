"""The emulator checker's protocol checks: unknown keys, partial frames, tags, concurrency, abort, ping while
busy, events, and the end of input (docs/emulator-protocol.md §1-§7)."""
from __future__ import annotations

import os
import random
from typing import Any

import trio

from .checker import Session
from .checker_expect import (GOOD, READ10, WRITE10, describe, expect_good, geometry, inquiry, is_disk, read_only, rw10)
from .checker_process import SPEC, CheckFailed, EmulatorGone, Unanswered, Warned, encode



def probe_command(s: Session, i: int) -> tuple[bytes, int]:
    """A cheap read-like command number i: a 1-block READ(10) on disks, an INQUIRY elsewhere."""
    if is_disk(s):
        bs, blocks = geometry(s)
        return rw10(READ10, i % blocks, 1), bs
    return inquiry(alloc=96), 96


async def unknown_keys(s: Session) -> str:
    cdb, xfer = probe_command(s, 0)
    extra: dict[str, Any] = {"x-future": {"nested": [1, 2]}, "attr": 0, "lun": 0}
    done = await s.emu.execute(cdb, xfer=xfer, **extra)
    expect_good(done, "a cmd carrying an unknown key", f"{SPEC} §1 (unknown keys are ignored)")
    return "ignored"


async def partial_frames(s: Session) -> str:
    cdb, xfer = probe_command(s, 1)
    tag = s.emu.new_tag()
    s.emu.expect(tag)
    await s.emu.send({"op": "cmd", "tag": tag, "cdb": cdb, "xfer": xfer}, chunks=5)
    expect_good(await s.emu.wait_done(tag), "a cmd written in 5 pieces", f"{SPEC} §1 (framing)")
    return "a frame arriving in 5 writes was reassembled"


async def tags(s: Session) -> str:
    cdb, xfer = probe_command(s, 2)
    done = await s.emu.execute(cdb, xfer=xfer, tag=2**32 + 7)
    expect_good(done, "cmd with tag 2^32+7", f"{SPEC} §8 (tag is a uint)")
    done = await s.emu.execute(cdb, xfer=xfer, tag=5)
    done = await s.emu.execute(cdb, xfer=xfer, tag=5)
    expect_good(done, "a tag reused after its done", f"{SPEC} §4 (tags may be reused after their done)")
    try:
        await s.emu.execute(cdb, xfer=xfer, tag=2**64 - 1)
    except CheckFailed as exc:
        if isinstance(exc, EmulatorGone):
            raise
        raise Warned(f"tag 2^64-1: {exc.message} (the core's tags fit in 48 bits today)", f"{SPEC} §8") from None
    return "tags 2^32+7 and 2^64-1 echoed; tag 5 reused"


async def concurrency(s: Session) -> str:
    emu = s.emu
    depth = max(1, min(s.options.depth, s.ready.get("max_inflight", 64)))
    expected: dict[int, bytes] = {}
    if is_disk(s):
        bs, blocks = geometry(s)
        depth, base = min(depth, blocks), 0
        if read_only(s):
            region = expect_good(await emu.execute(rw10(READ10, base, depth), xfer=depth * bs), "READ(10)",
                                 "SBC-3 READ (10)").data
        else:
            region = os.urandom(depth * bs)
            expect_good(await emu.execute(rw10(WRITE10, base, depth), region), "WRITE(10)", "SBC-3 WRITE (10)")
        commands = [(rw10(READ10, base + i, 1), bs, region[i * bs:(i + 1) * bs]) for i in range(depth)]
    else:
        reference = expect_good(await emu.execute(inquiry(alloc=96), xfer=96), "INQUIRY", "SPC-4 INQUIRY").data
        commands = [(inquiry(alloc=96), 96, reference)] * depth
    tag_values = random.sample(range(10_000, 1_000_000), depth)
    frames = []
    for tag, (cdb, xfer, want) in zip(tag_values, commands):
        emu.expect(tag)
        expected[tag] = want
        frames.append(encode({"op": "cmd", "tag": tag, "cdb": cdb, "xfer": xfer}))
    await emu.send(b"".join(frames))
    results, missing = await emu.wait_many(list(expected), s.options.timeout)
    wrong = [t for t, d in results.items() if d.status != GOOD or len(d.data) < len(expected[t])
             or (s.options.verify and d.data[:len(expected[t])] != expected[t])]
    if missing:
        raise Unanswered(f"{len(missing)} of {depth} tags never got a done (e.g. {missing[:5]})",
                          f"{SPEC} §4 (each cmd gets exactly one done)")
    if wrong:
        raise CheckFailed(f"{len(wrong)} of {depth} concurrent commands got the wrong answer (e.g. tag {wrong[0]}: "
                          f"{describe(results[wrong[0]])}): was a reply sent under another command's tag?",
                          f"{SPEC} §4")
    order = sorted(results, key=lambda t: results[t].seq)
    note = "in order" if order == tag_values else "out of order"
    return f"{depth} tagged commands in one write, each answered once with its own data ({note})"


async def big_reads(s: Session, first_tag: int, with_abort: bool = False) -> tuple[list[int], int]:
    """Send up to 8 large reads (INQUIRYs on other device types) in one write; each followed by its abort."""
    count = max(1, min(8, s.ready.get("max_inflight", 64)))
    if is_disk(s):
        bs, blocks = geometry(s)
        n = max(1, min(s.options.large // bs, blocks, 0xFFFF))
        cdb, xfer = rw10(READ10, 0, n), n * bs
    else:
        cdb, xfer = inquiry(alloc=96), 96
    tag_values, frames = list(range(first_tag, first_tag + count)), []
    for tag in tag_values:
        s.emu.expect(tag)
        frames.append(encode({"op": "cmd", "tag": tag, "cdb": cdb, "xfer": xfer}))
        if with_abort:
            frames.append(encode({"op": "abort", "tag": tag}))
    if with_abort:
        frames.append(encode({"op": "abort", "tag": 999_999_999}))
    await s.emu.send(b"".join(frames))
    return tag_values, xfer


async def abort(s: Session) -> str:
    tag_values, _ = await big_reads(s, 70_000, with_abort=True)
    results, missing = await s.emu.wait_many(tag_values, s.options.timeout)
    if missing:
        raise Unanswered(f"{len(missing)} aborted commands never got a done (tags {missing[:5]})",
                         f"{SPEC} §5 (an aborted cmd still gets exactly one done)")
    aborted = [d for d in results.values() if d.aborted]
    for d in results.values():
        if d.aborted and d.status != GOOD:
            raise CheckFailed(f"done for aborted tag {d.tag} has status 0x{d.status:02x}; an aborted done is "
                              "{tag, status: 0, aborted: true}", f"{SPEC} §5")
        if not d.aborted:
            expect_good(d, f"command {d.tag} that finished despite the abort", f"{SPEC} §5 (its normal result)")
    await s.emu.send({"op": "abort", "tag": tag_values[0]})      # already answered: must be ignored
    return (f"{len(results)} commands aborted in flight: {len(aborted)} answered aborted, "
            f"{len(results) - len(aborted)} completed; aborts of unknown and finished tags ignored")


async def ping_while_busy(s: Session) -> str:
    tag_values, xfer = await big_reads(s, 80_000)
    latency = await s.emu.ping()
    busy = sum(1 for t in tag_values if s.emu.waiters[t].in_flight)
    results, missing = await s.emu.wait_many(tag_values, s.options.timeout)
    if missing:
        raise Unanswered(f"{len(missing)} commands never got a done", f"{SPEC} §4 (each cmd gets exactly one done)")
    return f"pong after {latency * 1000:.0f} ms with {busy} of {len(tag_values)} commands ({xfer} B each) in flight"


async def events(s: Session) -> str:
    seen = s.emu.events
    if not seen:
        return "no events sent (none are required)"
    kinds = sorted({str(e.get("event")) for e in seen})
    return f"{len(seen)} events ({', '.join(kinds)}), each checked when it arrived (§6)"


async def eof_exit(s: Session) -> str:
    emu, opts = s.emu, s.options
    cdb, xfer = probe_command(s, 3)
    await emu.submit(cdb, xfer=xfer)
    await emu.close_stdin()
    code = await emu.wait_exit(opts.exit_timeout)
    with trio.move_on_after(1):
        await emu.gone.wait()
    if code is None:
        raise CheckFailed(f"still running {opts.exit_timeout:g} s after its stdin was closed",
                          f"{SPEC} §7 (end of input means shut down and exit 0)")
    if code != 0:
        raise CheckFailed(f"{emu.exit_text()} after its stdin was closed, expected exit code 0", f"{SPEC} §7")
    return "exit code 0 after EOF with a command in flight"
