"""Persistent reservation state: plain data, the one interface that holds it, and iSCSI TransportIDs.

Strategy: everything `reservations.py` decides is a function of one `PrState`, a plain dataclass of ints,
strings and frozen `Registration`s that turns into JSON-ready dicts and back (`to_dict` / `from_dict`).  The
rules never keep a `PrState` of their own: they read `ReservationState.current()` and change it only through
`ReservationState.update(change)`, which runs `change` on a draft and commits it whole or not at all.
`LocalState` is the in-process implementation; an etcd or RADOS backend shared by several gateways
implements the same two methods (a cached, watched `current()` and a compare-and-swap `update()`).

Invariants:
* A nexus is named by its initiator port and its target port's relative identifier
  (`nexus_id`: "<initiator port>|<relative port>"), lower-cased, since iSCSI names are case-insensitive.
* A registration covers the I_T nexuses of one initiator port through one target port, or through every
  target port (ALL_TG_PT: `relative_port is None`).  A registration made from an iSCSI TransportID without
  an ISID (format 00b) names the initiator device: it covers every initiator port of that iSCSI name.
  A nexus's own registration is the one with its exact id, else the first registration that covers it.
* `holder` is the id of the registration holding a Write Exclusive, Exclusive Access or registrants-only
  reservation; it is None when there is no reservation or it is an all-registrants one (every registrant
  holds it).  `type == 0` means no persistent reservation.
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol, TypeVar

from .nexus import Nexus

_T = TypeVar("_T")


class PrType(IntEnum):
    """Persistent reservation types (SPC-4 6.16.3.4, table 186)."""
    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


REGISTRANTS_ONLY = frozenset((PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY))
ALL_REGISTRANTS = frozenset((PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS))
WRITE_EXCLUSIVE_TYPES = frozenset((PrType.WRITE_EXCLUSIVE, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                                   PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS))
LU_SCOPE = 0

ISCSI_PROTOCOL_ID = 0x5
ISID_SEPARATOR = ",i,0x"


def port_name(initiator_port: str) -> str:
    """The canonical (lower-case) form of an initiator port name, or of an iSCSI name alone."""
    return initiator_port.strip().lower()


def device_name(initiator_port: str) -> str:
    """The iSCSI name part of `iqn...,i,0x<ISID>` (the whole string for other names)."""
    return initiator_port.split(ISID_SEPARATOR, 1)[0]


def nexus_id(nexus: Nexus) -> str:
    return f"{port_name(nexus.initiator_port)}|{nexus.relative_port}"


def covers(pattern: str, pattern_port: int | None, port: str, relative_port: int) -> bool:
    """Does a registration for (`pattern`, `pattern_port`) cover the I_T nexus (`port`, `relative_port`)?

    Both names must already be canonical (`port_name`).
    """
    if pattern_port is not None and pattern_port != relative_port:
        return False
    return pattern == port or (ISID_SEPARATOR not in pattern and device_name(port) == pattern)


@dataclass(frozen=True, slots=True)
class PortRef:
    """The I_T nexuses a unit attention or an abort is for: one initiator port (or every port of an iSCSI
    name, when the name has no ",i,0x" part) through one target port, or through all (`relative_port` None)."""
    initiator_port: str
    relative_port: int | None = None

    def matches(self, nexus: Nexus) -> bool:
        return covers(self.initiator_port, self.relative_port, port_name(nexus.initiator_port),
                      nexus.relative_port)


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered reservation key and the I_T nexuses it was registered for."""
    key: int
    initiator_port: str                 # canonical; an iSCSI name alone covers every port of that name
    relative_port: int | None           # None: every target port (registered with ALL_TG_PT)
    transport_id: bytes = b""

    @property
    def id(self) -> str:
        return registration_id(self.initiator_port, self.relative_port)

    @property
    def all_tg_pt(self) -> bool:
        return self.relative_port is None

    @property
    def ref(self) -> PortRef:
        return PortRef(self.initiator_port, self.relative_port)

    def covers(self, port: str, relative_port: int) -> bool:
        return covers(self.initiator_port, self.relative_port, port, relative_port)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "initiator_port": self.initiator_port, "relative_port": self.relative_port,
                "transport_id": self.transport_id.hex()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registration:
        rel = d["relative_port"]
        if not isinstance(d["key"], int) or not 0 < d["key"] < 1 << 64 or not isinstance(d["initiator_port"], str) \
                or not (rel is None or isinstance(rel, int)):
            raise ValueError(f"bad registration {d!r}")
        return cls(d["key"], port_name(d["initiator_port"]), rel, bytes.fromhex(d.get("transport_id", "")))


def registration_id(initiator_port: str, relative_port: int | None) -> str:
    return f"{initiator_port}|{'*' if relative_port is None else relative_port}"


