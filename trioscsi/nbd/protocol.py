"""The NBD server protocol, sans I/O: the fixed newstyle handshake and the transmission-phase codec.

Strategy: `NbdServer.receive_data` only buffers; `next_event` returns one event or `NEED_DATA`; what the server
must say during the handshake is queued and taken with `data_to_send`.  Which export a client may have is not a
protocol question, so the handshake stops at `ExportRequested` until the caller answers with `answer_export`.
Transmission replies are built by `encode_reply` (header and data kept apart, never joined).

Invariants: the state lives in `self.state` and only the readers in `_READERS` consume input; anything that
breaks a MUST of the protocol (bad magic, unknown client flags, a malformed option header, a WRITE larger than
the maximum payload) raises `NbdProtocolError`, after which the caller drops the connection (a hard disconnect,
as the protocol document allows).  A request that is well formed but cannot be served is a `Request` whose
`error` is already set: the caller answers it without executing anything.

Simple replies only: NBD_OPT_STRUCTURED_REPLY (and everything built on it) is answered NBD_REP_ERR_UNSUP.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

MAX_OPTION_LENGTH = 65536       # a name is at most 4096 bytes; anything far larger is not an honest option
DEFAULT_MAX_PAYLOAD = 32 << 20  # the protocol's suggested maximum block size for clients that were not told
ZEROES = bytes(124)


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Errno(IntEnum):
    """The error values the protocol allows in a reply (not the host's errno numbering)."""
    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class State(Enum):
    CLIENT_FLAGS = "client flags"       # greeting sent, waiting for the client's 32-bit flags
    OPTIONS = "options"                 # option haggling
    ANSWERING = "answering"             # ExportRequested delivered, waiting for answer_export
    TRANSMISSION = "transmission"
    CLOSED = "closed"                   # ABORT acknowledged, DISC received or export refused for EXPORT_NAME


class NbdProtocolError(Exception):
    """The peer broke the protocol; the only answer is a hard disconnect."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# ---- events ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ExportRequested:
    """The client chose an export (EXPORT_NAME, GO) or asks about one (INFO); answer with `answer_export`."""
    option: Option
    name: str
    info_requests: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Aborted:
    """NBD_OPT_ABORT: the ACK is queued; send it and close."""


@dataclass(frozen=True, slots=True)
class Request:
    """One transmission-phase request; `error` set means answer it with that error and do nothing else."""
    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes = b""
    error: int = 0


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish what is in flight, then close."""


@dataclass(frozen=True, slots=True)
class Export:
    """What the caller tells the protocol about an export: size in bytes, transmission flags, block sizes."""
    size: int
    flags: int
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_payload: int = DEFAULT_MAX_PAYLOAD


Event = ExportRequested | Aborted | Request | Disconnect


# ---- the server --------------------------------------------------------------------------------------------

_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")

_WRITES = frozenset((Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
_NEEDS = {Cmd.FLUSH: TransmissionFlag.SEND_FLUSH, Cmd.TRIM: TransmissionFlag.SEND_TRIM,
          Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES}
_KNOWN = frozenset((Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES))


class NbdServer:
    """One connection, server role.

    Args:
        export_names: what NBD_OPT_LIST reports (the caller still decides, per request, what exists).
    """

    def __init__(self, export_names: Sequence[str] = ()) -> None:
        self.export_names = list(export_names)
        self.state = State.CLIENT_FLAGS
        self.export: Export | None = None
        self.export_name: str | None = None
        self.no_zeroes = False
        self._buffer = bytearray()
        self._pos = 0
        self._out: list[bytes] = [struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                              HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)]
        self._pending: ExportRequested | None = None

    # ---- bytes in, events out -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is not State.CLOSED:
            self._buffer += data

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA.

        Raises:
            NbdProtocolError: the peer broke the protocol (the connection must be dropped).
        """
        if self.state is State.ANSWERING:
            raise RuntimeError("answer the ExportRequested before asking for the next event")
        reader = _READERS.get(self.state)
        if reader is None:
            return NEED_DATA
        try:
            event = reader(self)
        except NbdProtocolError:
            self.state = State.CLOSED
            raise
        if self._pos and (self._pos > 1 << 20 or self._pos == len(self._buffer)):
            del self._buffer[:self._pos]
            self._pos = 0
        return event

    def answer_export(self, export: Export | None, error: Reply = Reply.ERR_UNKNOWN, message: str = "") -> None:
        """Answer the pending ExportRequested: `export` to accept, None to refuse with `error` and `message`.

        For NBD_OPT_EXPORT_NAME a refusal cannot be told to the client: the state becomes CLOSED and the caller
        drops the connection."""
        request = self._pending
        if request is None or self.state is not State.ANSWERING:
            raise RuntimeError("no export request is waiting for an answer")
        self._pending = None
        option = request.option
        if export is None:
            if option == Option.EXPORT_NAME:
                self.state = State.CLOSED
                return
            self._reply(option, error, message.encode())
            self.state = State.OPTIONS
            return
        if option == Option.EXPORT_NAME:
            self._out.append(struct.pack(">QH", export.size, export.flags))
            if not self.no_zeroes:
                self._out.append(ZEROES)
        else:
            self._reply(option, Reply.INFO, struct.pack(">HQH", Info.EXPORT, export.size, export.flags))
            # Block sizes go out whether or not they were asked for (the protocol allows it): unaligned requests
            # are refused with EINVAL, so a client had better know the minimum.
            self._reply(option, Reply.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, export.minimum_block,
                                                        export.preferred_block, export.maximum_payload))
            if Info.NAME in request.info_requests:
                self._reply(option, Reply.INFO, struct.pack(">H", Info.NAME) + request.name.encode())
            self._reply(option, Reply.ACK)
            if option == Option.INFO:
                self.state = State.OPTIONS
                return
        self.export, self.export_name = export, request.name
        self.state = State.TRANSMISSION

    # ---- readers: one per state that consumes input -------------------------------------------------------

    def _take(self, size: int) -> bytes | None:
        if len(self._buffer) - self._pos < size:
            return None
        start = self._pos
        self._pos += size
        return bytes(self._buffer[start:self._pos])

    def _available(self) -> int:
        return len(self._buffer) - self._pos

    def _read_client_flags(self) -> Event | _NeedData:
        raw = self._take(4)
        if raw is None:
            return NEED_DATA
        flags = int.from_bytes(raw, "big")
        if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):   # int: ~ of an IntFlag keeps its bits
            raise NbdProtocolError(f"unknown client flags 0x{flags:08x}")
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self.state = State.OPTIONS
        return self._read_option()

    def _read_option(self) -> Event | _NeedData:
        while True:
            if self._available() < _OPTION.size:
                return NEED_DATA
            magic, option, length = _OPTION.unpack_from(self._buffer, self._pos)
            if magic != IHAVEOPT:
                raise NbdProtocolError(f"bad option magic 0x{magic:016x}")
            if length > MAX_OPTION_LENGTH:
                raise NbdProtocolError(f"option {option} carries {length} bytes")
            if self._available() < _OPTION.size + length:
                return NEED_DATA
            self._pos += _OPTION.size
            data = self._take(length) or b""
            event = self._option(option, data)
            if event is not None:
                return event

    def _option(self, option: int, data: bytes) -> Event | None:
        if option == Option.EXPORT_NAME:
            try:
                name = data.decode()
            except UnicodeDecodeError:
                raise NbdProtocolError("export name is not UTF-8") from None
            return self._ask(ExportRequested(Option.EXPORT_NAME, name))
        if option == Option.ABORT:
            self._reply(option, Reply.ACK)
            self.state = State.CLOSED
            return Aborted()
        if option == Option.LIST:
            if data:
                self._reply(option, Reply.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return None
            for name in self.export_names:
                raw = name.encode()
                self._reply(option, Reply.SERVER, struct.pack(">I", len(raw)) + raw)
            self._reply(option, Reply.ACK)
            return None
        if option in (Option.INFO, Option.GO):
            request = _parse_info(Option(option), data)
            if request is None:
                self._reply(option, Reply.ERR_INVALID, b"malformed export name or information requests")
                return None
            return self._ask(request)
        self._reply(option, Reply.ERR_UNSUP, f"option {option} is not supported".encode())
        return None

    def _ask(self, request: ExportRequested) -> ExportRequested:
        self._pending = request
        self.state = State.ANSWERING
        return request

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out.append(_OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data)

    def _read_request(self) -> Event | _NeedData:
        if self._available() < _REQUEST.size:
            return NEED_DATA
        magic, flags, command, handle, offset, length = _REQUEST.unpack_from(self._buffer, self._pos)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad request magic 0x{magic:08x}")
        export = self.export
        assert export is not None
        data = b""
        if command == Cmd.WRITE:
            if length > export.maximum_payload:
                raise NbdProtocolError(f"WRITE of {length} bytes exceeds the maximum payload")
            if self._available() < _REQUEST.size + length:
                return NEED_DATA
            self._pos += _REQUEST.size
            data = self._take(length) or b""
        else:
            self._pos += _REQUEST.size
        if command == Cmd.DISC:
            self.state = State.CLOSED
            return Disconnect()
        return Request(command, flags, handle, offset, length, data,
                       validate(export, command, flags, offset, length))


_READERS = {
    State.CLIENT_FLAGS: NbdServer._read_client_flags,
    State.OPTIONS: NbdServer._read_option,
    State.TRANSMISSION: NbdServer._read_request,
}


def _parse_info(option: Option, data: bytes) -> ExportRequested | None:
    """NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count of information requests, the requests."""
    if len(data) < 6:
        return None
    size = int.from_bytes(data[:4], "big")
    if len(data) < 4 + size + 2:
        return None
    try:
        name = data[4:4 + size].decode()
    except UnicodeDecodeError:
        return None
    count = int.from_bytes(data[4 + size:6 + size], "big")
    rest = data[6 + size:]
    if len(rest) != 2 * count:
        return None
    return ExportRequested(option, name, struct.unpack(f">{count}H", rest))


def validate(export: Export, command: int, flags: int, offset: int, length: int) -> int:
    """The error a well-formed request gets before anything runs (0: none), as the protocol document asks:
    EINVAL for unknown commands and flags, EPERM for writes to a read-only export, ENOSPC for a write and
    EINVAL for a read or trim beyond the end, EINVAL for requests not aligned to the minimum block size."""
    if command not in _KNOWN:
        return Errno.EINVAL
    needed = _NEEDS.get(Cmd(command))
    if needed is not None and not export.flags & needed:
        return Errno.EINVAL
    allowed = int(CmdFlag.FUA) if export.flags & TransmissionFlag.SEND_FUA else 0
    if command == Cmd.WRITE_ZEROES:
        allowed |= int(CmdFlag.NO_HOLE)
    if flags & ~allowed:
        return Errno.EINVAL
    if command == Cmd.FLUSH:
        return Errno.EINVAL if offset or length else Errno.OK
    if command in _WRITES and export.flags & TransmissionFlag.READ_ONLY:
        return Errno.EPERM
    if offset + length > export.size:
        return Errno.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
    block = export.minimum_block
    if offset % block or length % block:
        return Errno.EINVAL
    if command == Cmd.READ and length > export.maximum_payload:
        return Errno.EINVAL
    return Errno.OK


def encode_reply(handle: int, error: int, data: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """A simple reply: the header, then the data of a successful READ (not joined)."""
    header = _REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
    return [header, data] if data and not error else [header]


__all__ = ["NbdServer", "NbdProtocolError", "NEED_DATA", "ExportRequested", "Aborted", "Request", "Disconnect",
           "Export", "Option", "Reply", "Info", "TransmissionFlag", "Cmd", "CmdFlag", "Errno", "State",
           "encode_reply", "validate"]
