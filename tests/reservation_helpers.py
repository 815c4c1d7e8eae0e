"""Shared by the reservation tests (test_reservations*.py): nexuses A-D (and A2, A through a second target
port), keys, reservation types and ASCs by name, PERSISTENT RESERVE OUT/IN CDB and parameter list builders,
`status` (GOOD, CONFLICT or the CHECK CONDITION of a call), `summary` of a Reservations state, the unit
attentions of an Effects, and `reserved(ptype)`, the usual set-up."""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from trioscsi.core.nexus import Nexus
from trioscsi.core.pr_state import iscsi_transport_id
from trioscsi.core.reservations import Conflict, Effects, Reservations
from trioscsi.scsi.sense import CheckCondition, SenseKey, Status

T = "iqn.2026-11.org.trioscsi:t"


def nexus(name: str, isid: int, rel: int = 1) -> Nexus:
    iqn = f"iqn.x:{name}"
    return Nexus(f"{iqn},i,0x{isid:012x}", f"{T},t,0x{rel:04x}", iqn, rel)


A, B, C, D = nexus("a", 1), nexus("b", 2), nexus("c", 3), nexus("d", 4)
A2 = nexus("a", 1, rel=2)                       # A's initiator port through a second target port
NAMES = {"iqn.x:a,i,0x000000000001": "A", "iqn.x:b,i,0x000000000002": "B", "iqn.x:c,i,0x000000000003": "C",
         "iqn.x:d,i,0x000000000004": "D"}
KA, KB, NEW, BAD = 0xAAAA0000000000A1, 0xBBBB0000000000B2, 0x5E5E00000000000E, 0xBAD
WE, EA, WERO, EARO, WEAR, EAAR = 1, 3, 5, 6, 7, 8
TYPES = [WE, EA, WERO, EARO, WEAR, EAAR]
AR, RO = {WEAR, EAAR}, {WERO, EARO}
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, RIEK, REGISTER_AND_MOVE = range(8)
RESERVATIONS_PREEMPTED, RESERVATIONS_RELEASED, REGISTRATIONS_PREEMPTED = 0x2A03, 0x2A04, 0x2A05
INVALID_PARAM, INVALID_CDB, PLL_ERROR, INVALID_RELEASE = 0x2600, 0x2400, 0x1A00, 0x2604


def prout_cdb(action: int, ptype: int = 0, length: int = 24, scope: int = 0) -> bytes:
    return struct.pack(">BBBxxIB", 0x5F, action, scope << 4 | ptype, length, 0)


def prin_cdb(action: int, alloc: int = 8192) -> bytes:
    return struct.pack(">BB5xHB", 0x5E, action, alloc, 0)


def params(key: int = 0, sa_key: int = 0, *, aptpl: bool = False, spec_i_pt: bool = False,
           all_tg_pt: bool = False, tids: bytes = b"") -> bytes:
    flags = (8 if spec_i_pt else 0) | (4 if all_tg_pt else 0) | (1 if aptpl else 0)
    data = struct.pack(">QQ4xBxxx", key, sa_key, flags)
    return data + struct.pack(">I", len(tids)) + tids if spec_i_pt else data


def move_params(key: int, sa_key: int, tid: bytes, rel: int = 1, *, unreg: bool = False,
                aptpl: bool = False) -> bytes:
    return struct.pack(">QQxBHI", key, sa_key, (2 if unreg else 0) | (1 if aptpl else 0), rel, len(tid)) + tid


def out(r: Reservations, who: Nexus, action: int, key: int = 0, sa_key: int = 0, ptype: int = 0,
        **kw: Any) -> Effects:
    data = params(key, sa_key, **kw)
    return r.persistent_reserve_out(who, prout_cdb(action, ptype, len(data)), data)


def move(r: Reservations, who: Nexus, key: int, sa_key: int, ptype: int, to: Nexus, **kw: Any) -> Effects:
    data = move_params(key, sa_key, iscsi_transport_id(to.initiator_port), to.relative_port, **kw)
    return r.persistent_reserve_out(who, prout_cdb(REGISTER_AND_MOVE, ptype, len(data)), data)


def status(fn: Callable[[], Any]) -> Any:
    """"GOOD" (with the return value), "CONFLICT", or (sense key, asc) of the CHECK CONDITION."""
    try:
        return "GOOD", fn()
    except Conflict as e:
        assert e.status == Status.RESERVATION_CONFLICT == 0x18
        return "CONFLICT", None
    except CheckCondition as cc:
        return (cc.key, cc.asc), None


def summary(r: Reservations) -> tuple[dict[str, int], str | None, int]:
    """({name: key}, holder name or "ALL" or None, type)."""
    st = r.state
    regs = {NAMES.get(reg.initiator_port, reg.initiator_port): reg.key for reg in st.registrations.values()}
    holder = "ALL" if st.type in AR else (NAMES[st.registrations[st.holder].initiator_port] if st.holder else None)
    return regs, holder, st.type


def uas(effects: Effects | None, *among: Nexus) -> set[tuple[str, int]]:
    if effects is None:
        return set()
    return {(NAMES[n.initiator_port], asc) for n, asc in effects.attentions_for(among or (A, B, C, D))}


def reserved(ptype: int) -> Reservations:
    """A holds a `ptype` reservation with key KA; B is registered with KB; C is not registered."""
    r = Reservations()
    out(r, A, REGISTER, 0, KA)
    out(r, B, REGISTER, 0, KB)
    out(r, A, RESERVE, KA, ptype=ptype)
    assert r.state.generation == 2
    return r


READ10, WRITE10, MODE_SENSE6, INQUIRY = bytes((0x28,)) + bytes(9), bytes((0x2A,)) + bytes(9), bytes(6), \
    bytes((0x12, 0, 0, 0, 96, 0))


def allowed(r: Reservations, who: Nexus, cdb: bytes, pr_class: str) -> bool:
    return status(lambda: r.check(who, cdb, pr_class))[0] == "GOOD"


def check_condition(fn: Callable[[], Any]) -> CheckCondition:
    with pytest.raises(CheckCondition) as info:
        fn()
    assert info.value.key == SenseKey.ILLEGAL_REQUEST
    return info.value
