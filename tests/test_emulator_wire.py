"""The emulator protocol's framing and lifetime (docs/emulator-protocol.md §1, §3, §5, §7).

The codec is checked against cbor2 directly; the lifetime rules (handshake, tags, ping while busy, abort, end
of input, garbage) against a real vdisk subprocess.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import tempfile

import cbor2
import pytest

from emulators.pyemu import runner, wire
from emulators.pyemu.client import EmuClient, parse_sense
from emulators.pyemu.spc import ScsiDevice

MiB = 1 << 20


# -- codec ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    (1, 0), (23, 0), (24, 2, b"\x70" + bytes(17)), (2**16, 0, None, b"abc"), (2**40, 0, None, bytes(5000)),
    (7, 0, None, None, True), (8, 0, None, b"x" * 70000), (9, 0, None, memoryview(b"view" * 2000)),
])
def test_encode_done_is_plain_cbor(args):
    raw = b"".join(bytes(b) for b in wire.encode_done(*args))
    assert struct.unpack_from(">I", raw)[0] == len(raw) - 4
    msg = cbor2.loads(raw[4:])
    tag, status, sense, data, aborted = (list(args) + [None, None, False])[:5]
    assert msg["op"] == "done" and msg["tag"] == tag and msg["status"] == status
    assert msg.get("sense") == sense
    assert msg.get("data") == (bytes(data) if data else None)
    assert msg.get("aborted", False) == bool(aborted)


@pytest.mark.parametrize("msg", [
    {"op": "cmd", "tag": 5, "cdb": bytes(10), "xfer": 4096},
    {"op": "cmd", "tag": 2**33, "cdb": bytes(16), "xfer": 0, "data": bytes(range(256)) * 64, "attr": 1},
    {"op": "hello", "versions": [1, 2], "params": {"size": 1, "nested": {"a": [1]}}, "identity": {}},
    {"op": "ping", "tag": 0, "future": True, "none": None, "text": "é" * 5000},
])
def test_decode_matches_cbor2(msg):
    decoded = wire.decode(cbor2.dumps(msg))
    assert {k: bytes(v) if isinstance(v, memoryview) else v for k, v in decoded.items()} == msg


def test_large_data_is_not_copied():
    body = cbor2.dumps({"op": "cmd", "tag": 1, "cdb": bytes(10), "xfer": 0, "data": b"d" * MiB})
    assert isinstance(wire.decode(body)["data"], memoryview)


class Trickle(io.RawIOBase):
    """A stream that hands over one byte per read, like a slow pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._data:
            return 0
        b[0] = self._data[0]
        self._data = self._data[1:]
        return 1


def frames(*msgs) -> bytes:
    return b"".join(struct.pack(">I", len(b)) + b for b in map(cbor2.dumps, msgs))


def test_reader_byte_by_byte_and_trailing_garbage():
    raw = frames({"op": "ping", "tag": 1}, {"op": "ping", "tag": 2})
    reader = wire.FrameReader(io.BufferedReader(Trickle(raw), buffer_size=1))
    assert reader.read() == {"op": "ping", "tag": 1}
    assert reader.read() == {"op": "ping", "tag": 2}
    assert reader.read() is None
    reader = wire.FrameReader(io.BufferedReader(io.BytesIO(raw + b"\x00\x00")))
    reader.read(), reader.read()
    with pytest.raises(wire.ProtocolError):
        reader.read()                               # a partial header at end of input


def test_reader_limits():
    with pytest.raises(wire.ProtocolError):
        wire.FrameReader(io.BytesIO(struct.pack(">I", wire.MAX_FRAME + 1) + b"x")).read()
    with pytest.raises(wire.ProtocolError):
        wire.FrameReader(io.BytesIO(struct.pack(">I", 3) + b"\xff\xff\xff")).read()
    with pytest.raises(wire.ProtocolError):
        wire.FrameReader(io.BytesIO(frames([1, 2]))).read()         # not a map


