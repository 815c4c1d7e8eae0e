"""The sans-I/O NBD server (trioscsi/nbd/protocol.py) and the SCSI mapping (trioscsi/nbd/scsi_map.py), without
sockets: handshake sequences, option errors, request parsing and validation, malformed input."""
from __future__ import annotations

import struct

import pytest

from trioscsi.core.nexus import Response
from trioscsi.nbd import scsi_map
from trioscsi.nbd.protocol import IHAVEOPT, NBDMAGIC, NEED_DATA, OPTION_REPLY_MAGIC, REQUEST_MAGIC, \
    SIMPLE_REPLY_MAGIC, Aborted, Cmd, CmdFlag, Disconnect, Errno, Export, ExportRequested, Info, \
    NbdProtocolError, NbdServer, Option, Reply, Request, State, TransmissionFlag, encode_reply
from trioscsi.scsi.sense import Asc, SenseKey, Status, build_sense

RW = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA \
    | TransmissionFlag.SEND_WRITE_ZEROES
DISK = Export(size=1 << 20, flags=int(RW), minimum_block=512)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def request(cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, handle: int = 7,
            data: bytes = b"", magic: int = REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + data


def replies(out: list[bytes]) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of each option reply in the server's output."""
    raw = b"".join(out)
    found = []
    while raw:
        magic, opt, kind, length = struct.unpack_from(">QIII", raw)
        assert magic == OPTION_REPLY_MAGIC
        found.append((opt, kind, raw[20:20 + length]))
        raw = raw[20 + length:]
    return found


def feed(server: NbdServer, data: bytes, *, bytewise: bool = False) -> list[object]:
    """Feed `data` (whole or one byte at a time) and collect every event until NEED_DATA."""
    events: list[object] = []
    for piece in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
        server.receive_data(piece)
        while True:
            event = server.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, ExportRequested) or server.closed:
                return events
    return events


def greeted(flags: int = 3) -> NbdServer:
    server = NbdServer(["disk", "other"])
    greeting = b"".join(server.data_to_send())
    assert struct.unpack(">QQH", greeting) == (NBDMAGIC, IHAVEOPT, 3)
    assert feed(server, struct.pack(">I", flags)) == []
    assert server.state is State.OPTIONS
    return server


def transmitting(export: Export = DISK) -> NbdServer:
    server = greeted()
    assert feed(server, option(Option.GO, go_data("disk"))) == [ExportRequested(Option.GO, "disk", ())]
    server.answer_export(export)
    server.data_to_send()
    assert server.state is State.TRANSMISSION
    return server


# ---- handshake ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bytewise", [False, True])
def test_go_sends_export_info_block_size_and_ack(bytewise: bool) -> None:
    server = greeted()
    events = feed(server, option(Option.GO, go_data("disk", Info.BLOCK_SIZE, Info.NAME)), bytewise=bytewise)
    assert events == [ExportRequested(Option.GO, "disk", (Info.BLOCK_SIZE, Info.NAME))]
    assert server.state is State.ANSWERING
    server.answer_export(DISK)
    got = replies(server.data_to_send())
    assert got[0] == (Option.GO, Reply.INFO, struct.pack(">HQH", Info.EXPORT, 1 << 20, RW))
    assert got[1] == (Option.GO, Reply.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 512, 4096, 32 << 20))
    assert got[2] == (Option.GO, Reply.INFO, struct.pack(">H", Info.NAME) + b"disk")
    assert got[3] == (Option.GO, Reply.ACK, b"")
    assert server.state is State.TRANSMISSION and server.export_name == "disk"


def test_info_answers_then_stays_in_option_haggling() -> None:
    server = greeted()
    feed(server, option(Option.INFO, go_data("disk")))
    server.answer_export(DISK)
    assert [kind for _, kind, _ in replies(server.data_to_send())] == [Reply.INFO, Reply.INFO, Reply.ACK]
    assert server.state is State.OPTIONS
    assert feed(server, option(Option.GO, go_data(""))) == [ExportRequested(Option.GO, "", ())]


