"""SPC-4 persistent reservations and SPC-2 RESERVE/RELEASE: a pure, synchronous state machine.

Strategy: the logical unit calls `check()` for every command before it reaches an emulator, and hands
RESERVE/RELEASE (6 and 10), PERSISTENT RESERVE IN and PERSISTENT RESERVE OUT to this module's handlers
(`check()` lets exactly those six opcodes through: their handlers decide).  The state is a `PrState` behind a
`ReservationState` (see `pr_state.py`); every change happens in one `update()`, so a command that raises
`Conflict` or `CheckCondition` changes nothing.  A PERSISTENT RESERVE OUT returns `Effects`: the unit
attentions other I_T nexuses must get and, for PREEMPT AND ABORT, whose tasks the core must abort.  No I/O,
no trio; `pr_store.py` persists the state for APTPL.

Rules (section numbers are SPC-4 r37):
* Conflicts (5.13.1 tables 63/64, SBC-3 4.17): holders, and registrants of registrants-only and
  all-registrants reservations, may do anything.  Everyone else: "none" commands are allowed, "read"
  commands conflict with Exclusive Access types, "write"/"other" commands conflict with every type.
* Compatible reservation handling (CRH=1, 5.13.3): RESERVE/RELEASE from the PR holder, or from a registrant
  of a registrants-only or all-registrants reservation, is GOOD and does nothing; with any registration,
  every other RESERVE/RELEASE conflicts.  While an SPC-2 reservation exists, every PERSISTENT RESERVE IN/OUT
  conflicts, whoever sends it (SPC-2 5.5.1).
* Unit attentions never go to the I_T nexus that sent the command (libiscsi ProutReserve.Ownership*).
* PRgeneration counts successful REGISTER, REGISTER AND IGNORE EXISTING KEY, CLEAR, PREEMPT, PREEMPT AND
  ABORT and REGISTER AND MOVE (6.16.2), except a zero-key REGISTER from an unregistered I_T nexus, which does
  nothing; RESERVE and RELEASE leave it alone.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum

from ..scsi.sense import Asc, CheckCondition, SenseKey, Status
from .nexus import Nexus
from .pr_state import (ALL_REGISTRANTS, LU_SCOPE, REGISTRANTS_ONLY, WRITE_EXCLUSIVE_TYPES, LocalState, PortRef,
                       PrState, PrType, Registration, ReservationState, nexus_id, parse_transport_id, port_name,
                       transport_id_of)

__all__ = ["Conflict", "Effects", "Reservations", "ProutAction", "PrinAction", "PrType", "PrState",
           "ReservationState", "LocalState", "PortRef", "Registration", "SELF_CHECKED_OPCODES"]

INQUIRY, REQUEST_SENSE, REPORT_LUNS, PREVENT_ALLOW = 0x12, 0x03, 0xA0, 0x1E
RESERVE_6, RELEASE_6, RESERVE_10, RELEASE_10 = 0x16, 0x17, 0x56, 0x57
PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT = 0x5E, 0x5F
SELF_CHECKED_OPCODES = frozenset((RESERVE_6, RELEASE_6, RESERVE_10, RELEASE_10,
                                  PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT))

INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604   # ILLEGAL REQUEST (SPC-4 5.13.11.2.2)
# REPORT CAPABILITIES ALLOW COMMANDS 011b: TEST UNIT READY passes WE and EA reservations, and MODE SENSE,
# READ BUFFER, RECEIVE DIAGNOSTIC RESULTS, REPORT SUPPORTED OPERATION CODES ... pass WE reservations.
ALLOW_COMMANDS = 0b011
PR_TYPES = frozenset(PrType)
TYPE_MASK = 0x8000 | 0x4000 | 0x2000 | 0x0800 | 0x0200 | 0x0001    # all six types (SPC-4 table 198)


class ProutAction(IntEnum):
    REGISTER = 0
    RESERVE = 1
    RELEASE = 2
    CLEAR = 3
    PREEMPT = 4
    PREEMPT_AND_ABORT = 5
    REGISTER_AND_IGNORE_EXISTING_KEY = 6
    REGISTER_AND_MOVE = 7


class PrinAction(IntEnum):
    READ_KEYS = 0
    READ_RESERVATION = 1
    REPORT_CAPABILITIES = 2
    READ_FULL_STATUS = 3


class Conflict(Exception):
    """The command ends with RESERVATION CONFLICT status (and no sense data)."""
    status = Status.RESERVATION_CONFLICT

    def __init__(self, why: str = "reservation conflict") -> None:
        super().__init__(why)


@dataclass(slots=True)
class Effects:
    """What a state change means for the other I_T nexuses.

    `unit_attentions`: (whom, ASC<<8|ASCQ) pairs, never delivered to `origin`, the I_T nexus that sent the
    command (`attentions_for` skips it).  `abort_nexuses`: whose tasks PREEMPT AND ABORT aborts; it names the
    sender too when the sender's key was the one preempted, and the PERSISTENT RESERVE OUT task itself
    must be spared.
    """
    unit_attentions: list[tuple[PortRef, int]] = field(default_factory=list)
    abort_nexuses: list[PortRef] = field(default_factory=list)
    origin: Nexus | None = None

    def attentions_for(self, nexuses: Iterable[Nexus]) -> list[tuple[Nexus, int]]:
        """The (nexus, asc) pairs to queue, for the I_T nexuses the LU knows."""
        out: list[tuple[Nexus, int]] = []
        for nexus in nexuses:
            if self.origin is not None and _same_nexus(nexus, self.origin):
                continue
            for ref, asc in self.unit_attentions:
                if ref.matches(nexus) and (nexus, asc) not in out:
                    out.append((nexus, asc))
        return out

    def aborts(self, nexus: Nexus) -> bool:
        return any(ref.matches(nexus) for ref in self.abort_nexuses)

    def _tell(self, regs: Iterable[Registration], asc: int) -> None:
        self.unit_attentions.extend((r.ref, asc) for r in regs)


def _same_nexus(a: Nexus, b: Nexus) -> bool:
    return a.relative_port == b.relative_port and port_name(a.initiator_port) == port_name(b.initiator_port)


def _invalid_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=(byte, bit))


def _invalid_param(why: str) -> CheckCondition:
    """INVALID FIELD IN PARAMETER LIST (no field pointer: `build_sense` can only point into the CDB)."""
    cc = CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    cc.add_note(why)
    return cc


def _length_error() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


@dataclass(frozen=True, slots=True)
class _Params:
    """A PERSISTENT RESERVE OUT parameter list (SPC-4 6.17.3 and, for REGISTER AND MOVE, 6.17.4)."""
    key: int
    sa_key: int
    aptpl: bool
    spec_i_pt: bool = False
    all_tg_pt: bool = False
    unreg: bool = False
    relative_port: int = 0
    transport_ids: bytes = b""

    @classmethod
    def parse(cls, action: int, data: bytes, length: int) -> _Params:
        if len(data) < length or length < 24:
            raise _length_error()
        key, sa_key = struct.unpack_from(">QQ", data)
        if action == ProutAction.REGISTER_AND_MOVE:
            flags, rel, tid_len = struct.unpack_from(">xBHI", data, 16)
            if 24 + tid_len > length:
                raise _length_error()
            return cls(key, sa_key, bool(flags & 1), unreg=bool(flags & 2), relative_port=rel,
                       transport_ids=data[24:24 + tid_len])
        flags = data[20]
        params = cls(key, sa_key, bool(flags & 1), spec_i_pt=bool(flags & 8), all_tg_pt=bool(flags & 4))
        if params.spec_i_pt and action != ProutAction.REGISTER:
            raise _invalid_param("SPEC_I_PT is valid only for REGISTER")
        if not params.spec_i_pt:
            if length != 24:
                raise _length_error()
            return params
        tid_len = struct.unpack_from(">I", data, 24)[0] if length >= 28 else length
        if 28 + tid_len > length:
            raise _length_error()
        return replace(params, transport_ids=data[28:28 + tid_len])


class Reservations:
    """One logical unit's reservations.

    Args:
        state: the initial state (e.g. `pr_store.load()` after a restart), or None for none.
        on_change: called with the new state after every change (for APTPL persistence).
        backend: a shared `ReservationState`; when given, `state` and `on_change` are not used.
        aptpl_capable: whether APTPL=1 is accepted (PTPL_C); say False when nothing persists the state.
        relative_ports: the target ports' relative identifiers, when known: REGISTER AND MOVE to any
            other port is refused.
    """

    def __init__(self, state: PrState | None = None, *, on_change: Callable[[PrState], None] | None = None,
                 backend: ReservationState | None = None, aptpl_capable: bool = True,
                 relative_ports: Iterable[int] | None = None) -> None:
        self.backend: ReservationState = backend if backend is not None else LocalState(state, on_change)
        self.aptpl_capable = aptpl_capable
        self.relative_ports = frozenset(relative_ports) if relative_ports is not None else None

    @property
    def state(self) -> PrState:
        return self.backend.current()

    # ---- the pipeline step ---------------------------------------------------------------------------------

    def check(self, nexus: Nexus, cdb: bytes | memoryview, pr_class: str) -> None:
        """Raise `Conflict` if this command must end with RESERVATION CONFLICT.

        `pr_class` is the opcode table's class for this CDB: "none" (allowed through every reservation),
        "read" (allowed through Write Exclusive types), "write" or "other" (allowed for holders and
        registrants of registrants-only / all-registrants types only).
        """
        st = self.backend.current()
        if st.spc2_holder is None and not st.type:
            return
        if cdb[0] in SELF_CHECKED_OPCODES:
            return
        if st.spc2_holder is not None:
            if st.spc2_holder != nexus_id(nexus) and not _spc2_allowed(cdb):
                raise Conflict("logical unit reserved (SPC-2) by another I_T nexus")
            return
        reg = st.registration_of(nexus)
        if reg is not None and (st.type in REGISTRANTS_ONLY or st.is_holder(reg)):
            return
        if pr_class == "none" or (pr_class == "read" and st.type in WRITE_EXCLUSIVE_TYPES):
            return
        raise Conflict(f"{PrType(st.type).name} reservation held by another I_T nexus")

    # ---- SPC-2 RESERVE / RELEASE -------------------------------------------------------------------------

    def reserve6(self, nexus: Nexus, cdb: bytes | memoryview = b"") -> None:
        """RESERVE(6) or RESERVE(10) (SPC-2 7.21/7.22): third-party and extent reservations are refused."""
        if len(cdb) > 1 and cdb[0] == RESERVE_10 and cdb[1] & 0x10:
            raise _invalid_cdb(1, 4)                                # 3RDPTY
        if len(cdb) > 1 and cdb[0] == RESERVE_6 and cdb[1] & 0x01:
            raise _invalid_cdb(1, 0)                                # obsolete extent reservation

        def change(st: PrState) -> None:
            if self._crh_exempt(st, nexus):
                return
            me = nexus_id(nexus)
            if st.spc2_holder not in (None, me):
                raise Conflict("logical unit reserved (SPC-2) by another I_T nexus")
            st.spc2_holder = me
        self.backend.update(change)

    def release6(self, nexus: Nexus) -> None:
        """RELEASE(6) or RELEASE(10): releases the nexus's own SPC-2 reservation; from others it does nothing."""
        def change(st: PrState) -> None:
            if not self._crh_exempt(st, nexus) and st.spc2_holder == nexus_id(nexus):
                st.spc2_holder = None
        self.backend.update(change)

    @staticmethod
    def _crh_exempt(st: PrState, nexus: Nexus) -> bool:
        """True: RESERVE/RELEASE is GOOD and does nothing (SPC-4 5.13.3).  Conflict: registrations exist."""
        if not st.registrations:
            return False
        reg = st.registration_of(nexus)
        if reg is not None and (st.is_holder(reg) or st.type in REGISTRANTS_ONLY):
            return True
        raise Conflict("persistent reservation registrations exist")

    # ---- events from the core ------------------------------------------------------------------------------

    def nexus_lost(self, nexus: Nexus) -> Effects:
        """I_T nexus loss: its SPC-2 reservation is released; persistent reservations survive."""
        def change(st: PrState) -> None:
            if st.spc2_holder == nexus_id(nexus):
                st.spc2_holder = None
        self.backend.update(change)
        return Effects(origin=nexus)

    def reset(self) -> Effects:
        """LOGICAL UNIT RESET (or a target reset): the SPC-2 reservation is released; PRs survive."""
        def change(st: PrState) -> None:
            st.spc2_holder = None
        self.backend.update(change)
        return Effects()

    # ---- PERSISTENT RESERVE IN -----------------------------------------------------------------------------

    def persistent_reserve_in(self, nexus: Nexus, cdb: bytes | memoryview, alloc: int) -> bytes:
        """The parameter data of PERSISTENT RESERVE IN (SPC-4 6.16), cut to `alloc` bytes."""
        st = self.backend.current()
        if st.spc2_holder is not None:
            raise Conflict("PERSISTENT RESERVE IN while an SPC-2 reservation exists")
        action = cdb[1] & 0x1F
        if action == PrinAction.READ_KEYS:
            keys = b"".join(struct.pack(">Q", r.key) for r in st.registrations.values())
            data = struct.pack(">II", st.generation, len(keys)) + keys
        elif action == PrinAction.READ_RESERVATION:
            data = self._read_reservation(st)
        elif action == PrinAction.REPORT_CAPABILITIES:
            data = self._report_capabilities(st)
        elif action == PrinAction.READ_FULL_STATUS:
            data = self._read_full_status(st)
        else:
            raise _invalid_cdb(1, 4)
        return data[:max(alloc, 0)]

    @staticmethod
    def _read_reservation(st: PrState) -> bytes:
        if not st.type:
            return struct.pack(">II", st.generation, 0)
        key = 0 if st.type in ALL_REGISTRANTS else st.registrations[st.holder or ""].key
        return struct.pack(">IIQ4xxBxx", st.generation, 16, key, st.scope << 4 | st.type)

    def _report_capabilities(self, st: PrState) -> bytes:
        caps = 0x10 | 0x08 | 0x04 | (0x01 if self.aptpl_capable else 0)     # CRH SIP_C ATP_C PTPL_C
        flags = 0x80 | ALLOW_COMMANDS << 4 | (0x01 if st.aptpl else 0)      # TMV ALLOW_COMMANDS PTPL_A
        return struct.pack(">HBBHH", 8, caps, flags, TYPE_MASK, 0)

    @staticmethod
    def _read_full_status(st: PrState) -> bytes:
        descriptors = []
        for reg in st.registrations.values():
            holder = st.is_holder(reg)
            flags = (0x02 if reg.all_tg_pt else 0) | (0x01 if holder else 0)
            scope_type = st.scope << 4 | st.type if holder else 0
            descriptors.append(struct.pack(">Q4xBB4xHI", reg.key, flags, scope_type, reg.relative_port or 0,
                                           len(reg.transport_id)) + reg.transport_id)
        body = b"".join(descriptors)
        return struct.pack(">II", st.generation, len(body)) + body

    # ---- PERSISTENT RESERVE OUT ----------------------------------------------------------------------------

    def persistent_reserve_out(self, nexus: Nexus, cdb: bytes | memoryview,
                               params: bytes | memoryview) -> Effects:
        """Carry out PERSISTENT RESERVE OUT (SPC-4 6.17).

        Raises:
            Conflict: RESERVATION CONFLICT.
            CheckCondition: ILLEGAL REQUEST (invalid field in the CDB or parameter list, parameter list length
                error, invalid release of persistent reservation).
        """
        action = cdb[1] & 0x1F
        if action > ProutAction.REGISTER_AND_MOVE:
            raise _invalid_cdb(1, 4)
        scope, ptype = cdb[2] >> 4, cdb[2] & 0x0F
        if action in (ProutAction.RESERVE, ProutAction.PREEMPT, ProutAction.PREEMPT_AND_ABORT,
                      ProutAction.REGISTER_AND_MOVE):
            if scope != LU_SCOPE:
                raise _invalid_cdb(2, 7)
            if ptype not in PR_TYPES:
                raise _invalid_cdb(2, 3)
        length = int.from_bytes(cdb[5:9], "big")
        p = _Params.parse(action, bytes(params[:length]), length)
        if p.aptpl and not self.aptpl_capable and action in (
                ProutAction.REGISTER, ProutAction.REGISTER_AND_IGNORE_EXISTING_KEY, ProutAction.REGISTER_AND_MOVE):
            raise _invalid_param("APTPL is not supported")

        def change(st: PrState) -> Effects:
            if st.spc2_holder is not None:
                raise Conflict("PERSISTENT RESERVE OUT while an SPC-2 reservation exists")
            effects = Effects(origin=nexus)
            self._prout(ProutAction(action), st, nexus, p, scope, ptype, effects)
            return effects
        return self.backend.update(change)

    def _prout(self, action: ProutAction, st: PrState, nexus: Nexus, p: _Params, scope: int, ptype: int,
               effects: Effects) -> None:
        if action in (ProutAction.REGISTER, ProutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
            self._register(st, nexus, p, effects, ignore_key=action != ProutAction.REGISTER)
            return
        reg = st.registration_of(nexus)
        if reg is None or reg.key != p.key:
            raise Conflict("I_T nexus not registered with that reservation key")
        if action == ProutAction.RESERVE:
            _reserve(st, reg, scope, ptype)
        elif action == ProutAction.RELEASE:
            _release(st, reg, scope, ptype, effects)
        elif action == ProutAction.CLEAR:
            effects._tell(st.registrations.values(), Asc.RESERVATIONS_PREEMPTED)
            st.registrations.clear()
            st.release()
            st.bump()
        elif action == ProutAction.REGISTER_AND_MOVE:
            self._register_and_move(st, nexus, reg, p, scope, ptype)
        else:
            removed = _preempt(st, reg, p.sa_key, scope, ptype, effects)
            if action == ProutAction.PREEMPT_AND_ABORT:
                effects.abort_nexuses.extend(r.ref for r in removed)
                if reg.key == p.sa_key:
                    effects.abort_nexuses.append(reg.ref)

    def _register(self, st: PrState, nexus: Nexus, p: _Params, effects: Effects, *, ignore_key: bool) -> None:
        """REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 5.13.7, 5.13.11.2.3)."""
        reg = st.registration_of(nexus)
        if reg is None:
            if p.key != 0 and not ignore_key:
                raise Conflict("unregistered I_T nexus gave a reservation key")
            if p.sa_key == 0:
                return                                              # nothing to do, GOOD
            port = port_name(nexus.initiator_port)
            rel = None if p.all_tg_pt else nexus.relative_port
            new = [Registration(p.sa_key, port, rel, transport_id_of(nexus))]
            if p.spec_i_pt:
                new += _specified_ports(st, new[0], p)
            for r in new:
                st.add(r)
        else:
            if p.key != reg.key and not ignore_key:
                raise Conflict("reservation key does not match the registered key")
            if p.spec_i_pt:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)   # already registered
            if p.sa_key == 0:
                _unregister(st, [reg], effects)
            else:
                st.add(replace(reg, key=p.sa_key))
        st.aptpl = p.aptpl
        st.bump()

    def _register_and_move(self, st: PrState, nexus: Nexus, reg: Registration, p: _Params, scope: int,
                           ptype: int) -> None:
        """REGISTER AND MOVE (SPC-4 5.13.8): register the TransportID's I_T nexus and make it the holder."""
        if not st.type or st.type in ALL_REGISTRANTS or st.holder != reg.id:
            raise Conflict("REGISTER AND MOVE from an I_T nexus that does not hold the reservation")
        if p.sa_key == 0:
            raise _invalid_param("service action reservation key is zero")
        try:
            port, tid, _ = parse_transport_id(p.transport_ids)
        except ValueError as e:
            raise _invalid_param(str(e)) from None
        rel = p.relative_port
        if rel == 0 or (self.relative_ports is not None and rel not in self.relative_ports):
            raise _invalid_param(f"no target port with relative identifier {rel}")
        dest = st.registration_for(port, rel)
        if (port, rel) == (port_name(nexus.initiator_port), nexus.relative_port) \
                or (dest is not None and dest.id == reg.id):
            raise _invalid_param("REGISTER AND MOVE to the I_T nexus that sent it")
        dest = replace(dest, key=p.sa_key) if dest is not None else Registration(p.sa_key, port, rel, tid)
        st.add(dest)
        st.type, st.scope = ptype, scope
        st.holder = None if ptype in ALL_REGISTRANTS else dest.id
        if p.unreg:
            del st.registrations[reg.id]
        st.aptpl = p.aptpl
        st.bump()


