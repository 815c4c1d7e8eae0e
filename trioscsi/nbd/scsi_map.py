"""What an NBD request is in SCSI, and what a SCSI answer is in NBD: CDB builders, the LU's geometry, the error
mapping.  Pure functions, so the mapping is tested without a server.

Command mapping: READ -> READ(16), WRITE -> WRITE(16) (FUA -> FUA bit), FLUSH -> SYNCHRONIZE CACHE(16) of the whole
LU, TRIM -> UNMAP (thin LUs only), WRITE_ZEROES -> WRITE SAME(16) of one zero block (with the UNMAP bit when the
LU is thin, reads unmapped blocks as zeros and the client did not say NO_HOLE).  Requests larger than the LU's
limits (Block Limits VPD) become several commands.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..core.nexus import Response
from ..scsi.sense import Asc, SenseKey, Status, parse_sense
from .protocol import Cmd, Errno

READ_16, WRITE_16, SYNCHRONIZE_CACHE_16, WRITE_SAME_16, UNMAP = 0x88, 0x8A, 0x91, 0x93, 0x42
FALLBACK_TRANSFER = 8 << 20        # bytes per command when the LU reports no maximum transfer length


def read_capacity16() -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0)


def block_limits_vpd() -> bytes:
    return struct.pack(">BBBHB", 0x12, 0x01, 0xB0, 64, 0)


def mode_sense6_header() -> bytes:
    """MODE SENSE(6), all pages, no block descriptors: only the header's WP bit is wanted."""
    return struct.pack(">BBBBBB", 0x1A, 0x08, 0x3F, 0, 255, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", READ_16, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, fua: bool) -> bytes:
    return struct.pack(">BBQIBB", WRITE_16, 0x08 if fua else 0, lba, blocks, 0, 0)


def synchronize_cache16(lba: int = 0, blocks: int = 0) -> bytes:
    return struct.pack(">BBQIBB", SYNCHRONIZE_CACHE_16, 0, lba, blocks, 0, 0)


def write_same16(lba: int, blocks: int, unmap: bool) -> bytes:
    return struct.pack(">BBQIBB", WRITE_SAME_16, 0x08 if unmap else 0, lba, blocks, 0, 0)


def unmap(extents: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    """The UNMAP CDB and its parameter list for (lba, blocks) extents."""
    descriptors = b"".join(struct.pack(">QI4x", lba, blocks) for lba, blocks in extents)
    params = struct.pack(">HH4x", 6 + len(descriptors), len(descriptors)) + descriptors
    return struct.pack(">BB4xBHB", UNMAP, 0, 0, len(params), 0), params


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the transport needs to know about a disk LU, from READ CAPACITY(16) and the Block Limits VPD."""
    block_size: int
    blocks: int
    thin: bool = False                 # LBPME: UNMAP works
    zeroes_unmapped: bool = False      # LBPRZ: an unmapped block reads as zeros
    max_transfer_blocks: int = 0       # 0: not reported
    max_write_same_blocks: int = 0
    max_unmap_blocks: int = 0
    max_unmap_descriptors: int = 0
    read_only: bool = False

    @property
    def size(self) -> int:
        return self.block_size * self.blocks

    @property
    def transfer_blocks(self) -> int:
        """Blocks per READ(16)/WRITE(16)."""
        fallback = max(1, FALLBACK_TRANSFER // self.block_size)
        return min(self.max_transfer_blocks or fallback, fallback)

    @property
    def write_same_blocks(self) -> int:
        return self.max_write_same_blocks or self.transfer_blocks

    @property
    def can_trim(self) -> bool:
        return self.thin and self.max_unmap_blocks > 0 and self.max_unmap_descriptors > 0


def parse_capacity(data: bytes | memoryview) -> Geometry:
    """READ CAPACITY(16) parameter data (SBC-4 5.20.2).

    Raises:
        ValueError: too short, or a zero block size.
    """
    if len(data) < 16:
        raise ValueError("READ CAPACITY(16) data shorter than 16 bytes")
    last, block_size = struct.unpack_from(">QI", data)
    if not block_size:
        raise ValueError("block size 0")
    return Geometry(block_size, last + 1, thin=bool(data[14] & 0x80), zeroes_unmapped=bool(data[14] & 0x40))


def with_block_limits(geometry: Geometry, data: bytes | memoryview) -> Geometry:
    """Add the Block Limits VPD page's limits (SBC-4 6.6.4); a short or foreign page changes nothing."""
    if len(data) < 44 or data[1] != 0xB0:
        return geometry
    max_transfer = struct.unpack_from(">I", data, 8)[0]
    max_unmap, max_descriptors = struct.unpack_from(">II", data, 20)
    max_write_same = struct.unpack_from(">Q", data, 36)[0]
    return Geometry(geometry.block_size, geometry.blocks, geometry.thin, geometry.zeroes_unmapped,
                    max_transfer, min(max_write_same, 0xFFFFFFFF), max_unmap, max_descriptors,
                    geometry.read_only)


def chunks(lba: int, blocks: int, step: int) -> Iterator[tuple[int, int]]:
    """(lba, blocks) pieces of at most `step` blocks."""
    end = lba + blocks
    while lba < end:
        count = min(step, end - lba)
        yield lba, count
        lba += count


# ---- SCSI answers -> NBD errors ------------------------------------------------------------------------------

def sense_of(response: Response) -> tuple[int, int]:
    """(sense key, ASC/ASCQ) of a CHECK CONDITION, or (0, 0)."""
    if response.status != Status.CHECK_CONDITION or len(response.sense) < 8:
        return 0, 0
    return parse_sense(bytes(response.sense))


def retry_delay(response: Response, attempt: int) -> float | None:
    """How long to wait before repeating a command, as an initiator would; None: do not repeat.

    A unit attention is news, not an error: repeat at once.  BUSY, TASK SET FULL, a LU becoming ready and an
    ABORTED COMMAND (the emulator restarting) are repeated after a growing pause."""
    if response.status in (Status.BUSY, Status.TASK_SET_FULL):
        return 0.01 * (1 << attempt)
    key, asc = sense_of(response)
    if key == SenseKey.UNIT_ATTENTION:
        return 0.0
    if key == SenseKey.ABORTED_COMMAND or (key == SenseKey.NOT_READY
                                           and asc == Asc.LOGICAL_UNIT_NOT_READY_BECOMING_READY):
        return 0.01 * (1 << attempt)
    return None


def nbd_error(response: Response, command: int) -> Errno:
    """GOOD -> 0; DATA PROTECT and RESERVATION CONFLICT -> EPERM (the export refuses this client's writes, which
    is what EPERM means in the protocol document); LBA OUT OF RANGE -> ENOSPC for writes, EINVAL otherwise (the
    document's choices for requests beyond the end); anything else EIO."""
    if response.status in (Status.GOOD, Status.CONDITION_MET):
        return Errno.OK
    if response.status == Status.RESERVATION_CONFLICT:
        return Errno.EPERM
    key, asc = sense_of(response)
    if key == SenseKey.DATA_PROTECT:
        return Errno.EPERM
    if key == SenseKey.ILLEGAL_REQUEST and asc == Asc.LBA_OUT_OF_RANGE:
        return Errno.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
    return Errno.EIO
