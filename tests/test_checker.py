"""The emulator checker (trioscsi/emu/checker.py): its frame reader and schema on their own, then whole runs.

A correct emulator (the Python vdisk) passes every check.  Each broken emulator in tests/broken_emulators/ breaks
one rule; the checker must name that rule (the check, the diagnosis and the protocol section), return non-zero,
finish within a bounded time and leave no emulator process behind.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
import trio

from trioscsi.emu.checker import FrameReader, FramingError, Options, Report, main, run_checks, schema_problems

BROKEN = Path(__file__).parent / "broken_emulators"
REPO = Path(__file__).resolve().parents[1]
FAST = dict(timeout=1.0, ready_timeout=2.0, exit_timeout=2.0)   # the broken emulators need no patience
BOUND = 20.0                                                     # seconds any checker run may take here


def frame(message: object) -> bytes:
    body = cbor2.dumps(message)
    return struct.pack(">I", len(body)) + body


# ---- frame reader and schema (sans-I/O) ---------------------------------------------------------------------

@pytest.mark.parametrize("split", [None, 1, 3])
def test_frame_reader_whole_byte_by_byte_and_with_trailing_bytes(split):
    data = frame({"op": "pong", "tag": 1}) + frame({"op": "done", "tag": 2, "status": 0}) + b"\x00\x00"
    reader, got = FrameReader(), []
    for i in range(0, len(data), split or len(data)):
        reader.feed(data[i:i + (split or len(data))])
        while (m := reader.next()) is not None:
            got.append(m)
    assert [m["op"] for m in got] == ["pong", "done"]
    assert reader.describe_partial() == "stdout ended 2 bytes into a length prefix"


@pytest.mark.parametrize("data, diagnosis", [
    (lambda b: struct.pack("<I", len(b)) + b, "read little-endian it would be"),
    (lambda b: b, "is the 4-byte big-endian length prefix missing?"),
    (lambda b: b"starting up\n" + b, "log on stderr"),
    (lambda b: struct.pack(">I", len(b) + 4) + b + b"\xa1\x00\x00\x00", "count the CBOR bytes only"),
    (lambda b: struct.pack(">I", 3) + cbor2.dumps([1, 2]), "not a map"),
    (lambda b: frame({1: "x", "op": "done"}), "non-text keys"),
    (lambda b: frame({"tag": 1}), "no text 'op'"),
    (lambda b: struct.pack(">I", 2) + b"\xff\xff", "not one CBOR item"),
])
def test_frame_reader_diagnoses_broken_framing(data, diagnosis):
    body = cbor2.dumps({"op": "ready", "version": 1, "device_type": 0, "identity": {}, "padding": "x" * 200})
    reader = FrameReader()
    reader.feed(data(body))
    with pytest.raises(FramingError) as err:
        while reader.next() is not None:
            pass
    assert diagnosis in err.value.message
    assert err.value.clause.startswith("emulator-protocol §")


def test_frame_reader_reports_a_frame_cut_short():
    reader = FrameReader()
    reader.feed(frame({"op": "done", "tag": 1, "status": 0, "data": bytes(100)})[:30])
    assert reader.next() is None
    assert reader.describe_partial().startswith("stdout ended 26 bytes into a ")


@pytest.mark.parametrize("message, problem", [
    ({"op": "done", "tag": 1.0, "status": 0}, "done.tag must be an unsigned integer, got float"),
    ({"op": "done", "tag": 1}, "done lacks the required key 'status'"),
    ({"op": "done", "tag": 1, "status": 300}, "not a status byte"),
    ({"op": "done", "tag": 1, "status": 0, "data": "text"}, "done.data must be a byte string"),
    ({"op": "done", "tag": -1, "status": 0}, "done.tag must be an unsigned integer"),
    ({"op": "ready", "version": 1, "device_type": 40, "identity": {}}, "not a peripheral device type"),
    ({"op": "ready", "version": 1, "device_type": 0, "identity": {}, "capacity": {"blocks": 1}},
     "ready.capacity.block_size"),
    ({"op": "event", "event": "capacity_changed", "blocks": 5}, "event lacks the required key 'block_size'"),
    ({"op": "pong"}, "pong lacks the required key 'tag'"),
    ({"op": "event", "event": "position", "path": None, "object": 1.5, "loaded": True, "block_size": 0},
     "event.object must be an unsigned integer"),
    ({"op": "event", "event": "move", "action": "load", "drive": 500, "lun": "2", "serial": "D", "path": "p",
      "barcode": "b"}, "event.lun must be an unsigned integer or null"),
    ({"op": "cmd", "tag": 1}, "not a message an emulator sends"),
])
def test_schema_problems(message, problem):
    assert any(problem in p for p in schema_problems(message)), schema_problems(message)


def test_schema_accepts_valid_messages_with_unknown_keys():
    for message in ({"op": "done", "tag": 2**64 - 1, "status": 2, "sense": b"\x70", "aborted": False, "x": 1},
                    {"op": "event", "event": "medium_changed"}, {"op": "error", "message": "m", "tag": 3},
                    {"op": "event", "event": "position", "path": None, "object": 0, "loaded": False, "block_size": 0},
                    {"op": "ready", "version": 1, "device_type": 0, "identity": {"serial": "s"},
                     "capacity": {"block_size": 512, "blocks": 8}, "features": ["thin"], "max_inflight": 4}):
        assert schema_problems(message) == []


# ---- whole runs ---------------------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


async def check(script: str, tmp_path: Path, *, only: list[str] | None = None, **options) -> Report:
    pidfile = tmp_path / "pid"
    began = trio.current_time()
    report = await run_checks(Options([sys.executable, str(BROKEN / f"{script}.py")], params={"pidfile": str(pidfile)},
                                      only=only or [], **{**FAST, **options}))
    elapsed = trio.current_time() - began
    text = report.text()
    print(text)
    assert report.failed, text
    assert elapsed < BOUND, f"the checker took {elapsed:.1f} s (bound {BOUND} s)"
    if pidfile.exists():
        pid = int(pidfile.read_text())
        for _ in range(50):
            if not alive(pid):
                break
            await trio.sleep(0.02)
        assert not alive(pid), f"the checker left emulator pid {pid} running"
    return report


def failing(report: Report, name: str, *phrases: str, clause: str) -> None:
    outcome = report.outcome(name)
    assert outcome is not None and outcome.status == "FAIL", report.text()
    for phrase in phrases:
        assert phrase in outcome.detail, f"{name}: {phrase!r} not in {outcome.detail!r}"
    assert any(clause in c for c in outcome.clauses), f"{name}: no clause {clause!r} in {outcome.clauses}"


async def test_python_vdisk_passes_every_check(tmp_path):
    options = Options([sys.executable, "-m", "emulators.vdisk"], cwd=str(REPO),
                      params={"path": str(tmp_path / "disk.img"), "size": 8 << 20, "create": True})
    report = await run_checks(options)
    assert not report.failed, report.text()
    names = {o.check for o in report.outcomes}
    assert {"handshake.ready", "scsi.inquiry.vpd_83", "sbc.lba_out_of_range", "proto.concurrency", "proto.abort",
            "proto.ping_while_busy", "sbc.large_transfer", "lifetime.eof_exit", "handshake.version_refused"} <= names
    assert all(o.status in ("PASS", "SKIP") for o in report.outcomes), report.text()


async def test_python_null_passes_without_data_verification():
    report = await run_checks(Options([sys.executable, "-m", "emulators.null"], cwd=str(REPO),
                                      params={"size": 8 << 20}, verify=False))
    assert not report.failed, report.text()


async def test_wrong_framing(tmp_path):
    report = await check("wrong_framing", tmp_path)
    failing(report, "handshake.ready", "read little-endian it would be", "big-endian", clause="§1")
    assert report.outcome("proto.concurrency").status == "NOT RUN"


async def test_wrong_tag(tmp_path):
    report = await check("wrong_tag", tmp_path)
    failing(report, "scsi.test_unit_ready", "no done for tag 1", "done for tag 2, which is not in flight",
            clause="§4")
    assert "unanswered in two checks" in report.outcome("sbc.read_capacity10").detail   # stops instead of waiting


async def test_never_answering(tmp_path):
    report = await check("never_answers", tmp_path)
    failing(report, "handshake.ready", "no pong", clause="§7")
    assert report.outcome("scsi.test_unit_ready").status == "NOT RUN"
    assert "stopped answering" in report.outcome("scsi.test_unit_ready").detail


async def test_crash_mid_reply(tmp_path):
    report = await check("crash_mid_reply", tmp_path)
    failing(report, "scsi.test_unit_ready", "5 bytes into a 22-byte frame", "exit code 3", "crashed mid-reply",
            clause="§1")
    assert "exit code 3" in report.outcome("scsi.inquiry.standard").detail


async def test_no_ready(tmp_path):
    report = await check("no_ready", tmp_path)
    failing(report, "handshake.ready", "no ready within 2 s", clause="§3")
    assert [o.status for o in report.outcomes[1:]] == ["NOT RUN"] * (len(report.outcomes) - 1)


async def test_answers_twice(tmp_path):
    report = await check("answers_twice", tmp_path)
    failing(report, "scsi.test_unit_ready", "done #2 for tag 1: a second done", clause="exactly one done")


async def test_log_on_stdout(tmp_path):
    report = await check("stdout_print", tmp_path)
    failing(report, "handshake.ready", "the text 'starting emulator...'", "log on stderr", clause="§1")


async def test_float_tags(tmp_path):
    report = await check("float_tag", tmp_path)
    failing(report, "scsi.test_unit_ready", "done.tag must be an unsigned integer, got float", clause="§8")


async def test_invalid_sense(tmp_path):
    report = await check("bad_sense", tmp_path, only=["scsi.unknown_opcode"])
    failing(report, "scsi.unknown_opcode", "response code 0x05 is neither fixed", clause="SPC-4 sense data")


async def test_no_exit_on_eof(tmp_path):
    report = await check("ignores_eof", tmp_path, only=["lifetime"])
    failing(report, "lifetime.eof_exit", "still running 2 s after its stdin was closed", clause="§7")


# ---- command line -------------------------------------------------------------------------------------------

def run_cli(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    began = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "trioscsi.emu.checker", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    return r.returncode, r.stdout + r.stderr, time.monotonic() - began


def test_cli_passes_vdisk_and_fails_a_broken_emulator(tmp_path):
    code, out, _ = run_cli("--param", f"path={tmp_path / 'd.img'}", "--param", "size=4194304", "--",
                           sys.executable, "-m", "emulators.vdisk")
    assert code == 0, out
    assert "0 failed" in out and out.rstrip().endswith("OK"), out
    code, out, took = run_cli("--timeout", "1", "--ready-timeout", "1", "--", sys.executable,
                              str(BROKEN / "no_ready.py"))
    assert code == 1 and "FAIL    handshake.ready" in out and "see emulator-protocol §3" in out, out
    assert took < BOUND


def test_cli_usage_and_missing_command(tmp_path):
    code, out, _ = run_cli("--", str(tmp_path / "no-such-emulator"))
    assert code == 2 and "cannot start" in out, out
    with pytest.raises(SystemExit) as exc:
        main(["--param", "novalue"])
    assert exc.value.code == 2
