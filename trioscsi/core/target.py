"""A SCSI target device as transports see it: a LUN map, the commands that belong to the target rather
than to one LU (REPORT LUNS, anything addressed to an unmapped LUN), and task management.

The core knows nothing of iSCSI: a transport hands it a `Command` on a `Nexus` and gets a `Response`.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Mapping

from ..scsi.opcodes import DeviceType, lookup
from ..scsi.sense import Asc, CheckCondition, SenseKey, Status, build_sense
from .access import AccessControl, LunMapping
from .lu import LogicalUnit, Task, TaskAborted
from .nexus import Command, Nexus, Response, TaskAttribute, TmfFunction, TmfResponse, encode_lun

log = logging.getLogger("trioscsi.core")

INQUIRY, REQUEST_SENSE, REPORT_LUNS = 0x12, 0x03, 0xA0


class ScsiTarget:
    def __init__(self, name: str, access: AccessControl | Mapping[int, LogicalUnit]) -> None:
        self.name = name
        if not isinstance(access, AccessControl):
            access = AccessControl({n: LunMapping(lu) for n, lu in access.items()})
        self.access = access

    @property
    def logical_units(self) -> list[LogicalUnit]:
        return self.access.logical_units()

    def may_use(self, initiator_name: str, address: str) -> bool:
        return self.access.resolve(initiator_name, address)[1] is not None

    def lun_map(self, nexus: Nexus) -> Mapping[int, LunMapping]:
        """The LUNs this nexus may see, from its initiator group (or the default map)."""
        return self.access.resolve(nexus.initiator_name, nexus.initiator_address)[1] or {}

    async def execute(self, cmd: Command) -> Response:
        """Run one command through the pipeline; raises TaskAborted when task management ended it."""
        try:
            if cmd.cdb[-1] & 0x04 and len(cmd.cdb) >= 6:   # NACA: we do not support ACA
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB,
                                     field=(len(cmd.cdb) - 1, 2))
            luns = self.lun_map(cmd.nexus)
            mapping = luns.get(cmd.lun)
            if mapping is not None and cmd.cdb[0] != REPORT_LUNS:
                return await mapping.lu.execute(cmd, read_only=mapping.read_only)
            if cmd.cdb[0] == REPORT_LUNS:
                if mapping is not None:
                    mapping.lu.unit_attentions.clear(cmd.nexus, Asc.REPORTED_LUNS_DATA_HAS_CHANGED)
                response = self._report_luns(cmd, luns)
            else:
                response = self._missing_lun(cmd)
        except CheckCondition as cc:
            response = Response(Status.CHECK_CONDITION, cc.sense())
        response.wanted = _spc_wanted(cmd.cdb)        # answered here: INQUIRY, REQUEST SENSE, REPORT LUNS
        return response

    def _report_luns(self, cmd: Command, luns: Mapping[int, LunMapping]) -> Response:
        select = cmd.cdb[2]
        if select not in (0x00, 0x02, 0x10, 0x11, 0x12):
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=(2, None))
        alloc = struct.unpack_from(">I", cmd.cdb, 6)[0]
        if alloc < 16:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=(6, None))
        numbers = sorted(luns) if select in (0x00, 0x02, 0x11) else []
        body = b"".join(encode_lun(n) for n in numbers)
        data = struct.pack(">I4x", len(body)) + body
        return Response(Status.GOOD, data=data[:min(alloc, cmd.xfer)])

    def _missing_lun(self, cmd: Command) -> Response:
        """SPC-4 6.6: INQUIRY to a LUN that is not there answers peripheral qualifier 3."""
        op = cmd.cdb[0]
        if op == INQUIRY:
            if cmd.cdb[1] & 0x01:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
            data = bytearray(36)
            data[0] = (0x3 << 5) | DeviceType.NO_DEVICE
            data[2] = 0x06
            data[3] = 0x02
            data[4] = 31
            data[8:16] = b"TRIOSCSI"
            data[16:32] = b"NO LUN".ljust(16)
            alloc = struct.unpack_from(">H", cmd.cdb, 3)[0]
            return Response(Status.GOOD, data=bytes(data[:min(alloc, cmd.xfer)]))
        if op == REQUEST_SENSE:
            sense = build_sense(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
            return Response(Status.GOOD, data=sense[:min(cmd.cdb[4], cmd.xfer)])
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)

    # ---- task management (SAM-5 7) --------------------------------------------------------------------------

    def admit(self, nexus: Nexus, lun: int, tag: int, attr: int = TaskAttribute.SIMPLE) -> Task | None:
        """Enter a command into its LU's task set when it is delivered (in CmdSN order), so task management
        sees exactly the commands that preceded it and task attributes order it; None when the LUN is not
        mapped."""
        mapping = self.lun_map(nexus).get(lun)
        return mapping.lu.admit(nexus, tag, attr) if mapping is not None else None

    def release(self, nexus: Nexus, lun: int, task: Task) -> None:
        mapping = self.lun_map(nexus).get(lun)
        lu = mapping.lu if mapping is not None else None
        if lu is not None:
            lu.release(task)
        else:
            task.finish()

    async def task_management(self, nexus: Nexus, function: int, lun: int, ref_tag: int) -> TmfResponse:
        """Perform a task management function; returns only when every affected command has ended."""
        return await self.plan_task_management(nexus, function, lun, ref_tag)()

    def plan_task_management(self, nexus: Nexus, function: int, lun: int, ref_tag: int
                             ) -> Callable[[], Awaitable[TmfResponse]]:
        """Choose the affected tasks now (at delivery), and return what performs the function.

        The victims are fixed synchronously so that a command ordered after the TMF is never aborted by it."""
        luns = self.lun_map(nexus)

        def answer(response: TmfResponse) -> Callable[[], Awaitable[TmfResponse]]:
            async def done() -> TmfResponse:
                return response
            return done

        if function in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            plans = [(m.lu, list(m.lu.tasks)) for m in luns.values()]

            async def reset_target() -> TmfResponse:
                for lu, victims in plans:
                    await lu.reset(victims)
                return TmfResponse.FUNCTION_COMPLETE
            return reset_target
        if function == TmfFunction.TASK_REASSIGN:
            return answer(TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
        if function not in (TmfFunction.ABORT_TASK, TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                            TmfFunction.LOGICAL_UNIT_RESET, TmfFunction.CLEAR_ACA):
            return answer(TmfResponse.FUNCTION_NOT_SUPPORTED)
        mapping = luns.get(lun)
        if mapping is None:
            return answer(TmfResponse.LUN_DOES_NOT_EXIST)
        lu = mapping.lu
        if function == TmfFunction.ABORT_TASK:
            victims = lu.find(nexus, ref_tag)
            if not victims:
                return answer(TmfResponse.TASK_DOES_NOT_EXIST)
        elif function == TmfFunction.ABORT_TASK_SET:
            victims = lu.find(nexus)
        elif function in (TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET):
            victims = list(lu.tasks)
        else:
            victims = []
        others = {t.nexus for t in victims if t.nexus != nexus}

        async def perform() -> TmfResponse:
            if function == TmfFunction.LOGICAL_UNIT_RESET:
                await lu.reset(victims)
                return TmfResponse.FUNCTION_COMPLETE
            await lu.abort(victims)
            if function == TmfFunction.CLEAR_TASK_SET:
                for other in others:
                    lu.unit_attentions.raise_for(other, Asc.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR)
            return TmfResponse.FUNCTION_COMPLETE
        return perform

    def nexus_lost(self, nexus: Nexus) -> None:
        for lu in self.logical_units:
            lu.nexus_lost(nexus)


def _spc_wanted(cdb: bytes) -> int | None:
    """The allocation length of a command the target answers itself (SPC commands every device type shares)."""
    spec = lookup(DeviceType.NO_DEVICE, cdb[0])
    try:
        return spec.length(cdb, 512) if spec.length is not None else None
    except (IndexError, ValueError):
        return None


__all__ = ["ScsiTarget", "TmfFunction", "TaskAborted"]
