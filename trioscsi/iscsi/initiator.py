"""A small iSCSI initiator over the same sans-I/O codec: the project's own test client.

It logs in, sends SCSI commands (with immediate data, unsolicited Data-Out and R2T-driven Data-Out),
NOP-Outs, task management and logout, and returns every answer with its sense data intact, which is what
tests of the target's error paths need.  One request at a time per call, many calls may run concurrently.
"""
from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from .framing import NEED_DATA, PduReader, encode_pdu
from .negotiation import encode_text, parse_text
from .pdu import RESERVED_TAG, R2T, DataIn, DataOut, LoginRequest, LoginResponse, LogoutRequest, \
    LogoutResponse, NopIn, NopOut, Reject, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, \
    TextRequest, TextResponse


class LoginRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"login refused with status 0x{status:04x}")
        self.status = status


@dataclass
class ScsiResult:
    status: int
    data: bytes = b""
    sense: bytes = b""
    residual: int = 0
    underflow: bool = False
    overflow: bool = False

    @property
    def sense_key(self) -> int:
        if not self.sense:
            return 0
        return self.sense[1] & 0xF if self.sense[0] & 0x7F in (0x72, 0x73) else self.sense[2] & 0xF

    @property
    def asc(self) -> int:
        if not self.sense:
            return 0
        if self.sense[0] & 0x7F in (0x72, 0x73):
            return self.sense[2] << 8 | self.sense[3]
        return self.sense[12] << 8 | self.sense[13]


@dataclass
class _Waiter:
    event: trio.Event = field(default_factory=trio.Event)
    pdus: list[Any] = field(default_factory=list)
    r2ts: trio.MemorySendChannel[R2T] | None = None


