"""The vtape emulator as a real subprocess over the CBOR wire (docs/emulator-protocol.md, docs/tape.md): identity
and readiness, READ/WRITE in variable and fixed block mode, SPACE, LOCATE and READ POSITION, early warning and end
of medium, and write protection.

Each test names the SSC-3 behaviour it checks; the sense expectations are the ones the Linux st driver relies on
(../shared/kvm-initiator/README.md: FM/EOM/ILI bits, VALID + INFORMATION = residual, BLANK CHECK 00/05 at EOD).
Media control is in test_emulator_vtape_media.py, mode/log pages and attributes in test_emulator_vtape_pages.py;
the shared driver in vtape_helpers.py.
"""
from __future__ import annotations

import os
import struct

from emulators.pyemu import cartridge as cartmod
from emulators.pyemu.client import parse_sense
from vtape_helpers import (BLANK_CHECK, DATA_PROTECT, EOM, FM, GOOD, ILI, ILLEGAL_REQUEST, NOT_READY, NO_SENSE,
                           VOLUME_OVERFLOW, Tape, expect, good, new_cart, rec)
from vtape_helpers import tape, workdir  # noqa: F401 (pytest fixtures)


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
