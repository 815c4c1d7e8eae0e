"""Persistent reservations (SPC-4 5.13, 6.17) as a pure state machine: every PERSISTENT RESERVE OUT action
against every reservation type from the holder, a registrant and an unregistered initiator; which commands
conflict under each type; ownership, preemption and the generation counter; REGISTER AND MOVE.

Expectations come from SPC-4 and from what libiscsi's iscsi-test-cu checks (test_prout_reserve_access.c,
test_prout_reserve_ownership.c, test_prout_preempt.c). CDB and parameter list checks and PERSISTENT RESERVE IN
data are in test_reservations_cdb.py, SPC-2 RESERVE/RELEASE in test_reservations_spc2.py, the state interface
and random command sequences in test_reservations_state.py; shared helpers in reservation_helpers.py.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from reservation_helpers import (A, AR, B, BAD, C, CLEAR, D, EA, EAAR, EARO, INQUIRY, INVALID_PARAM,
                                 INVALID_RELEASE, KA, KB, MODE_SENSE6, NAMES, NEW, PLL_ERROR, PREEMPT,
                                 PREEMPT_AND_ABORT, READ10, REGISTER, REGISTER_AND_MOVE, REGISTRATIONS_PREEMPTED,
                                 RELEASE, RESERVATIONS_PREEMPTED, RESERVATIONS_RELEASED, RESERVE, RIEK, RO, TYPES,
                                 WE, WEAR, WERO, WRITE10, allowed, check_condition, move, move_params, out,
                                 prin_cdb, prout_cdb, reserved, status, summary, uas)
from trioscsi.core.nexus import Nexus
from trioscsi.core.pr_state import LocalState, PrState, iscsi_transport_id
from trioscsi.core.reservations import Effects, PrType, Reservations
from trioscsi.scsi.sense import SenseKey


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
