"""Persistent reservations (SPC-4 6.16, 6.17) at the byte level: PERSISTENT RESERVE OUT CDB and parameter list
checks (SPEC_I_PT, ALL_TG_PT and APTPL included), PERSISTENT RESERVE IN data byte for byte for each service
action, and iSCSI TransportIDs.

Expectations come from SPC-4 and from what libiscsi's iscsi-test-cu checks (test_prin_*.c).
"""
from __future__ import annotations

import pytest

from reservation_helpers import (A, A2, B, C, CLEAR, EA, EAAR, INVALID_CDB, INVALID_PARAM, KA, KB, NEW, PLL_ERROR,
                                 READ10, REGISTER, RELEASE, RESERVATIONS_PREEMPTED, RESERVE, RIEK, WE, WEAR, WERO,
                                 WRITE10, allowed, check_condition, nexus, out, params, prin_cdb, prout_cdb,
                                 reserved, summary)
from trioscsi.core.nexus import Nexus
from trioscsi.core.pr_state import PrState, iscsi_transport_id, parse_transport_id, transport_id_of
from trioscsi.core.reservations import Reservations


# ---- CDB and parameter list checks ------------------------------------------------------------------------
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
