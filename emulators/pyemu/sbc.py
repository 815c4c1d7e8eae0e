"""SBC-3/4: the block command set of a disk, over a pluggable backing store (``stores.FileStore``/``NullStore``).

Strategy: table-driven. READ/WRITE/VERIFY/WRITE AND VERIFY (6/10/12/16) are decoded by one small decoder per
CDB layout into ``RwRequest(lba, blocks, fua)``, so the handlers have no opcode switches. Ranges are checked
without overflow: ``blocks > capacity or lba > capacity - blocks``. A write with less data-out than its CDB
asks for writes the whole blocks it got (what libiscsi's residual tests expect); the rest is the core's residual.
COMPARE AND WRITE, ORWRITE and WRITE ATOMIC run under one per-LU lock, so they are atomic with each other (an
ordinary READ or WRITE takes no lock and may see or overlap a write in progress, as it could on any disk).
Commands that must see exactly their transfer (COMPARE AND WRITE, WRITE SAME, WRITE ATOMIC) refuse a data-out
buffer of the wrong size with ILLEGAL REQUEST.

The state that can make a command unanswerable (no medium after an eject, a sanitize in progress or failed) is
checked by one gate in ``execute`` that is None, and costs nothing, while the LU is in its normal state.
EXTENDED COPY lives in ``xcopy``, SANITIZE in ``sanitize``, logical block provisioning (GET LBA STATUS, WRITE
SAME, UNMAP) in ``provisioning``.
"""
from __future__ import annotations

import struct
import threading
from typing import Any, Callable, NamedTuple

from . import sanitize as sz
from .runner import ABORTED, current_nexus, current_tag
from .sense import (Asc, ScsiError, SenseKey, invalid_field, invalid_param, lba_out_of_range, miscompare,
                    param_length_error, write_protected)
from .spc import VERSION_ISCSI, VERSION_SAM5, VERSION_SPC4, ModePage, Result, ScsiDevice, cmd
from .provisioning import Provisioning
from .xcopy import Aborted, CopyManager, CopyTarget

ASC_MEDIUM_REMOVAL_PREVENTED = 0x5302
# Commands a removable LU answers without a medium, and a LU in sanitize failure mode answers normally.
_NO_MEDIUM_OK = frozenset((0x03, 0x12, 0x15, 0x1A, 0x1B, 0x1E, 0x55, 0x5A, 0x84, 0xA0, 0xA3))
_FAILED_MODE_OK = _NO_MEDIUM_OK | {0x48}
_SANITIZING_OK = frozenset((0x03, 0x12, 0xA0))              # INQUIRY, REQUEST SENSE, REPORT LUNS (SBC-4 4.11)

VERSION_SBC3 = 0x04C0
_S10 = struct.Struct(">xBIxH").unpack_from      # flags, lba, blocks
_S12 = struct.Struct(">xBII").unpack_from
_S16 = struct.Struct(">xBQI").unpack_from
_LEN_BYTE = {0: 4, 1: 7, 2: 7, 4: 10, 5: 6}    # CDB group -> byte of TRANSFER LENGTH (for field pointers)


class RwRequest(NamedTuple):
    lba: int
    blocks: int
    fua: int


