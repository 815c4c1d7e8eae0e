"""SPC-4 commands every device type shares: INQUIRY and VPD, REQUEST SENSE, TEST UNIT READY, MODE SENSE/SELECT,
REPORT SUPPORTED OPERATION CODES.

Strategy: a device is a table ``{opcode: Command}``; opcodes with service actions hold their own table. The same
tables drive dispatch and REPORT SUPPORTED OPERATION CODES, so what is reported is what is implemented. Mode
pages are data (current/changeable/default bytes); MODE SELECT may change only the changeable bits, checks every
page before applying any, and tells the page's owner through ``on_change``. Handlers return the data-in bytes
(or None, or a ready ``Result``) and raise ScsiError; ``execute`` is the one catcher.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Any, Callable, Mapping, NamedTuple

from .runner import current_tag
from .sense import (Asc, ScsiError, SenseKey, build_sense, invalid_field, invalid_opcode, invalid_param,
                    param_length_error)

Handler = Callable[[bytes, Any, int], Any]
NAA_OUI = 0x7A7353   # a CID (its X bit is set): it cannot collide with an IEEE-assigned OUI
VERSION_SAM5, VERSION_SPC4, VERSION_ISCSI = 0x00A0, 0x0460, 0x0960


class Result(NamedTuple):
    """What ``execute`` returns: SAM status, sense (CHECK CONDITION only), data-in, and a callback that frees
    the data-in buffer once it has been written (pooled O_DIRECT buffers), or None."""
    status: int
    sense: bytes | None
    data: Any
    release: Callable[[], None] | None = None


class Command(NamedTuple):
    """One row of a device's opcode table.

    ``usage`` is the CDB USAGE DATA of REPORT SUPPORTED OPERATION CODES: the bits the device looks at, usage[0]
    being the opcode; its length is the CDB length. ``sas`` holds the service actions of opcodes that have them.
    """
    name: str
    handler: Handler | None
    usage: bytes
    sas: Mapping[int, "Command"] | None = None
    timeout: int = 30


def cmd(name: str, handler: Handler | None, *usage: int, timeout: int = 30) -> Command:
    return Command(name, handler, bytes(usage), None, timeout)


class ModePage:
    """A mode page's parameter bytes (after the page header) in its three flavours."""

    def __init__(self, code: int, subpage: int, default: bytes, changeable: bytes,
                 on_change: Callable[[bytes], None] | None = None) -> None:
        assert len(default) == len(changeable)
        self.code, self.subpage = code, subpage
        self.default, self.changeable = bytes(default), bytes(changeable)
        self.current = bytes(default)
        self.on_change = on_change

    def render(self, pc: int) -> bytes:
        body = (self.current, self.changeable, self.default)[pc]
        if self.subpage:
            return struct.pack(">BBH", 0x40 | self.code, self.subpage, len(body)) + body
        return bytes((self.code, len(body))) + body


def _text(value: str, size: int) -> bytes:
    """An ASCII field: left-aligned, space-padded, cut to ``size``."""
    return value.encode("ascii", "replace")[:size].ljust(size)


def derived_naa(serial: str) -> bytes:
    """A stable NAA 6 (IEEE registered extended) designator derived from the serial number."""
    h = int.from_bytes(hashlib.sha256(b"trioscsi-naa:" + serial.encode()).digest()[:13], "big")
    vsi, ext = h >> 68, h & ((1 << 64) - 1)          # 36 bits of identifier, 64 of extension
    return ((6 << 124) | (NAA_OUI << 100) | (vsi << 64) | ext).to_bytes(16, "big")


class Identity:
    """vendor/product/revision/serial/naa: from ``hello.identity`` when given, derived stably otherwise."""

    def __init__(self, given: Mapping[str, Any], fallback_serial: str, product: str) -> None:
        self.vendor = str(given.get("vendor", "TRIOSCSI"))
        self.product = str(given.get("product", product))
        self.revision = str(given.get("revision", "0001"))
        self.serial = str(given.get("serial", fallback_serial))
        naa = given.get("naa")
        if naa is not None:
            naa = bytes(naa)
            if len(naa) not in (8, 16):
                raise ValueError("identity.naa must be 8 or 16 bytes")
        self.naa = naa or derived_naa(self.serial)
        self.extra = {k: v for k, v in given.items() if k not in ("vendor", "product", "revision", "serial", "naa")}

    def as_map(self) -> dict[str, Any]:
        return {**self.extra, "vendor": self.vendor, "product": self.product, "revision": self.revision,
                "serial": self.serial, "naa": self.naa}