def _spc2_allowed(cdb: bytes | memoryview) -> bool:
    """Commands another I_T nexus may send through an SPC-2 reservation."""
    op = cdb[0]
    return op in (INQUIRY, REQUEST_SENSE, REPORT_LUNS) or (op == PREVENT_ALLOW and len(cdb) > 4
                                                           and cdb[4] & 0x03 == 0)


def _specified_ports(st: PrState, own: Registration, p: _Params) -> list[Registration]:
    """The registrations SPEC_I_PT asks for, besides the sender's own (SPC-4 5.13.7).

    TransportIDs naming the sender's own I_T nexus, or an I_T nexus already registered, are skipped.
    """
    out: list[Registration] = []
    data, offset = p.transport_ids, 0
    while offset < len(data):
        try:
            port, tid, size = parse_transport_id(data, offset)
        except ValueError as e:
            raise _invalid_param(str(e)) from None
        offset += size
        reg = Registration(own.key, port, own.relative_port, tid)
        if reg.id == own.id or reg.id in st.registrations or any(r.id == reg.id for r in out):
            continue
        out.append(reg)
    return out


def _reserve(st: PrState, reg: Registration, scope: int, ptype: int) -> None:
    """RESERVE (SPC-4 5.13.9)."""
    if st.type:
        if st.is_holder(reg) and (st.type, st.scope) == (ptype, scope):
            return
        raise Conflict("a persistent reservation already exists")
    st.type, st.scope = ptype, scope
    st.holder = None if ptype in ALL_REGISTRANTS else reg.id