def test_unknown_export_gets_err_unknown_and_haggling_goes_on() -> None:
    server = greeted()
    feed(server, option(Option.GO, go_data("nope")))
    server.answer_export(None, Reply.ERR_UNKNOWN, "no export named 'nope'")
    assert replies(server.data_to_send()) == [(Option.GO, Reply.ERR_UNKNOWN, b"no export named 'nope'")]
    assert server.state is State.OPTIONS


def test_export_name_success_sends_size_flags_and_zeroes_unless_no_zeroes() -> None:
    for flags, tail in ((1, bytes(124)), (3, b"")):
        server = greeted(flags)
        assert feed(server, option(Option.EXPORT_NAME, b"disk")) == [ExportRequested(Option.EXPORT_NAME, "disk")]
        server.answer_export(DISK)
        assert b"".join(server.data_to_send()) == struct.pack(">QH", 1 << 20, RW) + tail
        assert server.state is State.TRANSMISSION


def test_export_name_refused_closes_without_a_reply() -> None:
    server = greeted()
    feed(server, option(Option.EXPORT_NAME, b"nope"))
    server.answer_export(None)
    assert server.data_to_send() == [] and server.closed


def test_list_reports_every_export_then_ack() -> None:
    server = greeted()
    assert feed(server, option(Option.LIST)) == []
    assert replies(server.data_to_send()) == [(Option.LIST, Reply.SERVER, b"\0\0\0\x04disk"),
                                              (Option.LIST, Reply.SERVER, b"\0\0\0\x05other"),
                                              (Option.LIST, Reply.ACK, b"")]


def test_list_with_data_is_invalid() -> None:
    server = greeted()
    feed(server, option(Option.LIST, b"x"))
    assert [kind for _, kind, _ in replies(server.data_to_send())] == [Reply.ERR_INVALID]


@pytest.mark.parametrize("opt", [Option.STRUCTURED_REPLY, Option.STARTTLS, Option.SET_META_CONTEXT,
                                 Option.EXTENDED_HEADERS, 999])
def test_unsupported_options_get_err_unsup(opt: int) -> None:
    server = greeted()
    assert feed(server, option(opt, b"")) == []
    assert [(o, kind) for o, kind, _ in replies(server.data_to_send())] == [(opt, Reply.ERR_UNSUP)]
    assert server.state is State.OPTIONS


@pytest.mark.parametrize("data", [b"", b"\0\0\0\x09disk\0\0", go_data("disk") + b"\0", go_data("disk", 3)[:-1],
                                  b"\0\0\0\x02\xff\xfe\0\0"])
def test_malformed_go_is_err_invalid(data: bytes) -> None:
    server = greeted()
    assert feed(server, option(Option.GO, data)) == []
    assert [kind for _, kind, _ in replies(server.data_to_send())] == [Reply.ERR_INVALID]


def test_abort_is_acknowledged_and_closes() -> None:
    server = greeted()
    assert feed(server, option(Option.ABORT)) == [Aborted()]
    assert replies(server.data_to_send()) == [(Option.ABORT, Reply.ACK, b"")]
    assert server.closed


def test_unknown_client_flags_and_bad_option_magic_are_fatal() -> None:
    server = NbdServer()
    server.receive_data(struct.pack(">I", 1 << 20 | 1))
    with pytest.raises(NbdProtocolError):
        server.next_event()
    assert server.closed
    server = greeted()
    server.receive_data(struct.pack(">QII", 0x1234, Option.LIST, 0))
    with pytest.raises(NbdProtocolError):
        server.next_event()


def test_answer_without_a_request_is_a_caller_bug() -> None:
    with pytest.raises(RuntimeError):
        greeted().answer_export(DISK)