class ScsiDevice:
    """A logical unit that answers the SPC commands; subclasses add their command set."""

    device_type = 0
    removable = False
    third_party_copy = False                 # 3PC: EXTENDED COPY is implemented
    version_descriptors: tuple[int, ...] = (VERSION_SAM5, VERSION_SPC4, VERSION_ISCSI)
    software_write_protect = False           # the control page's SWP bit is changeable
    # A state that answers some commands before their handler (no medium, sanitize): ``gate(cdb)`` returns the
    # Result, or None to go on. None while the LU is in its normal state, which costs one attribute load.
    _gate: Callable[[bytes], "Result | None"] | None = None

    def __init__(self, identity: Mapping[str, Any], emit: Callable[..., None] | None = None,
                 fallback_serial: str = "0", product: str = "VIRTUAL-DEVICE") -> None:
        self.ident = Identity(identity, fallback_serial, product)
        self.emit = emit or (lambda event, **keys: None)
        self.d_sense = False
        self.commands: dict[int, Command] = {}
        self.vpd: dict[int, Callable[[], bytes]] = {0x00: self._vpd_supported, 0x80: self._vpd_serial,
                                                    0x83: self._vpd_identification}
        self.mode_pages: dict[tuple[int, int], ModePage] = {}
        self._handlers: dict[int, tuple[Handler, int]] = {}      # opcode -> (handler, CDB length)
        self._std_inquiry: bytes | None = None
        self.add_commands({
            0x00: cmd("TEST UNIT READY", self.test_unit_ready, 0x00, 0, 0, 0, 0, 0x07),
            0x03: cmd("REQUEST SENSE", self.request_sense, 0x03, 0x01, 0, 0, 0xFF, 0x07),
            0x12: cmd("INQUIRY", self.inquiry, 0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07),
            0x15: cmd("MODE SELECT(6)", self.mode_select6, 0x15, 0x11, 0, 0, 0xFF, 0x07),
            0x1A: cmd("MODE SENSE(6)", self.mode_sense6, 0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07),
            0x55: cmd("MODE SELECT(10)", self.mode_select10, 0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07),
            0x5A: cmd("MODE SENSE(10)", self.mode_sense10, 0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07),
            # Answered by the core for every LU (protocol §4); listed so the report is complete.
            0xA0: cmd("REPORT LUNS", None, 0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
        })
        self.add_service_actions(0xA3, "MAINTENANCE IN", {
            0x0C: cmd("REPORT SUPPORTED OPERATION CODES", self.report_opcodes,
                      0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07)})
        changeable = _CONTROL_CHANGEABLE_SWP if self.software_write_protect else _CONTROL_CHANGEABLE
        self.add_mode_page(ModePage(0x0A, 0, _CONTROL_DEFAULT, changeable, self._control_changed))

    # -- the table ----------------------------------------------------------------------------------------------
    def add_commands(self, table: Mapping[int, Command]) -> None:
        for opcode, command in table.items():
            self.commands[opcode] = command
            self._handlers[opcode] = (command.handler or _core_owned, len(command.usage))

    def add_service_actions(self, opcode: int, name: str, table: Mapping[int, Command]) -> None:
        """Register an opcode whose CDB byte 1 (bits 4-0) selects a service action."""
        sas = dict(self.commands[opcode].sas or {}) if opcode in self.commands else {}
        sas.update(table)
        handlers = {sa: (c.handler or _core_owned, len(c.usage)) for sa, c in sas.items()}

        def dispatch(cdb: bytes, data: Any, xfer: int) -> Any:
            h = handlers.get(cdb[1] & 0x1F)
            if h is None:
                raise invalid_field(1, 4)
            if len(cdb) < h[1]:
                raise invalid_field(0)
            return h[0](cdb, data, xfer)

        self.commands[opcode] = Command(name, dispatch, b"", sas)
        self._handlers[opcode] = (dispatch, 2)

    def add_mode_page(self, page: ModePage) -> None:
        self.mode_pages[(page.code, page.subpage)] = page

    def execute(self, cdb: bytes, data: Any, xfer: int) -> Result:
        """Run one CDB; SCSI errors become CHECK CONDITION with sense in the current D_SENSE format."""
        gate = self._gate
        if gate is not None:
            answer = gate(cdb)
            if answer is not None:
                return answer
        try:
            entry = self._handlers.get(cdb[0])
            if entry is None:
                raise invalid_opcode()
            handler, size = entry
            if len(cdb) < size:                      # (handler is never None: see add_commands)
                raise invalid_field(0)               # shorter than its opcode's CDB
            out = handler(cdb, data, xfer)
        except ScsiError as err:
            return Result(2, err.sense(self.d_sense), None)
        if out.__class__ is Result:
            return out
        return Result(0, None, out)

    def sense_of(self, err: ScsiError) -> bytes:
        return err.sense(self.d_sense)

    # -- commands -----------------------------------------------------------------------------------------------
    def test_unit_ready(self, cdb: bytes, data: Any, xfer: int) -> None:
        self.check_ready()

    def check_ready(self) -> None:
        """Raise NOT READY here when the medium is absent (removable devices)."""

    def request_sense(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        # Sense is autosense on this protocol, so nothing is ever pending: NO SENSE (SPC-4 6.39).
        return build_sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE, descriptor=bool(cdb[1] & 1))[:cdb[4]]

    def inquiry(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        alloc = (cdb[3] << 8) | cdb[4]
        if cdb[1] & 0xFE:
            raise invalid_field(1, 1)
        if not cdb[1] & 1:
            if cdb[2]:
                raise invalid_field(2)
            if self._std_inquiry is None:
                self._std_inquiry = self._standard_inquiry()
            return self._std_inquiry[:alloc]
        page = self.vpd.get(cdb[2])
        if page is None:
            raise invalid_field(2)
        return page()[:alloc]

    def _standard_inquiry(self) -> bytes:
        ident = self.ident
        head = struct.pack(">BBBBBBBB", self.device_type, 0x80 if self.removable else 0, 0x06, 0x12, 91,
                           0x08 if self.third_party_copy else 0, 0, 0x02)   # SPC-4, HiSup, RDF 2, 3PC, CmdQue
        names = _text(ident.vendor, 8) + _text(ident.product, 16) + _text(ident.revision, 4)
        versions = b"".join(struct.pack(">H", v) for v in self.version_descriptors[:8])
        body = head + names + bytes(22) + versions
        return body.ljust(96, b"\x00")

    def vpd_page(self, code: int, body: bytes) -> bytes:
        return struct.pack(">BBH", self.device_type, code, len(body)) + body

    def _vpd_supported(self) -> bytes:
        return self.vpd_page(0x00, bytes(sorted(self.vpd)))

    def _vpd_serial(self) -> bytes:
        return self.vpd_page(0x80, self.ident.serial.encode("ascii", "replace"))

    def _vpd_identification(self) -> bytes:
        ident = self.ident
        naa = struct.pack(">BBxB", 0x01, 0x03, len(ident.naa)) + ident.naa          # binary, LU, NAA
        t10 = _text(ident.vendor, 8) + ident.serial.encode("ascii", "replace")
        t10 = struct.pack(">BBxB", 0x02, 0x01, len(t10)) + t10                     # ASCII, LU, T10 vendor ID
        return self.vpd_page(0x83, naa + t10)

    def report_opcodes(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        rctd, options = cdb[2] & 0x80, cdb[2] & 0x07
        opcode, sa, alloc = cdb[3], (cdb[4] << 8) | cdb[5], int.from_bytes(cdb[6:10], "big")
        if options == 0:
            body = b"".join(_opcode_descriptor(op, sa, c, rctd) for op, sa, c in self._all_commands())
            return (struct.pack(">I", len(body)) + body)[:alloc]
        if options > 3:
            raise invalid_field(2, 2)
        command = self.commands.get(opcode)
        if command is not None and command.sas is not None:
            if options == 1:
                raise invalid_field(2, 2)
            command = command.sas.get(sa)
        elif options == 2 and command is not None:
            raise invalid_field(2, 2)
        elif options == 3 and sa:
            command = None
        if command is None:
            return bytes((0, 0x01, 0, 0))[:alloc]                        # not supported
        body = struct.pack(">xBH", (0x80 if rctd else 0) | 0x03, len(command.usage)) + command.usage
        return (body + (_timeouts(command) if rctd else b""))[:alloc]

    def _all_commands(self) -> list[tuple[int, int, Command]]:
        rows = []
        for op, c in sorted(self.commands.items()):
            if c.sas is None:
                rows.append((op, -1, c))
            else:
                rows.extend((op, sa, sc) for sa, sc in sorted(c.sas.items()))
        return rows

    # -- mode pages ---------------------------------------------------------------------------------------------
    def device_specific_parameter(self) -> int:
        return 0

    def block_descriptor(self, long: bool) -> bytes:
        """The mode parameter block descriptor, or b"" for device types without one."""
        return b""

    def check_block_descriptor(self, desc: bytes, offset: int) -> None:
        """Validate a block descriptor sent with MODE SELECT (``offset`` is its place in the list)."""

    def mode_sense6(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        body = self._mode_data(cdb)
        bd = b"" if cdb[1] & 0x08 else self.block_descriptor(False)
        head = bytes((min(255, 3 + len(bd) + len(body)), 0, self.device_specific_parameter(), len(bd)))
        return (head + bd + body)[:cdb[4]]

    def mode_sense10(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        body = self._mode_data(cdb)
        long = bool(cdb[1] & 0x10)
        bd = b"" if cdb[1] & 0x08 else self.block_descriptor(long)
        head = struct.pack(">HBBBxH", 6 + len(bd) + len(body), 0, self.device_specific_parameter(),
                           1 if long and len(bd) == 16 else 0, len(bd))
        return (head + bd + body)[:(cdb[7] << 8) | cdb[8]]

    def _mode_data(self, cdb: bytes) -> bytes:
        pc, code, sub = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if pc == 3:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED, field=(2, 7))
        pages = sorted(self.mode_pages.items())
        if code == 0x3F:
            if sub not in (0x00, 0xFF):
                raise invalid_field(3)
            chosen = [p for _, p in pages if sub == 0xFF or p.subpage == 0]
        elif sub == 0xFF:
            chosen = [p for (c, _), p in pages if c == code]
        else:
            page = self.mode_pages.get((code, sub))
            chosen = [page] if page else []
        if not chosen:
            raise invalid_field(3 if any(c == code for c, _ in self.mode_pages) else 2, 5)
        return b"".join(p.render(pc) for p in chosen)

    def mode_select6(self, cdb: bytes, data: Any, xfer: int) -> None:
        self._mode_select(cdb, cdb[4], data, 4)

    def mode_select10(self, cdb: bytes, data: Any, xfer: int) -> None:
        self._mode_select(cdb, (cdb[7] << 8) | cdb[8], data, 8)

    def _mode_select(self, cdb: bytes, length: int, data: Any, hlen: int) -> None:
        if cdb[1] & 0x01:
            raise invalid_field(1, 0)              # SP: no saved pages (SPC-4 6.11)
        if not length:
            return
        if length < hlen or len(data) < length:
            raise param_length_error()
        buf = bytes(data[:length])
        bdl = buf[3] if hlen == 4 else (buf[6] << 8) | buf[7]
        pos = hlen + bdl
        if pos > length:
            raise param_length_error()
        if bdl:
            self.check_block_descriptor(buf[hlen:pos], hlen)
        staged = []
        while pos < length:
            page, body, pos = self._parse_page(buf, pos, length)
            staged.append((page, body))
        changed = False
        for page, body in staged:
            if body != page.current:
                page.current = body
                changed = True
                if page.on_change:
                    page.on_change(body)
        if changed:
            tag = current_tag()                    # the nexus that made the change gets no unit attention
            self.emit("mode_changed", **({} if tag is None else {"tag": tag}))

    def _parse_page(self, buf: bytes, pos: int, end: int) -> tuple[ModePage, bytes, int]:
        """Check one page of a MODE SELECT list; returns (page, new current body, next position)."""
        if end - pos < 2:
            raise param_length_error()
        code, spf = buf[pos] & 0x3F, buf[pos] & 0x40
        if spf:
            if end - pos < 4:
                raise param_length_error()
            sub, size, start = buf[pos + 1], (buf[pos + 2] << 8) | buf[pos + 3], pos + 4
        else:
            sub, size, start = 0, buf[pos + 1], pos + 2
        page = self.mode_pages.get((code, sub))
        if page is None:
            raise invalid_param(pos, 5)
        if size != len(page.current):
            raise invalid_param(pos + (2 if spf else 1))
        if start + size > end:
            raise param_length_error()
        sent = buf[start:start + size]
        out = bytearray(size)
        for i, (new, cur, mask) in enumerate(zip(sent, page.current, page.changeable)):
            if (new ^ cur) & ~mask & 0xFF:
                raise invalid_param(start + i)
            out[i] = (cur & ~mask & 0xFF) | (new & mask)
        return page, bytes(out), start + size

    def _control_changed(self, body: bytes) -> None:
        self.d_sense = bool(body[0] & 0x04)


def _core_owned(cdb: bytes, data: Any, xfer: int) -> None:
    raise invalid_opcode()


def _opcode_descriptor(op: int, sa: int, c: Command, rctd: int) -> bytes:
    flags = (0x02 if rctd else 0) | (0x01 if sa >= 0 else 0)
    row = struct.pack(">BxHxBH", op, max(sa, 0), flags, len(c.usage))
    return row + _timeouts(c) if rctd else row


def _timeouts(c: Command) -> bytes:
    """Command timeouts descriptor (SPC-4 6.35.4): nominal and recommended, in seconds."""
    return struct.pack(">HxBII", 0x0A, 0, 0, c.timeout)


# Control mode page (SPC-4 7.5.8), bytes 2..11: GLTSD; QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering).
# D_SENSE is the one changeable bit.
_CONTROL_DEFAULT = bytes((0x02, 0x10, 0x00, 0x00, 0, 0, 0, 0, 0, 0))
_CONTROL_CHANGEABLE = bytes((0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0))
_CONTROL_CHANGEABLE_SWP = bytes((0x04, 0, 0x08, 0, 0, 0, 0, 0, 0, 0))     # + SWP (software write protect)
