"""SBC-3/4: the block command set of a disk, over a pluggable backing store (``stores.FileStore``/``NullStore``).

Strategy: table-driven. READ/WRITE/VERIFY/WRITE AND VERIFY (6/10/12/16) are decoded by one small decoder per
CDB layout into ``RwRequest(lba, blocks, fua)``, so the handlers have no opcode switches. Ranges are checked
without overflow: ``blocks > capacity or lba > capacity - blocks``. A write with less data-out than its CDB
asks for writes the whole blocks it got (what libiscsi's residual tests expect); the rest is the core's residual.
COMPARE AND WRITE and ORWRITE read-modify-write under one per-LU lock, so they are atomic with each other.
"""
from __future__ import annotations

import struct
import threading
from typing import Any, Callable, NamedTuple

from .sense import (invalid_field, invalid_param, lba_out_of_range, miscompare, param_length_error,
                    write_protected)
from .spc import VERSION_ISCSI, VERSION_SAM5, VERSION_SPC4, ModePage, ScsiDevice, cmd

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


class SbcDevice(ScsiDevice):
    """A direct-access block device (peripheral type 0) over ``store``.

    Args:
        store: the backing store (see ``stores``): ``size``, ``thin``, ``read``/``pread``/``write``/``punch``/
            ``extent``/``flush``/``close``.
        block_size: logical block size in bytes (a power of two).
        read_only: writes fail with DATA PROTECT, WRITE PROTECTED; MODE SENSE sets WP.
        write_back: the caching page's WCE; when clear every write is made durable before GOOD.
        physical_block: the store's allocation unit, reported as logical blocks per physical block and as the
            optimal unmap granularity (a hole can only be punched in whole file-system blocks).
        rotation_rate: Block Device Characteristics MEDIUM ROTATION RATE (1 = solid state).
    """

    version_descriptors = (VERSION_SAM5, VERSION_SPC4, VERSION_SBC3, VERSION_ISCSI)
    max_transfer_bytes = 8 * 1024 * 1024         # well under the protocol's 16 MiB frame
    max_write_same_bytes = 1 << 30
    max_unmap_descriptors = 256
    max_compare_blocks = 255

    def __init__(self, store: Any, identity: dict[str, Any], emit: Callable[..., None] | None = None, *,
                 block_size: int = 512, read_only: bool = False, write_back: bool = True,
                 physical_block: int = 4096, rotation_rate: int = 1, fallback_serial: str = "0",
                 product: str = "VIRTUAL-DISK") -> None:
        super().__init__(identity, emit, fallback_serial, product)
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 512, not {block_size}")
        self.store = store
        self.block_size = block_size
        self.shift = block_size.bit_length() - 1
        self.blocks = store.size >> self.shift
        self.read_only = read_only
        self.write_back = write_back
        self.thin = bool(store.thin) and not read_only
        self.phys_exp = max(0, (max(physical_block, block_size) // block_size).bit_length() - 1)
        self.rotation_rate = rotation_rate
        self.max_xfer = self.max_transfer_bytes >> self.shift
        self.max_ws = min(self.max_write_same_bytes >> self.shift, 0xFFFFFFFF)
        self.max_unmap_lbas = min(self.max_write_same_bytes >> self.shift, 0xFFFFFFFF)
        self._rmw_lock = threading.Lock()
        self._quick_ops = frozenset((0x08, 0x28, 0x88, 0x0A, 0x2A, 0x8A, 0x00))
        self._setup_tables()

    # -- tables -------------------------------------------------------------------------------------------------
    def _setup_tables(self) -> None:
        rd, wr = 0x18, 0x18                                   # DPO, FUA (reported: DPOFUA is set)
        table = {
            0x08: cmd("READ(6)", self.read, 0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07),
            0x0A: cmd("WRITE(6)", self.write, 0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07),
            0x1B: cmd("START STOP UNIT", self.accept, 0x1B, 0x01, 0, 0x0F, 0xF7, 0x07),
            0x1E: cmd("PREVENT ALLOW MEDIUM REMOVAL", self.accept, 0x1E, 0, 0, 0, 0x03, 0x07),
            0x25: cmd("READ CAPACITY(10)", self.read_capacity10, 0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01,
                      0x07),
            0x28: cmd("READ(10)", self.read, 0x28, rd, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x2A: cmd("WRITE(10)", self.write, 0x2A, wr, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x2E: cmd("WRITE AND VERIFY(10)", self.write_verify, 0x2E, 0x12, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x2F: cmd("VERIFY(10)", self.verify, 0x2F, 0x16, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x34: cmd("PRE-FETCH(10)", self.prefetch, 0x34, 0x02, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
            0x35: cmd("SYNCHRONIZE CACHE(10)", self.sync_cache, 0x35, 0x02, *_RW10, 0x1F, 0xFF, 0xFF, 0x07),
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
            0xA8: cmd("READ(12)", self.read, 0xA8, rd, *_RW12, 0x1F, 0x07),
            0xAA: cmd("WRITE(12)", self.write, 0xAA, wr, *_RW12, 0x1F, 0x07),
            0xAE: cmd("WRITE AND VERIFY(12)", self.write_verify, 0xAE, 0x12, *_RW12, 0x1F, 0x07),
            0xAF: cmd("VERIFY(12)", self.verify, 0xAF, 0x16, *_RW12, 0x1F, 0x07),
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
        self.vpd.update({0xB0: self._vpd_block_limits, 0xB1: self._vpd_characteristics,
                         0xB2: self._vpd_provisioning})
        self.add_mode_page(ModePage(0x01, 0, bytes((0xC0, 0, 0, 0, 0, 0, 0, 0, 0, 0)), bytes(10)))
        self.add_mode_page(ModePage(0x08, 0, _caching(self.write_back), _caching(True, changeable=True),
                                    self._caching_changed))
        self.add_mode_page(ModePage(0x1C, 0, bytes((0x08,) + (0,) * 9), bytes(10)))  # DEXCPT, read-only

    def ready_info(self) -> dict[str, Any]:
        features = [f for f, on in (("thin", self.thin), ("read_only", self.read_only),
                                    ("write_back", self.write_back)) if on]
        return {"identity": self.ident.as_map(), "features": features,
                "capacity": {"block_size": self.block_size, "blocks": self.blocks}}

    def quick(self, cdb: bytes, xfer: int) -> bool:
        """Cheap enough to run on the reader thread when nothing else is in flight."""
        return cdb[0] in self._quick_ops and xfer <= 65536 and self.store.quick

    def close(self) -> None:
        self.store.close()

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
        if not blocks:
            return
        if self.read_only:
            raise write_protected()
        size = blocks << self.shift
        if len(data) < 2 * size:
            raise invalid_field(13)
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

    def accept(self, cdb: bytes, data: Any, xfer: int) -> None:
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

    def get_lba_status(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        lba, alloc = int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
        if lba >= self.blocks:
            raise lba_out_of_range()
        room = max(1, min(64, (alloc - 8) // 16)) if alloc >= 24 else 1
        descs: list[bytes] = []
        while lba < self.blocks and len(descs) < room:
            mapped, end = self.store.extent(lba << self.shift) if self.thin else (True, self.store.size)
            end_lba = min(self.blocks, max(lba + 1, -(-end >> self.shift) if mapped else end >> self.shift))
            count = min(end_lba - lba, 0xFFFFFFFF)
            descs.append(struct.pack(">QIB3x", lba, count, 0 if mapped else 1))
            lba += count
        body = b"".join(descs)
        return (struct.pack(">I4x", len(body) + 4) + body)[:alloc]

    def write_same(self, cdb: bytes, data: Any, xfer: int) -> None:
        ws16 = cdb[0] == 0x93
        flags = cdb[1]
        lba, blocks = struct.unpack_from(">QI", cdb, 2) if ws16 else struct.unpack_from(">IxH", cdb, 2)
        if flags & 0xE0:
            raise invalid_field(1, 7)
        if flags & 0x10:
            raise invalid_field(1, 4)                # ANCHOR: ANC_SUP is 0
        if not blocks:
            if lba > self.blocks:
                raise lba_out_of_range()
            blocks = self.blocks - lba               # 0 blocks: to the end of the LU (WSNZ is 0)
        self._check_range(lba, blocks)
        if blocks > self.max_ws:
            raise invalid_field(10 if ws16 else 7)
        if self.read_only:
            raise write_protected()
        if ws16 and flags & 0x01:                    # NDOB: no data-out, the block is zeros
            block = bytes(self.block_size)
        elif len(data) < self.block_size:
            raise param_length_error()
        else:
            block = bytes(data[:self.block_size])
        offset, size = lba << self.shift, blocks << self.shift
        if flags & 0x08 and self.thin and not any(block):
            self.store.punch(offset, size)           # UNMAP: deallocate; LBPRZ makes them read as zeros
        else:
            self.store.write_same(offset, size, block, not self.write_back)

    def unmap(self, cdb: bytes, data: Any, xfer: int) -> None:
        if cdb[1] & 0x01:
            raise invalid_field(1, 0)                # ANCHOR
        length = (cdb[7] << 8) | cdb[8]
        if not length:
            return
        if length < 8 or len(data) < 8:
            raise param_length_error()
        if self.read_only:
            raise write_protected()
        buf = bytes(data[:length])
        count = min((buf[2] << 8) | buf[3], len(buf) - 8) // 16
        if count > self.max_unmap_descriptors:
            raise invalid_param(2)
        extents = [struct.unpack_from(">QI", buf, 8 + 16 * i) for i in range(count)]
        for i, (lba, blocks) in enumerate(extents):
            self._check_range(lba, blocks)
            if blocks > self.max_unmap_lbas:
                raise invalid_param(8 + 16 * i + 8)
        for lba, blocks in extents:
            if blocks:
                self.store.punch(lba << self.shift, blocks << self.shift)

    # -- VPD and mode pages -------------------------------------------------------------------------------------
    def _vpd_block_limits(self) -> bytes:
        gran = 1 << self.phys_exp
        unmap_lbas, unmap_descs = (self.max_unmap_lbas, self.max_unmap_descriptors) if self.thin else (0, 0)
        body = struct.pack(">BBHIIIIIIIQ", 0, self.max_compare_blocks, gran, self.max_xfer,
                           min(self.max_xfer, 128 * gran), self.max_xfer, unmap_lbas, unmap_descs,
                           gran if self.thin else 0, 0x80000000 if self.thin else 0, self.max_ws)
        return self.vpd_page(0xB0, body.ljust(0x3C, b"\x00"))

    def _vpd_characteristics(self) -> bytes:
        return self.vpd_page(0xB1, struct.pack(">H", self.rotation_rate).ljust(0x3C, b"\x00"))

    def _vpd_provisioning(self) -> bytes:
        if not self.thin:
            return self.vpd_page(0xB2, bytes(4))
        bits = 0xE0 | (0x04 if self.store.lbprz else 0)          # LBPU, LBPWS, LBPWS10, LBPRZ
        return self.vpd_page(0xB2, bytes((0, bits, 0x02, 0)))   # provisioning type: thin

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

