"""CRC32C digests for iSCSI HeaderDigest/DataDigest (RFC 7143 §13.1, RFC 3720 appendix B.4).

Strategy: the `crc32c` package does the work (SSE4.2/ARMv8 instructions where present), so a digest costs about
as much as a memcpy and callers never loop over bytes in Python.

Byte order: the 32-bit CRC goes on the wire least significant byte first. RFC 3720 B.4 lists the CRC of 32
zero bytes as the bytes ``aa 36 91 8a``, i.e. the value 0x8A9136AA little-endian; Linux (crc32c crypto API,
``__le32``) and libiscsi put it on the wire the same way.
"""

from __future__ import annotations

from typing import Final

from crc32c import crc32c as _crc32c

DIGEST_LENGTH: Final = 4


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data``; pass a previous result as ``crc`` to continue over discontiguous buffers."""
    return _crc32c(data, crc)


def digest_bytes(data: bytes | bytearray | memoryview, crc: int = 0) -> bytes:
    """The 4 wire bytes of the CRC32C of ``data`` (continuing from ``crc``)."""
    return _crc32c(data, crc).to_bytes(4, "little")


def digest_value(wire: bytes | bytearray | memoryview) -> int:
    """The CRC32C value carried by 4 wire bytes."""
    return int.from_bytes(wire, "little")