@dataclass(slots=True)
class PrState:
    """Everything about one LU's reservations (see the module invariants)."""
    generation: int = 0
    registrations: dict[str, Registration] = field(default_factory=dict)   # by Registration.id, in order
    holder: str | None = None
    type: int = 0
    scope: int = LU_SCOPE
    aptpl: bool = False
    spc2_holder: str | None = None      # nexus_id of the SPC-2 RESERVE holder

    def copy(self) -> PrState:
        return dataclasses.replace(self, registrations=dict(self.registrations))

    def registration_of(self, nexus: Nexus) -> Registration | None:
        return self.registration_for(port_name(nexus.initiator_port), nexus.relative_port)

    def registration_for(self, port: str, relative_port: int) -> Registration | None:
        exact = self.registrations.get(registration_id(port, relative_port))
        if exact is not None:
            return exact
        return next((r for r in self.registrations.values() if r.covers(port, relative_port)), None)

    def is_holder(self, reg: Registration | None) -> bool:
        return reg is not None and (self.type in ALL_REGISTRANTS or (self.type != 0 and self.holder == reg.id))

    def add(self, reg: Registration) -> None:
        self.registrations[reg.id] = reg

    def release(self) -> None:
        self.type, self.scope, self.holder = 0, LU_SCOPE, None

    def bump(self) -> None:
        self.generation = (self.generation + 1) & 0xFFFFFFFF

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "registrations": [r.to_dict() for r in self.registrations.values()],
                "holder": self.holder, "type": self.type, "scope": self.scope, "aptpl": self.aptpl,
                "spc2_holder": self.spc2_holder}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrState:
        """The state a `to_dict` made; ValueError if it is not self-consistent."""
        try:
            regs = [Registration.from_dict(r) for r in d["registrations"]]
            state = cls(int(d["generation"]) & 0xFFFFFFFF, {r.id: r for r in regs}, d.get("holder"),
                        int(d.get("type", 0)), int(d.get("scope", LU_SCOPE)), bool(d.get("aptpl", False)),
                        d.get("spc2_holder"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad reservation state: {e!r}") from None
        if state.type and state.type not in set(PrType):
            raise ValueError(f"bad reservation type {state.type}")
        needs_holder = state.type != 0 and state.type not in ALL_REGISTRANTS
        if needs_holder != (state.holder is not None) or (needs_holder and state.holder not in state.registrations):
            raise ValueError(f"reservation holder {state.holder!r} does not match type {state.type}")
        if state.type in ALL_REGISTRANTS and not state.registrations:
            raise ValueError("all-registrants reservation without registrants")
        return state


class ReservationState(Protocol):
    """Where a LU's `PrState` lives: in this process, or in an engine several gateways share."""

    def current(self) -> PrState:
        """The latest state.  Read it; never change it."""
        ...

    def update(self, change: Callable[[PrState], _T]) -> _T:
        """Run `change` on a draft of the current state and commit the draft if `change` returns.

        If `change` raises, nothing is committed and the exception propagates.  A shared backend may run
        `change` more than once (compare-and-swap retry), so `change` must depend only on its argument.
        """
        ...


class LocalState:
    """`ReservationState` in memory.  `on_change(state)` runs after each commit that changed something."""

    def __init__(self, state: PrState | None = None,
                 on_change: Callable[[PrState], None] | None = None) -> None:
        self._state = state if state is not None else PrState()
        self._on_change = on_change

    def current(self) -> PrState:
        return self._state

    def update(self, change: Callable[[PrState], _T]) -> _T:
        draft = self._state.copy()
        result = change(draft)
        if draft != self._state:
            self._state = draft
            if self._on_change is not None:
                self._on_change(draft)
        return result


# ---- iSCSI TransportIDs (SPC-4 7.6.4.6) ---------------------------------------------------------------------

def iscsi_transport_id(initiator_port: str) -> bytes:
    """The TransportID of an iSCSI initiator port `name,i,0x<ISID>` (format 01b) or of a name (format 00b).

    The name field is NUL-terminated and padded to a multiple of 4 bytes, at least 20.
    """
    fmt = 1 if ISID_SEPARATOR in initiator_port.lower() else 0
    body = initiator_port.encode() + b"\0"
    size = max(20, (len(body) + 3) & ~3)
    return struct.pack(">BBH", fmt << 6 | ISCSI_PROTOCOL_ID, 0, size) + body.ljust(size, b"\0")


def transport_id_of(nexus: Nexus) -> bytes:
    """The nexus's TransportID as its transport gave it, else built from its iSCSI initiator port name."""
    return bytes(nexus.transport_id) if nexus.transport_id else iscsi_transport_id(nexus.initiator_port)


def parse_transport_id(data: bytes, offset: int = 0) -> tuple[str, bytes, int]:
    """Decode the iSCSI TransportID at `offset`.

    Returns:
        (canonical initiator port or iSCSI name, the TransportID's bytes, its length).
    Raises:
        ValueError: not an iSCSI TransportID, truncated, or malformed.
    """
    if len(data) - offset < 4:
        raise ValueError("truncated TransportID header")
    b0, _, length = struct.unpack_from(">BBH", data, offset)
    fmt, proto = b0 >> 6, b0 & 0x0F
    if proto != ISCSI_PROTOCOL_ID:
        raise ValueError(f"TransportID protocol {proto:#x} is not iSCSI")
    if fmt not in (0, 1) or b0 & 0x30 or length < 4 or length % 4:
        raise ValueError(f"bad iSCSI TransportID format {fmt} / length {length}")
    end = offset + 4 + length
    if end > len(data):
        raise ValueError("truncated TransportID")
    body = data[offset + 4:end]
    nul = body.find(b"\0")
    if nul <= 0:
        raise ValueError("iSCSI name is empty or not NUL-terminated")
    try:
        text = port_name(body[:nul].decode())
    except UnicodeDecodeError:
        raise ValueError("iSCSI name is not UTF-8") from None
    name, sep, isid = text.partition(ISID_SEPARATOR)
    if fmt == 1 and (not sep or not name or len(isid) != 12 or any(c not in "0123456789abcdef" for c in isid)):
        raise ValueError(f"bad iSCSI initiator port name {text!r}")
    if fmt == 0 and sep:
        raise ValueError(f"format 00b TransportID with an ISID: {text!r}")
    return text, bytes(data[offset:end]), end - offset