def _rw6(cdb: bytes) -> RwRequest:
    return RwRequest(((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256, 0)   # 0 means 256


def _rw10(cdb: bytes) -> RwRequest:
    flags, lba, blocks = _S10(cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)                # RDPROTECT/WRPROTECT/VRPROTECT: no protection information
    return RwRequest(lba, blocks, flags & 0x08)


def _rw12(cdb: bytes) -> RwRequest:
    flags, lba, blocks = _S12(cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    return RwRequest(lba, blocks, flags & 0x08)


def _rw16(cdb: bytes) -> RwRequest:
    flags, lba, blocks = _S16(cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    return RwRequest(lba, blocks, flags & 0x08)


DECODE: dict[int, Callable[[bytes], RwRequest]] = {
    0x08: _rw6, 0x0A: _rw6,                                      # READ(6), WRITE(6)
    0x28: _rw10, 0x2A: _rw10, 0x2E: _rw10, 0x2F: _rw10,          # READ, WRITE, WRITE AND VERIFY, VERIFY (10)
    0xA8: _rw12, 0xAA: _rw12, 0xAE: _rw12, 0xAF: _rw12,          # ... (12)
    0x88: _rw16, 0x8A: _rw16, 0x8E: _rw16, 0x8F: _rw16,          # ... (16)
    0x8B: _rw16,                                                 # ORWRITE(16)
}
_RW10, _RW12, _RW16 = (0xFF, 0xFF, 0xFF, 0xFF), (0xFF,) * 8, (0xFF,) * 12


def _first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where equal-length ``a`` and ``b`` differ (they do)."""
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return len(a) - 1 - (x.bit_length() - 1) // 8


class SbcDevice(Provisioning, ScsiDevice):
    """A direct-access block device (peripheral type 0) over ``store``.

    Args:
        store: the backing store (see ``stores``): ``size``, ``thin``, ``read``/``pread``/``write``/``punch``/
            ``extent``/``flush``/``close``.
        block_size: logical block size in bytes (a power of two).
        read_only: writes fail with DATA PROTECT, WRITE PROTECTED; MODE SENSE sets WP.
        write_back: the caching page's WCE; when clear every write is made durable before GOOD.
        physical_block: the physical block size reported by READ CAPACITY(16) (LOGICAL BLOCKS PER PHYSICAL
            BLOCK EXPONENT). The store's own allocation unit (``store.fs_block``: a hole can only be punched in
            whole file-system blocks) is reported apart, as the optimal transfer and unmap granularities.
        rotation_rate: Block Device Characteristics MEDIUM ROTATION RATE (1 = solid state).
        removable: RMB is set; START STOP UNIT with LOEJ ejects and loads the medium (the same image), PREVENT
            ALLOW MEDIUM REMOVAL blocks that, and medium access without a medium is NOT READY, MEDIUM NOT PRESENT.
            Prevention is per I_T nexus (``cmd.nexus``; all commands without one count as one nexus) and ends with
            the nexus (``nexus_lost``) or a reset (``reset``).
        copy_peers: ``{naa bytes: CopyTarget factory}``: other LUs EXTENDED COPY may read and write.
        sanitize_marker, sanitize_rate: see ``sanitize.Sanitizer``.
        software_write_protect: the control mode page's SWP bit is changeable; set, it write-protects the LU for
            every initiator (DATA PROTECT, WRITE PROTECTED) and MODE SENSE reports WP.
    """

    version_descriptors = (VERSION_SAM5, VERSION_SPC4, VERSION_SBC3, VERSION_ISCSI)
    third_party_copy = True
    max_transfer_bytes = 8 * 1024 * 1024         # well under the protocol's 16 MiB frame
    max_unmap_descriptors = 256
    max_compare_blocks = 255

    def __init__(self, store: Any, identity: dict[str, Any], emit: Callable[..., None] | None = None, *,
                 block_size: int = 512, read_only: bool = False, write_back: bool = True,
                 physical_block: int = 512, rotation_rate: int = 1, fallback_serial: str = "0",
                 product: str = "VIRTUAL-DISK", removable: bool = False,
                 copy_peers: dict[bytes, Callable[[], CopyTarget | None]] | None = None,
                 sanitize_marker: str | None = None, sanitize_rate: int = 0,
                 software_write_protect: bool = False) -> None:
        self.software_write_protect = software_write_protect
        super().__init__(identity, emit, fallback_serial, product)
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 512, not {block_size}")
        self.store = store
        self.block_size = block_size
        self.shift = block_size.bit_length() - 1
        self.blocks = store.size >> self.shift
        self._read_only = read_only                  # configured; ``read_only`` adds the control page's SWP
        self.read_only = read_only
        self.swp = False
        self.write_back = write_back
        self.thin = bool(store.thin)                 # a read-only LU stays thin: UNMAP is refused, not unknown
        self.phys_exp = max(0, (max(physical_block, block_size) // block_size).bit_length() - 1)
        self.granularity = max(1, getattr(store, "fs_block", block_size) // block_size)
        self.rotation_rate = rotation_rate
        self.max_xfer = self.max_transfer_bytes >> self.shift
        # MAXIMUM WRITE SAME LENGTH: one command's work stays bounded (a WRITE SAME cannot be aborted midway).
        self.max_ws = self.max_xfer
        self.max_unmap_lbas = 0xFFFFFFFF             # no limit: a hole is punched in one system call
        self.max_atomic = self.max_xfer
        self._rmw_lock = threading.Lock()
        self._quick_ops = frozenset((0x08, 0x28, 0x88, 0x0A, 0x2A, 0x8A, 0x00))
        self.removable = removable
        self.loaded = True
        self._preventing: set[Any] = set()          # the I_T nexuses that prevent medium removal
        self._cancel: dict[int, threading.Event] = {}
        self._closing = threading.Event()
        self._peers = dict(copy_peers or {})
        self.copier = CopyManager(self._resolve_copy_target, block_size)
        self.sanitizer = sz.Sanitizer(store, block_size, sanitize_marker, sanitize_rate, self._update_gate)
        self._sanitize_actions = frozenset((sz.OVERWRITE, sz.CRYPTO_ERASE, sz.EXIT_FAILURE_MODE)
                                           + ((sz.BLOCK_ERASE,) if self.thin else ()))
        self._setup_tables()
        if not read_only:
            self.sanitizer.resume()

    # -- tables -------------------------------------------------------------------------------------------------
    def _setup_tables(self) -> None:
        rd, wr = 0x18, 0x18                                   # DPO, FUA (reported: DPOFUA is set)
        table = {
            0x08: cmd("READ(6)", self.read, 0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07),
            0x0A: cmd("WRITE(6)", self.write, 0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07),
            0x1B: cmd("START STOP UNIT", self.start_stop, 0x1B, 0x01, 0, 0x0F, 0xF7, 0x07),
            0x1E: cmd("PREVENT ALLOW MEDIUM REMOVAL", self.prevent_allow, 0x1E, 0, 0, 0, 0x03, 0x07),
            0x25: cmd("READ CAPACITY(10)", self.read_capacity10, 0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01,
                      0x07),
            0x28: cmd("READ(10)", self.read, 0x28, rd, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x2A: cmd("WRITE(10)", self.write, 0x2A, wr, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x2E: cmd("WRITE AND VERIFY(10)", self.write_verify, 0x2E, 0x12, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x2F: cmd("VERIFY(10)", self.verify, 0x2F, 0x16, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x34: cmd("PRE-FETCH(10)", self.prefetch, 0x34, 0x02, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x35: cmd("SYNCHRONIZE CACHE(10)", self.sync_cache, 0x35, 0x02, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x37: cmd("READ DEFECT DATA(10)", self.read_defect_data, 0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0x07),
            0x41: cmd("WRITE SAME(10)", self.write_same, 0x41, 0x08 if self.thin else 0, *_RW10, 0x1F, 0xFF,
                      0xFF, 0x07),
            0x88: cmd("READ(16)", self.read, 0x88, rd, *_RW16, 0x1F, 0x07),
            0x8A: cmd("WRITE(16)", self.write, 0x8A, wr, *_RW16, 0x1F, 0x07),
            0x89: cmd("COMPARE AND WRITE", self.compare_and_write, 0x89, 0x18, *(0xFF,) * 8, 0, 0, 0, 0xFF,
                      0x1F, 0x07),
            0x8B: cmd("ORWRITE(16)", self.orwrite, 0x8B, 0x18, *_RW16, 0x1F, 0x07),
            0x8E: cmd("WRITE AND VERIFY(16)", self.write_verify, 0x8E, 0x12, *_RW16, 0x1F, 0x07),
            0x8F: cmd("VERIFY(16)", self.verify, 0x8F, 0x16, *_RW16, 0x1F, 0x07),
            0x90: cmd("PRE-FETCH(16)", self.prefetch, 0x90, 0x02, *_RW16, 0x1F, 0x07),
            0x91: cmd("SYNCHRONIZE CACHE(16)", self.sync_cache, 0x91, 0x02, *_RW16, 0x1F, 0x07),
            0x93: cmd("WRITE SAME(16)", self.write_same, 0x93, 0x09 if self.thin else 0x01, *_RW16, 0x1F,
                      0x07),
            0x9C: cmd("WRITE ATOMIC(16)", self.write_atomic, 0x9C, 0x18, *(0xFF,) * 8, 0xFF, 0xFF, 0xFF, 0xFF,
                      0x1F, 0x07),
            0xA8: cmd("READ(12)", self.read, 0xA8, rd, *_RW12, 0x1F, 0x07),
            0xAA: cmd("WRITE(12)", self.write, 0xAA, wr, *_RW12, 0x1F, 0x07),
            0xAE: cmd("WRITE AND VERIFY(12)", self.write_verify, 0xAE, 0x12, *_RW12, 0x1F, 0x07),
            0xAF: cmd("VERIFY(12)", self.verify, 0xAF, 0x16, *_RW12, 0x1F, 0x07),
            0xB7: cmd("READ DEFECT DATA(12)", self.read_defect_data, 0xB7, 0x1F, *(0xFF,) * 8, 0, 0x07),
        }
        if self.thin:
            table[0x42] = cmd("UNMAP", self.unmap, 0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x07)
        self.add_commands(table)
        self.add_service_actions(0x9E, "SERVICE ACTION IN(16)", {
            0x10: cmd("READ CAPACITY(16)", self.read_capacity16, 0x9E, 0x10, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF,
                      0, 0x07),
            0x12: cmd("GET LBA STATUS", self.get_lba_status, 0x9E, 0x12, *(0xFF,) * 8, 0xFF, 0xFF, 0xFF, 0xFF,
                      0, 0x07),
        })
        self.add_service_actions(0x83, "EXTENDED COPY", {
            0x00: cmd("EXTENDED COPY(LID1)", self.extended_copy, 0x83, 0x00, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF,
                      0, 0x07, timeout=60)})
        self.add_service_actions(0x84, "RECEIVE COPY RESULTS", {
            0x00: cmd("RECEIVE COPY RESULTS: COPY STATUS", self.copy_status, 0x84, 0x00, 0xFF, *(0,) * 7,
                      0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
            0x03: cmd("RECEIVE COPY RESULTS: OPERATING PARAMETERS", self.copy_parameters, 0x84, 0x03,
                      *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07)})
        names = {sz.OVERWRITE: "OVERWRITE", sz.BLOCK_ERASE: "BLOCK ERASE", sz.CRYPTO_ERASE: "CRYPTOGRAPHIC ERASE",
                 sz.EXIT_FAILURE_MODE: "EXIT FAILURE MODE"}
        self.add_service_actions(0x48, "SANITIZE", {
            sa: cmd(f"SANITIZE: {names[sa]}", self.sanitize, 0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07,
                    timeout=3600)
            for sa in sorted(self._sanitize_actions)})
        self.vpd.update({0x8F: self._vpd_third_party_copy, 0xB0: self._vpd_block_limits,
                         0xB1: self._vpd_characteristics, 0xB2: self._vpd_provisioning})
        self.add_mode_page(ModePage(0x01, 0, bytes((0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0)), bytes(10)))
        self.add_mode_page(ModePage(0x08, 0, _caching(self.write_back), _caching(True, changeable=True),
                                    self._caching_changed))
        self.add_mode_page(ModePage(0x1C, 0, bytes((0x08,) + (0,) * 9), bytes(10)))  # DEXCPT, read-only

    def _control_changed(self, body: bytes) -> None:
        super()._control_changed(body)
        self.swp = bool(body[2] & 0x08)              # SWP: software write protect, for every initiator
        self.read_only = self._read_only or self.swp

    def ready_info(self) -> dict[str, Any]:
        features = [f for f, on in (("thin", self.thin), ("read_only", self.read_only),
                                    ("write_back", self.write_back)) if on]
        return {"identity": self.ident.as_map(), "features": features,
                "capacity": {"block_size": self.block_size, "blocks": self.blocks}}

    def quick(self, cdb: bytes, xfer: int) -> bool:
        """Cheap enough to run on the reader thread when nothing else is in flight."""
        return cdb[0] in self._quick_ops and xfer <= 65536 and self.store.quick

    def close(self) -> None:
        self._closing.set()
        self.sanitizer.stop()
        self.store.close()

    # -- the gate (see ScsiDevice.execute): no medium, sanitize in progress or failed --------------------------
    def _update_gate(self) -> None:
        normal = self.loaded and self.sanitizer.running is None and self.sanitizer.failed is None
        self._gate = None if normal else self._check_gate

    def _check_gate(self, cdb: bytes) -> Result | None:
        op = cdb[0]
        if self.sanitizer.running is not None:
            allowed, err = _SANITIZING_OK, sz.in_progress(self.sanitizer.progress())
        elif not self.loaded:
            allowed, err = _NO_MEDIUM_OK, ScsiError(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
        elif self.sanitizer.failed is not None:
            allowed, err = _FAILED_MODE_OK, sz.failed_mode()
        else:
            return None
        if op == 0x03 and len(cdb) >= 6:             # REQUEST SENSE reports the condition (SPC-4 6.39)
            return Result(0, None, err.sense(bool(cdb[1] & 1))[:cdb[4]])
        if op in allowed:
            return None
        return Result(2, err.sense(self.d_sense), None)

    # -- long commands that an abort can stop -------------------------------------------------------------------
    def cancel(self, tag: int | None) -> None:
        """Runner hook: the command ``tag`` was aborted (None: shutdown, stop every long command)."""
        if tag is None:
            self._closing.set()
            for event in list(self._cancel.values()):
                event.set()
            return
        running = self._cancel.get(tag)
        if running is not None:
            running.set()

    def _cancellable(self) -> tuple[int | None, threading.Event]:
        tag = current_tag()
        event = threading.Event()
        if self._closing.is_set():
            event.set()
        if tag is not None:
            self._cancel[tag] = event
        return tag, event

    # -- range checks -------------------------------------------------------------------------------------------
    def _check_range(self, lba: int, blocks: int) -> None:
        if blocks > self.blocks or lba > self.blocks - blocks:
            raise lba_out_of_range()

    def _check_write(self, cdb: bytes, blocks: int) -> None:
        if self.read_only:
            raise write_protected()
        if blocks > self.max_xfer:
            raise invalid_field(_LEN_BYTE[cdb[0] >> 5])

    # -- READ / WRITE / VERIFY ----------------------------------------------------------------------------------
    def read(self, cdb: bytes, data: Any, xfer: int) -> Any:
        lba, blocks, _ = DECODE[cdb[0]](cdb)
        if blocks > self.blocks or lba > self.blocks - blocks:
            raise lba_out_of_range()
        if blocks > self.max_xfer:
            raise invalid_field(_LEN_BYTE[cdb[0] >> 5])
        if not blocks:
            return None
        return self.store.read(lba << self.shift, blocks << self.shift)

    def write(self, cdb: bytes, data: Any, xfer: int) -> None:
        lba, blocks, fua = DECODE[cdb[0]](cdb)
        self._write(cdb, lba, blocks, fua, data)

    def write_verify(self, cdb: bytes, data: Any, xfer: int) -> None:
        # The store keeps what it is given, so the verify step cannot fail: make the write durable instead.
        lba, blocks, _ = DECODE[cdb[0]](cdb)
        self._write(cdb, lba, blocks, 1, data)

    def _write(self, cdb: bytes, lba: int, blocks: int, fua: int, data: Any) -> None:
        if blocks > self.blocks or lba > self.blocks - blocks:
            raise lba_out_of_range()
        self._check_write(cdb, blocks)
        size = blocks << self.shift
        if len(data) != size:
            if len(data) < size:                 # short data-out: write the whole blocks that came
                size = (len(data) >> self.shift) << self.shift
            data = memoryview(data)[:size]
        if size:
            self.store.write(lba << self.shift, data, fua or not self.write_back)

    def verify(self, cdb: bytes, data: Any, xfer: int) -> None:
        lba, blocks, _ = DECODE[cdb[0]](cdb)
        self._check_range(lba, blocks)
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk == 2:
            raise invalid_field(1, 2)
        if not blocks or not bytchk:
            return                               # BYTCHK 0: the medium is always readable
        if blocks > self.max_xfer:
            raise invalid_field(_LEN_BYTE[cdb[0] >> 5])
        size = blocks << self.shift
        if bytchk == 3:                          # one block, compared with every block of the range
            if len(data) < self.block_size:
                raise param_length_error()
            expect = bytes(data[:self.block_size]) * blocks
        else:
            if len(data) < size:
                raise param_length_error()
            expect = bytes(data[:size])
        medium = self.store.pread(lba << self.shift, size)
        if medium != expect:
            raise miscompare(_first_difference(medium, expect))

    def compare_and_write(self, cdb: bytes, data: Any, xfer: int) -> None:
        flags, lba, blocks = cdb[1], int.from_bytes(cdb[2:10], "big"), cdb[13]
        if flags & 0xE0:
            raise invalid_field(1, 7)
        self._check_range(lba, blocks)
        if blocks > self.max_compare_blocks:
            raise invalid_field(13)
        size = blocks << self.shift
        if len(data) != 2 * size:
            # The data-out buffer must hold exactly the verify and the write data (SBC-4 5.3): a mismatch means
            # the initiator and the CDB disagree (NUMBER OF LOGICAL BLOCKS 0 with data, or a wrong length).
            raise invalid_field(13)
        if not blocks:
            return
        if self.read_only:
            raise write_protected()
        offset = lba << self.shift
        with self._rmw_lock:
            medium = self.store.pread(offset, size)
            verify = bytes(data[:size])
            if medium != verify:
                raise miscompare(_first_difference(medium, verify))
            self.store.write(offset, memoryview(data)[size:2 * size], flags & 0x08 or not self.write_back)

    def orwrite(self, cdb: bytes, data: Any, xfer: int) -> None:
        lba, blocks, fua = DECODE[cdb[0]](cdb)
        self._check_range(lba, blocks)
        self._check_write(cdb, blocks)
        size = min(blocks << self.shift, (len(data) >> self.shift) << self.shift)
        if not size:
            return
        offset = lba << self.shift
        with self._rmw_lock:
            old = int.from_bytes(self.store.pread(offset, size), "big")
            new = (old | int.from_bytes(data[:size], "big")).to_bytes(size, "big")
            self.store.write(offset, new, fua or not self.write_back)

    # -- cache, prefetch, start/stop ----------------------------------------------------------------------------
    def _range_or_to_end(self, cdb: bytes) -> tuple[int, int]:
        lba, blocks, _ = (_rw10 if cdb[0] < 0x80 else _rw16)(bytes((cdb[0], cdb[1] & 0x1F)) + bytes(cdb[2:]))
        self._check_range(lba, blocks)
        return lba, blocks or self.blocks - lba

    def sync_cache(self, cdb: bytes, data: Any, xfer: int) -> None:
        self._range_or_to_end(cdb)
        self.store.flush()

    def prefetch(self, cdb: bytes, data: Any, xfer: int) -> None:
        lba, blocks = self._range_or_to_end(cdb)
        self.store.prefetch(lba << self.shift, blocks << self.shift)

    def start_stop(self, cdb: bytes, data: Any, xfer: int) -> None:
        """START STOP UNIT (SBC-3 5.25): LOEJ ejects (START=0) or loads (START=1) a removable medium. A POWER
        CONDITION other than 0 ignores LOEJ and START; stopping the (virtual) spindle changes nothing."""
        power, loej, start = cdb[4] >> 4, cdb[4] & 0x02, cdb[4] & 0x01
        if power or not loej or not self.removable:
            return
        if self._preventing:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, ASC_MEDIUM_REMOVAL_PREVENTED)
        if start:
            self.loaded = True
        elif self.loaded:
            if not cdb[4] & 0x04:                    # NO_FLUSH clear: the cache goes to the medium first
                self.store.flush()
            self.loaded = False
        self._update_gate()

    def prevent_allow(self, cdb: bytes, data: Any, xfer: int) -> None:
        """PREVENT ALLOW MEDIUM REMOVAL (SPC-4 6.13): PREVENT 01b forbids, 00b allows removal."""
        mode = cdb[4] & 0x03
        if mode & 0x02:
            raise invalid_field(4, 1)                # 10b/11b: medium changer prevention, not a changer
        if self.removable:
            if mode:
                self._preventing.add(current_nexus())
            else:
                self._preventing.discard(current_nexus())

    # -- I_T nexus loss and resets (runner notifications) -------------------------------------------------------
    def nexus_lost(self, nexus: Any) -> None:
        """SPC-4: an I_T nexus loss ends that nexus's prevention and discards its copy results."""
        self._preventing.discard(nexus)
        self.copier.forget(nexus)

    def reset(self) -> None:
        """A logical unit reset or a hard reset: no prevention, no held copy results (SPC-4 6.13, 5.17.4)."""
        self._preventing.clear()
        self.copier.forget()

    def read_defect_data(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        """READ DEFECT DATA(10)/(12) (SBC-3 5.18, 5.19): the lists exist and are empty."""
        flags = cdb[2] if cdb[0] == 0x37 else cdb[1]
        if flags & 0x07 not in (0, 3, 4, 5):         # short/long block, bytes from index, physical sector
            raise invalid_field(2 if cdb[0] == 0x37 else 1, 2)
        byte1 = flags & 0x1F                         # PLISTV/GLISTV: the lists asked for are valid (and empty)
        if cdb[0] == 0x37:
            return struct.pack(">xBH", byte1, 0)[:(cdb[7] << 8) | cdb[8]]
        return struct.pack(">xBHI", byte1, 0, 0)[:int.from_bytes(cdb[6:10], "big")]

    def write_atomic(self, cdb: bytes, data: Any, xfer: int) -> None:
        """WRITE ATOMIC(16) (SBC-4 5.48): all of it or none of it, never mixed with another atomic write."""
        flags = cdb[1]
        if flags & 0xE0:
            raise invalid_field(1, 7)
        lba, boundary, blocks = struct.unpack_from(">QHH", cdb, 2)
        self._check_range(lba, blocks)
        if boundary:
            raise invalid_field(10)                  # MAXIMUM ATOMIC BOUNDARY SIZE is 0
        if blocks > self.max_atomic:
            raise invalid_field(12)
        if self.read_only:
            raise write_protected()
        size = blocks << self.shift
        if len(data) != size:
            raise invalid_field(12)                  # a partial atomic write is no atomic write
        if not size:
            return
        with self._rmw_lock:
            self.store.write(lba << self.shift, data, flags & 0x08 or not self.write_back)

    # -- EXTENDED COPY, RECEIVE COPY RESULTS --------------------------------------------------------------------
    def extended_copy(self, cdb: bytes, data: Any, xfer: int) -> Any:
        tag, event = self._cancellable()
        try:
            self.copier.extended_copy(cdb, data, event.is_set, current_nexus())
        except Aborted:
            return Result(ABORTED, None, None)
        finally:
            if tag is not None:
                self._cancel.pop(tag, None)
        return None

    def copy_status(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        return self.copier.copy_status(cdb, current_nexus())

    def copy_parameters(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        return self.copier.operating_parameters(cdb)

    def _resolve_copy_target(self, code_set: int, dtype: int, designator: bytes) -> CopyTarget | None:
        ident = self.ident
        t10 = ident.vendor.encode("ascii", "replace")[:8].ljust(8) + ident.serial.encode("ascii", "replace")
        if (code_set == 1 and dtype == 3 and designator == ident.naa) or (dtype == 1 and designator == t10):
            if not self.loaded:
                return None
            return CopyTarget(self.store, self.block_size, self.blocks, self.read_only, self.write_back)
        if code_set == 1 and dtype == 3:
            peer = self._peers.get(bytes(designator))
            return peer() if peer is not None else None
        return None

    # -- SANITIZE -----------------------------------------------------------------------------------------------
    def sanitize(self, cdb: bytes, data: Any, xfer: int) -> Any:
        plan = sz.parse(cdb, data, self.block_size, self._sanitize_actions)
        if self.read_only:
            raise write_protected()
        if plan.action == sz.EXIT_FAILURE_MODE:
            self.sanitizer.exit_failure_mode()
            return None
        done = self.sanitizer.start(plan)
        if plan.immed:
            return None
        tag, event = self._cancellable()
        try:
            while not done.wait(0.1):
                if event.is_set():
                    return Result(ABORTED, None, None)   # the operation goes on (SBC-4 4.11.2)
        finally:
            if tag is not None:
                self._cancel.pop(tag, None)
        if self.sanitizer.failed is not None:
            raise sz.failed_mode()
        return None

    # -- capacity and provisioning ------------------------------------------------------------------------------
    def read_capacity10(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        if not cdb[8] & 1 and any(cdb[2:6]):
            raise invalid_field(2)                   # an LBA without PMI (SBC-3 5.15)
        return struct.pack(">II", min(self.blocks - 1, 0xFFFFFFFF), self.block_size)

    def read_capacity16(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        alloc = int.from_bytes(cdb[10:14], "big")
        lbp = (0x8000 | (0x4000 if self.store.lbprz else 0)) if self.thin else 0
        out = struct.pack(">QIBBH", self.blocks - 1, self.block_size, 0, self.phys_exp, lbp)
        return (out + bytes(16))[:alloc]

    # -- VPD and mode pages -------------------------------------------------------------------------------------
    def _vpd_block_limits(self) -> bytes:
        gran = max(self.granularity, 1 << self.phys_exp)
        unmap_lbas, unmap_descs = (self.max_unmap_lbas, self.max_unmap_descriptors) if self.thin else (0, 0)
        body = struct.pack(">BBHIIIIIIIQIIIII", 0, self.max_compare_blocks, gran, self.max_xfer,
                           min(self.max_xfer, 128 * gran), self.max_xfer, unmap_lbas, unmap_descs,
                           gran if self.thin else 0, 0x80000000 if self.thin else 0, self.max_ws,
                           self.max_atomic, 0, 0, 0, 0)   # atomic: length; no alignment, granularity, boundary
        return self.vpd_page(0xB0, body)

    def _vpd_characteristics(self) -> bytes:
        # WABEREQ 01b, WACEREQ 01b: a read after a block or cryptographic erase completes GOOD (SBC-4 6.6.2).
        return self.vpd_page(0xB1, struct.pack(">HxB", self.rotation_rate, 0x50).ljust(0x3C, b"\x00"))

    def _vpd_third_party_copy(self) -> bytes:
        body = self.copier.vpd_descriptors()
        return struct.pack(">BBH", self.device_type, 0x8F, len(body)) + body

    def device_specific_parameter(self) -> int:
        return (0x80 if self.read_only else 0) | 0x10            # WP, DPOFUA

    def block_descriptor(self, long: bool) -> bytes:
        if long:
            return struct.pack(">QxxxxI", self.blocks, self.block_size)
        return struct.pack(">IxBH", min(self.blocks, 0xFFFFFFFF), self.block_size >> 16,
                           self.block_size & 0xFFFF)

    def check_block_descriptor(self, desc: bytes, offset: int) -> None:
        size = int.from_bytes(desc[-3:] if len(desc) == 8 else desc[-4:], "big")
        if len(desc) not in (8, 16):
            raise invalid_param(offset - 1)
        if size not in (0, self.block_size):
            raise invalid_param(offset + len(desc) - 3)

    def _caching_changed(self, body: bytes) -> None:
        self.write_back = bool(body[0] & 0x04)


def _caching(wce: bool, changeable: bool = False) -> bytes:
    """Caching mode page (SBC-3 6.4.5) bytes 2..19: only WCE means anything here."""
    if changeable:
        return bytes((0x04,) + (0,) * 17)
    return bytes((0x04 if wce else 0,) + (0,) * 17)