# ---- transmission ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bytewise", [False, True])
def test_write_request_carries_its_payload_and_trailing_bytes_wait(bytewise: bool) -> None:
    server = transmitting()
    data = bytes(range(256)) * 4
    events = feed(server, request(Cmd.WRITE, 1024, 1024, flags=CmdFlag.FUA, handle=0xABCDEF, data=data)
                  + request(Cmd.READ, 0, 512)[:10], bytewise=bytewise)
    assert events == [Request(Cmd.WRITE, CmdFlag.FUA, 0xABCDEF, 1024, 1024, data, 0)]
    assert feed(server, request(Cmd.READ, 0, 512)[10:]) == [Request(Cmd.READ, 0, 7, 0, 512, b"", 0)]


def test_disc_ends_the_request_stream() -> None:
    server = transmitting()
    assert feed(server, request(Cmd.FLUSH) + request(Cmd.DISC) + request(Cmd.READ, 0, 512)) == [
        Request(Cmd.FLUSH, 0, 7, 0, 0, b"", 0), Disconnect()]
    assert server.closed


def test_bad_request_magic_is_fatal() -> None:
    server = transmitting()
    server.receive_data(request(Cmd.READ, 0, 512, magic=0x25609514))
    with pytest.raises(NbdProtocolError):
        server.next_event()
    assert server.closed


def test_write_over_maximum_payload_is_fatal() -> None:
    server = transmitting(Export(size=1 << 30, flags=int(RW), minimum_block=512, maximum_payload=1 << 20))
    server.receive_data(request(Cmd.WRITE, 0, 2 << 20))
    with pytest.raises(NbdProtocolError):
        server.next_event()


@pytest.mark.parametrize("cmd, offset, length, flags, error", [
    (Cmd.READ, 0, 512, 0, Errno.OK),
    (Cmd.READ, (1 << 20) - 512, 1024, 0, Errno.EINVAL),          # read beyond the end
    (Cmd.WRITE, (1 << 20) - 512, 1024, 0, Errno.ENOSPC),         # write beyond the end
    (Cmd.WRITE_ZEROES, 1 << 20, 512, 0, Errno.ENOSPC),
    (Cmd.READ, 100, 512, 0, Errno.EINVAL),                       # unaligned offset
    (Cmd.READ, 0, 100, 0, Errno.EINVAL),                         # unaligned length
    (Cmd.READ, 0, 512, CmdFlag.DF, Errno.EINVAL),                # DF needs structured replies
    (Cmd.READ, 0, 512, 1 << 9, Errno.EINVAL),                    # a flag nobody defined
    (Cmd.WRITE_ZEROES, 0, 512, CmdFlag.NO_HOLE | CmdFlag.FUA, Errno.OK),
    (Cmd.WRITE, 0, 512, CmdFlag.NO_HOLE, Errno.EINVAL),          # NO_HOLE belongs to WRITE_ZEROES
    (Cmd.FLUSH, 0, 512, 0, Errno.EINVAL),                        # FLUSH offset/length must be 0
    (Cmd.TRIM, 0, 512, 0, Errno.EINVAL),                         # TRIM not advertised
    (Cmd.CACHE, 0, 512, 0, Errno.EINVAL),                        # unknown to us
    (Cmd.BLOCK_STATUS, 0, 512, 0, Errno.EINVAL),
])
def test_request_validation(cmd: int, offset: int, length: int, flags: int, error: int) -> None:
    server = transmitting()
    [event] = feed(server, request(cmd, offset, length, flags=flags,
                                   data=bytes(length) if cmd == Cmd.WRITE else b""))
    assert isinstance(event, Request) and event.error == error


