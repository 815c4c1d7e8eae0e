"""Frames of the emulator protocol (docs/emulator-protocol.md §1): a uint32 BE length, then one CBOR map.

Strategy: this is the hot path of every benchmark, so
* the reader ``readinto``s the 4-byte header into a preallocated buffer and reads each body as one bytes object
  (a command outlives the read, so a shared body buffer would cost a copy per frame). Large flat maps of uints,
  text, bytes and bools (every ``cmd`` with data-out) are decoded here, byte strings as zero-copy memoryviews
  into the body: cbor2 copies large byte strings in chunks (about 50 us for 128 KiB). Small frames and anything
  else go to cbor2, whose C decoder is four times faster than the Python one on a 40-byte ``cmd``.
* the writer encodes ``done`` by hand and hands the data-in buffer to ``os.writev`` beside the CBOR prefix, so
  data-in is never copied into an encoded item. One lock keeps frames from interleaving; every frame is one
  ``writev`` on an unbuffered descriptor, so there is nothing to flush.
"""
from __future__ import annotations

import os
import struct
import threading
from typing import Any

import cbor2

MAX_FRAME = 16 * 1024 * 1024 + 4096
_LEN = struct.Struct(">I")
_U8, _U16, _U32, _U64 = (struct.Struct(f) .unpack_from for f in (">B", ">H", ">I", ">Q"))


class ProtocolError(Exception):
    """The peer broke the protocol: the answer is an ``error`` frame."""


class FrameReader:
    """Reads frames from a blocking binary stream (normally a BufferedReader over fd 0)."""

    def __init__(self, stream: Any, max_frame: int = MAX_FRAME) -> None:
        self._stream = stream
        self._head = bytearray(4)
        self._head_view = memoryview(self._head)
        self.max_frame = max_frame

    def read(self) -> dict[str, Any] | None:
        """The next frame's map, or None at end of input between frames.

        Raises:
            ProtocolError: a truncated frame, a length over ``max_frame``, bad CBOR, or not a map.
        """
        got = self._stream.readinto(self._head_view)
        while got and got < 4:                          # a pipe may hand over the header in pieces
            more = self._stream.readinto(self._head_view[got:])
            if not more:
                break
            got += more
        if not got:
            return None
        if got < 4:
            raise ProtocolError("end of input inside a frame header")
        (length,) = _LEN.unpack(self._head)
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds max_frame {self.max_frame}")
        body = self._stream.read(length)
        if body is None or len(body) < length:
            raise ProtocolError("end of input inside a frame body")
        return decode(body)


_FLAT_OVER = 8192   # below this cbor2's C decoder is faster than the copy it makes


def decode(body: bytes) -> dict[str, Any]:
    """Decode one frame body; byte strings of large flat maps come back as memoryviews into ``body``."""
    msg = None
    if len(body) > _FLAT_OVER:
        try:
            msg = _decode_flat(body)
        except (IndexError, struct.error, UnicodeDecodeError, ValueError):
            msg = None
    if msg is None:
        try:
            msg = cbor2.loads(body)
        except Exception as exc:  # cbor2 raises several types; all mean "not CBOR"
            raise ProtocolError(f"undecodable CBOR: {exc}") from None
        if not isinstance(msg, dict):
            raise ProtocolError("a frame must be a CBOR map with text keys")
    return msg


