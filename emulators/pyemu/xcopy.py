"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): a copy manager for block-to-block copies.

Strategy: the whole parameter list is checked before one byte moves, so a copy that is refused has done nothing:
header and lengths, then descriptor counts, then each CSCD (copy source or destination) descriptor, then each
segment with its ranges. Only the identification CSCD descriptor (E4h) with an NAA or T10 vendor designator and the
block-to-block segment descriptor (02h) are implemented. A CSCD names a logical unit the copy manager can reach
through ``resolve(designator)``: the LU itself, or a peer LU the configuration listed (``vdisk`` ``xcopy_peers``).
Data moves a megabyte at a time; an all-zero megabyte read from a thin source is deallocated at a thin destination
that reads unmapped blocks as zeros (the copy stays sparse). Overlapping ranges on one LU copy backwards when the
destination is above the source, so the result is that of a copy through a buffer. Between chunks the copy checks
whether its command was aborted.

A list identifier names an operation of one I_T nexus (the ``nexus`` the core gives each command; without one, all
commands share one). With LIST ID USAGE 00b the copy's status is held for RECEIVE COPY RESULTS (COPY STATUS),
which returns it once and then discards it; an I_T nexus loss or a reset discards it too (``forget``).
"""
from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

from .sense import (Asc, ScsiError, SenseKey, build_sense, invalid_field, invalid_param, param_length_error,
                    write_protected)

COPY_ABORTED = 0x0A
ASC_COPY_TARGET_NOT_REACHABLE = 0x0D02       # COPY TARGET DEVICE NOT REACHABLE
ASC_OPERATION_IN_PROGRESS = 0x0016
ASC_TOO_MANY_TARGET_DESCRIPTORS = 0x2606
ASC_UNSUPPORTED_TARGET_DESCRIPTOR = 0x2607
ASC_TOO_MANY_SEGMENT_DESCRIPTORS = 0x2608
ASC_UNSUPPORTED_SEGMENT_DESCRIPTOR = 0x2609

HEADER = 16
CSCD_SIZE = 32
CSCD_IDENTIFICATION = 0xE4
SEGMENT_BLOCK_TO_BLOCK = 0x02
MAX_CSCD_DESCRIPTORS = 8
MAX_SEGMENT_DESCRIPTORS = 64
MAX_DESCRIPTOR_LIST = MAX_CSCD_DESCRIPTORS * CSCD_SIZE + MAX_SEGMENT_DESCRIPTORS * 28
MAX_CONCURRENT = 4
HELD_STATUSES = 64                            # COPY STATUS results kept at most (oldest forgotten first)
CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)

STATUS_IN_PROGRESS, STATUS_DONE, STATUS_FAILED = 0x00, 0x01, 0x02


class CopyTarget(NamedTuple):
    """A logical unit a segment can read or write."""
    store: Any                 # stores.FileStore-like: pread, write, punch, extent, flush, thin, lbprz
    block_size: int
    blocks: int
    read_only: bool
    write_back: bool


class CopyAborted(ScsiError):
    """COPY ABORTED; COMMAND-SPECIFIC INFORMATION holds the number of the segment being processed (SPC-4 6.4.3)."""

    def __init__(self, asc: int, segment: int | None = None) -> None:
        super().__init__(COPY_ABORTED, asc)
        self.segment = segment

    def sense(self, descriptor: bool = False) -> bytes:
        if descriptor:
            descs = b"" if self.segment is None else struct.pack(">BBxxQ", 0x01, 0x0A, self.segment)
            return struct.pack(">BBBBxxxB", 0x72, COPY_ABORTED, self.asc >> 8, self.asc & 0xFF, len(descs)) + descs
        out = bytearray(build_sense(COPY_ABORTED, self.asc))
        if self.segment is not None:
            out[8:12] = struct.pack(">I", self.segment & 0xFFFFFFFF)
        return bytes(out)


class Aborted(Exception):
    """The command that runs the copy was aborted; the copy stopped between two chunks."""


class _Segment(NamedTuple):
    number: int
    src: CopyTarget
    dst: CopyTarget
    src_lba: int
    dst_lba: int
    size: int                  # bytes


class CopyManager:
    """The copy manager of one logical unit.

    Args:
        resolve: ``resolve(code_set, designator_type, designator) -> CopyTarget | None``.
        block_size: the LU's logical block size (for the granularity reported in OPERATING PARAMETERS).
    """

    def __init__(self, resolve: Callable[[int, int, bytes], CopyTarget | None], block_size: int) -> None:
        self.resolve = resolve
        self.block_size = block_size
        self._lock = threading.Lock()
        # (nexus, list id) -> status, segments processed, bytes moved
        self._held: OrderedDict[tuple[Any, int], tuple[int, int, int]] = OrderedDict()
        self._active: set[tuple[Any, int]] = set()

    # -- EXTENDED COPY ------------------------------------------------------------------------------------------
    def extended_copy(self, cdb: bytes, data: Any, cancelled: Callable[[], bool], nexus: Any = None) -> None:
        length = int.from_bytes(cdb[10:14], "big")
        if not length:
            return                                   # SPC-4 6.4.1: not an error, nothing to do
        if length < HEADER or len(data) < length:
            raise param_length_error()
        buf = bytes(data[:length])
        list_id, usage = buf[0], (buf[1] >> 3) & 0x03
        cscd_len = int.from_bytes(buf[2:4], "big")
        seg_len, inline_len = struct.unpack_from(">II", buf, 8)
        if usage == 0x01:
            raise invalid_param(1, 4)                # LIST ID USAGE 01b is reserved
        if usage == 0x03 and list_id:
            raise invalid_param(0)                   # 11b: the list identifier must be zero
        if HEADER + cscd_len + seg_len + inline_len > length:
            raise param_length_error()
        if cscd_len + seg_len > MAX_DESCRIPTOR_LIST:
            raise param_length_error()
        if inline_len:
            raise invalid_param(12)                  # MAXIMUM INLINE DATA LENGTH is 0
        if cscd_len // CSCD_SIZE > MAX_CSCD_DESCRIPTORS:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, ASC_TOO_MANY_TARGET_DESCRIPTORS, field=(2, None))
        cscds = self._cscds(buf, HEADER, cscd_len)
        segments = self._segments(buf, HEADER + cscd_len, seg_len, cscds)
        hold = usage in (0x00, 0x02)                  # the list identifier names the operation
        key = (nexus, list_id)
        with self._lock:
            if hold and key in self._active:
                raise ScsiError(SenseKey.ILLEGAL_REQUEST, ASC_OPERATION_IN_PROGRESS)
            if hold:
                self._active.add(key)
                self._held.pop(key, None)
        done = moved = 0
        status = STATUS_FAILED
        try:
            for seg in segments:
                try:
                    moved += self._copy(seg, cancelled)
                except CopyAborted:
                    raise
                except ScsiError as err:             # a read or write of the segment failed
                    raise CopyAborted(Asc.NO_ADDITIONAL_SENSE, seg.number) from err
                done += 1
            status = STATUS_DONE
        finally:
            with self._lock:
                if hold:
                    self._active.discard(key)
                if usage == 0x00:
                    self._held[key] = (status, done, moved)
                    while len(self._held) > HELD_STATUSES:
                        self._held.popitem(last=False)

    def _cscds(self, buf: bytes, start: int, length: int) -> list[tuple[int, bytes]]:
        """(position, descriptor) of each CSCD descriptor, checked field by field."""
        out = []
        pos, end = start, start + length
        while pos < end:
            code = buf[pos]
            if code != CSCD_IDENTIFICATION:
                raise ScsiError(SenseKey.ILLEGAL_REQUEST, ASC_UNSUPPORTED_TARGET_DESCRIPTOR, field=(pos, None))
            if pos + CSCD_SIZE > end:
                raise param_length_error()
            desc = buf[pos:pos + CSCD_SIZE]
            # Byte 1: LU ID TYPE and NUL are obsolete in SPC-4 (the designator alone names the LU): ignored.
            if desc[7] > 20:
                raise invalid_param(pos + 7)         # the designator must fit bytes 8..27
            out.append((pos, desc))
            pos += CSCD_SIZE
        return out

    def _segments(self, buf: bytes, start: int, length: int, cscds: list[tuple[int, bytes]]) -> list[_Segment]:
        spans = []
        pos, end = start, start + length
        while pos < end:
            if pos + 4 > end:
                raise param_length_error()
            size = 4 + int.from_bytes(buf[pos + 2:pos + 4], "big")
            if pos + size > end:
                raise param_length_error()
            spans.append((pos, size))
            pos += size
        if len(spans) > MAX_SEGMENT_DESCRIPTORS:
            raise ScsiError(SenseKey.ILLEGAL_REQUEST, ASC_TOO_MANY_SEGMENT_DESCRIPTORS, field=(8, None))
        targets: dict[int, CopyTarget] = {}
        segments = []
        for number, (pos, size) in enumerate(spans):
            if buf[pos] != SEGMENT_BLOCK_TO_BLOCK:
                raise ScsiError(SenseKey.ILLEGAL_REQUEST, ASC_UNSUPPORTED_SEGMENT_DESCRIPTOR, field=(pos, None))
            if size != 28:
                raise invalid_param(pos + 2)
            dc = buf[pos + 1] & 0x02
            src_i, dst_i, _, blocks, src_lba, dst_lba = struct.unpack_from(">HHHHQQ", buf, pos + 4)
            src = self._target(src_i, cscds, targets, number)
            dst = self._target(dst_i, cscds, targets, number)
            size_bytes = blocks * (dst.block_size if dc else src.block_size)
            if size_bytes % src.block_size or size_bytes % dst.block_size:
                raise invalid_param(pos + 10)
            src_n, dst_n = size_bytes // src.block_size, size_bytes // dst.block_size
            if src_lba > src.blocks or src_n > src.blocks - src_lba \
                    or dst_lba > dst.blocks or dst_n > dst.blocks - dst_lba:
                raise CopyAborted(Asc.NO_ADDITIONAL_SENSE, number)   # the CSCD would answer LBA OUT OF RANGE
            if dst.read_only and size_bytes:
                raise write_protected()
            segments.append(_Segment(number, src, dst, src_lba * src.block_size, dst_lba * dst.block_size,
                                     size_bytes))
        return segments

    def _target(self, index: int, cscds: list[tuple[int, bytes]], cache: dict[int, CopyTarget],
                segment: int) -> CopyTarget:
        hit = cache.get(index)
        if hit is not None:
            return hit
        if index >= len(cscds):
            raise CopyAborted(ASC_COPY_TARGET_NOT_REACHABLE, segment)
        pos, desc = cscds[index]
        if desc[1] & 0x1F:                            # not a block device: no block-to-block segment with it
            raise CopyAborted(ASC_COPY_TARGET_NOT_REACHABLE, segment)
        code_set, dtype, dlen = desc[4] & 0x0F, desc[5] & 0x0F, desc[7]
        target = self.resolve(code_set, dtype, desc[8:8 + dlen])
        if target is None:
            raise CopyAborted(ASC_COPY_TARGET_NOT_REACHABLE, segment)
        disk_block = int.from_bytes(desc[29:32], "big")
        if disk_block and disk_block != target.block_size:
            raise invalid_param(pos + 29)
        cache[index] = target
        return target

    def _copy(self, seg: _Segment, cancelled: Callable[[], bool]) -> int:
        """Copy one segment; returns the bytes moved."""
        src, dst, size = seg.src, seg.dst, seg.size
        if not size:
            return 0
        same = src.store is dst.store
        backwards = same and seg.src_lba < seg.dst_lba < seg.src_lba + size
        sparse = dst.store.thin and dst.store.lbprz
        offsets = range(0, size, CHUNK)
        for off in (reversed(offsets) if backwards else offsets):
            if cancelled():
                raise Aborted()
            n = min(CHUNK, size - off)
            chunk = src.store.pread(seg.src_lba + off, n)
            if sparse and chunk == _ZEROS[:n]:
                dst.store.punch(seg.dst_lba + off, n)
            else:
                dst.store.write(seg.dst_lba + off, chunk, False)
        if not dst.write_back:
            dst.store.flush()
        return size

    # -- RECEIVE COPY RESULTS -----------------------------------------------------------------------------------
    def forget(self, nexus: Any = ...) -> None:
        """Discard the held results of ``nexus`` (I_T nexus loss), or of every nexus (reset)."""
        with self._lock:
            for key in [k for k in self._held if nexus is ... or k[0] == nexus]:
                del self._held[key]

    def copy_status(self, cdb: bytes, nexus: Any = None) -> bytes:
        key = (nexus, cdb[2])
        with self._lock:
            if key in self._active:
                status, done, moved = STATUS_IN_PROGRESS, 0, 0
            else:
                held = self._held.pop(key, None)
                if held is None:
                    raise invalid_field(2)            # no operation with this list identifier
                status, done, moved = held
        units, count = 0x00, moved
        while count > 0xFFFFFFFF:
            units, count = units + 1, count >> 10     # 01h KiB, 02h MiB, ... (SPC-4 table 6.18.3)
        body = struct.pack(">BHBI", status, min(done, 0xFFFF), units, count)
        return _alloc(struct.pack(">I", len(body)) + body, cdb)

    def operating_parameters(self, cdb: bytes) -> bytes:
        granularity = self.block_size.bit_length() - 1
        body = struct.pack(">BxxxHHIIIIIxxHBBBBxxx", 0x01, MAX_CSCD_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS,
                           MAX_DESCRIPTOR_LIST, 0xFFFF * self.block_size, 0, 0, 0, MAX_CONCURRENT, MAX_CONCURRENT,
                           granularity, 0, 0)
        implemented = bytes((SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION))
        body += bytes((len(implemented),)) + implemented
        return _alloc(struct.pack(">I", len(body)) + body, cdb)

    # -- Third-party Copy VPD page (SPC-4 7.8.17) ---------------------------------------------------------------
    def vpd_descriptors(self) -> bytes:
        commands = (bytes((0x83, 1, 0x00))             # EXTENDED COPY: LID1
                    + bytes((0x84, 2, 0x00, 0x03)))    # RECEIVE COPY RESULTS: COPY STATUS, OPERATING PARAMETERS
        supported_commands = _descriptor(0x0001, bytes((len(commands),)) + commands)
        parameter_data = _descriptor(0x0004, struct.pack(">xxxxHHII", MAX_CSCD_DESCRIPTORS,
                                                         MAX_SEGMENT_DESCRIPTORS, MAX_DESCRIPTOR_LIST, 0)
                                     + bytes(12))
        codes = bytes((SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION))
        supported = _descriptor(0x0008, bytes((len(codes),)) + codes)
        cscd_ids = _descriptor(0x000C, struct.pack(">H", 0))
        general = _descriptor(0x8001, struct.pack(">IIIBB", MAX_CONCURRENT, MAX_CONCURRENT,
                                                  0xFFFF * self.block_size, self.block_size.bit_length() - 1, 0)
                              + bytes(18))
        return supported_commands + parameter_data + supported + cscd_ids + general


def _descriptor(kind: int, body: bytes) -> bytes:
    """A third-party copy descriptor, padded to a multiple of 4 bytes."""
    body += bytes(-(4 + len(body)) % 4)
    return struct.pack(">HH", kind, len(body)) + body


def _alloc(data: bytes, cdb: bytes) -> bytes:
    return data[:int.from_bytes(cdb[10:14], "big")]