def test_read_only_export_refuses_writes_with_eperm() -> None:
    server = transmitting(Export(size=1 << 20, flags=int(RW | TransmissionFlag.READ_ONLY
                                                         | TransmissionFlag.SEND_TRIM), minimum_block=512))
    events = feed(server, request(Cmd.WRITE, 0, 512, data=bytes(512)) + request(Cmd.TRIM, 0, 512)
                  + request(Cmd.WRITE_ZEROES, 0, 512) + request(Cmd.READ, 0, 512))
    assert [e.error for e in events] == [Errno.EPERM, Errno.EPERM, Errno.EPERM, Errno.OK]  # type: ignore[attr-defined]


def test_simple_reply_encoding() -> None:
    assert encode_reply(0x1122, 0, b"data") == [struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 0x1122), b"data"]
    assert encode_reply(0x1122, Errno.EIO, b"data") == [struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 5, 0x1122)]


# ---- SCSI mapping -------------------------------------------------------------------------------------------

def check(key: int, asc: int) -> Response:
    return Response(Status.CHECK_CONDITION, build_sense(key, asc))


@pytest.mark.parametrize("response, cmd, error", [
    (Response(Status.GOOD), Cmd.WRITE, Errno.OK),
    (check(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED), Cmd.WRITE, Errno.EPERM),
    (Response(Status.RESERVATION_CONFLICT), Cmd.WRITE, Errno.EPERM),
    (check(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE), Cmd.WRITE, Errno.ENOSPC),
    (check(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE), Cmd.READ, Errno.EINVAL),
    (check(SenseKey.MEDIUM_ERROR, 0x1100), Cmd.READ, Errno.EIO),
    (check(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT), Cmd.READ, Errno.EIO),
    (Response(Status.TASK_SET_FULL), Cmd.READ, Errno.EIO),
])
def test_scsi_results_map_to_nbd_errors(response: Response, cmd: int, error: int) -> None:
    assert scsi_map.nbd_error(response, cmd) == error


def test_unit_attention_is_retried_at_once_and_transients_later() -> None:
    assert scsi_map.retry_delay(check(SenseKey.UNIT_ATTENTION, Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET), 0) == 0.0
    assert scsi_map.retry_delay(Response(Status.BUSY), 2) == pytest.approx(0.04)
    assert scsi_map.retry_delay(check(SenseKey.ABORTED_COMMAND, Asc.LOGICAL_UNIT_COMMUNICATION_FAILURE), 0) > 0
    assert scsi_map.retry_delay(check(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED), 0) is None
    assert scsi_map.retry_delay(Response(Status.GOOD), 0) is None


def test_geometry_from_read_capacity_and_block_limits() -> None:
    capacity = struct.pack(">QIBBH", 2047, 4096, 0, 0, 0xC000) + bytes(16)
    geometry = scsi_map.parse_capacity(capacity)
    assert (geometry.size, geometry.thin, geometry.zeroes_unmapped) == (2048 * 4096, True, True)
    page = struct.pack(">BBH", 0, 0xB0, 0x3C) + struct.pack(">BBHIIIIIIIQ", 0, 0, 8, 256, 0, 0, 1024, 16, 0, 0,
                                                             512) + bytes(20)
    limited = scsi_map.with_block_limits(geometry, page)
    assert (limited.transfer_blocks, limited.write_same_blocks, limited.can_trim) == (256, 512, True)
    assert list(scsi_map.chunks(10, 600, 256)) == [(10, 256), (266, 256), (522, 88)]
    with pytest.raises(ValueError):
        scsi_map.parse_capacity(bytes(8))


def test_cdbs() -> None:
    assert scsi_map.write16(0x0102030405, 8, fua=True) == bytes([0x8A, 0x08, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 8,
                                                                 0, 0])
    assert scsi_map.read16(1, 2)[0] == 0x88 and len(scsi_map.read16(1, 2)) == 16
    cdb, params = scsi_map.unmap([(5, 7)])
    assert cdb[0] == 0x42 and int.from_bytes(cdb[7:9], "big") == len(params) == 24
    assert params[:4] == struct.pack(">HH", 22, 16) and params[8:20] == struct.pack(">QI", 5, 7)