def _release(st: PrState, reg: Registration, scope: int, ptype: int, effects: Effects) -> None:
    """RELEASE (SPC-4 5.13.11.2.2): only the holder releases; others get GOOD and nothing happens."""
    if not st.is_holder(reg):
        return
    if (st.type, st.scope) != (ptype, scope):
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    released = st.type
    st.release()
    if released not in (PrType.WRITE_EXCLUSIVE, PrType.EXCLUSIVE_ACCESS):
        effects._tell(st.registrations.values(), Asc.RESERVATIONS_RELEASED)


def _unregister(st: PrState, regs: list[Registration], effects: Effects) -> None:
    """Remove registrations; a holder's removal releases its reservation (SPC-4 5.13.11.2.3)."""
    released = 0
    for reg in regs:
        del st.registrations[reg.id]
        if st.type and st.type not in ALL_REGISTRANTS and st.holder == reg.id:
            released = st.type
            st.release()
    if st.type in ALL_REGISTRANTS and not st.registrations:
        st.release()
    if released in REGISTRANTS_ONLY:
        effects._tell(st.registrations.values(), Asc.RESERVATIONS_RELEASED)


def _preempt(st: PrState, reg: Registration, sa_key: int, scope: int, ptype: int,
             effects: Effects) -> list[Registration]:
    """PREEMPT / PREEMPT AND ABORT (SPC-4 5.13.11.4); returns the registrations it removed."""
    all_registrants = st.type in ALL_REGISTRANTS
    if sa_key == 0 and not all_registrants:
        raise _invalid_param("service action reservation key is zero")
    holder = st.registrations.get(st.holder) if st.holder is not None else None
    if all_registrants and sa_key == 0 or holder is not None and holder.key == sa_key:
        # Preempt the reservation: drop the other registrations it names, take the reservation over.
        victims = [r for r in st.registrations.values() if r.id != reg.id and (sa_key == 0 or r.key == sa_key)]
        for victim in victims:
            del st.registrations[victim.id]
        before = (st.type, st.scope)
        st.type, st.scope = ptype, scope
        st.holder = None if ptype in ALL_REGISTRANTS else reg.id
        effects._tell(victims, Asc.REGISTRATIONS_PREEMPTED)
        if before != (ptype, scope):
            effects._tell(st.registrations.values(), Asc.RESERVATIONS_RELEASED)
    else:
        # Preempt registrations only: the reservation (if any) stays where it is.
        victims = [r for r in st.registrations.values() if r.key == sa_key]
        if not victims:
            raise Conflict("no registration has the service action reservation key")
        _unregister(st, victims, Effects())
        effects._tell(victims, Asc.REGISTRATIONS_PREEMPTED)
    st.bump()
    return victims
