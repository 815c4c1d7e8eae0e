"""iSCSI PDU framing (RFC 7143 §11.2): bytes in, PDUs out; PDUs to a list of buffers out.

Strategy: `PduReader` keeps one receive ``bytearray`` and a read offset. ``feed`` appends (and first drops the
bytes already consumed, which for a bytearray is an O(1) move of its logical start); ``next_pdu`` looks at the
fixed parts in place — BHS (48) → AHS (TotalAHSLength * 4) → header digest → data padded to 4 → data
digest — and either consumes exactly one whole PDU or consumes nothing and returns `NEED_DATA`. The parsed
lengths of a PDU still arriving are remembered, so a large data segment is not re-parsed on every feed. The
only copies per PDU are the header (≤ 1068 bytes) and one ``bytes`` of the data segment; digests are computed
over memoryview slices by the C ``crc32c``.

Error policy (what the connection does next):
  * `FramingError`: the stream cannot be resynchronised (a data segment over the hard limit, or an unknown
    opcode whose length we cannot trust) — drop the connection.
  * `DigestError` with ``header_digest=True``: the lengths are untrusted too — drop the connection.
  * `DigestError` with ``header_digest=False``: the PDU was consumed; ``.pdu`` says what it was, so the target
    can Reject it (DATA_DIGEST_ERROR) and carry on.
  * `PduError`: the PDU was consumed (an oversized data segment is dropped as it arrives, never buffered whole);
    answer with a Reject of ``.reason`` and carry on.
After a fatal error the reader raises the same error again on every call.
"""

from __future__ import annotations

import enum
from struct import Struct
from typing import Final, Literal, TypeAlias

from crc32c import crc32c as _crc32c

from .pdu import (
    BHS_LENGTH,
    KNOWN_OPCODES,
    FramingError,
    Pdu,
    PduError,
    RejectReason,
    data_length,
    decode,
    encode_header,
)

__all__ = [
    "HARD_DATA_SEGMENT_LIMIT",
    "NEED_DATA",
    "DigestError",
    "FramingError",
    "NeedData",
    "PduReader",
    "encode_pdu",
]

HARD_DATA_SEGMENT_LIMIT: Final = 16 * 1024 * 1024 + 4096
"""Data segments longer than this are a `FramingError` whatever was negotiated (bounds memory per connection)."""