# -- the runner in process: a handler's bug is HARDWARE ERROR, not a dead emulator -----------------------------
class Buggy(ScsiDevice):
    def __init__(self, identity):
        super().__init__(identity)
        self.add_commands({0xC0: self.commands[0x00]._replace(handler=self.boom)})

    def boom(self, cdb, data, xfer):
        return 1 // 0

    def ready_info(self):
        return {"identity": self.ident.as_map()}


@pytest.mark.parametrize("workers", [0, 2])
def test_handler_exception_is_internal_target_failure(workers, capfd):
    raw = frames({"op": "hello", "versions": [1], "params": {"workers": workers}, "identity": {}},
                 {"op": "cmd", "tag": 1, "cdb": bytes((0xC0,)) + bytes(5), "xfer": 0},
                 {"op": "cmd", "tag": 2, "cdb": bytes(6), "xfer": 0})
    r, w = os.pipe()
    code = runner.serve(lambda p, i, e: Buggy(i), io.BufferedReader(io.BytesIO(raw)), w)
    os.close(w)
    with os.fdopen(r, "rb") as out:
        reader = wire.FrameReader(out)
        assert reader.read()["op"] == "ready"
        answers = {m["tag"]: m for m in (reader.read(), reader.read())}
    assert code == 0
    sense = parse_sense(bytes(answers[1]["sense"]))
    assert answers[1]["status"] == 2 and (sense["key"], sense["asc"], sense["ascq"]) == (0x4, 0x44, 0x00)
    assert answers[2]["status"] == 0
    assert "ZeroDivisionError" in capfd.readouterr().err


# -- a real emulator ------------------------------------------------------------------------------------------------
@pytest.fixture
def image():
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="wire-test-") as d:
        yield os.path.join(d, "disk.img")


def start(image: str, **params) -> EmuClient:
    client = EmuClient("emulators.vdisk")
    ready = client.hello({"path": image, "size": 64 * MiB, **params})
    assert ready["op"] == "ready", ready
    return client


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def long_write_same(blocks: int = 16384) -> bytes:
    """A WRITE SAME(16) of MAXIMUM WRITE SAME LENGTH (8 MiB of 512-byte blocks)."""
    return struct.pack(">BBQIBB", 0x93, 0, 0, blocks, 0, 0)


SANITIZE_RATE = 32 * MiB                  # 64 MiB at this rate: a command that runs for 2 s


def long_sanitize() -> tuple[bytes, bytes]:
    """SANITIZE OVERWRITE (IMMED=0) of the whole LU: with ``sanitize_rate`` it keeps a worker busy for seconds."""
    plist = bytes((1, 0, 0, 1, 0xA5))
    return struct.pack(">BBxxxxxHB", 0x48, 0x01, len(plist), 0), plist


def test_version_mismatch_exits_2(image):
    with EmuClient("emulators.vdisk") as client:
        reply = client.hello({"path": image, "size": MiB}, versions=[7, 8])
        assert reply["op"] == "error" and "version" in reply["message"]
        assert client.close() == 2


def test_first_frame_must_be_hello(image):
    with EmuClient("emulators.vdisk") as client:
        client.send({"op": "ping", "tag": 1})
        assert client.recv()["op"] == "error"
        assert client.close() == 1


def test_end_of_input_before_hello_exits_0():
    with EmuClient("emulators.vdisk") as client:
        assert client.close() == 0


def test_many_commands_in_flight_answered_by_tag(image):
    with start(image) as client:
        for i in range(32):
            client.submit(write10(i * 8, 8), data=bytes([i]) * 4096, tag=1000 + i)
        assert sorted(client.recv()["tag"] for _ in range(32)) == list(range(1000, 1032))
        for i in range(32):
            client.submit(read10(i * 8, 8), xfer=4096, tag=i)
        answers = [client.recv() for _ in range(32)]
        for done in answers:
            assert done["status"] == 0 and done["data"] == bytes([done["tag"]]) * 4096
        assert client.close() == 0