def _head(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the data item at ``pos``."""
    ib = buf[pos]
    major, ai = ib >> 5, ib & 0x1F
    if ai < 24:
        return major, ai, pos + 1
    if ai == 24:
        return major, buf[pos + 1], pos + 2
    if ai == 25:
        return major, _U16(buf, pos + 1)[0], pos + 3
    if ai == 26:
        return major, _U32(buf, pos + 1)[0], pos + 5
    if ai == 27:
        return major, _U64(buf, pos + 1)[0], pos + 9
    raise ValueError("indefinite length")


def _decode_flat(buf: bytes) -> dict[str, Any] | None:
    """A map of text keys to uint/bytes/text/bool/null, or None when the item is anything else."""
    major, count, pos = _head(buf, 0)
    if major != 5:
        return None
    view = memoryview(buf)
    out: dict[str, Any] = {}
    for _ in range(count):
        major, n, pos = _head(buf, pos)
        if major != 3:
            return None
        key = str(view[pos:pos + n], "utf-8")
        pos += n
        major, n, pos = _head(buf, pos)
        if major == 0:
            out[key] = n
        elif major == 2:
            if pos + n > len(buf):
                return None
            out[key] = view[pos:pos + n]
            pos += n
        elif major == 3:
            out[key] = str(view[pos:pos + n], "utf-8")
            pos += n
        elif major == 7 and 20 <= n <= 22 and buf[pos - 1] == 0xE0 | n:
            out[key] = (False, True, None)[n - 20]
        else:
            return None
    return out if pos == len(buf) else None


def _uint(major: int, n: int) -> bytes:
    """CBOR head of major type ``major`` with argument ``n``."""
    m = major << 5
    if n < 24:
        return bytes((m | n,))
    if n < 0x100:
        return bytes((m | 24, n))
    if n < 0x10000:
        return struct.pack(">BH", m | 25, n)
    if n < 0x100000000:
        return struct.pack(">BI", m | 26, n)
    return struct.pack(">BQ", m | 27, n)


_DONE = b"\x62op\x64done\x63tag"
_STATUS = b"\x66status"
_SENSE = b"\x65sense"
_DATA = b"\x64data"
_ABORTED = b"\x67aborted\xf5"
_GOOD_DATA = b"\xa4" + _DONE
_GOOD_DATA_TAIL = _STATUS + b"\x00" + _DATA
_SMALL = 4096     # data-in up to this size is joined to the prefix: one buffer beats an iovec of two


_HEADS: dict[tuple[int, int], bytes] = {}   # (major, n) -> head, for the few data lengths and tags a run uses


def _head_of(major: int, n: int) -> bytes:
    h = _HEADS.get((major, n))
    if h is None:
        h = _uint(major, n)
        if len(_HEADS) < 4096:
            _HEADS[(major, n)] = h
    return h


def encode_done(tag: int, status: int, sense: bytes | None = None, data: Any = None,
                aborted: bool = False) -> list[Any]:
    """The buffers of one ``done`` frame, length header included, ready for ``writev``."""
    if not status and not aborted and data is not None:                  # GOOD with data-in: the hot path
        size = len(data)
        if size:
            prefix = b"".join((_GOOD_DATA, _head_of(0, tag), _GOOD_DATA_TAIL, _head_of(2, size)))
            head = _LEN.pack(len(prefix) + size) + prefix
            return [head + data] if size <= _SMALL else [head, data]
    n = 3
    parts = [_DONE, _uint(0, tag), _STATUS, _uint(0, status)]
    if sense:
        n += 1
        parts += (_SENSE, _uint(2, len(sense)), sense)
    if aborted:
        n += 1
        parts.append(_ABORTED)
    size = len(data) if data is not None else 0
    if size:
        n += 1
        parts += (_DATA, _uint(2, size))
    prefix = b"".join(parts)
    total = 1 + len(prefix) + size
    head = _LEN.pack(total) + bytes((0xA0 | n,)) + prefix
    if not size:
        return [head]
    if size <= _SMALL:
        return [head + data]
    return [head, data]


def encode(msg: dict[str, Any]) -> list[bytes]:
    """The buffers of any frame, encoded by cbor2."""
    body = cbor2.dumps(msg)
    return [_LEN.pack(len(body)) + body]


class FrameWriter:
    """Writes whole frames to a file descriptor, from any thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        self.write(encode(msg))

    def send_done(self, tag: int, status: int, sense: bytes | None = None, data: Any = None,
                  aborted: bool = False) -> None:
        self.write(encode_done(tag, status, sense, data, aborted))

    def write(self, bufs: list[Any]) -> None:
        """Write ``bufs`` as one frame; a short write (signal, huge frame) is resumed."""
        with self._lock:
            total = sum(len(b) for b in bufs) if len(bufs) > 1 else len(bufs[0])
            done = os.writev(self._fd, bufs)
            while done < total:
                done += os.write(self._fd, _tail(bufs, done))


def _tail(bufs: list[Any], skip: int) -> memoryview:
    """What remains of ``bufs`` after ``skip`` bytes, as one view (slow path only)."""
    for b in bufs:
        if skip < len(b):
            return memoryview(b)[skip:]
        skip -= len(b)
    return memoryview(b"")
