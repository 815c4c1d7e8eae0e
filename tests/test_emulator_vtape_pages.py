"""The vtape emulator's mode pages, log pages, medium attributes and limits, as a real subprocess over the CBOR
wire (docs/emulator-protocol.md, docs/tape.md): MODE SENSE/SELECT, LOG SENSE (TapeAlert included), READ/WRITE
ATTRIBUTE, READ BLOCK LIMITS, REPORT DENSITY SUPPORT, and descriptor-format sense with the stream bits.
"""
from __future__ import annotations

import struct

from emulators.pyemu import cartridge as cartmod
from emulators.pyemu.client import parse_sense
from vtape_helpers import DATA_PROTECT, FM, ILLEGAL_REQUEST, MiB, Tape, expect, good, new_cart
from vtape_helpers import tape, workdir  # noqa: F401 (pytest fixtures)


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
