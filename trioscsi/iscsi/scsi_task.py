"""One SCSI command on an iSCSI connection: gathering its Data-Out, and cutting its answer into PDUs.

Strategy: the connection's reader hands every Data-Out PDU to the task that owns its ITT
(`IscsiTask.on_data_out`, synchronous: the data is copied once, into the task's preallocated buffer at the
PDU's buffer offset).  The task itself runs in the session's nursery: `gather()` waits for immediate and
unsolicited data, then asks for the rest with R2Ts no longer than MaxBurstLength, one outstanding at a time.
`response_pdus()` turns the core's `Response` into Data-In PDUs (no larger than the initiator's
MaxRecvDataSegmentLength, memoryview slices of the emulator's buffer, never copies) with the status in the
last one when it is GOOD (phase collapse), or a SCSI Response PDU carrying sense.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from ..core.nexus import Response
from ..scsi.sense import Asc, CheckCondition, SenseKey
from .pdu import R2T, RESERVED_TAG, DataIn, DataOut, PduError, RejectReason, ScsiCommand, ScsiResponse, \
    sense_segment


@dataclass(eq=False)
class IscsiTask:
    command: ScsiCommand
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0          # bytes of data-out received so far (immediate data included)
    burst_goal: int = 0        # `received` at which the current burst (unsolicited or R2T) is complete
    burst_done: trio.Event = field(default_factory=trio.Event)
    ttt: int = RESERVED_TAG    # the TTT of the outstanding R2T, or RESERVED_TAG for unsolicited data
    next_datasn: int = 0
    error: CheckCondition | None = None
    core: Any = None           # the core's Task once delivered (core.lu.Task): aborting cancels its scope

    @property
    def itt(self) -> int:
        return self.command.itt

    # ---- data-out ---------------------------------------------------------------------------------------

    def start_data_out(self, first_burst_length: int, initial_r2t: bool, limit: int = 1 << 62) -> None:
        """Take the immediate data and decide how much unsolicited Data-Out to wait for.

        A transfer beyond `limit` is refused before anything is allocated (the initiator chooses EDTL)."""
        cmd = self.command
        edtl = cmd.edtl
        if edtl > limit:
            self.error = CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
            self.burst_done.set()
            return
        self.buffer = bytearray(edtl)
        immediate = len(cmd.data)
        if immediate > edtl:
            immediate = edtl
        if immediate:
            self.buffer[:immediate] = memoryview(cmd.data)[:immediate] if not isinstance(cmd.data, bytes) \
                else cmd.data[:immediate]
        self.received = immediate
        unsolicited = 0 if initial_r2t or cmd.final else min(first_burst_length, edtl) - immediate
        self.burst_goal = self.received + max(unsolicited, 0)
        if self.received >= self.burst_goal:
            self.burst_done.set()

    def on_data_out(self, pdu: DataOut) -> None:
        """Place one Data-Out PDU; raises PduError for data the initiator had no right to send."""
        if self.error is not None:
            return                      # the command was refused; its unsolicited data is discarded
        if pdu.ttt != self.ttt:
            raise PduError(RejectReason.INVALID_PDU_FIELD, "Data-Out with a TTT that was not solicited")
        if pdu.datasn != self.next_datasn:
            raise PduError(RejectReason.PROTOCOL_ERROR,
                           f"DataSN {pdu.datasn}, expected {self.next_datasn}")
        length = len(pdu.data)
        end = pdu.buffer_offset + length
        if end > len(self.buffer) or pdu.buffer_offset != self.received:
            raise PduError(RejectReason.PROTOCOL_ERROR, "Data-Out outside the expected range")
        if length:
            self.buffer[pdu.buffer_offset:end] = pdu.data
        self.received = end
        self.next_datasn += 1
        if pdu.final or self.received >= self.burst_goal:
            self.burst_done.set()

    def r2t(self, ttt: int, r2tsn: int, max_burst_length: int) -> R2T | None:
        """The next R2T (statsn/expcmdsn/maxcmdsn are filled in by the connection), or None when complete."""
        remaining = len(self.buffer) - self.received
        if remaining <= 0:
            return None
        length = min(remaining, max_burst_length)
        self.ttt = ttt
        self.next_datasn = 0
        self.burst_goal = self.received + length
        self.burst_done = trio.Event()
        return R2T(lun=self.command.lun, itt=self.itt, ttt=ttt, r2tsn=r2tsn, buffer_offset=self.received,
                   desired_length=length)

    # ---- the answer ---------------------------------------------------------------------------------------

    def response_pdus(self, response: Response, *, max_data_segment: int, wanted: int | None,
                      stamp: "StatusStamp") -> list[DataIn | ScsiResponse]:
        """Data-In PDUs and/or a SCSI Response for this command's result."""
        cmd = self.command
        data = response.data if cmd.read else b""
        length = len(data)
        edtl = cmd.edtl
        underflow = overflow = False
        residual = 0
        if wanted is not None and wanted > edtl:
            overflow, residual = True, min(wanted - edtl, 0xFFFFFFFF)
        elif cmd.read and length < edtl:
            underflow, residual = True, edtl - length
        elif cmd.write and not cmd.read and self.received < edtl:
            underflow, residual = True, edtl - self.received
        elif cmd.write and wanted is not None and wanted < edtl:
            underflow, residual = True, edtl - wanted
        collapse = response.status == 0 and length > 0 and not response.sense
        pdus: list[DataIn | ScsiResponse] = []
        view = memoryview(data) if length else None
        datasn = 0
        for offset in range(0, length, max_data_segment):
            assert view is not None
            last = offset + max_data_segment >= length
            if last and collapse:
                statsn, expcmdsn, maxcmdsn = stamp.status()
                pdus.append(DataIn(final=True, status_present=True, status=0, overflow=overflow,
                                   underflow=underflow, lun=0, itt=cmd.itt, ttt=RESERVED_TAG, statsn=statsn,
                                   expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, datasn=datasn, buffer_offset=offset,
                                   residual=residual, data=view[offset:offset + max_data_segment]))
            else:
                expcmdsn, maxcmdsn = stamp.window()
                pdus.append(DataIn(final=last, lun=0, itt=cmd.itt, ttt=RESERVED_TAG, expcmdsn=expcmdsn,
                                   maxcmdsn=maxcmdsn, datasn=datasn, buffer_offset=offset,
                                   data=view[offset:offset + max_data_segment]))
            datasn += 1
        if not collapse:
            statsn, expcmdsn, maxcmdsn = stamp.status()
            pdus.append(ScsiResponse(overflow=overflow, underflow=underflow, response=0,
                                     status=response.status, itt=cmd.itt, statsn=statsn, expcmdsn=expcmdsn,
                                     maxcmdsn=maxcmdsn, expdatasn=datasn, residual=residual,
                                     data=sense_segment(response.sense) if response.sense else b""))
        return pdus


class StatusStamp:
    """What a response PDU needs from its connection and session: StatSN, ExpCmdSN, MaxCmdSN."""

    def status(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def window(self) -> tuple[int, int]:
        raise NotImplementedError


def invalid_data_out() -> CheckCondition:
    return CheckCondition(SenseKey.ABORTED_COMMAND, Asc.DATA_PHASE_ERROR)
