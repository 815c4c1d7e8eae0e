"""The vchanger emulator as a real subprocess over the CBOR wire (docs/emulator-protocol.md §10, docs/tape.md).

READ ELEMENT STATUS is parsed the way mtx parses it (mtxl.c ParseElementStatus: the header's element count, each
page's descriptor length as the stride, the volume tag at byte 12 when PVOLTAG is set) and the way the Linux ch
driver reads a drive's SCSI address (descriptor byte 6: ID VALID, LU VALID, LUN).
"""
from __future__ import annotations

import json
import os
import struct
import tempfile

import pytest

from emulators.pyemu.cartridge import Cartridge, create_cartridge
from emulators.pyemu.client import EmuClient, parse_sense

GOOD, CHECK, ILLEGAL_REQUEST, NOT_READY = 0x00, 0x02, 0x5, 0x2
MT, ST, IE, DT = 1, 2, 3, 4


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vchanger-test-") as d:
        yield d


def library(workdir: str, **over) -> dict:
    params = {"slots": 4, "ie_slots": 1, "media_dir": workdir, "state": os.path.join(workdir, "lib.state"),
              "capacity": 1 << 20,
              "drives": [{"serial": "DRV0001", "lun": 5}, {"serial": "DRV0002", "lun": 12}],
              "cartridges": [{"barcode": "TAPE1001", "path": "t1.img"}, {"barcode": "TAPE1002", "path": "t2.img"},
                             {"barcode": "TAPE1003", "path": "t3.img", "slot": 4}]}
    params.update(over)
    return params


class Changer:
    def __init__(self, params: dict) -> None:
        self.c = EmuClient("emulators.vchanger")
        self.ready = self.c.hello(params)
        assert self.ready["op"] == "ready", (self.ready, self.c.stderr_text())

    def cmd(self, cdb: bytes, data: bytes | None = None, xfer: int = 0) -> dict:
        return self.c.cmd(bytes(cdb), data, xfer)

    def ordered(self, cdb: bytes) -> list[dict]:
        """Every frame up to and including the command's done, in wire order."""
        tag = self.c.submit(bytes(cdb))
        frames = []
        while True:
            m = self.c.recv()
            frames.append(m)
            if m.get("op") == "done" and m.get("tag") == tag:
                return frames

    def move(self, src: int, dst: int, transport: int = 1) -> list[dict]:
        return self.ordered(struct.pack(">BxHHHxxxx", 0xA5, transport, src, dst))

    def status(self, kind: int = 0, start: int = 0, count: int = 0xFFFF, voltag: bool = True,
               dvcid: bool = False, alloc: int = 0xFFFF, byte1: int = 0) -> dict:
        cdb = struct.pack(">BBHHB", 0xB8, byte1 | (0x10 if voltag else 0) | kind, start, count,
                          1 if dvcid else 0) + alloc.to_bytes(3, "big") + b"\0\0"
        done = self.cmd(cdb, xfer=alloc)
        assert done["status"] == GOOD, done
        return parse_element_status(done["data"])

    def close(self) -> None:
        self.c.__exit__(None, None, None)


