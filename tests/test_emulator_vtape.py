"""The vtape emulator as a real subprocess over the CBOR wire (docs/emulator-protocol.md, docs/tape.md).

Each test names the SSC-3 behaviour it checks; the sense expectations are the ones the Linux st driver relies on
(../shared/kvm-initiator/README.md: FM/EOM/ILI bits, VALID + INFORMATION = residual, BLANK CHECK 00/05 at EOD).
"""
from __future__ import annotations

import os
import struct
import tempfile

import pytest

from emulators.pyemu import cartridge as cartmod
from emulators.pyemu.cartridge import Cartridge, create_cartridge
from emulators.pyemu.client import EmuClient, parse_sense

GOOD, CHECK = 0x00, 0x02
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, DATA_PROTECT, BLANK_CHECK, VOLUME_OVERFLOW = \
    0x0, 0x2, 0x3, 0x5, 0x7, 0x8, 0xD
FM, EOM, ILI = 0x80, 0x40, 0x20
MiB = 1 << 20


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vtape-test-") as d:
        yield d


def new_cart(workdir: str, name: str = "TAPE0001", capacity: int = 16 * MiB, **kw) -> str:
    return create_cartridge(os.path.join(workdir, name + ".img"), name, capacity, **kw)


class Tape:
    """A vtape subprocess with CDB builders; ``events`` collects the event frames seen so far."""

    def __init__(self, params: dict | None = None, identity: dict | None = None) -> None:
        self.c = EmuClient("emulators.vtape")
        self.ready = self.c.hello(params or {}, identity or {})
        assert self.ready["op"] == "ready", (self.ready, self.c.stderr_text())
        self.events: list[dict] = []

    def cmd(self, cdb: bytes, data: bytes | None = None, xfer: int = 0) -> dict:
        done = self.c.cmd(bytes(cdb), data, xfer)
        self._drain()
        return done

    def control(self, msg: dict, tag: int = 9000) -> dict:
        self.c.send({**msg, "tag": tag})
        done = self.c.wait(tag)
        self._drain()
        return done

    def _drain(self) -> None:
        keep = []
        for m in self.c.early:
            (self.events if m.get("op") == "event" else keep).append(m)
        self.c.early[:] = keep

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]

    # -- CDBs -----------------------------------------------------------------------------------------------------
    def write(self, data: bytes) -> dict:
        return self.cmd(bytes((0x0A, 0)) + len(data).to_bytes(3, "big") + b"\0", data)

    def write_fixed(self, data: bytes, blocks: int) -> dict:
        return self.cmd(bytes((0x0A, 1)) + blocks.to_bytes(3, "big") + b"\0", data)

    def read(self, n: int, fixed: bool = False, sili: bool = False, xfer: int | None = None) -> dict:
        cdb = bytes((0x08, (1 if fixed else 0) | (2 if sili else 0))) + n.to_bytes(3, "big") + b"\0"
        return self.cmd(cdb, xfer=xfer if xfer is not None else n)

    def wfm(self, n: int = 1, immed: bool = False, setmark: bool = False) -> dict:
        return self.cmd(bytes((0x10, (1 if immed else 0) | (2 if setmark else 0))) + n.to_bytes(3, "big") + b"\0")

    def space(self, code: int, count: int) -> dict:
        return self.cmd(bytes((0x11, code)) + (count & 0xFFFFFF).to_bytes(3, "big") + b"\0")

    def space16(self, code: int, count: int) -> dict:
        return self.cmd(bytes((0x91, code, 0, 0)) + struct.pack(">q", count) + bytes(4))

    def rewind(self) -> dict:
        return self.cmd(bytes((0x01, 0, 0, 0, 0, 0)))

    def locate10(self, n: int) -> dict:
        return self.cmd(struct.pack(">BBxIxBB", 0x2B, 0, n, 0, 0))

    def locate16(self, n: int, dest_type: int = 0) -> dict:
        return self.cmd(struct.pack(">BBBBQxxBB", 0x92, dest_type << 3, 0, 0, n, 0, 0))

    def position(self) -> dict:
        """READ POSITION long form: bop, eop, object, file."""
        done = self.cmd(bytes((0x34, 6)) + bytes(8), xfer=32)
        assert done["status"] == GOOD, done
        d = done["data"]
        obj, fileno = struct.unpack_from(">QQ", d, 8)
        return {"bop": bool(d[0] & 0x80), "eop": bool(d[0] & 0x40), "object": obj, "file": fileno}

    def close(self) -> None:
        self.c.__exit__(None, None, None)


