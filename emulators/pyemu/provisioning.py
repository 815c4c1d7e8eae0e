"""Logical block provisioning (SBC-4 4.7): GET LBA STATUS, WRITE SAME (with UNMAP) and UNMAP.

A mixin of ``SbcDevice``: it uses the device's geometry (``blocks``, ``shift``, ``block_size``), its limits
(``max_ws``, ``max_unmap_lbas``, ``max_unmap_descriptors``) and its store's ``extent``/``punch``/``write_same``.
A thin LU deallocates on UNMAP and WRITE SAME with UNMAP; reads of deallocated blocks return zeros (LBPRZ,
when the store says so).
"""
from __future__ import annotations

import struct
from typing import Any, Callable

from .sense import invalid_field, invalid_param, lba_out_of_range, param_length_error, write_protected


class Provisioning:
    blocks: int
    shift: int
    block_size: int
    thin: bool
    read_only: bool
    write_back: bool
    max_ws: int
    max_unmap_lbas: int
    max_unmap_descriptors: int
    store: Any
    _check_range: Callable[[int, int], None]       # provided by SbcDevice
    vpd_page: Callable[[int, bytes], bytes]         # provided by ScsiDevice

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
        elif len(data) != self.block_size:
            raise param_length_error()               # the data-out buffer is exactly one logical block
        else:
            block = bytes(data[:self.block_size])
        offset, size = lba << self.shift, blocks << self.shift
        if flags & 0x08 and self.thin:
            # UNMAP (SBC-3 5.42): deallocate whatever the block holds; LBPRZ makes the range read as zeros.
            self.store.punch(offset, size)
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

    def _vpd_provisioning(self) -> bytes:
        if not self.thin:
            return self.vpd_page(0xB2, bytes(4))
        bits = 0xE0 | (0x04 if self.store.lbprz else 0)          # LBPU, LBPWS, LBPWS10, LBPRZ
        return self.vpd_page(0xB2, bytes((0, bits, 0x02, 0)))   # provisioning type: thin
