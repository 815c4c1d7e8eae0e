"""SPC-2 RESERVE/RELEASE and their coexistence with persistent reservations: RESERVE(6) between two
initiators, release by reset and nexus loss, third-party RESERVE(10), PERSISTENT RESERVE commands under an SPC-2
reservation, and compatible reservation handling (SPC-4 5.13.3).

Expectations come from SPC-4 and from what libiscsi's iscsi-test-cu checks (test_reserve6_*.c).
"""
from __future__ import annotations

import pytest

from reservation_helpers import (A, A2, AR, B, C, EA, INQUIRY, KA, KB, MODE_SENSE6, READ10, REGISTER, RO, TYPES,
                                 allowed, check_condition, out, prin_cdb, reserved, status, summary)
from trioscsi.core.pr_state import PrState
from trioscsi.core.reservations import PrType, Reservations


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