@pytest.fixture
def tape(workdir):
    t = Tape({"cartridge": new_cart(workdir)})
    yield t
    t.close()


def expect(done: dict, key: int, asc: int, ascq: int, info: int | None = None, flags: int = 0) -> dict:
    """Check CHECK CONDITION sense (key, ASC/ASCQ, VALID + INFORMATION, stream bits); returns ``done``."""
    assert done["status"] == CHECK, done
    s = parse_sense(done["sense"])
    assert (s["key"], s["asc"], s["ascq"]) == (key, asc, ascq), s
    assert done["sense"][2] & 0xE0 == flags, f"stream bits {done['sense'][2] & 0xE0:#x}, wanted {flags:#x}"
    if info is not None:
        assert s["info"] is not None, "VALID must be set"
        assert s["info"] == info & 0xFFFFFFFF, (s["info"], info)
    return done


def good(done: dict) -> dict:
    assert done["status"] == GOOD, done
    return done


def rec(i: int, size: int) -> bytes:
    return (struct.pack(">I", i) * (size // 4 + 1))[:size]


# -- identity, readiness --------------------------------------------------------------------------------------------
def test_handshake_reports_tape_with_medium_state(workdir):
    path = new_cart(workdir)
    t = Tape({"cartridge": path}, {"serial": "DRV-1"})
    try:
        assert t.ready["device_type"] == 1
        assert t.ready["medium"] == {"path": path, "object": 0, "loaded": True, "block_size": 0}
        inq = good(t.cmd(bytes((0x12, 0, 0, 0, 96, 0)), xfer=96))["data"]
        assert inq[0] == 0x01 and inq[1] & 0x80                           # sequential access, removable
        assert good(t.cmd(bytes((0x12, 1, 0x80, 0, 64, 0)), xfer=64))["data"][4:] == b"DRV-1"
        good(t.cmd(bytes(6)))
    finally:
        t.close()
    assert t.c.proc.returncode == 0


def test_no_cartridge_is_not_ready_medium_not_present():
    """SSC-3 4.2.x: no medium → NOT READY, MEDIUM NOT PRESENT (3A/00); limits and mode data still answer."""
    t = Tape()
    try:
        assert t.ready["medium"]["path"] is None
        expect(t.cmd(bytes(6)), NOT_READY, 0x3A, 0x00)
        expect(t.read(10), NOT_READY, 0x3A, 0x00)
        expect(t.write(b"x"), NOT_READY, 0x3A, 0x00)
        expect(t.cmd(bytes((0x34, 0)) + bytes(8), xfer=20), NOT_READY, 0x3A, 0x00)
        good(t.cmd(bytes((0x05, 0, 0, 0, 0, 0)), xfer=6))
        ms = good(t.cmd(bytes((0x1A, 0, 0, 0, 12, 0)), xfer=12))["data"]
        assert len(ms) == 12 and ms[3] == 8
    finally:
        t.close()


def test_bad_image_stays_in_drive_not_ready(workdir):
    path = os.path.join(workdir, "junk.img")
    with open(path, "wb") as f:
        f.write(b"not a tape" * 1000)
    t = Tape({"cartridge": path})
    try:
        expect(t.cmd(bytes(6)), NOT_READY, 0x30, 0x02)
        assert t.ready["medium"]["path"] == path
    finally:
        t.close()


# -- READ / WRITE ---------------------------------------------------------------------------------------------------
def test_write_records_and_filemarks_then_read_back(tape):
    sizes = [1, 512, 1000, 65536, 3, 262144]
    for i, n in enumerate(sizes[:3]):
        good(tape.write(rec(i, n)))
    good(tape.wfm(1))
    for i, n in enumerate(sizes[3:], 3):
        good(tape.write(rec(i, n)))
    good(tape.wfm(2))
    assert tape.position() == {"bop": False, "eop": False, "object": 9, "file": 3}
    good(tape.rewind())
    assert tape.position()["bop"]
    for i, n in enumerate(sizes[:3]):
        assert good(tape.read(n))["data"] == rec(i, n)
    expect(tape.read(4096), NO_SENSE, 0x00, 0x01, info=4096, flags=FM)
    for i, n in enumerate(sizes[3:], 3):
        assert good(tape.read(n))["data"] == rec(i, n)
    expect(tape.read(10), NO_SENSE, 0x00, 0x01, info=10, flags=FM)
    expect(tape.read(10), NO_SENSE, 0x00, 0x01, info=10, flags=FM)
    expect(tape.read(10), BLANK_CHECK, 0x00, 0x05, info=10)


def test_variable_read_incorrect_length(tape):
    """SSC-3 READ(6): ILI + VALID, INFORMATION = requested - actual; negative for an overlength block; SILI
    suppresses the underlength report only."""
    for i in range(4):
        good(tape.write(rec(i, 1000)))
    good(tape.rewind())
    done = tape.read(4096)
    expect(done, NO_SENSE, 0x00, 0x00, info=4096 - 1000, flags=ILI)
    assert done["data"] == rec(0, 1000)
    done = tape.read(100)
    expect(done, NO_SENSE, 0x00, 0x00, info=100 - 1000, flags=ILI)
    assert done["data"] == rec(1, 1000)[:100]
    assert tape.position()["object"] == 2                       # positioned after the overlength block
    assert good(tape.read(4096, sili=True))["data"] == rec(2, 1000)
    assert good(tape.read(10, sili=True))["data"] == rec(3, 1000)[:10]   # variable mode: no overlength report
    expect(tape.read(1, fixed=True, sili=True), ILLEGAL_REQUEST, 0x24, 0x00)
    expect(tape.read(1, fixed=True), ILLEGAL_REQUEST, 0x24, 0x00)       # FIXED without a block length


def test_reading_a_filemark_moves_past_it(tape):
    good(tape.write(b"a" * 10))
    good(tape.wfm())
    good(tape.write(b"b" * 10))
    good(tape.rewind())
    good(tape.read(10))
    done = expect(tape.read(65536), NO_SENSE, 0x00, 0x01, info=65536, flags=FM)
    assert not done.get("data")
    assert tape.position() == {"bop": False, "eop": False, "object": 2, "file": 1}
    assert good(tape.read(10))["data"] == b"b" * 10
    expect(tape.read(10), BLANK_CHECK, 0x00, 0x05, info=10)
    assert tape.position()["object"] == 3                       # EOD does not move


def test_zero_length_transfers_do_nothing(tape):
    good(tape.write(b"x"))
    good(tape.cmd(bytes((0x0A, 0, 0, 0, 0, 0))))
    good(tape.rewind())
    good(tape.read(0))
    assert tape.position()["object"] == 0


def test_fixed_block_mode(tape):
    """MODE SELECT block length 512; WRITE/READ FIXED=1; a filemark in a fixed read; an odd block → ILI."""
    bd = bytes((0, 0, 0x10, 8)) + bytes((0, 0, 0, 0, 0, 0, 0x02, 0x00))
    good(tape.cmd(bytes((0x15, 0x10, 0, 0, len(bd), 0)), bd))
    assert tape.named("mode_changed")
    ms = good(tape.cmd(bytes((0x1A, 0, 0, 0, 12, 0)), xfer=12))["data"]
    assert int.from_bytes(ms[9:12], "big") == 512 and ms[2] & 0x10
    data = b"".join(rec(i, 512) for i in range(8))
    good(tape.write_fixed(data, 8))
    assert tape.position()["object"] == 8                       # each fixed block is one logical object
    good(tape.wfm())
    good(tape.write(b"z" * 100))                                  # a variable block in between
    good(tape.rewind())
    assert good(tape.read(4, fixed=True, xfer=2048))["data"] == data[:2048]
    done = expect(tape.read(6, fixed=True, xfer=3072), NO_SENSE, 0x00, 0x01, info=2, flags=FM)
    assert done["data"] == data[2048:]
    done = expect(tape.read(2, fixed=True, xfer=1024), NO_SENSE, 0x00, 0x00, info=2, flags=ILI)
    assert not done.get("data")
    assert tape.position()["object"] == 10
    expect(tape.read(3, fixed=True, xfer=1536), BLANK_CHECK, 0x00, 0x05, info=3)


# -- SPACE, LOCATE, READ POSITION ---------------------------------------------------------------------------------
def _three_files(tape: Tape) -> None:
    """objects: 0-2 data, 3 FM, 4-5 data, 6 FM, 7 data, 8 FM; EOD at 9."""
    for n in (3, 2, 1):
        for i in range(n):
            good(tape.write(rec(i, 100)))
        good(tape.wfm())
    good(tape.rewind())


def test_space_blocks_stops_at_filemark(tape):
    _three_files(tape)
    expect(tape.space(0, 5), NO_SENSE, 0x00, 0x01, info=2, flags=FM)      # crossed 3 blocks, then the FM
    assert tape.position() == {"bop": False, "eop": False, "object": 4, "file": 1}
    good(tape.space(0, 1))
    assert tape.position()["object"] == 5
    expect(tape.space(0, -4), NO_SENSE, 0x00, 0x01, info=3, flags=FM)     # one block back, then the FM
    assert tape.position() == {"bop": False, "eop": False, "object": 3, "file": 0}   # BOP side of the FM
    good(tape.space(0, -2))
    assert tape.position()["object"] == 1
    expect(tape.space(0, -5), NO_SENSE, 0x00, 0x04, info=4, flags=EOM)    # beginning of partition
    assert tape.position()["bop"]


def test_space_filemarks_to_eod_reports_residual(tape):
    """What `mt eod` does with fast_mteom=0: SPACE(6) filemarks 0x7fffff must end in BLANK CHECK 00/05 with
    VALID and INFORMATION = count - filemarks spaced (tgt got this wrong), then SPACE code 3."""
    _three_files(tape)
    expect(tape.space(1, 0x7FFFFF), BLANK_CHECK, 0x00, 0x05, info=0x7FFFFF - 3)
    assert tape.position() == {"bop": False, "eop": False, "object": 9, "file": 3}
    good(tape.rewind())
    good(tape.space(3, 0))
    assert tape.position()["object"] == 9
    good(tape.rewind())
    good(tape.space(1, 2))
    assert tape.position() == {"bop": False, "eop": False, "object": 7, "file": 2}
    good(tape.space(1, -1))                                       # BOP side of filemark 1
    assert tape.position() == {"bop": False, "eop": False, "object": 6, "file": 1}
    expect(tape.space(1, -3), NO_SENSE, 0x00, 0x04, info=2, flags=EOM)
    assert tape.position()["object"] == 0
    good(tape.space16(1, 3))
    assert tape.position()["object"] == 9
    expect(tape.space16(0, 1), BLANK_CHECK, 0x00, 0x05, info=1)
    expect(tape.space(2, 1), ILLEGAL_REQUEST, 0x24, 0x00)       # sequential filemarks: not supported


def test_read_position_short_and_extended_forms(tape):
    _three_files(tape)
    good(tape.space(0, 2))
    for sa in (0, 1):                                             # st's `34 01` included: BPU must be clear
        d = good(tape.cmd(bytes((0x34, sa)) + bytes(8), xfer=20))["data"]
        assert len(d) == 20 and d[0] & 0x04 == 0 and d[0] & 0x80 == 0
        assert struct.unpack_from(">II", d, 4) == (2, 2)
    good(tape.rewind())
    d = good(tape.cmd(bytes((0x34, 0)) + bytes(8), xfer=20))["data"]
    assert d[0] & 0x80 and struct.unpack_from(">I", d, 4)[0] == 0
    d = good(tape.cmd(bytes((0x34, 8, 0, 0, 0, 0, 0, 0, 32, 0)), xfer=32))["data"]
    assert len(d) == 32 and d[0] & 0x80 and struct.unpack_from(">H", d, 2)[0] == 0x1C
    assert struct.unpack_from(">QQ", d, 8) == (0, 0)
    expect(tape.cmd(bytes((0x34, 3)) + bytes(8), xfer=32), ILLEGAL_REQUEST, 0x24, 0x00)


def test_locate(tape):
    _three_files(tape)
    good(tape.locate10(5))
    assert tape.position() == {"bop": False, "eop": False, "object": 5, "file": 1}
    assert good(tape.read(100))["data"] == rec(1, 100)
    good(tape.locate16(2, dest_type=1))                           # logical file 2 starts after filemark 1
    assert tape.position() == {"bop": False, "eop": False, "object": 7, "file": 2}
    good(tape.locate16(0, dest_type=3))                           # end of data
    assert tape.position()["object"] == 9
    good(tape.locate16(0))
    assert tape.position()["bop"]
    expect(tape.locate10(50), BLANK_CHECK, 0x00, 0x05)
    assert tape.position()["object"] == 9
    expect(tape.locate16(9, dest_type=1), BLANK_CHECK, 0x00, 0x05)


def test_write_in_the_middle_truncates_and_erase(tape):
    _three_files(tape)
    good(tape.locate10(4))
    good(tape.write(b"new"))
    good(tape.rewind())
    expect(tape.space(1, 10), BLANK_CHECK, 0x00, 0x05, info=9)   # only filemark 0 is left
    assert tape.position()["object"] == 5
    good(tape.locate10(1))
    good(tape.cmd(bytes((0x19, 1, 0, 0, 0, 0))))                  # ERASE (LONG) from here
    good(tape.rewind())
    expect(tape.space(0, 5), BLANK_CHECK, 0x00, 0x05, info=4)


def test_setmarks(tape):
    good(tape.write(b"a"))
    good(tape.wfm(1, setmark=True))
    good(tape.write(b"b"))
    good(tape.wfm(1))
    good(tape.rewind())
    good(tape.space(4, 1))
    assert tape.position()["object"] == 2
    good(tape.rewind())
    good(tape.read(1))
    expect(tape.read(1), NO_SENSE, 0x00, 0x03, info=1, flags=FM)


# -- capacity, write protection -------------------------------------------------------------------------------------
def test_early_warning_then_end_of_medium(workdir):
    """SSC-3 4.2.5: past early warning a WRITE still writes and reports NO SENSE + EOM, 00/02, INFORMATION 0;
    when nothing fits: VOLUME OVERFLOW + EOM, 00/02, INFORMATION = the whole transfer."""
    cap, ew = 256 * 1024, 64 * 1024
    t = Tape({"cartridge": new_cart(workdir, capacity=cap, early_warning=ew)})
    try:
        block, n = 16 * 1024, 0
        while (done := t.write(rec(n, block)))["status"] == GOOD:
            n += 1
        expect(done, NO_SENSE, 0x00, 0x02, info=0, flags=EOM)
        n += 1                                                   # that block was written
        assert n * (block + cartmod.HEAD_SIZE) >= cap - ew
        assert t.position()["eop"]
        while parse_sense((done := t.write(rec(n, block)))["sense"])["key"] == NO_SENSE:
            expect(done, NO_SENSE, 0x00, 0x02, info=0, flags=EOM)
            n += 1
        expect(done, VOLUME_OVERFLOW, 0x00, 0x02, info=block, flags=EOM)
        assert n == cap // (block + cartmod.HEAD_SIZE)
        expect(t.wfm(1), NO_SENSE, 0x00, 0x02, info=0, flags=EOM)   # a filemark still fits
        good(t.rewind())
        for i in range(n):
            assert good(t.read(block))["data"] == rec(i, block)
    finally:
        t.close()


def test_write_protected_cartridge(workdir):
    t = Tape({"cartridge": new_cart(workdir, write_protect=True)})
    try:
        expect(t.write(b"data"), DATA_PROTECT, 0x27, 0x00)
        expect(t.wfm(1), DATA_PROTECT, 0x27, 0x00)
        expect(t.cmd(bytes((0x19, 0, 0, 0, 0, 0))), DATA_PROTECT, 0x27, 0x00)
        good(t.wfm(0))                                            # a flush writes nothing: allowed
        ms = good(t.cmd(bytes((0x1A, 0, 0, 0, 12, 0)), xfer=12))["data"]
        assert ms[2] & 0x80                                      # WP
        ta = good(t.cmd(bytes((0x4D, 0, 0x6E, 0, 0, 0, 0, 0x01, 0x40, 0)), xfer=320))["data"]
        assert ta[4 + 8 * 5 + 4] == 1                            # TapeAlert flag 9: write protect
    finally:
        t.close()


# -- media control over the protocol --------------------------------------------------------------------------------
def test_load_and_unload_messages(workdir):
    a, b = new_cart(workdir, "TAPEA"), new_cart(workdir, "TAPEB")
    t = Tape()
    try:
        done = t.control({"op": "load", "path": a}, tag=1)
        assert done["status"] == GOOD and done["path"] == a and done["object"] == 0
        assert t.named("medium_changed")
        assert t.named("position")[-1] == {"op": "event", "event": "position", "path": a, "object": 0,
                                           "loaded": True, "block_size": 0}
        good(t.cmd(bytes(6)))
        good(t.write(b"on A"))
        assert t.control({"op": "load", "path": b}, tag=2)["status"] == CHECK   # the drive is full
        done = t.control({"op": "unload"}, tag=3)
        assert done["status"] == GOOD and done["unloaded"] == a and done["path"] is None
        expect(t.cmd(bytes(6)), NOT_READY, 0x3A, 0x00)
        assert good(t.control({"op": "unload"}, tag=4))["unloaded"] is None      # idempotent
        good(t.control({"op": "load", "path": b}, tag=5))
        good(t.cmd(bytes(6)))
        expect(t.read(10), BLANK_CHECK, 0x00, 0x05)
        good(t.control({"op": "unload"}, tag=6))
        good(t.control({"op": "load", "path": a}, tag=7))
        assert good(t.read(4))["data"] == b"on A"                 # the unload flushed it
    finally:
        t.close()
    with _Open(a) as cart:
        assert cart.meta["loads"] == 2


class _Open:
    def __init__(self, path: str) -> None:
        self.cart = Cartridge(path)

    def __enter__(self) -> Cartridge:
        return self.cart

    def __exit__(self, *exc) -> None:
        self.cart.close()


def test_load_unload_command_and_prevent(tape):
    good(tape.write(b"x"))
    good(tape.cmd(bytes((0x1E, 0, 0, 0, 1, 0))))                  # PREVENT
    expect(tape.cmd(bytes((0x1B, 0, 0, 0, 0, 0))), ILLEGAL_REQUEST, 0x53, 0x02)
    good(tape.cmd(bytes((0x1E, 0, 0, 0, 0, 0))))
    good(tape.cmd(bytes((0x1B, 0, 0, 0, 0, 0))))                  # UNLOAD
    expect(tape.cmd(bytes(6)), NOT_READY, 0x3A, 0x00)
    assert tape.named("position")[-1]["loaded"] is False
    good(tape.cmd(bytes((0x1B, 0, 0, 0, 1, 0))))                  # LOAD
    assert tape.named("medium_changed")
    assert good(tape.read(1))["data"] == b"x"


def test_position_survives_an_emulator_kill(workdir):
    """Protocol §10: the core restores {path, object, loaded, block_size} from the last `position` event; records
    written since the last flush survive a killed process (roll-forward)."""
    path = new_cart(workdir)
    t = Tape({"cartridge": path})
    for i in range(5):
        good(t.write(rec(i, 777)))
    good(t.wfm())
    good(t.write(rec(5, 777)))                                    # never flushed by a filemark or motion
    last = t.named("position")[-1]
    assert last["object"] == 7
    t.c.proc.kill()
    t.c.proc.wait()
    t.close()
    t = Tape()
    try:
        done = t.control({"op": "restore", **{k: last[k] for k in ("path", "object", "loaded", "block_size")}})
        assert done["status"] == GOOD and not done.get("moved")
        assert not t.named("medium_changed")                      # restoring is invisible to initiators
        assert t.position() == {"bop": False, "eop": False, "object": 7, "file": 1}
        good(t.space(0, -1))
        assert good(t.read(777))["data"] == rec(5, 777)         # rolled forward after the kill
        good(t.locate10(2))
        assert good(t.read(777))["data"] == rec(2, 777)
        done = t.control({"op": "restore", "path": path, "object": 99, "loaded": True, "block_size": 0}, tag=2)
        assert done["moved"] and done["object"] == 7 and t.named("medium_changed")
    finally:
        t.close()


def test_index_spans_many_objects(workdir):
    """LOCATE and SPACE across several index records, before and after reopening the cartridge."""
    path = new_cart(workdir, capacity=64 * MiB)
    cart = Cartridge(path)
    for i in range(1800):
        cart.append(cartmod.DATA, [rec(i, 16 + i % 50)])
        if i % 100 == 99:
            cart.append(cartmod.FILEMARK, [b""])
    cart.close()
    t = Tape({"cartridge": path})
    try:
        good(t.locate10(1234))
        pos = t.position()
        assert pos["file"] == 1234 // 101
        expected = 1234 - pos["file"]
        assert good(t.read(100, sili=True))["data"] == rec(expected, 16 + expected % 50)
        expect(t.space(1, 100), BLANK_CHECK, 0x00, 0x05, info=100 - (18 - pos["file"]))
        assert t.position() == {"bop": False, "eop": False, "object": 1818, "file": 18}
        good(t.space(1, -10))
        assert t.position()["object"] == cart_fm_object(8)
    finally:
        t.close()


def cart_fm_object(n: int) -> int:
    """Object number of filemark n in test_index_spans_many_objects."""
    return 100 * (n + 1) + n


def test_cartridge_survives_torn_header_and_stale_records(workdir):
    """The header is the commit point: a header torn while being written leaves the previous one in force, and
    records of an earlier epoch are never rolled forward into a shorter tape."""
    path = new_cart(workdir)
    cart = Cartridge(path)
    cart.append(cartmod.DATA, [b"a" * 100] * 10)
    cart.flush()
    cart.seek(4)
    cart.truncate()                                               # commits "end of data at 4" (a new epoch)
    os.close(cart.fd)                                             # crash right after, with that header torn:
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"\xff" * 64, (cart.seq & 1) * cartmod.SLOT_SIZE + 40)
    os.close(fd)
    cart = Cartridge(path)
    assert cart.eod == 10                                         # the previous header is in force, data intact
    cart.seek(9)
    assert bytes(cart.read(1)[0][1]) == b"a" * 100
    cart.seek(4)
    cart.append(cartmod.DATA, [b"b" * 100])                       # truncate + overwrite, never flushed
    os.close(cart.fd)                                             # crash
    cart = Cartridge(path)
    try:
        assert cart.eod == 5                                      # object 4 rolled forward; old 5..9 stay dead
        cart.seek(4)
        assert bytes(cart.read(1)[0][1]) == b"b" * 100
    finally:
        cart.close()
    with pytest.raises(cartmod.CartridgeError):
        Cartridge(os.path.join(workdir, "missing.img"))


# -- mode, log, attributes, limits ----------------------------------------------------------------------------------
def test_mode_pages(tape):
    d = good(tape.cmd(bytes((0x1A, 0x08, 0x10, 0, 255, 0)), xfer=255))["data"]
    assert d[3] == 0 and d[4] == 0x10 and d[5] == 14             # device configuration page, no descriptor
    d = good(tape.cmd(bytes((0x1A, 0x08, 0x0F, 0, 255, 0)), xfer=255))["data"]
    assert d[4] == 0x0F and d[6] & 0x40                          # compression page: DCC
    d = good(tape.cmd(bytes((0x1A, 0, 0x3F, 0, 255, 0)), xfer=255))["data"]
    assert d[3] == 8 and d[4] == cartmod.DENSITY                 # block descriptor density of the loaded medium
    page = bytearray(good(tape.cmd(bytes((0x1A, 0x08, 0x10, 0, 255, 0)), xfer=255))["data"][4:])
    page[10] |= 0x04                                             # SWP, the one changeable bit we use
    sel = bytes((0, 0, 0, 0)) + page
    good(tape.cmd(bytes((0x15, 0x10, 0, 0, len(sel), 0)), sel))
    expect(tape.write(b"x"), DATA_PROTECT, 0x27, 0x00)
    bad = bytes((0, 0, 0x10, 8)) + bytes((0x55, 0, 0, 0, 0, 0, 0, 0))
    expect(tape.cmd(bytes((0x15, 0x10, 0, 0, len(bad), 0)), bad), ILLEGAL_REQUEST, 0x26, 0x00)


def test_log_sense_pages(tape):
    good(tape.write(b"y" * 1234))
    d = good(tape.cmd(bytes((0x4D, 0, 0x40, 0, 0, 0, 0, 0, 64, 0)), xfer=64))["data"]
    assert {0x00, 0x02, 0x03, 0x2E}.issubset(set(d[4:4 + struct.unpack_from(">H", d, 2)[0]]))
    d = good(tape.cmd(bytes((0x4D, 0, 0x42, 0, 0, 0, 0, 1, 0, 0)), xfer=256))["data"]
    params, pos = {}, 4
    while pos < len(d):
        code, _, n = struct.unpack_from(">HBB", d, pos)
        params[code] = int.from_bytes(d[pos + 4:pos + 4 + n], "big")
        pos += 4 + n
    assert params[5] == 1234
    d = good(tape.cmd(bytes((0x4D, 0, 0x6E, 0, 0, 0, 0, 0x01, 0x40, 0)), xfer=320))["data"]
    assert d[0] == 0x2E and struct.unpack_from(">H", d, 2)[0] == 64 * 5
    expect(tape.cmd(bytes((0x4D, 0, 0x55, 0, 0, 0, 0, 0, 64, 0)), xfer=64), ILLEGAL_REQUEST, 0x24, 0x00)


def _attributes(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 4
    while pos + 5 <= len(data):
        ident, _, n = struct.unpack_from(">HBH", data, pos)
        out[ident] = data[pos + 5:pos + 5 + n]
        pos += 5 + n
    return out


def test_read_and_write_attributes(workdir):
    path = new_cart(workdir, "BAR123L6", capacity=32 * MiB)
    t = Tape({"cartridge": path})
    try:
        d = good(t.cmd(bytes((0x8C, 0)) + bytes(6) + bytes((0, 0, 0, 0, 0x10, 0, 0, 0)), xfer=4096))["data"]
        attrs = _attributes(d)
        assert attrs[0x0806].rstrip() == b"BAR123L6"
        assert int.from_bytes(attrs[0x0001], "big") == 32                    # MiB
        assert int.from_bytes(attrs[0x0003], "big") == 1                     # load count
        label = b"weekly full"
        param = struct.pack(">I", 5 + len(label)) + struct.pack(">HBH", 0x0803, 2, len(label)) + label
        good(t.cmd(bytes((0x8D, 0)) + bytes(8) + len(param).to_bytes(4, "big") + bytes(2), param))
        d = good(t.cmd(bytes((0x8C, 0)) + bytes(6) + bytes((0x08, 0x03, 0, 0, 0x10, 0, 0, 0)), xfer=4096))["data"]
        assert _attributes(d)[0x0803] == label
        bad = struct.pack(">I", 13) + struct.pack(">HBH", 0x0003, 0, 8) + bytes(8)   # LOAD COUNT is read only
        expect(t.cmd(bytes((0x8D, 0)) + bytes(8) + len(bad).to_bytes(4, "big") + bytes(2), bad),
               ILLEGAL_REQUEST, 0x26, 0x00)
    finally:
        t.close()


def test_block_limits_and_density_support(tape):
    d = good(tape.cmd(bytes((0x05, 0, 0, 0, 0, 0)), xfer=6))["data"]
    assert int.from_bytes(d[1:4], "big") == 8 * MiB and int.from_bytes(d[4:6], "big") == 1
    d = good(tape.cmd(bytes((0x05, 1, 0, 0, 0, 0)), xfer=20))["data"]
    assert len(d) == 20 and int.from_bytes(d[12:20], "big") > 0
    d = good(tape.cmd(bytes((0x44, 1, 0, 0, 0, 0, 0, 0, 255, 0)), xfer=255))["data"]
    assert struct.unpack_from(">H", d, 0)[0] == 54 and d[4] == cartmod.DENSITY and d[6] & 0x80
    assert struct.unpack_from(">I", d, 16)[0] == 16 * MiB // 1000000


def test_descriptor_sense_carries_stream_bits(tape):
    ctl = bytes((0, 0, 0, 0)) + bytes((0x0A, 10, 0x06, 0x10)) + bytes(8)   # control page with D_SENSE
    good(tape.cmd(bytes((0x15, 0x10, 0, 0, len(ctl), 0)), ctl))
    good(tape.write(b"q"))
    good(tape.wfm())
    good(tape.rewind())
    good(tape.read(1))
    done = tape.read(50)
    s = parse_sense(done["sense"])
    assert s["format"] == 0x72 and (s["key"], s["asc"], s["ascq"], s["info"]) == (0, 0, 1, 50)
    sense = done["sense"]
    assert bytes((0x04, 0x02, 0x00, FM)) in sense[8:]