class Initiator:
    def __init__(self, stream: trio.abc.Stream, *, name: str = "iqn.2026-11.org.trioscsi:test-initiator",
                 isid: bytes = b"\x80\x00\x00\x00\x00\x01") -> None:
        self.stream = stream
        self.name = name
        self.isid = isid
        self.reader = PduReader(max_recv_data_segment_length=1 << 24)
        self.cmdsn = 1
        self.expstatsn = 0
        self.tsih = 0
        self.params: dict[str, str] = {}
        self.max_send_segment = 8192
        self._itts = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self.rejects: list[Reject] = []
        self.async_pdus: list[Any] = []
        self.closed = trio.Event()          # set when the target closed the connection

    @classmethod
    async def connect(cls, host: str, port: int, **kwargs: Any) -> Initiator:
        return cls(await trio.open_tcp_stream(host, port), **kwargs)

    async def send(self, pdu: Any) -> None:
        async with self._send_lock:
            for buf in encode_pdu(pdu):
                await self.stream.send_all(buf)

    async def receive(self) -> Any:
        while True:
            pdu = self.reader.next_pdu()
            if pdu is not NEED_DATA:
                return pdu
            chunk = await self.stream.receive_some(1 << 18)
            if not chunk:
                raise EOFError("target closed the connection")
            self.reader.feed(chunk)

    # ---- login -------------------------------------------------------------------------------------------------

    async def login(self, target: str | None, *, keys: dict[str, str] | None = None,
                    discovery: bool = False) -> dict[str, str]:
        offer = {"InitiatorName": self.name, "SessionType": "Discovery" if discovery else "Normal",
                 "AuthMethod": "None"}
        if target:
            offer["TargetName"] = target
        operational = {"HeaderDigest": "None", "DataDigest": "None", "MaxRecvDataSegmentLength": "262144"}
        if not discovery:
            operational.update({"InitialR2T": "No", "ImmediateData": "Yes", "MaxBurstLength": "262144",
                                "FirstBurstLength": "65536", "MaxOutstandingR2T": "1",
                                "ErrorRecoveryLevel": "0", "MaxConnections": "1"})
        operational.update(keys or {})
        itt = next(self._itts)
        answer = await self._login_step(itt, 0, 1, offer)
        stage = answer.nsg if answer.transit else 0
        while stage != 3:
            response = await self._login_step(itt, 1, 3, operational)
            operational = {}
            stage = response.nsg if response.transit else 1
        self.max_send_segment = int(self.params.get("MaxRecvDataSegmentLength", "8192"))
        self.nursery_started = True
        return self.params

    async def _login_step(self, itt: int, csg: int, nsg: int, keys: dict[str, str]) -> LoginResponse:
        await self.send(LoginRequest(transit=True, cont=False, csg=csg, nsg=nsg, version_max=0, version_min=0,
                                     isid=self.isid, tsih=self.tsih, itt=itt, cid=0, cmdsn=self.cmdsn,
                                     expstatsn=self.expstatsn, data=encode_text(keys.items())))
        response = await self.receive()
        assert isinstance(response, LoginResponse), response
        status = response.status_class << 8 | response.status_detail
        if status:
            raise LoginRefused(status)
        self.expstatsn = (response.statsn + 1) & 0xFFFFFFFF
        self.tsih = response.tsih
        self.params.update(dict(parse_text(response.data)))
        return response

    # ---- full feature phase -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch received PDUs to waiting requests; run this in a nursery after login."""
        task_status.started()
        while True:
            try:
                pdu = await self.receive()
            except (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                for waiter in self._waiters.values():
                    waiter.event.set()
                self.closed.set()
                return
            statsn = getattr(pdu, "statsn", None)
            if statsn is not None and not (isinstance(pdu, DataIn) and not pdu.status_present) \
                    and not isinstance(pdu, R2T) and not (isinstance(pdu, NopIn) and pdu.itt == RESERVED_TAG):
                self.expstatsn = (statsn + 1) & 0xFFFFFFFF
            if isinstance(pdu, Reject):
                self.rejects.append(pdu)
                itt = struct.unpack_from(">I", pdu.data, 16)[0] if len(pdu.data) >= 20 else None
                waiter = self._waiters.get(itt) if itt is not None else None
                if waiter is not None:
                    waiter.pdus.append(pdu)
                    waiter.event.set()
                continue
            if isinstance(pdu, NopIn) and pdu.itt == RESERVED_TAG:
                await self.send(NopOut(immediate=True, lun=pdu.lun, itt=RESERVED_TAG, ttt=pdu.ttt,
                                       cmdsn=self.cmdsn, expstatsn=self.expstatsn))
                continue
            waiter = self._waiters.get(pdu.itt)
            if waiter is None:
                self.async_pdus.append(pdu)
                continue
            if isinstance(pdu, R2T):
                assert waiter.r2ts is not None
                waiter.r2ts.send_nowait(pdu)
                continue
            waiter.pdus.append(pdu)
            if not isinstance(pdu, DataIn) or pdu.status_present or \
                    (isinstance(pdu, TextResponse) and not pdu.cont):
                waiter.event.set()
            if isinstance(pdu, TextResponse):
                waiter.event.set()

    def _next_cmdsn(self, immediate: bool) -> int:
        cmdsn = self.cmdsn
        if not immediate:
            self.cmdsn = (cmdsn + 1) & 0xFFFFFFFF
        return cmdsn

    async def _request(self, build: Any, *, r2t: bool = False) -> tuple[int, _Waiter]:
        itt = next(self._itts)
        waiter = self._waiters[itt] = _Waiter()
        if r2t:
            waiter.r2ts, receive = trio.open_memory_channel[R2T](64)
            waiter.r2t_receive = receive  # type: ignore[attr-defined]
        await self.send(build(itt))
        return itt, waiter

    async def scsi(self, cdb: bytes, *, lun: int = 0, read: int = 0, write: bytes = b"",
                   immediate_data: int | None = None, edtl: int | None = None, attr: int = 1) -> ScsiResult:
        """Send one CDB; `read` is the data-in length accepted, `write` the data-out, `attr` the iSCSI ATTR field
        (RFC 7143 numbering: 1 simple, 2 ordered, 3 head of queue)."""
        edtl = edtl if edtl is not None else (read or len(write))
        first = write[:immediate_data if immediate_data is not None else min(len(write), 65536)]
        lun_field = struct.unpack(">Q", struct.pack(">BB6x", 0, lun) if lun < 256 else
                                  struct.pack(">BB6x", 0x40 | lun >> 8, lun & 0xFF))[0]
        cmdsn = self._next_cmdsn(False)
        itt, waiter = await self._request(lambda itt: ScsiCommand(
            immediate=False, final=len(first) >= len(write) or immediate_data is not None,
            read=bool(read), write=bool(write), attr=attr, lun=lun_field, itt=itt, edtl=edtl, cmdsn=cmdsn,
            expstatsn=self.expstatsn, cdb=cdb.ljust(16, b"\0"), data=first), r2t=bool(write))
        if write:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_r2ts, waiter, lun_field, itt, write)
                await waiter.event.wait()
                nursery.cancel_scope.cancel()
        else:
            await waiter.event.wait()
        del self._waiters[itt]
        if not waiter.pdus:
            raise EOFError("the target closed the connection")
        return self._result(waiter.pdus)

    async def _serve_r2ts(self, waiter: _Waiter, lun: int, itt: int, data: bytes) -> None:
        async for r2t in waiter.r2t_receive:  # type: ignore[attr-defined]
            offset, end = r2t.buffer_offset, r2t.buffer_offset + r2t.desired_length
            for datasn, start in enumerate(range(offset, end, self.max_send_segment)):
                stop = min(start + self.max_send_segment, end)
                await self.send(DataOut(final=stop == end, lun=lun, itt=itt, ttt=r2t.ttt,
                                        expstatsn=self.expstatsn, datasn=datasn, buffer_offset=start,
                                        data=data[start:stop]))

    def _result(self, pdus: list[Any]) -> ScsiResult:
        data = bytearray()
        for pdu in pdus:
            if isinstance(pdu, DataIn):
                data[pdu.buffer_offset:pdu.buffer_offset + len(pdu.data)] = pdu.data
        last = pdus[-1] if pdus else None
        if isinstance(last, Reject):
            raise RuntimeError(f"command rejected with reason 0x{last.reason:02x}")
        if isinstance(last, DataIn):
            return ScsiResult(last.status, bytes(data), b"", last.residual, last.underflow, last.overflow)
        assert isinstance(last, ScsiResponse), last
        sense = b""
        if len(last.data) >= 2:
            length = struct.unpack_from(">H", last.data)[0]
            sense = bytes(last.data[2:2 + length])
        return ScsiResult(last.status, bytes(data), sense, last.residual, last.underflow, last.overflow)

    async def nop(self, data: bytes = b"") -> bytes:
        cmdsn = self._next_cmdsn(True)
        itt, waiter = await self._request(lambda itt: NopOut(immediate=True, lun=0, itt=itt, ttt=RESERVED_TAG,
                                                             cmdsn=cmdsn, expstatsn=self.expstatsn, data=data))
        await waiter.event.wait()
        del self._waiters[itt]
        reply = waiter.pdus[-1]
        assert isinstance(reply, NopIn), reply
        return bytes(reply.data)

    async def task_management(self, function: int, *, lun: int = 0, rtt: int = RESERVED_TAG) -> int:
        cmdsn = self._next_cmdsn(True)
        itt, waiter = await self._request(lambda itt: TaskMgmtRequest(
            immediate=True, function=function, lun=lun << 48, itt=itt, rtt=rtt, cmdsn=cmdsn,
            expstatsn=self.expstatsn, refcmdsn=0, expdatasn=0))
        await waiter.event.wait()
        del self._waiters[itt]
        reply = waiter.pdus[-1]
        assert isinstance(reply, TaskMgmtResponse), reply
        return reply.response

    async def text(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        body = bytearray()
        ttt = RESERVED_TAG
        data = encode_text(keys.items())
        while True:
            cmdsn = self._next_cmdsn(False)
            itt, waiter = await self._request(lambda itt: TextRequest(
                immediate=False, final=True, cont=False, lun=0, itt=itt, ttt=ttt, cmdsn=cmdsn,
                expstatsn=self.expstatsn, data=data))
            await waiter.event.wait()
            del self._waiters[itt]
            reply = waiter.pdus[-1]
            assert isinstance(reply, TextResponse), reply
            body += reply.data
            if not reply.cont:
                return parse_text(bytes(body))
            ttt, data = reply.ttt, b""

    async def logout(self, reason: int = 0) -> int:
        cmdsn = self._next_cmdsn(True)
        itt, waiter = await self._request(lambda itt: LogoutRequest(immediate=True, reason=reason, itt=itt,
                                                                    cid=0, cmdsn=cmdsn,
                                                                    expstatsn=self.expstatsn))
        await waiter.event.wait()
        del self._waiters[itt]
        reply = waiter.pdus[-1]
        assert isinstance(reply, LogoutResponse), reply
        return reply.response
