"""SSC-3/SSC-4: a sequential-access (tape) device over a ``cartridge.Cartridge`` (docs/tape.md).

Strategy: the drive holds at most one cartridge (``path``), threaded (``loaded``) or not; every medium access goes
through ``_cart()``, which raises the NOT READY flavour that fits. Commands run one at a time (one worker thread):
a tape has one position, so there is nothing to overlap. Tape conditions that still transfer data (a filemark,
an incorrect-length block, end of data inside a READ) return a ``Result`` with CHECK CONDITION *and* data-in;
the others raise ``TapeError``, a ScsiError that also carries the FILEMARK/EOM/ILI bits and a signed
INFORMATION field. Buffered mode 1: a WRITE answers GOOD once its record is in the file; the record becomes
durable (header committed) at WRITE FILEMARKS with IMMED=0, at any motion away from end of data, and at unload.
After every command that changed the drive's state, ``position`` is emitted (before the command's ``done``) so
the core can restore a restarted emulator exactly (protocol §10).
"""
from __future__ import annotations

import struct
import sys
from typing import Any, Callable

from .cartridge import (DATA, DENSITY, FILEMARK, HOST_ATTRIBUTES, SETMARK, Cartridge, CartridgeError,
                        mam_attributes)
from .media import MediaControl
from .sense import (Asc, ScsiError, SenseKey, build_sense, invalid_field, invalid_param, param_length_error,
                    write_protected)
from .spc import VERSION_ISCSI, VERSION_SAM5, VERSION_SPC4, ModePage, Result, ScsiDevice, cmd

VERSION_SSC3 = 0x0400
VOLUME_OVERFLOW = 0x0D
FM, EOM, ILI = 0x80, 0x40, 0x20
FILEMARK_DETECTED, END_OF_MEDIUM, SETMARK_DETECTED, BEGINNING_OF_MEDIUM, END_OF_DATA = 1, 2, 3, 4, 5
NOT_READY_INIT_REQUIRED, INCOMPATIBLE_FORMAT, MEDIUM_REMOVAL_PREVENTED = 0x0402, 0x3002, 0x5302
AUX_MEMORY_FULL, WRITE_ERROR, READ_ERROR = 0x5506, 0x0C00, 0x1100
MAX_BLOCK = 8 * 1024 * 1024


class TapeError(ScsiError):
    """CHECK CONDITION with the stream bits (FILEMARK, EOM, ILI) and a possibly negative INFORMATION."""

    def __init__(self, key: int, asc: int, info: int | None = None, flags: int = 0,
                 field: tuple[int, int | None] | None = None) -> None:
        super().__init__(key, asc, info, field)
        self.flags = flags

    def sense(self, descriptor: bool = False) -> bytes:
        info = self.info
        if descriptor:
            s = bytearray(build_sense(self.sense_key, self.asc, info, self._sks(), True))
            if self.flags:
                s += bytes((0x04, 0x02, 0, self.flags))          # stream commands sense data descriptor
                s[7] += 4
            return bytes(s)
        s = bytearray(build_sense(self.sense_key, self.asc, None if info is None else info & 0xFFFFFFFF,
                                  self._sks()))
        s[2] |= self.flags
        return bytes(s)


def not_ready(asc: int = Asc.MEDIUM_NOT_PRESENT) -> ScsiError:
    return ScsiError(SenseKey.NOT_READY, asc)


def _signed(raw: bytes) -> int:
    return int.from_bytes(raw, "big", signed=True)


