"""The key=value text format of login and text requests (RFC 7143 6.1), and the login status its errors carry.

Sans I/O: `parse_text` splits a complete data segment into pairs and checks each key name and value length
against the key table (`keys.KEYS`); `encode_text` is its inverse.  Errors are `NegotiationError`s that carry
the Login Response status to answer with (INITIATOR ERROR for a malformed segment).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from enum import IntEnum

from .keys import KEYS, UNKNOWN_VALUE_LIMIT, KeyType

__all__ = ["LoginStatus", "NegotiationError", "parse_text", "encode_text"]


class LoginStatus(IntEnum):
    """Login Response status, (class << 8) | detail (RFC 7143 11.13.5)."""
    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def status_class(self) -> int:
        return self >> 8

    @property
    def status_detail(self) -> int:
        return self & 0xFF


class NegotiationError(Exception):
    """A negotiation failure that ends the login. It carries the Login Response status to answer with.

    In full feature phase there is no login status to send. The caller answers with a Reject PDU instead.
    """

    def __init__(self, status_class: int, status_detail: int, message: str) -> None:
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail
        self.message = message

    @property
    def status(self) -> int:
        """(class << 8) | detail, as a LoginStatus when it is one."""
        code = (self.status_class << 8) | self.status_detail
        try:
            return LoginStatus(code)
        except ValueError:
            return code

    @classmethod
    def of(cls, status: LoginStatus, message: str) -> NegotiationError:
        return cls(status.status_class, status.status_detail, message)


def _fail(status: LoginStatus, message: str) -> NegotiationError:
    return NegotiationError.of(status, message)


_KEY_NAME = re.compile(r"[A-Za-z0-9.\-+@_:#]{1,63}")   # RFC 7143 6.1 key-name, plus '#' for X# keys


def parse_text(data: bytes | memoryview) -> list[tuple[str, str]]:
    """Split a complete text data segment into (key, value) pairs, in order.

    The segment is key=value items, each followed by a NUL. A missing final NUL and empty items (extra
    padding NULs) are tolerated.

    Raises:
        NegotiationError(INITIATOR_ERROR): an item without '=', a bad or over-long (>63 bytes) key name,
            a value that is not UTF-8, or a value longer than its key allows (RFC 7143 6.1).
    """
    pairs: list[tuple[str, str]] = []
    for item in bytes(data).split(b"\0"):
        if not item:
            continue
        raw_key, sep, raw_value = item.partition(b"=")
        if not sep:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"text item without '=': {item[:64]!r}")
        try:
            key = raw_key.decode("ascii")
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"text item is not UTF-8: {item[:64]!r}") from None
        if not _KEY_NAME.fullmatch(key):
            raise _fail(LoginStatus.INITIATOR_ERROR, f"malformed key name {key[:64]!r}")
        _check_length(key, raw_value)
        pairs.append((key, value))
    return pairs


def _check_length(key: str, raw_value: bytes) -> None:
    spec = KEYS.get(key)
    if spec is None:
        limit, items = UNKNOWN_VALUE_LIMIT, [raw_value]
    else:
        limit = spec.max_length
        items = raw_value.split(b",") if spec.type is KeyType.LIST else [raw_value]
    if any(len(item) > limit for item in items):
        raise _fail(LoginStatus.INITIATOR_ERROR, f"{key}: value longer than {limit} bytes")


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """key=value NUL ... The inverse of parse_text."""
    out = bytearray()
    for key, value in pairs:
        if "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"cannot encode {key!r}={value!r}")
        out += f"{key}={value}".encode() + b"\0"
    return bytes(out)