def test_ping_answered_while_busy(image):
    with start(image, workers=2, sanitize_rate=SANITIZE_RATE) as client:
        busy = client.submit(*long_sanitize())
        client.send({"op": "ping", "tag": 77})
        first = client.recv(timeout=30)
        assert first == {"op": "pong", "tag": 77}, "the pong waited for the command"
        assert client.wait(busy, timeout=60)["status"] == 0


def test_abort_answers_exactly_one_done(image):
    with start(image, workers=1, sanitize_rate=SANITIZE_RATE) as client:
        cdb, plist = long_sanitize()
        busy = client.submit(cdb, data=plist, tag=1)
        queued = client.submit(read10(0, 8), xfer=4096, tag=2)   # waits behind the only worker
        client.send({"op": "abort", "tag": queued})
        client.send({"op": "abort", "tag": busy})                # running (or about to): either answer
        client.send({"op": "abort", "tag": 999})                 # unknown: ignored
        client.send({"op": "ping", "tag": 5})
        seen = []
        while len([m for m in seen if m["op"] == "done"]) < 2:
            seen.append(client.recv(timeout=60))
        client.send({"op": "ping", "tag": 6})
        while seen[-1] != {"op": "pong", "tag": 6}:
            seen.append(client.recv(timeout=30))
        dones = [m for m in seen if m["op"] == "done"]
        assert sorted(d["tag"] for d in dones) == [1, 2]
        by_tag = {d["tag"]: d for d in dones}
        assert by_tag[2] == {"op": "done", "tag": 2, "status": 0, "aborted": True}
        assert by_tag[1]["status"] == 0                          # normal end, or aborted before it started
        assert client.close() == 0


def test_end_of_input_finishes_commands_in_flight(image):
    client = start(image, workers=2)
    with client:
        tag = client.submit(long_write_same(), data=b"\x11" * 512)
        assert client.close(timeout=60) == 0
        assert client.recv()["tag"] == tag
    with open(image, "rb") as f:
        assert f.read(512) == b"\x11" * 512


@pytest.mark.parametrize("garbage", [
    struct.pack(">I", 4) + b"\xff\xfe\xfd\xfc",             # not CBOR
    struct.pack(">I", 2) + b"\x82\x01",                      # CBOR, but not a map (cut short)
    struct.pack(">I", 0x7FFFFFFF) + b"xx",                   # far over max_frame
    cbor2.dumps({"op": "cmd"}),                              # no length prefix at all
    struct.pack(">I", 9) + cbor2.dumps({"op": "cmd", "tag": 1}),   # cmd without cdb (and a wrong length)
])
def test_garbage_gets_error_or_clean_exit_not_a_hang(image, garbage):
    with start(image) as client:
        client.send_raw(garbage)
        try:
            client.proc.stdin.close()
        except BrokenPipeError:
            pass
        reply = client.recv(timeout=10)
        assert reply is None or reply["op"] == "error"
        assert client.proc.wait(10) in (0, 1)


def test_cmd_with_bad_cdb_is_a_protocol_error(image):
    with start(image) as client:
        client.send({"op": "cmd", "tag": 3, "cdb": b"\x00", "xfer": 0})
        reply = client.recv()
        assert reply["op"] == "error" and reply["tag"] == 3
        assert client.close() == 1


CHATTY = """
import os
from emulators.pyemu.runner import main
from emulators.pyemu.spc import ScsiDevice

class Chatty(ScsiDevice):
    def test_unit_ready(self, cdb, data, xfer):
        print("a stray print")
        os.write(1, b"and a stray write to fd 1")
    def ready_info(self):
        return {"identity": self.ident.as_map()}

main(lambda params, identity, emit: Chatty(identity))
"""


def test_stray_output_cannot_corrupt_frames():
    """The runner moves fd 1 to stderr: a print in a handler would otherwise corrupt the stream."""
    with EmuClient(argv=[sys.executable, "-c", CHATTY]) as client:
        assert client.hello({})["op"] == "ready"
        assert client.cmd(bytes(6))["status"] == 0
        client.send({"op": "ping", "tag": 1})
        assert client.recv() == {"op": "pong", "tag": 1}
        assert client.close() == 0
        assert "a stray print" in client.stderr_text()
