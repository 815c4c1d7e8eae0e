"""SMC-3: a medium changer (tape library) whose elements hold cartridge images (docs/tape.md, "Library").

Strategy: the library is a list of ``Element``s (one medium transport, storage slots, import/export slots, data
transfer elements = drives) with contiguous address ranges per type, which is what the element address
assignment page can describe. MOVE MEDIUM and EXCHANGE MEDIUM change the elements, persist them through
``on_change`` (the emulator's state file), and only then tell the core which drive must load or unload what, as
``move`` events written before the command's ``done`` (protocol §10): the core forwards them to the drive LUs
before it answers the initiator. Bits 7-5 of CDB byte 1 (the SCSI-2 LUN field, which the Linux ch driver still
fills in) are ignored on every command.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, NamedTuple

from .sense import ScsiError, SenseKey, invalid_field
from .spc import VERSION_ISCSI, VERSION_SAM5, VERSION_SPC4, ModePage, Result, ScsiDevice, cmd

VERSION_SMC3 = 0x0480
MT, ST, IE, DT = 1, 2, 3, 4
TYPE_NAMES = {MT: "transport", ST: "slot", IE: "import/export", DT: "drive"}
INVALID_ELEMENT, DEST_FULL, SOURCE_EMPTY = 0x2101, 0x3B0D, 0x3B0E


class Volume(NamedTuple):
    barcode: str
    path: str


class Drive(NamedTuple):
    serial: str
    lun: int | None = None
    vendor: str = "TRIOSCSI"
    product: str = "VIRTUAL-TAPE"

    def identifier(self) -> bytes:
        """The DVCID identifier: T10 vendor ID based, vendor (8) + product (16) + serial."""
        return (self.vendor.encode("ascii", "replace")[:8].ljust(8)
                + self.product.encode("ascii", "replace")[:16].ljust(16) + self.serial.encode("ascii", "replace"))


class Element:
    """One element; ``source`` is the storage address the volume was last moved from (SVALID)."""
    __slots__ = ("kind", "address", "volume", "source", "drive")

    def __init__(self, kind: int, address: int, volume: Volume | None = None, source: int | None = None,
                 drive: Drive | None = None) -> None:
        self.kind, self.address, self.volume, self.source, self.drive = kind, address, volume, source, drive


def element_error(asc: int) -> ScsiError:
    return ScsiError(SenseKey.ILLEGAL_REQUEST, asc)


class SmcDevice(ScsiDevice):
    """A medium changer (peripheral type 8) over ``elements``.

    Args:
        elements: every element, each type's addresses contiguous; exactly one medium transport.
        on_change: called after the elements changed and before the drives are told (persist here).
    """

    device_type = 8
    removable = True
    default_workers = 1
    version_descriptors = (VERSION_SAM5, VERSION_SPC4, VERSION_SMC3, VERSION_ISCSI)

    def __init__(self, elements: list[Element], identity: dict[str, Any], emit: Callable[..., None] | None = None,
                 on_change: Callable[[], None] | None = None, *, fallback_serial: str = "0",
                 product: str = "VIRTUAL-CHANGER") -> None:
        super().__init__(identity, emit, fallback_serial, product)
        self.elements = sorted(elements, key=lambda e: e.address)
        self.by_address = {e.address: e for e in self.elements}
        if len(self.by_address) != len(self.elements):
            raise ValueError("two elements share an address")
        self.ranges = {t: self._range(t) for t in (MT, ST, IE, DT)}
        if self.ranges[MT][1] != 1:
            raise ValueError("a library has exactly one medium transport element")
        self.on_change = on_change or (lambda: None)
        self.prevent = False
        self.add_commands({
            0x07: cmd("INITIALIZE ELEMENT STATUS", self.accept, 0x07, 0, 0, 0, 0, 0x07, timeout=300),
            0x1E: cmd("PREVENT ALLOW MEDIUM REMOVAL", self.prevent_allow, 0x1E, 0, 0, 0, 0x03, 0x07),
            0x2B: cmd("POSITION TO ELEMENT", self.position_to_element, 0x2B, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0,
                      0x01, 0x07),
            0x37: cmd("INITIALIZE ELEMENT STATUS WITH RANGE", self.init_range, 0x37, 0x03, 0xFF, 0xFF, 0, 0,
                      0xFF, 0xFF, 0, 0x07, timeout=300),
            0xA5: cmd("MOVE MEDIUM", self.move_medium, 0xA5, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01,
                      0x07, timeout=300),
            0xA6: cmd("EXCHANGE MEDIUM", self.exchange_medium, 0xA6, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                      0xFF, 0xFF, 0x03, 0x07, timeout=300),
            0xB8: cmd("READ ELEMENT STATUS", self.read_element_status, 0xB8, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0x03,
                      0xFF, 0xFF, 0xFF, 0, 0x07),
        })
        r = self.ranges
        assignment = struct.pack(">8H2x", *r[MT], *r[ST], *r[IE], *r[DT])
        self.add_mode_page(ModePage(0x1D, 0, assignment, bytes(len(assignment))))
        self.add_mode_page(ModePage(0x1E, 0, bytes(2), bytes(2)))             # transport geometry: no rotation
        moves = 0x0E                                                         # to ST, IE and DT
        caps = bytes((0x0E, 0, 0, moves, moves, moves, 0, 0, 0, 0, 0, moves, moves, moves, 0, 0, 0, 0))
        self.add_mode_page(ModePage(0x1F, 0, caps, bytes(len(caps))))         # device capabilities

    def _range(self, kind: int) -> tuple[int, int]:
        addrs = [e.address for e in self.elements if e.kind == kind]
        if addrs and addrs != list(range(addrs[0], addrs[0] + len(addrs))):
            raise ValueError(f"the {TYPE_NAMES[kind]} addresses must be contiguous")
        return (addrs[0] if addrs else 0), len(addrs)

    def ready_info(self) -> dict[str, Any]:
        drives = [{"address": e.address, "lun": e.drive.lun, "serial": e.drive.serial,
                   "path": e.volume.path if e.volume else None, "barcode": e.volume.barcode if e.volume else None}
                  for e in self.elements if e.kind == DT and e.drive]
        return {"identity": self.ident.as_map(), "features": ["changer"], "drives": drives}

    def execute(self, cdb: bytes, data: Any, xfer: int) -> Result:
        if len(cdb) > 1 and cdb[1] & 0xE0:
            cdb = bytes((cdb[0], cdb[1] & 0x1F)) + cdb[2:]      # the obsolete LUN field
        return super().execute(cdb, data, xfer)

    # -- element lookup -------------------------------------------------------------------------------------------
    def _element(self, address: int, *, transport_ok: bool = False) -> Element:
        e = self.by_address.get(address)
        if e is None or (e.kind == MT and not transport_ok):
            raise element_error(INVALID_ELEMENT)
        return e

    def _check_transport(self, address: int) -> None:
        if address and self._element(address, transport_ok=True).kind != MT:
            raise element_error(INVALID_ELEMENT)

    # -- commands -------------------------------------------------------------------------------------------------
    def accept(self, cdb: bytes, data: Any, xfer: int) -> None:
        return None

    def init_range(self, cdb: bytes, data: Any, xfer: int) -> None:
        if cdb[1] & 1:
            start, count = struct.unpack_from(">H2xH", cdb, 2)
            if not any(start <= e.address for e in self.elements) and count:
                raise element_error(INVALID_ELEMENT)

    def prevent_allow(self, cdb: bytes, data: Any, xfer: int) -> None:
        self.prevent = bool(cdb[4] & 3)

    def position_to_element(self, cdb: bytes, data: Any, xfer: int) -> None:
        transport, dest = struct.unpack_from(">HH", cdb, 2)
        if cdb[8] & 1:
            raise invalid_field(8, 0)
        self._check_transport(transport)
        self._element(dest)

    def move_medium(self, cdb: bytes, data: Any, xfer: int) -> None:
        transport, src_addr, dst_addr = struct.unpack_from(">HHH", cdb, 2)
        if cdb[10] & 1:
            raise invalid_field(10, 0)                  # INVERT: single-sided media
        self._check_transport(transport)
        src, dst = self._element(src_addr), self._element(dst_addr)
        if src.volume is None:
            raise element_error(SOURCE_EMPTY)
        if src is dst:
            return
        if dst.volume is not None:
            raise element_error(DEST_FULL)
        changes = [(src, None, None), (dst, src.volume, self._home(src))]
        self._apply(changes)

    def exchange_medium(self, cdb: bytes, data: Any, xfer: int) -> None:
        transport, src_addr, first_addr, second_addr = struct.unpack_from(">HHHH", cdb, 2)
        if cdb[10] & 3:
            raise invalid_field(10, 1)
        self._check_transport(transport)
        src, first, second = self._element(src_addr), self._element(first_addr), self._element(second_addr)
        if src.volume is None or first.volume is None:
            raise element_error(SOURCE_EMPTY)
        if second.volume is not None and second is not src:
            raise element_error(DEST_FULL)
        if first is src:
            return
        moved, displaced = src.volume, first.volume
        home_moved, home_displaced = self._home(src), self._home(first)
        changes = [(src, None, None), (first, moved, home_moved), (second, displaced, home_displaced)]
        self._apply(changes)

    @staticmethod
    def _home(e: Element) -> int | None:
        """What a volume leaving ``e`` keeps as its source address: a storage element stays its home."""
        return e.address if e.kind in (ST, IE) else e.source

    def _apply(self, changes: list[tuple[Element, Volume | None, int | None]]) -> None:
        """Set the new contents, persist, then tell the core: every drive unload before any load."""
        before = {id(e): e.volume for e, _, _ in changes}
        for e, volume, source in changes:
            e.volume, e.source = volume, source if volume else None
        try:
            self.on_change()
        except OSError as exc:
            for e, _, _ in changes:
                e.volume = before[id(e)]
            raise ScsiError(SenseKey.HARDWARE_ERROR, 0x4400) from exc
        drives = {id(e): e for e, _, _ in changes if e.kind == DT}.values()
        for e in drives:
            old = before[id(e)]
            if old is not None and e.volume != old:
                self._tell(e, "unload", old)
        for e in drives:
            old = before[id(e)]
            if e.volume is not None and e.volume != old:
                self._tell(e, "load", e.volume)

    def _tell(self, e: Element, action: str, volume: Volume) -> None:
        d = e.drive or Drive("")
        self.emit("move", action=action, drive=e.address, lun=d.lun, serial=d.serial, path=volume.path,
                  barcode=volume.barcode)

    # -- READ ELEMENT STATUS --------------------------------------------------------------------------------------
    def read_element_status(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        voltag, kind = bool(cdb[1] & 0x10), cdb[1] & 0x0F
        start, count = struct.unpack_from(">HH", cdb, 2)
        dvcid, alloc = bool(cdb[6] & 1), int.from_bytes(cdb[7:10], "big")
        if kind > DT:
            raise invalid_field(1, 3)
        chosen = [e for e in self.elements if (not kind or e.kind == kind) and e.address >= start][:count]
        pages: list[bytes] = []
        run: list[Element] = []
        for e in chosen:
            if run and run[-1].kind != e.kind:
                pages.append(self._page(run, voltag, dvcid))
                run = []
            run.append(e)
        if run:
            pages.append(self._page(run, voltag, dvcid))
        body = b"".join(pages)
        head = struct.pack(">HHx", chosen[0].address if chosen else 0, len(chosen)) + len(body).to_bytes(3, "big")
        return (head + body)[:alloc]

    def _page(self, run: list[Element], voltag: bool, dvcid: bool) -> bytes:
        kind = run[0].kind
        idlen = max((len(e.drive.identifier()) for e in run if e.drive), default=0) if dvcid and kind == DT else 0
        size = 12 + (36 if voltag else 0) + 4 + idlen
        descs = b"".join(self._descriptor(e, voltag, idlen).ljust(size, b"\0") for e in run)
        return struct.pack(">BBHx", kind, 0x80 if voltag else 0, size) + len(descs).to_bytes(3, "big") + descs

    def _descriptor(self, e: Element, voltag: bool, idlen: int) -> bytes:
        full = e.volume is not None
        flags = (0x01 if full else 0) | (0x08 if e.kind != MT else 0) | (0x30 if e.kind == IE else 0)
        bus = b"\0\0\0"
        if e.kind == DT and e.drive and e.drive.lun is not None and e.drive.lun < 8:
            bus = bytes((0x30 | e.drive.lun, 0, 0))            # ID VALID (target 0), LU VALID
        svalid = 0x80 if full and e.source is not None else 0
        out = struct.pack(">HBxBB", e.address, flags, 0, 0) + bus + \
            struct.pack(">BH", svalid | (1 if full else 0), (e.source or 0) if svalid else 0)
        if voltag:                                              # primary volume tag: barcode, 0, sequence 0
            out += e.volume.barcode.encode("ascii", "replace")[:32].ljust(32) + bytes(4) if e.volume else bytes(36)
        ident = e.drive.identifier()[:idlen] if idlen and e.drive else b""
        return out + bytes((0x02 if ident else 0, 0x01 if ident else 0, 0, len(ident))) + ident