class SscDevice(MediaControl, ScsiDevice):
    """A tape drive (peripheral type 1). ``block_size`` 0 is variable-block mode."""

    device_type = 1
    removable = True
    default_workers = 1
    version_descriptors = (VERSION_SAM5, VERSION_SPC4, VERSION_SSC3, VERSION_ISCSI)

    def __init__(self, identity: dict[str, Any], emit: Callable[..., None] | None = None, *, block_size: int = 0,
                 fallback_serial: str = "0", product: str = "VIRTUAL-TAPE") -> None:
        super().__init__(identity, emit, fallback_serial, product)
        if not 0 <= block_size <= MAX_BLOCK:
            raise ValueError(f"block_size must be 0 (variable) to {MAX_BLOCK}")
        self.block_size = block_size
        self.path: str | None = None           # the cartridge in the drive, if any
        self.cart: Cartridge | None = None     # open when the image is usable
        self.bad = ""                          # why the cartridge in the drive cannot be used
        self.loaded = False                    # threaded: ready for I/O
        self.hold = False
        self.prevent = False
        self.swp = False                       # software write protect (device configuration page)
        self.tapealert = 0
        self.io = {"written": 0, "read": 0}    # bytes since load
        self._staged_bd: int | None = None
        self._reported: tuple[Any, ...] | None = None
        self.add_commands({
            0x01: cmd("REWIND", self.rewind, 0x01, 0x01, 0, 0, 0, 0x07),
            0x05: cmd("READ BLOCK LIMITS", self.read_block_limits, 0x05, 0x01, 0, 0, 0, 0x07),
            0x08: cmd("READ(6)", self.read, 0x08, 0x03, 0xFF, 0xFF, 0xFF, 0x07, timeout=600),
            0x0A: cmd("WRITE(6)", self.write, 0x0A, 0x01, 0xFF, 0xFF, 0xFF, 0x07, timeout=600),
            0x10: cmd("WRITE FILEMARKS(6)", self.write_filemarks, 0x10, 0x03, 0xFF, 0xFF, 0xFF, 0x07),
            0x11: cmd("SPACE(6)", self.space, 0x11, 0x0F, 0xFF, 0xFF, 0xFF, 0x07, timeout=3600),
            0x19: cmd("ERASE(6)", self.erase, 0x19, 0x03, 0, 0, 0, 0x07),
            0x1B: cmd("LOAD UNLOAD", self.load_unload, 0x1B, 0x01, 0, 0, 0x0F, 0x07, timeout=300),
            0x1E: cmd("PREVENT ALLOW MEDIUM REMOVAL", self.prevent_allow, 0x1E, 0, 0, 0, 0x03, 0x07),
            0x2B: cmd("LOCATE(10)", self.locate, 0x2B, 0x07, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0x07,
                      timeout=3600),
            0x34: cmd("READ POSITION", self.read_position, 0x34, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07),
            0x44: cmd("REPORT DENSITY SUPPORT", self.report_density, 0x44, 0x03, 0, 0, 0, 0, 0, 0xFF, 0xFF,
                      0x07),
            0x4D: cmd("LOG SENSE", self.log_sense, 0x4D, 0x03, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07),
            0x80: cmd("WRITE FILEMARKS(16)", self.write_filemarks, 0x80, 0x01, 0, 0xFF, *(0xFF,) * 8, 0xFF,
                      0xFF, 0xFF, 0, 0x07),
            0x8C: cmd("READ ATTRIBUTE", self.read_attribute, 0x8C, 0x1F, 0, 0, 0, 0xFF, 0, 0xFF, 0xFF, 0xFF,
                      0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x07),
            0x8D: cmd("WRITE ATTRIBUTE", self.write_attribute, 0x8D, 0x01, 0, 0, 0, 0xFF, 0, 0xFF, 0, 0,
                      0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
            0x91: cmd("SPACE(16)", self.space, 0x91, 0x0F, 0, 0xFF, *(0xFF,) * 8, 0xFF, 0xFF, 0, 0x07,
                      timeout=3600),
            0x92: cmd("LOCATE(16)", self.locate, 0x92, 0x3B, 0x01, 0xFF, *(0xFF,) * 8, 0, 0, 0, 0x07,
                      timeout=3600),
        })
        # Data compression (SSC-3 8.3.2): DCE changeable, DCC set; nothing is really compressed.
        self.add_mode_page(ModePage(0x0F, 0, bytes((0xC0, 0x80, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0)),
                                    bytes((0x80,) + (0,) * 13)))
        # Device configuration (SSC-3 8.3.3): LOIS; EEG and SEW; SWP changeable; compression algorithm 1.
        self.add_mode_page(ModePage(0x10, 0, bytes((0, 0, 0, 0, 0, 0, 0x40, 0, 0x18, 0, 0, 0, 1, 0)),
                                    bytes((0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0xFF, 0)), self._config_changed))

    # -- protocol glue --------------------------------------------------------------------------------------------
    def ready_info(self) -> dict[str, Any]:
        state = self.state()
        self._reported = tuple(state.values())                   # ``ready.medium`` is the first report
        return {"identity": self.ident.as_map(), "features": ["removable"], "medium": state}

    def state(self) -> dict[str, Any]:
        """What the core keeps to restore a restarted emulator (protocol §10)."""
        return {"path": self.path, "object": self.cart.pos if self.cart else 0, "loaded": self.loaded,
                "block_size": self.block_size}

    def execute(self, cdb: bytes, data: Any, xfer: int) -> Result:
        result = super().execute(cdb, data, xfer)
        self.report()
        return result

    def close(self) -> None:
        self.eject()

    # -- the medium -----------------------------------------------------------------------------------------------
    def insert(self, path: str, *, load: bool = True, count_load: bool = True) -> None:
        """Put a cartridge in the (empty) drive and thread it; an unusable image stays in the drive, NOT READY."""
        self.path, self.bad, self.loaded, self.hold = path, "", load, False
        self.io = {"written": 0, "read": 0}
        try:
            self.cart = Cartridge(path)
        except (CartridgeError, OSError) as exc:
            self.cart, self.bad = None, str(exc)
            print(f"vtape: cartridge {path} unusable: {exc}", file=sys.stderr)
            return
        if count_load:
            self.cart.update_meta(loads=self.cart.meta["loads"] + 1)

    def eject(self) -> str | None:
        """Take the cartridge out (flushing it); returns its path."""
        path, cart = self.path, self.cart
        self.path, self.cart, self.loaded, self.bad, self.hold = None, None, False, "", False
        if cart is not None:
            try:
                m = cart.meta
                cart.update_meta(written=m["written"] + self.io["written"], read=m["read"] + self.io["read"])
            except OSError as exc:
                print(f"vtape: cannot update MAM of {path}: {exc}", file=sys.stderr)
            cart.close()
        return path

    def check_ready(self) -> None:
        self._cart()

    def _cart(self) -> Cartridge:
        if self.path is None:
            raise not_ready()
        if self.cart is None:
            raise not_ready(INCOMPATIBLE_FORMAT)
        if not self.loaded:
            raise not_ready(NOT_READY_INIT_REQUIRED if self.hold else Asc.MEDIUM_NOT_PRESENT)
        return self.cart

    def _writable(self) -> Cartridge:
        cart = self._cart()
        if cart.write_protected or self.swp:
            self.tapealert |= 1 << (64 - 9)                  # flag 9: write protect
            raise write_protected()
        return cart

    def _flush(self, cart: Cartridge) -> None:
        try:
            cart.flush()
        except OSError as exc:
            print(f"vtape: flush failed: {exc}", file=sys.stderr)
            raise ScsiError(SenseKey.MEDIUM_ERROR, WRITE_ERROR) from None

    def _check(self, err: TapeError, data: Any = None) -> Result:
        return Result(2, err.sense(self.d_sense), data)

    def _eod_error(self, cart: Cartridge, info: int | None) -> TapeError:
        return TapeError(SenseKey.BLANK_CHECK, END_OF_DATA, info, EOM if cart.in_early_warning(cart.pos_off) else 0)

    def _read_objects(self, cart: Cartridge, count: int) -> list[tuple[int, Any]]:
        try:
            return cart.read(count)
        except (CartridgeError, OSError) as exc:
            print(f"vtape: {exc}", file=sys.stderr)
            raise ScsiError(SenseKey.MEDIUM_ERROR, READ_ERROR) from None

    # -- READ / WRITE ---------------------------------------------------------------------------------------------
    def read(self, cdb: bytes, data: Any, xfer: int) -> Any:
        fixed, sili = cdb[1] & 1, cdb[1] & 2
        if fixed and sili:
            raise invalid_field(1, 1)
        n = int.from_bytes(cdb[2:5], "big")
        if fixed and not self.block_size:
            raise invalid_field(1, 0)
        cart = self._cart()
        if not n:
            return None
        if not fixed:
            return self._read_variable(cart, n, sili)
        bs, start = self.block_size, cart.pos
        if n * bs > MAX_BLOCK:
            raise invalid_field(2)
        objs = self._read_objects(cart, n)
        good: list[Any] = []
        for i, (kind, payload) in enumerate(objs):
            if kind != DATA:
                err = TapeError(SenseKey.NO_SENSE, FILEMARK_DETECTED if kind == FILEMARK else SETMARK_DETECTED,
                                n - i, FM)
                return self._check(err, self._count(b"".join(good)))
            if len(payload) != bs:                     # incorrect length: stop after it
                cart.seek(start + i + 1)
                return self._check(TapeError(SenseKey.NO_SENSE, 0, n - i, ILI), self._count(b"".join(good)))
            good.append(payload)
        out = self._count(b"".join(good))
        if len(objs) < n:
            return self._check(self._eod_error(cart, n - len(objs)), out)
        return out

    def _read_variable(self, cart: Cartridge, n: int, sili: int) -> Any:
        if n > MAX_BLOCK:
            raise invalid_field(2)
        objs = self._read_objects(cart, 1)
        if not objs:
            raise self._eod_error(cart, n)
        kind, payload = objs[0]
        if kind != DATA:
            raise TapeError(SenseKey.NO_SENSE, FILEMARK_DETECTED if kind == FILEMARK else SETMARK_DETECTED, n, FM)
        size = len(payload)
        if size == n or (sili and (size < n or not self.block_size)):
            return self._count(payload[:n])
        return self._check(TapeError(SenseKey.NO_SENSE, 0, n - size, ILI), self._count(payload[:n]))

    def _count(self, data: Any) -> Any:
        self.io["read"] += len(data)
        return data

    def write(self, cdb: bytes, data: Any, xfer: int) -> None:
        fixed, n = cdb[1] & 1, int.from_bytes(cdb[2:5], "big")
        if fixed and not self.block_size:
            raise invalid_field(1, 0)
        if (n * self.block_size if fixed else n) > MAX_BLOCK:
            raise invalid_field(2)
        cart = self._writable()
        if not n:
            return
        view = memoryview(data)
        if fixed:
            bs = self.block_size
            records = [view[i * bs:(i + 1) * bs] for i in range(min(n, len(view) // bs))]
        else:
            records = [view[:n]]
        self._append(cart, DATA, records, n, not fixed)

    def _append(self, cart: Cartridge, kind: int, records: list[Any], n: int, variable: bool = False) -> None:
        """Append, then report end of medium (not everything fit: INFORMATION = what was not written, in bytes
        for a variable block, else in blocks or marks) or early warning (all written: EOM, INFORMATION 0)."""
        try:
            done = cart.append(kind, records)
        except OSError as exc:
            print(f"vtape: write failed: {exc}", file=sys.stderr)
            raise ScsiError(SenseKey.MEDIUM_ERROR, WRITE_ERROR) from None
        if kind == DATA:
            self.io["written"] += sum(len(r) for r in records[:done])
        if done < len(records):
            raise TapeError(VOLUME_OVERFLOW, END_OF_MEDIUM, n if variable else n - done, EOM)
        if cart.in_early_warning():
            raise TapeError(SenseKey.NO_SENSE, END_OF_MEDIUM, 0, EOM)

    def write_filemarks(self, cdb: bytes, data: Any, xfer: int) -> None:
        if cdb[0] == 0x10:
            immed, setmark, n = cdb[1] & 1, cdb[1] & 2, int.from_bytes(cdb[2:5], "big")
        else:
            immed, setmark, n = cdb[1] & 1, 0, int.from_bytes(cdb[12:15], "big")
            cart = self._cart()
            if cdb[3] or int.from_bytes(cdb[4:12], "big") != cart.pos:
                raise invalid_field(4)                       # explicit address: must be the current position
        cart = self._writable() if n else self._cart()
        if n:
            self._append(cart, SETMARK if setmark else FILEMARK, [b""] * n, n)
        if not immed:
            self._flush(cart)

    # -- positioning ----------------------------------------------------------------------------------------------
    def rewind(self, cdb: bytes, data: Any, xfer: int) -> None:
        cart = self._cart()
        self._flush(cart)
        cart.seek(0)

    def space(self, cdb: bytes, data: Any, xfer: int) -> None:
        code = cdb[1] & 0x0F
        if cdb[0] == 0x11:
            count = _signed(cdb[2:5])
        else:
            count = _signed(cdb[4:12])
            if cdb[12] or cdb[13]:
                raise invalid_field(12)
        if code not in (0, 1, 3, 4):
            raise invalid_field(1, 3)
        cart = self._cart()
        self._flush(cart)
        if code == 3:
            cart.seek(cart.eod)
        elif count and code == 0:
            self._space_blocks(cart, count)
        elif count:
            self._space_marks(cart, FILEMARK if code == 1 else SETMARK, count)

    def _space_blocks(self, cart: Cartridge, count: int) -> None:
        pos = cart.pos
        if count > 0:
            mark = cart.next_mark(pos, min(pos + count, cart.eod))
            if mark is not None:
                cart.seek(mark + 1)
                raise self._mark_error(cart, mark, count - (mark - pos))
            if pos + count > cart.eod:
                cart.seek(cart.eod)
                raise self._eod_error(cart, count - (cart.eod - pos))
            cart.seek(pos + count)
            return
        c = -count
        mark = cart.prev_mark(pos, max(pos - c, 0))
        if mark is not None:
            cart.seek(mark)                                   # the beginning-of-partition side of the mark
            raise self._mark_error(cart, mark, c - (pos - mark - 1))
        if pos - c < 0:
            cart.seek(0)
            raise TapeError(SenseKey.NO_SENSE, BEGINNING_OF_MEDIUM, c - pos, EOM)
        cart.seek(pos - c)

    def _mark_error(self, cart: Cartridge, mark: int, residual: int) -> TapeError:
        asc = FILEMARK_DETECTED if cart.kind_of(mark) == FILEMARK else SETMARK_DETECTED
        return TapeError(SenseKey.NO_SENSE, asc, residual, FM)

    def _space_marks(self, cart: Cartridge, kind: int, count: int) -> None:
        before = cart.marks_before(cart.pos, kind)
        if count > 0:
            if before + count <= cart.count[kind]:
                cart.seek(cart.nth_mark(before + count - 1, kind) + 1)
                return
            cart.seek(cart.eod)
            raise self._eod_error(cart, count - (cart.count[kind] - before))
        if before + count >= 0:
            cart.seek(cart.nth_mark(before + count, kind))   # stop before the mark
            return
        cart.seek(0)
        raise TapeError(SenseKey.NO_SENSE, BEGINNING_OF_MEDIUM, -count - before, EOM)

    def locate(self, cdb: bytes, data: Any, xfer: int) -> None:
        if cdb[0] == 0x2B:
            cp, dest_type, target, partition = cdb[1] & 2, 0, int.from_bytes(cdb[3:7], "big"), cdb[8]
        else:
            cp, dest_type, target, partition = cdb[1] & 2, (cdb[1] >> 3) & 7, int.from_bytes(cdb[4:12], "big"), cdb[3]
            if dest_type not in (0, 1, 3):
                raise invalid_field(1, 5)
        if cp and partition:
            raise invalid_field(8 if cdb[0] == 0x2B else 3)
        cart = self._cart()
        self._flush(cart)
        if dest_type == 3:
            target = cart.eod
        elif dest_type == 1:                                   # logical file identifier
            if target > cart.count[FILEMARK]:
                target = cart.eod + 1
            elif target:
                target = cart.nth_mark(target - 1) + 1
        if target > cart.eod:
            cart.seek(cart.eod)
            raise self._eod_error(cart, None)
        cart.seek(target)

    def read_position(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        sa = cdb[1] & 0x1F
        if sa not in (0, 1, 6, 8):
            raise invalid_field(1, 4)
        cart = self._cart()
        pos = cart.pos
        flags = (0x80 if pos == 0 else 0) | (0x40 if cart.in_early_warning(cart.pos_off) else 0)
        if sa == 6:
            return struct.pack(">B3xIQQ8x", flags, 0, pos, cart.marks_before(pos))
        if sa == 8:
            out = struct.pack(">BBHx3xQQQ", flags, 0, 0x1C, pos, pos, 0)
            return out[:(cdb[7] << 8) | cdb[8]]
        if pos > 0xFFFFFFFF:
            return struct.pack(">BB18x", flags | 0x04, 0)   # LOLU: the position does not fit 32 bits
        return struct.pack(">BBxxIIxBHI", flags, 0, pos, pos, 0, 0, 0)

    def erase(self, cdb: bytes, data: Any, xfer: int) -> None:
        cart = self._writable()
        cart.truncate()
        self._flush(cart)

    # -- load, removal, limits ------------------------------------------------------------------------------------
    def load_unload(self, cdb: bytes, data: Any, xfer: int) -> None:
        load, eot, hold = cdb[4] & 1, cdb[4] & 4, cdb[4] & 8
        if load and eot:
            raise invalid_field(4, 2)
        if self.path is None:
            raise not_ready()
        if load:
            if self.cart is None:
                raise not_ready(INCOMPATIBLE_FORMAT)
            self._flush(self.cart)
            self.cart.seek(0)
            if not self.loaded:
                self.loaded, self.hold = True, False
                self.emit("medium_changed")
            return
        if self.prevent:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, MEDIUM_REMOVAL_PREVENTED)
        if self.cart is not None:
            self._flush(self.cart)
            self.cart.seek(0)
        self.loaded, self.hold = False, bool(hold)

    def prevent_allow(self, cdb: bytes, data: Any, xfer: int) -> None:
        self.prevent = bool(cdb[4] & 3)

    def read_block_limits(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        if cdb[1] & 1:                                         # MLOI: maximum logical object identifier
            return bytes(12) + struct.pack(">Q", (1 << 62) - 1)
        return struct.pack(">BHBH", 0, MAX_BLOCK >> 8, MAX_BLOCK & 0xFF, 1)

    def report_density(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        if cdb[1] & 2:
            raise invalid_field(1, 1)                          # medium type descriptors: not supported
        capacity = 0
        if cdb[1] & 1:
            capacity = self._cart().meta["capacity"]
        elif self.cart is not None:
            capacity = self.cart.meta["capacity"]
        desc = struct.pack(">BBBxxBHHHI8s8s20s", DENSITY, DENSITY, 0xA0, 0, 0, 127, 1,
                           min(capacity // 1000000, 0xFFFFFFFF), b"TRIOSCSI", b"TRIOV1  ",
                           b"trioscsi virtual tape")
        return (struct.pack(">HH", len(desc) + 2, 0) + desc)[:(cdb[7] << 8) | cdb[8]]

    # -- mode pages -----------------------------------------------------------------------------------------------
    def _mode_data(self, cdb: bytes) -> bytes:
        if cdb[2] & 0x3F == 0 and cdb[3] == 0:
            return b""                                          # page 0: header and block descriptor only
        return super()._mode_data(cdb)

    def device_specific_parameter(self) -> int:
        wp = self.cart is not None and self.loaded and (self.cart.write_protected or self.swp)
        return (0x80 if wp else 0) | 0x10                       # WP, buffered mode 1

    def block_descriptor(self, long: bool) -> bytes:
        density = self.cart.meta["density"] if self.cart is not None and self.loaded else 0
        return struct.pack(">B3xxBH", density, self.block_size >> 16, self.block_size & 0xFFFF)

    def check_block_descriptor(self, desc: bytes, offset: int) -> None:
        if len(desc) != 8:
            raise invalid_param(offset - 1)
        if desc[0] not in (0, 0x7F, DENSITY):
            raise invalid_param(offset)
        size = int.from_bytes(desc[5:8], "big")
        if size > MAX_BLOCK:
            raise invalid_param(offset + 5)
        self._staged_bd = size

    def mode_select6(self, cdb: bytes, data: Any, xfer: int) -> None:
        self._select(super().mode_select6, cdb, data, xfer)

    def mode_select10(self, cdb: bytes, data: Any, xfer: int) -> None:
        self._select(super().mode_select10, cdb, data, xfer)

    def _select(self, base: Callable[..., None], cdb: bytes, data: Any, xfer: int) -> None:
        self._staged_bd = None
        base(cdb, data, xfer)                       # validates everything first; raises before any change
        if self._staged_bd is not None and self._staged_bd != self.block_size:
            self.block_size = self._staged_bd
            self.emit("mode_changed")

    def _config_changed(self, body: bytes) -> None:
        self.swp = bool(body[8] & 0x04)

    # -- LOG SENSE ------------------------------------------------------------------------------------------------
    def log_sense(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        if cdb[1] & 1:
            raise invalid_field(1, 0)                          # SP: nothing is saved
        code, sub, pointer = cdb[2] & 0x3F, cdb[3], (cdb[5] << 8) | cdb[6]
        pages = {0x00: self._log_supported, 0x02: self._log_counters, 0x03: self._log_counters,
                 0x2E: self._log_tapealert, 0x31: self._log_capacity}
        if sub or code not in pages:
            raise invalid_field(3 if sub else 2, 5)
        params = [(c, ctl, v) for c, ctl, v in pages[code](code) if c >= pointer or code == 0]
        body = b"".join(struct.pack(">HBB", c, ctl, len(v)) + v for c, ctl, v in params) if code else \
            bytes(sorted(pages))
        return (struct.pack(">BBH", code, 0, len(body)) + body)[:(cdb[7] << 8) | cdb[8]]

    def _log_supported(self, code: int) -> list[tuple[int, int, bytes]]:
        return []

    def _log_counters(self, code: int) -> list[tuple[int, int, bytes]]:
        done = self.io["written" if code == 0x02 else "read"]
        return [(c, 0x00, struct.pack(">Q", done if c == 5 else 0)) for c in range(7)]

    def _log_tapealert(self, code: int) -> list[tuple[int, int, bytes]]:
        flags, self.tapealert = self.tapealert, 0              # the flags are cleared once read
        return [(i, 0x03, bytes((flags >> (64 - i) & 1,))) for i in range(1, 65)]

    def _log_capacity(self, code: int) -> list[tuple[int, int, bytes]]:
        cart = self.cart
        left = max(0, cart.limit - cart.end) // 1000000 if cart else 0
        total = cart.meta["capacity"] // 1000000 if cart else 0
        return [(1, 0x00, struct.pack(">I", min(left, 0xFFFFFFFF))), (2, 0x00, bytes(4)),
                (3, 0x00, struct.pack(">I", min(total, 0xFFFFFFFF))), (4, 0x00, bytes(4))]

    # -- MAM ------------------------------------------------------------------------------------------------------
    def read_attribute(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        sa, volume, partition = cdb[1] & 0x1F, cdb[5], cdb[7]
        first, alloc = (cdb[8] << 8) | cdb[9], int.from_bytes(cdb[10:14], "big")
        if sa not in (0, 1, 2, 3, 5):
            raise invalid_field(1, 4)
        if volume:
            raise invalid_field(5)
        if partition:
            raise invalid_field(7)
        if sa in (2, 3):                                       # logical volume / partition list
            return bytes((0, 2, 0, 1))[:alloc]
        cart = self._cart()
        attrs = [a for a in mam_attributes(cart) if a[0] >= first]
        if sa == 0:
            body = b"".join(struct.pack(">HBH", i, (0x80 if ro else 0) | fmt, len(v)) + v for i, ro, fmt, v in attrs)
        else:
            ids = [a[0] for a in attrs] if sa == 1 else sorted({a[0] for a in attrs} | set(HOST_ATTRIBUTES))
            body = b"".join(struct.pack(">H", i) for i in ids if i >= first)
        return (struct.pack(">I", len(body)) + body)[:alloc]

    def write_attribute(self, cdb: bytes, data: Any, xfer: int) -> None:
        if cdb[5]:
            raise invalid_field(5)
        if cdb[7]:
            raise invalid_field(7)
        length = int.from_bytes(cdb[10:14], "big")
        cart = self._cart()
        if not length:
            return
        if length < 4 or len(data) < length:
            raise param_length_error()
        buf = bytes(data[:length])
        end = min(length, 4 + int.from_bytes(buf[:4], "big"))
        attrs = dict(cart.meta["attributes"])
        pos = 4
        while pos + 5 <= end:
            ident, fmt, size = struct.unpack_from(">HBH", buf, pos)
            spec = HOST_ATTRIBUTES.get(ident)
            if spec is None or (fmt & 3) != spec[0] or size > spec[1] or pos + 5 + size > end:
                raise invalid_param(pos)
            if size:
                attrs[ident] = buf[pos + 5:pos + 5 + size]
            else:
                attrs.pop(ident, None)                         # a zero length deletes the attribute
            pos += 5 + size
        try:
            cart.update_meta(attributes=attrs)
        except CartridgeError:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, AUX_MEMORY_FULL) from None
