"""Persistent reservations (SPC-4 5.13, 6.16, 6.17) and SPC-2 RESERVE/RELEASE, as a pure state machine.

Expectations come from SPC-4 and from what libiscsi's iscsi-test-cu checks (test_prout_reserve_access.c,
test_prout_reserve_ownership.c, test_prout_preempt.c, test_prin_*.c, test_reserve6_*.c).
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from trioscsi.core.nexus import Nexus
from trioscsi.core.pr_state import (LocalState, PrState, iscsi_transport_id, parse_transport_id,
                                    transport_id_of)
from trioscsi.core.reservations import Conflict, Effects, PrType, ProutAction, Reservations
from trioscsi.scsi.sense import Asc, CheckCondition, SenseKey, Status

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


# ---- every PR OUT action x every type x holder / registrant / unregistered -------------------------------

KEYS = {"A": KA, "B": KB, "C": 0}
OTHER = {"A": "B", "B": "A"}


def expected(action: str, t: int, who: str) -> tuple[Any, tuple[dict[str, int], str | None, int], set, int, set]:
    """(status, summary after, unit attentions, generation increment, aborted) for the `reserved(t)` set-up."""
    before = ({"A": KA, "B": KB}, "ALL" if t in AR else "A", t)
    regs, holder = dict(before[0]), before[1]
    unchanged: tuple[Any, ...] = (before, set(), 0, set())
    holds = who == "A" or (who == "B" and t in AR)
    if action in ("register", "register_ignore"):
        regs[who] = NEW
        return "GOOD", (regs, holder, t), set(), 1, set()
    if action == "register_bad_key":
        return ("CONFLICT", *unchanged)
    if action == "unregister":
        if who == "C":
            return ("GOOD", *unchanged)
        del regs[who]
        if who == "A" and t not in AR:
            return "GOOD", (regs, None, 0), {("B", RESERVATIONS_RELEASED)} if t in RO else set(), 1, set()
        return "GOOD", (regs, holder, t), set(), 1, set()
    if who == "C":
        return ("CONFLICT", *unchanged)                         # unregistered: only REGISTER passes
    if action == "reserve_same":
        return ("GOOD" if holds else "CONFLICT", *unchanged)
    if action == "reserve_other":
        return ("CONFLICT", *unchanged)
    if action in ("release", "release_wrong_type"):
        if not holds:
            return ("GOOD", *unchanged)
        if action == "release_wrong_type":
            return ((SenseKey.ILLEGAL_REQUEST, INVALID_RELEASE), *unchanged)
        tell = {(OTHER[who], RESERVATIONS_RELEASED)} if t not in (WE, EA) else set()
        return "GOOD", (regs, None, 0), tell, 0, set()
    if action == "clear":
        return "GOOD", ({}, None, 0), {(OTHER[who], RESERVATIONS_PREEMPTED)}, 1, set()
    if action in ("preempt", "preempt_abort"):
        victim = OTHER[who]
        del regs[victim]
        new_holder = "ALL" if t in AR else who
        aborted = {victim} if action == "preempt_abort" else set()
        return "GOOD", (regs, new_holder, t), {(victim, REGISTRATIONS_PREEMPTED)}, 1, aborted
    if action == "preempt_zero":
        if t not in AR:
            return ((SenseKey.ILLEGAL_REQUEST, INVALID_PARAM), *unchanged)
        del regs[OTHER[who]]
        return "GOOD", (regs, "ALL", t), {(OTHER[who], REGISTRATIONS_PREEMPTED)}, 1, set()
    if action == "move":
        if who != "A" or t in AR:
            return ("CONFLICT", *unchanged)
        return "GOOD", ({"A": KA, "B": KB, "D": NEW}, "D", t), set(), 1, set()
    raise AssertionError(action)


ACTIONS: dict[str, Callable[[Reservations, Nexus, int, int], Effects]] = {
    "register": lambda r, n, k, t: out(r, n, REGISTER, k, NEW),
    "register_ignore": lambda r, n, k, t: out(r, n, RIEK, BAD, NEW),
    "register_bad_key": lambda r, n, k, t: out(r, n, REGISTER, BAD, NEW),
    "unregister": lambda r, n, k, t: out(r, n, REGISTER, k, 0),
    "reserve_same": lambda r, n, k, t: out(r, n, RESERVE, k, ptype=t),
    "reserve_other": lambda r, n, k, t: out(r, n, RESERVE, k, ptype=EA if t == WE else WE),
    "release": lambda r, n, k, t: out(r, n, RELEASE, k, ptype=t),
    "release_wrong_type": lambda r, n, k, t: out(r, n, RELEASE, k, ptype=EA if t == WE else WE),
    "clear": lambda r, n, k, t: out(r, n, CLEAR, k),
    "preempt": lambda r, n, k, t: out(r, n, PREEMPT, k, KB if k == KA else KA, ptype=t),
    "preempt_abort": lambda r, n, k, t: out(r, n, PREEMPT_AND_ABORT, k, KB if k == KA else KA, ptype=t),
    "preempt_zero": lambda r, n, k, t: out(r, n, PREEMPT, k, 0, ptype=t),
    "move": lambda r, n, k, t: move(r, n, k, NEW, t, D),
}


@pytest.mark.parametrize("who", ["A", "B", "C"], ids=["holder", "registrant", "unregistered"])
@pytest.mark.parametrize("ptype", TYPES, ids=[PrType(t).name for t in TYPES])
@pytest.mark.parametrize("action", list(ACTIONS))
def test_prout_action_matrix(action: str, ptype: int, who: str) -> None:
    r = reserved(ptype)
    initial = summary(r)
    changes: list[PrState] = []
    r.backend = LocalState(r.state, changes.append)
    sender = {"A": A, "B": B, "C": C}[who]
    got, effects = status(lambda: ACTIONS[action](r, sender, KEYS[who], ptype))
    want, after, attentions, bump, aborted = expected(action, ptype, who)
    assert got == want
    assert summary(r) == after
    assert uas(effects) == attentions
    assert r.state.generation == 2 + bump
    if effects is not None:
        assert {NAMES[n.initiator_port] for n in (A, B, C, D) if effects.aborts(n)} == aborted
        assert (who, RESERVATIONS_RELEASED) not in uas(effects)
    assert len(changes) == (1 if summary(r) != initial or bump else 0)      # on_change: once, on changes only


# ---- conflicts: libiscsi test_prout_reserve_access.c and SPC-4 table 63 -----------------------------------

# type: (registered can read, registered can write, unregistered can read, unregistered can write)
ACCESS = {
    EA: (0, 0, 0, 0), WE: (1, 0, 1, 0), EARO: (1, 1, 0, 0), WERO: (1, 1, 1, 0), EAAR: (1, 1, 0, 0), WEAR: (1, 1, 1, 0)}
READ10, WRITE10, MODE_SENSE6, INQUIRY = bytes((0x28,)) + bytes(9), bytes((0x2A,)) + bytes(9), bytes(6), \
    bytes((0x12, 0, 0, 0, 96, 0))


def allowed(r: Reservations, who: Nexus, cdb: bytes, pr_class: str) -> bool:
    return status(lambda: r.check(who, cdb, pr_class))[0] == "GOOD"


@pytest.mark.parametrize("ptype", TYPES, ids=[PrType(t).name for t in TYPES])
def test_access_per_type(ptype: int) -> None:
    r = reserved(ptype)
    reg_read, reg_write, unreg_read, unreg_write = ACCESS[ptype]
    assert allowed(r, A, READ10, "read") and allowed(r, A, WRITE10, "write") and allowed(r, A, WRITE10, "other")
    assert allowed(r, B, READ10, "read") == bool(reg_read)
    assert allowed(r, B, WRITE10, "write") == allowed(r, B, WRITE10, "other") == bool(reg_write)
    assert allowed(r, C, READ10, "read") == bool(unreg_read)
    assert allowed(r, C, WRITE10, "write") == allowed(r, C, MODE_SENSE6, "other") == bool(unreg_write)
    for who in (A, B, C):
        assert allowed(r, who, INQUIRY, "none")
        assert allowed(r, who, prin_cdb(0), "none") and allowed(r, who, prout_cdb(0), "write")
    out(r, B, REGISTER, KB, 0)                  # libiscsi unregisters init2 and tries again
    assert allowed(r, B, READ10, "read") == bool(unreg_read)
    assert allowed(r, B, WRITE10, "write") == bool(unreg_write)
    out(r, A, RELEASE, KA, ptype=ptype)
    assert allowed(r, C, WRITE10, "write")


def test_no_reservation_no_conflict() -> None:
    r = Reservations()
    out(r, A, REGISTER, 0, KA)
    for who in (A, B):
        assert allowed(r, who, WRITE10, "write") and allowed(r, who, READ10, "other")


@pytest.mark.parametrize("ptype", TYPES, ids=[PrType(t).name for t in TYPES])
def test_ownership_libiscsi(ptype: int) -> None:
    """ProutReserve.Ownership*: the holder unregisters; no UA comes back to its own nexus."""
    r = reserved(ptype)
    effects = out(r, A, REGISTER, KA, 0)
    assert ("A", RESERVATIONS_RELEASED) not in uas(effects)
    if ptype in AR:
        assert summary(r) == ({"B": KB}, "ALL", ptype)
        assert uas(effects) == set()
        effects = out(r, B, RELEASE, KB, ptype=ptype)            # the remaining registrant releases
        assert summary(r) == ({"B": KB}, None, 0) and uas(effects) == set()
    else:
        assert summary(r) == ({"B": KB}, None, 0)
        assert uas(effects) == ({("B", RESERVATIONS_RELEASED)} if ptype in RO else set())
    out(r, B, REGISTER, KB, 0)
    assert summary(r) == ({}, None, 0)


def test_all_registrants_reservation_ends_with_the_last_registrant() -> None:
    r = reserved(WEAR)
    out(r, B, REGISTER, KB, 0)
    assert summary(r) == ({"A": KA}, "ALL", WEAR)
    out(r, A, REGISTER, KA, 0)
    assert summary(r) == ({}, None, 0)


def test_preempt_own_key_changes_type_and_tells_registrants() -> None:
    r = reserved(WE)
    out(r, B, REGISTER, KB, KA)                                   # B now has the holder's key too
    effects = out(r, A, PREEMPT, KA, KA, ptype=EARO)
    assert summary(r) == ({"A": KA}, "A", EARO)
    assert uas(effects) == {("B", REGISTRATIONS_PREEMPTED)}
    r = reserved(WE)
    out(r, C, REGISTER, 0, 0xC)
    effects = out(r, A, PREEMPT, KA, KA, ptype=EARO)             # nobody else has KA: only the type changes
    assert summary(r) == ({"A": KA, "B": KB, "C": 0xC}, "A", EARO)
    assert uas(effects) == {("B", RESERVATIONS_RELEASED), ("C", RESERVATIONS_RELEASED)}
    r = reserved(EA)
    out(r, C, REGISTER, 0, 0xC)
    effects = out(r, B, PREEMPT, KB, KA, ptype=EA)                # same type and scope: C is not told
    assert summary(r) == ({"B": KB, "C": 0xC}, "B", EA)
    assert uas(effects) == {("A", REGISTRATIONS_PREEMPTED)}


def test_preempt_without_reservation_libiscsi() -> None:
    """ProutPreempt.RemoveRegistration: generation +1 exactly, the other key stays."""
    r = Reservations()
    out(r, A, RIEK, 0, KA)
    out(r, A, CLEAR, KA)
    out(r, A, RIEK, 0, KA)
    out(r, B, RIEK, 0, KB)
    gen = r.state.generation
    effects = out(r, B, PREEMPT, KB, KA, ptype=EA)
    assert uas(effects) == {("A", REGISTRATIONS_PREEMPTED)}
    assert r.state.generation == gen + 1
    data = r.persistent_reserve_in(A, prin_cdb(0), 8192)
    assert data == struct.pack(">IIQ", gen + 1, 8, KB)
    assert status(lambda: out(r, B, PREEMPT, KB, 0x1234, ptype=EA))[0] == "CONFLICT"   # no such key


def test_preempt_and_abort_names_the_preempted_nexuses() -> None:
    r = reserved(EA)
    out(r, C, REGISTER, 0, KB)                                    # C shares B's key
    effects = out(r, A, PREEMPT_AND_ABORT, KA, KB, ptype=EA)
    assert [n for n in (A, B, C) if effects.aborts(n)] == [B, C]
    assert uas(effects) == {("B", REGISTRATIONS_PREEMPTED), ("C", REGISTRATIONS_PREEMPTED)}


def test_generation_not_bumped_by_reserve_release_or_failures() -> None:
    r = Reservations()
    out(r, A, REGISTER, 0, KA)
    out(r, A, RESERVE, KA, ptype=WE)
    out(r, A, RELEASE, KA, ptype=WE)
    status(lambda: out(r, A, REGISTER, BAD, NEW))
    out(r, C, REGISTER, 0, 0)                                     # unregistered, key 0: nothing happens
    assert r.state.generation == 1
    r.state.generation = 0xFFFFFFFF
    out(r, A, REGISTER, KA, NEW)
    assert r.state.generation == 0


# ---- CDB and parameter list checks ------------------------------------------------------------------------

def check_condition(fn: Callable[[], Any]) -> CheckCondition:
    with pytest.raises(CheckCondition) as info:
        fn()
    assert info.value.key == SenseKey.ILLEGAL_REQUEST
    return info.value


def test_prout_cdb_and_parameter_errors_change_nothing() -> None:
    r = reserved(WE)
    before = r.state
    assert check_condition(lambda: r.persistent_reserve_out(A, prout_cdb(8), params(KA))).field == (1, 4)
    assert check_condition(lambda: out(r, A, RESERVE, KA, ptype=2)).field == (2, 3)
    assert check_condition(lambda: r.persistent_reserve_out(A, prout_cdb(RESERVE, WE, scope=1),
                                                            params(KA))).field == (2, 7)
    for length in (0, 23, 25, 28):
        cc = check_condition(lambda: r.persistent_reserve_out(A, prout_cdb(REGISTER, 0, length),
                                                              params(KA, NEW).ljust(length, b"\0")))
        assert cc.asc == PLL_ERROR
    assert check_condition(lambda: r.persistent_reserve_out(A, prout_cdb(REGISTER, 0, 24), b"\0" * 20)).asc \
        == PLL_ERROR                                              # less data than the CDB announced
    tids = iscsi_transport_id(C.initiator_port)
    assert check_condition(lambda: out(r, A, RESERVE, KA, ptype=WE, spec_i_pt=True, tids=tids)).asc \
        == INVALID_PARAM
    assert check_condition(lambda: out(r, A, RIEK, KA, NEW, spec_i_pt=True, tids=tids)).asc == INVALID_PARAM
    assert check_condition(lambda: out(r, A, REGISTER, KA, NEW, spec_i_pt=True, tids=tids)).asc == INVALID_CDB
    assert r.state is before


def test_spec_i_pt_registers_the_listed_ports() -> None:
    r = Reservations()
    name_only = iscsi_transport_id("iqn.x:c")                     # format 00b: every port of initiator c
    tids = iscsi_transport_id(B.initiator_port.upper()) + name_only + iscsi_transport_id(A.initiator_port)
    out(r, A, REGISTER, 0, KA, spec_i_pt=True, tids=tids)
    assert summary(r)[0] == {"A": KA, "B": KA, "iqn.x:c": KA}
    assert r.state.generation == 1
    other_c = nexus("c", 99)
    assert r.state.registration_of(other_c) is not None and r.state.registration_of(nexus("c", 3, rel=2)) is None
    out(r, other_c, RESERVE, KA, ptype=EA)                        # c's ports are registered through port 1
    assert allowed(r, nexus("c", 99), WRITE10, "write") and not allowed(r, A, READ10, "read")
    r = Reservations()
    bad = [tids + b"\x41\x00\x00\x14" + bytes(20),                # FC TransportID: not iSCSI
           tids + iscsi_transport_id(B.initiator_port)[:-4],      # truncated
           iscsi_transport_id("iqn.x:b,i,0x12")]                  # ISID not 12 hex digits
    for data in bad:
        assert check_condition(lambda: out(r, A, REGISTER, 0, KA, spec_i_pt=True, tids=data)).asc == INVALID_PARAM
    assert r.state == PrState()


def test_all_tg_pt_registers_every_target_port() -> None:
    r = Reservations()
    out(r, A, REGISTER, 0, KA, all_tg_pt=True)
    assert r.state.registration_of(A2) is r.state.registration_of(A)
    out(r, A2, RESERVE, KA, ptype=WE)
    assert allowed(r, A, WRITE10, "write") and not allowed(r, B, WRITE10, "write")
    out(r, B, REGISTER, 0, KB)
    effects = out(r, B, CLEAR, KB)
    assert {(n.relative_port, asc) for n, asc in effects.attentions_for([A, A2, B])} == \
        {(1, RESERVATIONS_PREEMPTED), (2, RESERVATIONS_PREEMPTED)}
    effects = out(Reservations(), A, REGISTER, 0, KA)
    assert effects.attentions_for([A, A2]) == []


def test_aptpl_capability() -> None:
    r = Reservations(aptpl_capable=False)
    assert check_condition(lambda: out(r, A, REGISTER, 0, KA, aptpl=True)).asc == INVALID_PARAM
    out(r, A, REGISTER, 0, KA)
    out(r, A, RESERVE, KA, ptype=WE, aptpl=True)                  # APTPL is ignored outside REGISTER*
    r = Reservations()
    out(r, A, REGISTER, 0, KA, aptpl=True)
    assert r.state.aptpl and r.persistent_reserve_in(A, prin_cdb(2), 8)[3] & 1
    out(r, A, REGISTER, KA, NEW)
    assert not r.state.aptpl


# ---- REGISTER AND MOVE ---------------------------------------------------------------------------------------

def test_register_and_move() -> None:
    r = reserved(WE)
    effects = move(r, A, KA, NEW, EA, D, unreg=True, aptpl=True)
    assert summary(r) == ({"B": KB, "D": NEW}, "D", EA) and r.state.aptpl and uas(effects) == set()
    assert allowed(r, D, WRITE10, "write") and not allowed(r, A, READ10, "read")
    assert r.state.registrations[r.state.holder or ""].transport_id == iscsi_transport_id(D.initiator_port)
    r = reserved(WE)
    move(r, A, KA, NEW, WE, B)                                    # B already registered: its key becomes NEW
    assert summary(r) == ({"A": KA, "B": NEW}, "B", WE)
    r = reserved(WE)
    move(r, A, KA, NEW, WEAR, D)                                  # to an all-registrants type: no one holder
    assert summary(r) == ({"A": KA, "B": KB, "D": NEW}, "ALL", WEAR)


def test_register_and_move_errors() -> None:
    r = Reservations(relative_ports=[1, 2])
    out(r, A, REGISTER, 0, KA, all_tg_pt=True)
    out(r, A, RESERVE, KA, ptype=WE)
    tid = iscsi_transport_id(D.initiator_port)
    for data, asc in [(move_params(KA, 0, tid), INVALID_PARAM),                  # no new key
                      (move_params(KA, NEW, tid, rel=0), INVALID_PARAM),          # no such target port
                      (move_params(KA, NEW, tid, rel=3), INVALID_PARAM),
                      (move_params(KA, NEW, iscsi_transport_id(A.initiator_port)), INVALID_PARAM),  # itself
                      (move_params(KA, NEW, iscsi_transport_id(A.initiator_port), rel=2), INVALID_PARAM),
                      (move_params(KA, NEW, b"\x45\x00\x00\x10" + bytes(16)), INVALID_PARAM),
                      (move_params(KA, NEW, tid)[:-4], PLL_ERROR)]:
        cc = check_condition(lambda: r.persistent_reserve_out(A, prout_cdb(REGISTER_AND_MOVE, WE, len(data)), data))
        assert cc.asc == asc
    assert status(lambda: move(r, A, BAD, NEW, WE, D))[0] == "CONFLICT"
    assert status(lambda: move(Reservations(), A, 0, NEW, WE, D))[0] == "CONFLICT"


# ---- PERSISTENT RESERVE IN, byte for byte ----------------------------------------------------------------

TID_A = b"\x45\x00\x00\x1c" + b"iqn.x:a,i,0x000000000001" + bytes(4)
TID_B = b"\x45\x00\x00\x1c" + b"iqn.x:b,i,0x000000000002" + bytes(4)


def test_read_keys() -> None:
    r = Reservations()
    assert r.persistent_reserve_in(A, prin_cdb(0), 8192) == bytes(8)
    out(r, A, REGISTER, 0, KA)
    out(r, B, REGISTER, 0, KB)
    data = r.persistent_reserve_in(A, prin_cdb(0), 8192)
    assert data.hex() == "00000002" "00000010" "aaaa0000000000a1" "bbbb0000000000b2"
    assert r.persistent_reserve_in(A, prin_cdb(0, 8), 8).hex() == "00000002" "00000010"   # Truncate
    assert r.persistent_reserve_in(A, prin_cdb(0), 12) == data[:12]


def test_read_reservation() -> None:
    r = Reservations()
    out(r, A, REGISTER, 0, KA)
    assert r.persistent_reserve_in(A, prin_cdb(1), 8192).hex() == "00000001" "00000000"
    out(r, A, RESERVE, KA, ptype=WERO)
    assert r.persistent_reserve_in(B, prin_cdb(1), 8192).hex() == \
        "00000001" "00000010" "aaaa0000000000a1" "00000000" "00" "05" "0000"
    out(r, A, RELEASE, KA, ptype=WERO)
    out(r, A, RESERVE, KA, ptype=EAAR)
    assert r.persistent_reserve_in(B, prin_cdb(1), 8192).hex() == \
        "00000001" "00000010" "0000000000000000" "00000000" "00" "08" "0000"


def test_report_capabilities() -> None:
    r = Reservations()
    assert r.persistent_reserve_in(A, prin_cdb(2), 8192).hex() == "0008" "1d" "b0" "ea01" "0000"
    # CRH SIP_C ATP_C PTPL_C; TMV, ALLOW COMMANDS 011b; all six types (WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX EX_AC_AR)
    assert Reservations(aptpl_capable=False).persistent_reserve_in(A, prin_cdb(2), 8192)[2] == 0x1C


def test_read_full_status() -> None:
    r = Reservations()
    assert r.persistent_reserve_in(A, prin_cdb(3), 8192) == bytes(8)
    out(r, A, REGISTER, 0, KA)
    out(r, B2 := nexus("b", 2, rel=2), REGISTER, 0, KB)
    out(r, A, RESERVE, KA, ptype=EA)
    data = r.persistent_reserve_in(A, prin_cdb(3), 8192)
    desc_a = bytes.fromhex("aaaa0000000000a1" "00000000" "01" "03" "00000000" "0001" "00000020") + TID_A
    desc_b = bytes.fromhex("bbbb0000000000b2" "00000000" "00" "00" "00000000" "0002" "00000020") + TID_B
    assert data == bytes.fromhex("00000002" "00000070") + desc_a + desc_b
    assert r.persistent_reserve_in(A, prin_cdb(3), 40) == data[:40]
    out(r, B2, REGISTER, KB, 0)
    out(r, B, REGISTER, 0, KB, all_tg_pt=True)
    out(r, A, RELEASE, KA, ptype=EA)
    out(r, A, RESERVE, KA, ptype=WEAR)
    data = r.persistent_reserve_in(A, prin_cdb(3), 8192)
    assert data[8 + 56:] == bytes.fromhex("bbbb0000000000b2" "00000000" "03" "07" "00000000" "0000" "00000020") \
        + TID_B                                                   # ALL_TG_PT, R_HOLDER of a WEAR reservation


def test_prin_service_action_range() -> None:
    """PrinServiceactionRange.Range: 0-3 work, 4-0x1f are INVALID FIELD IN CDB."""
    r = reserved(WE)
    for action in range(4):
        assert r.persistent_reserve_in(C, prin_cdb(action), 8192)
    for action in range(4, 0x20):
        cc = check_condition(lambda: r.persistent_reserve_in(C, prin_cdb(action), 8192))
        assert cc.asc == INVALID_CDB and cc.sense()[15:18] == bytes((0xCC, 0, 1))


def test_transport_ids() -> None:
    assert iscsi_transport_id(A.initiator_port) == TID_A
    assert transport_id_of(A) == TID_A and transport_id_of(Nexus("x", "t", "x", 1, b"\x01")) == b"\x01"
    upper = TID_A[:4] + b"IQN.X:A,I,0X000000000001" + bytes(4) + b"trailing"
    assert parse_transport_id(upper) == ("iqn.x:a,i,0x000000000001", upper[:32], 32)
    short = iscsi_transport_id("iqn.x:c")
    assert short == b"\x05\x00\x00\x14" + b"iqn.x:c" + bytes(13) and parse_transport_id(short)[0] == "iqn.x:c"
    for bad in (b"\x45\x00", b"\x05\x00\x00\x03abc", b"\x85\x00\x00\x14" + bytes(20), TID_A[:-1],
                b"\x05\x00\x00\x04abcd", b"\x05\x00\x00\x20" + b"iqn.x:a,i,0x000000000001" + bytes(8),
                b"\x45\x00\x00\x14" + b"iqn.x:a" + bytes(13)):
        with pytest.raises(ValueError):
            parse_transport_id(bad)


# ---- SPC-2 RESERVE / RELEASE and their coexistence with PRs -------------------------------------------------

def test_reserve6_two_initiators() -> None:
    """Reserve6.2Initiators."""
    r = Reservations()
    r.reserve6(A)
    r.reserve6(A)                                                 # re-RESERVE by the holder
    assert status(lambda: r.reserve6(B))[0] == "CONFLICT"
    r.release6(B)                                                 # a no-op
    assert allowed(r, A, MODE_SENSE6, "read") and not allowed(r, B, MODE_SENSE6, "read")
    assert not allowed(r, B, bytes(6), "none")                    # TEST UNIT READY conflicts too (SPC-2)
    assert allowed(r, B, INQUIRY, "none") and allowed(r, B, bytes((0xA0,)) + bytes(11), "none")
    assert allowed(r, B, bytes((0x03, 0, 0, 0, 18, 0)), "none")
    assert status(lambda: r.reserve6(B))[0] == "CONFLICT"
    r.release6(A)
    r.reserve6(B)
    r.release6(B)
    assert r.state == PrState()


def test_reserve6_released_by_reset_and_nexus_loss_but_prs_survive() -> None:
    r = Reservations()
    r.reserve6(A)
    assert r.nexus_lost(B).unit_attentions == [] and r.state.spc2_holder is not None
    r.nexus_lost(A)
    r.reserve6(B)
    r.reset()
    r.reserve6(C)
    r.nexus_lost(A2)
    assert not allowed(r, A, READ10, "read")
    r.release6(C)
    pr = reserved(EA)
    pr.reset()
    pr.nexus_lost(A)
    assert summary(pr) == ({"A": KA, "B": KB}, "A", EA)


def test_reserve10_third_party_refused() -> None:
    r = Reservations()
    assert check_condition(lambda: r.reserve6(A, bytes((0x56, 0x10)) + bytes(8))).field == (1, 4)
    r.reserve6(A, bytes((0x56, 0x00)) + bytes(8))


def test_persistent_reserve_commands_conflict_with_spc2_reservation() -> None:
    r = Reservations()
    r.reserve6(A)
    for who in (A, B):
        assert status(lambda: out(r, who, REGISTER, 0, KA))[0] == "CONFLICT"
        assert status(lambda: r.persistent_reserve_in(who, prin_cdb(0), 8192))[0] == "CONFLICT"
    assert r.state.registrations == {}


@pytest.mark.parametrize("ptype", TYPES, ids=[PrType(t).name for t in TYPES])
def test_compatible_reservation_handling(ptype: int) -> None:
    """CRH=1 (SPC-4 5.13.3): holder / RO+AR registrants get GOOD and nothing happens; others conflict."""
    r = reserved(ptype)
    before = r.state
    for action in (r.reserve6, r.release6):
        action(A)
        assert status(lambda: action(C))[0] == "CONFLICT"
        assert status(lambda: action(B))[0] == ("GOOD" if ptype in RO | AR else "CONFLICT")
    assert r.state == before
    r = Reservations()
    out(r, A, REGISTER, 0, KA)                                    # registrations but no reservation
    for who in (A, B):
        assert status(lambda: r.reserve6(who))[0] == "CONFLICT"
        assert status(lambda: r.release6(who))[0] == "CONFLICT"


# ---- the state interface ---------------------------------------------------------------------------------

class RetryingBackend:
    """Like a compare-and-swap backend that loses the race once: every change runs twice."""

    def __init__(self) -> None:
        self.local = LocalState()
        self.runs = 0

    def current(self) -> PrState:
        return self.local.current()

    def update(self, change: Callable[[PrState], Any]) -> Any:
        self.runs += 1
        change(self.local.current().copy())
        return self.local.update(change)


def test_changes_go_through_the_backend_and_may_be_retried() -> None:
    backend = RetryingBackend()
    r = Reservations(backend=backend)
    out(r, A, REGISTER, 0, KA)
    out(r, B, REGISTER, 0, KB)
    out(r, A, RESERVE, KA, ptype=WERO)
    effects = out(r, A, CLEAR, KA)
    assert uas(effects) == {("B", RESERVATIONS_PREEMPTED)} and len(effects.unit_attentions) == 2
    assert backend.runs == 4 and r.state.generation == 3


def test_on_change_and_state_round_trip() -> None:
    seen: list[PrState] = []
    r = Reservations(on_change=seen.append)
    out(r, A, REGISTER, 0, KA, all_tg_pt=True)
    out(r, B, REGISTER, 0, KB)
    out(r, A, RESERVE, KA, ptype=WE)
    status(lambda: out(r, C, RESERVE, 0, ptype=WE))
    assert len(seen) == 3 and seen[-1] is r.state
    copy = PrState.from_dict(r.state.to_dict())
    assert copy == r.state
    restored = Reservations(copy)
    assert not allowed(restored, B, WRITE10, "write") and allowed(restored, A2, WRITE10, "write")
    for broken in ({**r.state.to_dict(), "holder": None}, {**r.state.to_dict(), "type": 2},
                   {**r.state.to_dict(), "registrations": [{"key": 0}]}):
        with pytest.raises(ValueError):
            PrState.from_dict(broken)


# ---- any sequence of commands keeps the state self-consistent ------------------------------------------
KEY = hs.sampled_from([0, KA, KB, NEW, BAD, "own", "own", "holder"])      # resolved when the command runs
ACTION = hs.sampled_from([REGISTER] * 3 + [RIEK, RESERVE, RESERVE, RESERVE, RELEASE, RELEASE, CLEAR, PREEMPT,
                          PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_MOVE, 8])
COMMAND = hs.tuples(hs.sampled_from([A, B, C, A2]), ACTION, KEY, KEY, hs.sampled_from(TYPES + [2]),
                    hs.integers(0, 15), hs.sampled_from([b""] * 9 + [bytes(6)]))


@settings(max_examples=300, deadline=None)
@given(hs.sampled_from([0] + TYPES), hs.lists(COMMAND, min_size=5, max_size=30))
def test_any_command_sequence_keeps_invariants(start: int, commands: list[tuple[Any, ...]]) -> None:
    r = reserved(start) if start else Reservations()
    for who, action, key, sa_key, ptype, flags, spc2 in commands:
        gen = r.state.generation
        own, holder = r.state.registration_of(who), r.state.registrations.get(r.state.holder or "")
        key, sa_key = ({"own": own.key if own else 0, "holder": holder.key if holder else 0}.get(k, k)
                       for k in (key, sa_key))
        if spc2:
            got, _ = status(lambda: (r.reserve6 if flags & 1 else r.release6)(who))
        elif action == REGISTER_AND_MOVE:
            got, _ = status(lambda: move(r, who, key, sa_key, ptype, D, unreg=bool(flags & 2)))
        else:
            got, _ = status(lambda: out(r, who, action, key, sa_key, ptype, aptpl=bool(flags & 1),
                                        all_tg_pt=bool(flags & 4)))
        state = r.state
        assert PrState.from_dict(state.to_dict()) == state           # holder registered, AR has registrants
        assert state.spc2_holder is None or not state.registrations
        if got != "GOOD" or action in (RESERVE, RELEASE) or spc2:
            assert state.generation == gen
        for nexus_ in (A, B, C, D, A2):
            if state.is_holder(state.registration_of(nexus_)):
                r.check(nexus_, WRITE10, "write")