def parse_element_status(data: bytes) -> dict:
    """mtx's reading of READ ELEMENT STATUS data: {address: {type, full, source, barcode, lun, ident}}."""
    first, count = struct.unpack_from(">HH", data, 0)
    byte_count = int.from_bytes(data[5:8], "big")
    assert len(data) == 8 + byte_count, "BYTE COUNT OF REPORT AVAILABLE must cover every page"
    out, pos = {"first": first, "elements": {}}, 8
    while count > 0:
        kind, volbits, size = struct.unpack_from(">BBH", data, pos)
        page_bytes = int.from_bytes(data[pos + 5:pos + 8], "big")
        assert page_bytes % size == 0
        pos += 8
        for _ in range(page_bytes // size):
            d = data[pos:pos + size]
            addr = struct.unpack_from(">H", d)[0]
            e = {"type": kind, "full": bool(d[2] & 1), "except": bool(d[2] & 4), "size": size,
                 "source": struct.unpack_from(">H", d, 10)[0] if d[9] & 0x80 else None}
            at = 12
            if volbits & 0x80:
                e["barcode"] = d[12:44].rstrip(b" \0").decode()
                at += 36
            if d[6] & 0x10:
                e["lun"] = d[6] & 7
            idlen = d[at + 3]
            e["ident"] = d[at + 4:at + 4 + idlen].decode() if idlen else None
            out["elements"][addr] = e
            pos += size
            count -= 1
    return out


def expect(done: dict, key: int, asc: int, ascq: int) -> None:
    assert done["status"] == CHECK, done
    s = parse_sense(done["sense"])
    assert (s["key"], s["asc"], s["ascq"]) == (key, asc, ascq), s


@pytest.fixture
def changer(workdir):
    ch = Changer(library(workdir))
    yield ch
    ch.close()


# -- identity and mode pages ----------------------------------------------------------------------------------------
def test_handshake_and_inquiry(changer, workdir):
    assert changer.ready["device_type"] == 8
    assert changer.ready["drives"] == [
        {"address": 500, "lun": 5, "serial": "DRV0001", "path": None, "barcode": None},
        {"address": 501, "lun": 12, "serial": "DRV0002", "path": None, "barcode": None}]
    inq = changer.cmd(bytes((0x12, 0, 0, 0, 56, 0)), xfer=56)["data"]        # what `mtx inquiry` asks
    assert inq[0] == 0x08 and inq[1] & 0x80 and len(inq) == 56
    assert changer.cmd(bytes(6))["status"] == GOOD
    for name in ("t1.img", "t2.img", "t3.img"):                               # created on first start
        assert os.path.getsize(os.path.join(workdir, name)) > 0


def test_element_address_assignment_page_with_the_lun_field_set(changer):
    """The ch driver's first command: MODE SENSE(6) page 0x1D with LUN<<5 in byte 1 (`1a 80 1d 00 ff 00`)."""
    d = changer.cmd(bytes((0x1A, 0x80, 0x1D, 0, 0xFF, 0)), xfer=255)["data"]
    bdl = d[3]
    page = d[4 + bdl:]
    assert page[0] == 0x1D and page[1] == 0x12
    assert struct.unpack_from(">8H", page, 2) == (1, 1, 1000, 4, 10, 1, 500, 2)
    d = changer.cmd(bytes((0x1A, 0x08, 0x1F, 0, 0xFF, 0)), xfer=255)["data"]
    assert d[4] == 0x1F and d[5] == 0x12 and d[6] & 0x0E and d[4 + 2 + 5] & 0x08   # StorDT, ST->DT
    d = changer.cmd(bytes((0x1A, 0x08, 0x1E, 0, 0xFF, 0)), xfer=255)["data"]
    assert d[4] == 0x1E and d[5] == 2
    d = changer.cmd(bytes((0x5A, 0x08, 0x3F, 0, 0, 0, 0, 0x01, 0, 0)), xfer=256)["data"]
    assert struct.unpack_from(">H", d, 0)[0] + 2 == len(d)


# -- READ ELEMENT STATUS ---------------------------------------------------------------------------------------------
def test_read_element_status_per_type_like_mtx(changer):
    slots = changer.status(ST, 1000, 4)["elements"]
    assert sorted(slots) == [1000, 1001, 1002, 1003]
    assert [slots[a]["barcode"] if slots[a]["full"] else None for a in sorted(slots)] == \
        ["TAPE1001", "TAPE1002", None, "TAPE1003"]
    assert slots[1000]["size"] == 12 + 36 + 4 and slots[1000]["source"] == 1000
    ie = changer.status(IE, 10, 1)["elements"]
    assert list(ie) == [10] and not ie[10]["full"]
    drives = changer.status(DT, 500, 2)["elements"]
    assert sorted(drives) == [500, 501] and not any(d["full"] for d in drives.values())
    transport = changer.status(MT, 1, 1)["elements"]
    assert list(transport) == [1] and transport[1]["type"] == MT


def test_read_element_status_all_types_dvcid_and_allocation(changer):
    report = changer.status(dvcid=True)
    els = report["elements"]
    assert report["first"] == 1 and len(els) == 1 + 4 + 1 + 2
    assert [els[a]["type"] for a in sorted(els)] == [MT, IE, DT, DT, ST, ST, ST, ST]
    assert els[500]["ident"] == "TRIOSCSIVIRTUAL-TAPE    DRV0001"
    assert els[500]["size"] == 12 + 36 + 4 + len("TRIOSCSIVIRTUAL-TAPE    DRV0001")
    assert els[1000]["ident"] is None
    only = changer.status(ST, 1001, 2)["elements"]
    assert sorted(only) == [1001, 1002]
    d = changer.cmd(struct.pack(">BBHHB", 0xB8, 0x12, 1000, 4, 0) + (8).to_bytes(3, "big") + b"\0\0",
                    xfer=8)["data"]
    assert len(d) == 8 and int.from_bytes(d[5:8], "big") == 8 + 4 * 52   # the full size, for a retry
    expect(changer.cmd(struct.pack(">BBHHB", 0xB8, 0x05, 0, 1, 0) + bytes(5), xfer=64), ILLEGAL_REQUEST,
           0x24, 0x00)


def test_ch_driver_drive_query_reports_the_drive_lun(changer):
    """ch_readconfig: `b8 84 00 02 00 01 00 00 00 ff` style (no VOLTAG, LUN bits in byte 1), 16 bytes from +16."""
    cdb = bytes((0xB8, 0x84, 0x01, 0xF4, 0, 1, 0, 0, 0, 0xFF, 0, 0))
    d = changer.cmd(cdb, xfer=255)["data"]
    desc = d[16:32]
    assert struct.unpack_from(">H", desc)[0] == 500
    assert desc[6] & 0x30 == 0x30 and desc[6] & 7 == 5 and desc[7] == 0      # ID VALID, LU VALID, LUN 5
    d = changer.cmd(bytes((0xB8, 0x84, 0x01, 0xF5, 0, 1, 0, 0, 0, 0xFF, 0, 0)), xfer=255)["data"]
    assert d[16 + 6] & 0x30 == 0                                             # LUN 12 does not fit 3 bits


# -- MOVE MEDIUM ----------------------------------------------------------------------------------------------------
def test_move_slot_to_drive_emits_load_before_done(changer, workdir):
    frames = changer.move(1001, 500)
    assert [f["op"] for f in frames] == ["event", "done"] and frames[-1]["status"] == GOOD
    assert frames[0] == {"op": "event", "event": "move", "action": "load", "drive": 500, "lun": 5,
                         "serial": "DRV0001", "path": os.path.join(workdir, "t2.img"), "barcode": "TAPE1002"}
    els = changer.status()["elements"]
    assert els[500]["full"] and els[500]["barcode"] == "TAPE1002" and els[500]["source"] == 1001
    assert not els[1001]["full"]


def test_move_drive_to_slot_and_drive_to_drive(changer, workdir):
    changer.move(1000, 500)
    frames = changer.move(500, 501)
    assert [(f.get("action"), f.get("drive")) for f in frames[:-1]] == [("unload", 500), ("load", 501)]
    assert changer.status(DT, 500)["elements"][501]["source"] == 1000        # the home slot is kept
    frames = changer.move(501, 1002)
    assert frames[0]["action"] == "unload" and frames[0]["drive"] == 501 and frames[0]["barcode"] == "TAPE1001"
    els = changer.status()["elements"]
    assert els[1002]["full"] and els[1002]["barcode"] == "TAPE1001" and not els[501]["full"]
    assert [f["op"] for f in changer.move(1002, 10)] == ["done"]             # slot to I/E: no drive involved


def test_illegal_moves(changer):
    expect(changer.move(1002, 500)[-1], ILLEGAL_REQUEST, 0x3B, 0x0E)       # empty source
    expect(changer.move(1000, 1001)[-1], ILLEGAL_REQUEST, 0x3B, 0x0D)      # full destination
    expect(changer.move(1000, 2000)[-1], ILLEGAL_REQUEST, 0x21, 0x01)      # no such element
    expect(changer.move(1000, 1)[-1], ILLEGAL_REQUEST, 0x21, 0x01)         # the transport holds nothing
    expect(changer.move(1000, 500, transport=1000)[-1], ILLEGAL_REQUEST, 0x21, 0x01)
    assert changer.move(1000, 1000)[-1]["status"] == GOOD                  # onto itself: nothing to do
    cdb = struct.pack(">BxHHHxxBx", 0xA5, 1, 1000, 500, 1)                # INVERT
    expect(changer.cmd(cdb), ILLEGAL_REQUEST, 0x24, 0x00)
    assert changer.status(ST, 1000, 1)["elements"][1000]["full"]


def test_exchange_medium(changer):
    changer.move(1000, 500)
    cdb = struct.pack(">BxHHHHxx", 0xA6, 1, 1001, 500, 1000)               # TAPE1002 in, TAPE1001 home
    frames = changer.ordered(cdb)
    assert frames[-1]["status"] == GOOD
    assert [(f["action"], f["barcode"]) for f in frames[:-1]] == [("unload", "TAPE1001"), ("load", "TAPE1002")]
    els = changer.status()["elements"]
    assert els[500]["barcode"] == "TAPE1002" and els[1000]["barcode"] == "TAPE1001" and not els[1001]["full"]
    expect(changer.cmd(struct.pack(">BxHHHHxx", 0xA6, 1, 1001, 500, 1000)), ILLEGAL_REQUEST, 0x3B, 0x0E)
    expect(changer.cmd(struct.pack(">BxHHHHxx", 0xA6, 1, 1003, 500, 1000)), ILLEGAL_REQUEST, 0x3B, 0x0D)


def test_other_commands(changer):
    assert changer.cmd(bytes((0x07, 0x80, 0, 0, 0, 0)))["status"] == GOOD   # INITIALIZE ELEMENT STATUS, LUN bits
    assert changer.cmd(struct.pack(">BBHHHBB", 0x37, 1, 1000, 0, 4, 0, 0))["status"] == GOOD
    assert changer.cmd(struct.pack(">BxHHxxxB", 0x2B, 1, 500, 0))["status"] == GOOD
    expect(changer.cmd(struct.pack(">BxHHxxxB", 0x2B, 1, 4242, 0)), ILLEGAL_REQUEST, 0x21, 0x01)
    assert changer.cmd(bytes((0x1E, 0, 0, 0, 1, 0)))["status"] == GOOD
    assert changer.cmd(bytes((0x1E, 0, 0, 0, 0, 0)))["status"] == GOOD
    expect(changer.cmd(bytes((0x28,)) + bytes(9)), ILLEGAL_REQUEST, 0x20, 0x00)


# -- persistence and the library file -------------------------------------------------------------------------------
def test_state_persists_across_restart(workdir):
    ch = Changer(library(workdir))
    ch.move(1000, 501)
    ch.move(1003, 1002)
    ch.close()
    state = json.load(open(os.path.join(workdir, "lib.state")))
    assert state["elements"]["501"]["barcode"] == "TAPE1001"
    ch = Changer(library(workdir))
    try:
        els = ch.status()["elements"]
        assert els[501]["full"] and els[501]["barcode"] == "TAPE1001" and els[501]["source"] == 1000
        assert els[1002]["barcode"] == "TAPE1003" and not els[1003]["full"] and not els[1000]["full"]
        assert ch.ready["drives"][1]["path"] == os.path.join(workdir, "t1.img")
    finally:
        ch.close()


def test_library_from_a_toml_file(workdir):
    toml = os.path.join(workdir, "lib.toml")
    with open(toml, "w") as f:
        f.write('slots = 2\nfirst_slot = 4096\ntransport = 0\nfirst_drive = 256\ncapacity = 1048576\n'
                '[[drives]]\nserial = "D1"\nlun = 3\n'
                '[[cartridges]]\nbarcode = "A00001L6"\npath = "a1.img"\ndrive = 0\n')
    ch = Changer({"library": toml})
    try:
        els = ch.status()["elements"]
        assert els[0]["type"] == MT and els[256]["barcode"] == "A00001L6" and els[256]["source"] is None
        assert ch.ready["drives"][0]["path"] == os.path.join(workdir, "a1.img")
        assert os.path.exists(toml + ".state.json")
    finally:
        ch.close()
    bad = EmuClient("emulators.vchanger")
    with bad:
        assert bad.hello({"slots": 0})["op"] == "error"


def test_changer_and_drive_wired_like_the_core(workdir):
    """What the core does with a `move` event: send load/unload to the drive LU before answering the initiator."""
    ch = Changer(library(workdir))
    drive = EmuClient("emulators.vtape")
    try:
        drive.hello({}, {"serial": "DRV0001"})
        for event in ch.move(1000, 500)[:-1]:
            drive.send({"op": event["action"], "tag": 1, "path": event["path"]})
            assert drive.wait(1)["status"] == GOOD
        assert drive.cmd(bytes(6))["status"] == GOOD
        data = b"backup"
        assert drive.cmd(bytes((0x0A, 0, 0, 0, len(data), 0)), data)["status"] == GOOD
        for event in ch.move(500, 1000)[:-1]:
            drive.send({"op": event["action"], "tag": 2})
            assert drive.wait(2)["status"] == GOOD
        done = drive.cmd(bytes(6))
        assert done["status"] == CHECK and parse_sense(done["sense"])["key"] == NOT_READY
    finally:
        drive.__exit__(None, None, None)
        ch.close()
    cart = Cartridge(os.path.join(workdir, "t1.img"))
    try:
        assert cart.eod == 1 and cart.meta["loads"] == 1
    finally:
        cart.close()
    create_cartridge(os.path.join(workdir, "spare.img"), "SPARE", 1 << 20)
