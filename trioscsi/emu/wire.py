"""Sans-I/O codec for the emulator protocol (docs/emulator-protocol.md): length-prefixed CBOR maps.

`FrameDecoder.feed(bytes)` buffers; `next_message()` returns one decoded map or None when more bytes are
needed.  `encode(message)` returns the bytes of one frame.  Both sides of the protocol use it (the core, and
tests that play an emulator).
"""
from __future__ import annotations

import struct
from typing import Any

import cbor2

MAX_FRAME = 16 * 1024 * 1024 + 4096
_LEN = struct.Struct(">I")


class WireError(Exception):
    """The peer broke the framing or sent something that is not a CBOR map: the stream is unusable."""


def encode(message: dict[str, Any]) -> bytes:
    body = cbor2.dumps(message)
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> dict[str, Any] | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (length,) = _LEN.unpack_from(buf, pos)
        if length > self.max_frame:
            raise WireError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
        end = pos + 4 + length
        if len(buf) < end:
            return None
        try:
            message = cbor2.loads(memoryview(buf)[pos + 4:end])
        except Exception as exc:  # cbor2 raises several types for malformed input
            raise WireError(f"undecodable CBOR frame: {exc}") from None
        self._pos = end
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise WireError("a frame is not a map with a text 'op'")
        return message
