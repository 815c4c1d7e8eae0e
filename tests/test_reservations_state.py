"""The reservation state behind the state machine: changes go through the backend (and may be retried),
on_change sees every change, the state round-trips through to_dict/from_dict, and any sequence of commands keeps
it self-consistent (a hypothesis property)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from reservation_helpers import (A, A2, B, BAD, C, CLEAR, D, KA, KB, NEW, PREEMPT, PREEMPT_AND_ABORT, REGISTER,
                                 REGISTER_AND_MOVE, RELEASE, RESERVATIONS_PREEMPTED, RESERVE, RIEK, TYPES, WE, WERO,
                                 WRITE10, allowed, move, out, reserved, status, uas)
from trioscsi.core.pr_state import LocalState, PrState
from trioscsi.core.reservations import Reservations


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