_WORD = Struct(">I")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by length % 4


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by `PduReader.next_pdu` until a whole PDU is buffered."""

NeedData: TypeAlias = Literal[_NeedData.NEED_DATA]


class DigestError(Exception):
    """A CRC32C digest mismatch.

    Attributes:
      header_digest: True if the header digest was bad (fatal: the lengths cannot be trusted).
      header: the 48-byte BHS as received (for a Reject's data segment).
      pdu: for a data digest error, the decoded PDU (None if it did not decode); the PDU has been consumed.
    """

    def __init__(self, message: str, *, header_digest: bool, header: bytes = b"", pdu: Pdu | None = None) -> None:
        super().__init__(message)
        self.header_digest = header_digest
        self.header = header
        self.pdu = pdu


class PduReader:
    """Turns a byte stream into PDUs. Not thread-safe; one per connection and direction.

    The three settings are plain attributes, read when a PDU's header is parsed, so login code can switch digests
    and MaxRecvDataSegmentLength on between PDUs.
    """

    def __init__(
        self,
        *,
        header_digest: bool = False,
        data_digest: bool = False,
        max_recv_data_segment_length: int = 8192,
        hard_data_segment_limit: int = HARD_DATA_SEGMENT_LIMIT,
    ) -> None:
        self.header_digest = header_digest
        self.data_digest = data_digest
        self.max_recv_data_segment_length = max_recv_data_segment_length
        self.hard_data_segment_limit = hard_data_segment_limit
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._head: tuple[int, int, int, int] | None = None  # (hlen, hdigest, dsl, ddigest) of the PDU arriving
        self._discard = 0  # bytes of an oversized PDU still to drop
        self._discard_error: PduError | None = None
        self._fatal: Exception | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; parsing happens in `next_pdu`."""
        if self._fatal is not None:
            return  # the connection is being dropped; do not grow the buffer
        buf = self._buf
        if self._pos:
            if self._pos == len(buf):
                buf.clear()
            else:
                del buf[: self._pos]
            self._pos = 0
        buf += data

    def next_pdu(self) -> Pdu | NeedData:
        """The next whole PDU, or `NEED_DATA`.

        Raises:
          FramingError: fatal; see the module docstring.
          DigestError: fatal if ``header_digest`` is set, else the PDU was consumed.
          PduError: the PDU was consumed; the connection continues.
        """
        if self._fatal is not None:
            raise self._fatal
        if self._discard and not self._drop():
            return NEED_DATA
        if self._discard_error is not None:
            err, self._discard_error = self._discard_error, None
            raise err
        head = self._head
        if head is None:
            try:
                head = self._parse_head()
            except (FramingError, DigestError) as e:
                self._fatal = e
                raise
            if head is None:
                return NEED_DATA
            if self._discard:
                return self.next_pdu()
            self._head = head
        hlen, hd, dsl, dd = head
        buf, pos = self._buf, self._pos
        dstart = pos + hlen + hd
        dend = dstart + ((dsl + 3) & ~3)
        if len(buf) < dend + dd:
            return NEED_DATA
        self._head = None
        self._pos = dend + dd
        with memoryview(buf) as mv:
            header = bytes(mv[pos : pos + hlen])
            data = bytes(mv[dstart : dstart + dsl]) if dsl else b""
            bad = dd and _crc32c(mv[dstart:dend]) != int.from_bytes(mv[dend : dend + 4], "little")
        if bad:
            raise self._data_digest_error(header, data)
        return decode(header, header[BHS_LENGTH:], data)

    def _parse_head(self) -> tuple[int, int, int, int] | None:
        """Read the lengths of the PDU at the read offset, once its header (and header digest) is buffered.

        Starts discarding an oversized PDU (and returns its lengths with ``_discard`` set).
        """
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < BHS_LENGTH:
            return None
        word = _WORD.unpack_from(buf, pos + 4)[0]
        dsl = word & 0xFFFFFF
        oversized = dsl > self.max_recv_data_segment_length
        # Judge the lengths as soon as the BHS is here, so garbage fails fast instead of waiting for more bytes.
        if dsl > self.hard_data_segment_limit:
            raise FramingError(f"data segment of {dsl} bytes exceeds the hard limit")
        if oversized and buf[pos] & 0x3F not in KNOWN_OPCODES:
            raise FramingError(f"unknown opcode 0x{buf[pos] & 0x3F:02x} with a {dsl}-byte data segment")
        hlen = BHS_LENGTH + (word >> 24) * 4
        hd = 4 if self.header_digest else 0
        if avail < hlen + hd:
            return None
        if hd:
            with memoryview(buf) as mv:
                bad = _crc32c(mv[pos : pos + hlen]) != int.from_bytes(mv[pos + hlen : pos + hlen + 4], "little")
            if bad:
                raise DigestError("header digest mismatch", header_digest=True, header=bytes(buf[pos : pos + 48]))
        dd = 4 if self.data_digest and dsl else 0
        if oversized:
            self._discard = hlen + hd + ((dsl + 3) & ~3) + dd
            self._discard_error = PduError(
                RejectReason.PROTOCOL_ERROR,
                f"data segment of {dsl} bytes exceeds MaxRecvDataSegmentLength {self.max_recv_data_segment_length}",
                bytes(buf[pos : pos + BHS_LENGTH]),
            )
        return hlen, hd, dsl, dd

    def _drop(self) -> bool:
        """Consume what is buffered of an oversized PDU; True once all of it is gone."""
        n = min(self._discard, len(self._buf) - self._pos)
        self._pos += n
        self._discard -= n
        return not self._discard

    def _data_digest_error(self, header: bytes, data: bytes) -> DigestError:
        try:
            pdu: Pdu | None = decode(header, header[BHS_LENGTH:], data)
        except PduError:
            pdu = None
        return DigestError("data digest mismatch", header_digest=False, header=header[:BHS_LENGTH], pdu=pdu)


def encode_pdu(pdu: Pdu, *, header_digest: bool = False, data_digest: bool = False) -> list[bytes | memoryview]:
    """The wire form of ``pdu`` as buffers to write in order, without joining header and data.

    Returns ``[header (+ header digest), pdu.data (the same object), padding (+ data digest)]``, omitting empty
    parts. The data digest covers the data and its padding (RFC 7143 §11.2).

    Raises:
      ValueError: a field does not fit on the wire (see `encode_header`).
    """
    header = encode_header(pdu)
    if header_digest:
        header += _crc32c(header).to_bytes(4, "little")
    data = pdu.data
    n = data_length(data)
    if not n:
        return [header]
    pad = _PADS[n & 3]
    if data_digest:
        crc = _crc32c(data)
        if pad:
            crc = _crc32c(pad, crc)
        return [header, data, pad + crc.to_bytes(4, "little")]
    return [header, data, pad] if pad else [header, data]
