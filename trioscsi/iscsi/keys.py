"""The login and text keys of RFC 7143 (section 13, plus AuthMethod and CHAP from section 12) as one table.

Strategy: each key the target may receive is one frozen `KeySpec` row in `KEYS`. The negotiator
(`negotiation.py`) reads the row and does not branch on key names, except where the RFC itself singles a key
out (SessionType decides what is relevant; FirstBurstLength may not exceed MaxBurstLength).

Invariants:
  * A key missing from `KEYS` is unknown. That includes X-/X# extension keys other than X#NodeArchitecture,
    and the SRP_/KRB_ security keys. The negotiator answers an unknown key with NotUnderstood.
  * `phases` follows the RFC "Use" line: IO/LO keys are OPERATIONAL, "Any-Stage" adds SECURITY, "ALL" adds
    FULL_FEATURE, FFPO is FULL_FEATURE only. For keys that both sides send, `phases` is where the initiator may
    send the key. For example, the target also sends TargetName in full feature phase, in a SendTargets answer.
  * `default` is the RFC default in wire form ("Yes", "8192", "None"), or None when the RFC gives no default.
  * `irrelevant_when` is a disjunction of conjunctions of (key, wire value) conditions, read against the values
    agreed so far. `evaluation_rank` orders a request's keys so that a condition is decided before it is read.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, Flag
from types import MappingProxyType

__all__ = [
    "KeyType", "Scope", "Phase", "Sender", "Redeclare", "KeySpec", "KEYS", "VALUE_LIMIT", "UNKNOWN_VALUE_LIMIT",
    "lookup", "is_extension", "evaluation_rank", "parse_bool", "parse_number", "result_and", "result_or",
    "result_min", "result_max", "result_list", "BOOLEAN_RESULT", "NUMERIC_RESULT",
]

VALUE_LIMIT = 255
"""Longest simple value in bytes, unless a key says otherwise (RFC 7143 6.1). For a list, this is per item."""
UNKNOWN_VALUE_LIMIT = 8192
"""Sanity bound on the value of a key we do not know. It is answered NotUnderstood, so it does not fail the login."""


class KeyType(Enum):
    """How a key is negotiated. This picks the result function (RFC 7143 6.2)."""
    BOOLEAN_AND = "and"
    BOOLEAN_OR = "or"
    NUMERIC_MIN = "min"
    NUMERIC_MAX = "max"
    NUMERIC_DECLARATIVE = "numeric-declarative"
    LIST = "list"                  # the responder picks the first offered value it accepts
    DECLARATIVE = "declarative"    # text declared by its sender; not answered
    AUTH = "auth"                  # an authentication exchange key (CHAP_*); the auth handler answers it
    REQUEST = "request"            # SendTargets: the caller answers it, possibly over many Text PDUs


class Scope(Enum):
    SESSION = "SW"      # session-wide; LO keys are also leading_only
    CONNECTION = "CO"


class Phase(Flag):
    SECURITY = 1
    OPERATIONAL = 2
    FULL_FEATURE = 4


class Sender(Flag):
    INITIATOR = 1
    TARGET = 2


class Redeclare(Enum):
    """Whether a key may appear again in one login (RFC 7143 6.3 forbids it "except for ... specific keys")."""
    NEVER = "never"
    SAME_VALUE = "same"   # identity keys: libiscsi repeats them in its first operational PDU after CHAP
    UPDATE = "update"     # a later declaration replaces the earlier one


# "Use" shorthands of RFC 7143 section 13
_IO = Phase.OPERATIONAL                                     # IO / LO operational keys
_ANY_STAGE = Phase.SECURITY | Phase.OPERATIONAL              # IO / LO, "Any-Stage"
_ALL = Phase.OPERATIONAL | Phase.FULL_FEATURE                # ALL
_ALL_ANY_STAGE = Phase.SECURITY | Phase.OPERATIONAL | Phase.FULL_FEATURE
_FFPO = Phase.FULL_FEATURE
_SECURITY = Phase.SECURITY
_BOTH = Sender.INITIATOR | Sender.TARGET

_DISCOVERY = (("SessionType", "Discovery"),)
_MAX_24 = 2**24 - 1


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One key: how it is typed, bounded, scoped, where it may appear and who may send it."""
    name: str
    type: KeyType
    default: str | None
    phases: Phase
    senders: Sender
    scope: Scope = Scope.SESSION
    leading_only: bool = False
    low: int | None = None
    high: int | None = None
    irrelevant_when: tuple[tuple[tuple[str, str], ...], ...] = ()
    values: tuple[str, ...] = ()        # literals the RFC defines (LIST items, SessionType)
    max_length: int = VALUE_LIMIT       # bytes per value; per item for LIST keys
    param: str | None = None            # the SessionParams attribute that holds the result
    redeclare: Redeclare = Redeclare.NEVER
    obsolete: bool = False              # RFC 7143 "Obsoleted Keys": answered No (booleans) or Reject


def _numeric(name: str, kind: KeyType, default: int, low: int, high: int, param: str, *,
             leading_only: bool = True, discovery_irrelevant: bool = True) -> KeySpec:
    return KeySpec(name, kind, str(default), _IO, _BOTH, leading_only=leading_only, low=low, high=high,
                   irrelevant_when=(_DISCOVERY,) if discovery_irrelevant else (), param=param)


def _boolean(name: str, kind: KeyType, default: str, param: str) -> KeySpec:
    return KeySpec(name, kind, default, _IO, _BOTH, leading_only=True, irrelevant_when=(_DISCOVERY,), param=param)


def _chap(name: str, max_length: int = VALUE_LIMIT) -> KeySpec:
    return KeySpec(name, KeyType.AUTH, None, _SECURITY, _BOTH, scope=Scope.CONNECTION, max_length=max_length)


_ROWS: tuple[KeySpec, ...] = (
    # 13.1: digests are negotiated per connection
    KeySpec("HeaderDigest", KeyType.LIST, "None", _IO, _BOTH, scope=Scope.CONNECTION,
            values=("CRC32C", "None"), param="header_digest"),
    KeySpec("DataDigest", KeyType.LIST, "None", _IO, _BOTH, scope=Scope.CONNECTION,
            values=("CRC32C", "None"), param="data_digest"),
    _numeric("MaxConnections", KeyType.NUMERIC_MIN, 1, 1, 65535, "max_connections"),
    KeySpec("SendTargets", KeyType.REQUEST, None, _FFPO, Sender.INITIATOR),
    # 13.4-13.9: names and addresses are declarative
    KeySpec("TargetName", KeyType.DECLARATIVE, None, _ANY_STAGE, _BOTH, max_length=223, param="target_name",
            redeclare=Redeclare.SAME_VALUE),
    KeySpec("InitiatorName", KeyType.DECLARATIVE, None, _ANY_STAGE, Sender.INITIATOR, max_length=223,
            param="initiator_name", redeclare=Redeclare.SAME_VALUE),
    KeySpec("TargetAlias", KeyType.DECLARATIVE, None, _ALL_ANY_STAGE, Sender.TARGET),
    KeySpec("InitiatorAlias", KeyType.DECLARATIVE, None, _ALL_ANY_STAGE, Sender.INITIATOR,
            param="initiator_alias", redeclare=Redeclare.UPDATE),
    KeySpec("TargetAddress", KeyType.DECLARATIVE, None, _ALL_ANY_STAGE, Sender.TARGET),
    KeySpec("TargetPortalGroupTag", KeyType.NUMERIC_DECLARATIVE, None, _ANY_STAGE, Sender.TARGET, low=0,
            high=65535, param="target_portal_group_tag"),
    _boolean("InitialR2T", KeyType.BOOLEAN_OR, "Yes", "initial_r2t"),
    _boolean("ImmediateData", KeyType.BOOLEAN_AND, "Yes", "immediate_data"),
    # 13.12: each side declares what it can receive; this row is the initiator's declaration
    KeySpec("MaxRecvDataSegmentLength", KeyType.NUMERIC_DECLARATIVE, "8192", _ALL, _BOTH,
            scope=Scope.CONNECTION, low=512, high=_MAX_24, param="initiator_max_recv_data_segment_length",
            redeclare=Redeclare.UPDATE),
    _numeric("MaxBurstLength", KeyType.NUMERIC_MIN, 262144, 512, _MAX_24, "max_burst_length"),
    KeySpec("FirstBurstLength", KeyType.NUMERIC_MIN, "65536", _IO, _BOTH, leading_only=True, low=512,
            high=_MAX_24, irrelevant_when=((("InitialR2T", "Yes"), ("ImmediateData", "No")), _DISCOVERY),
            param="first_burst_length"),
    _numeric("DefaultTime2Wait", KeyType.NUMERIC_MAX, 2, 0, 3600, "default_time2wait",
             discovery_irrelevant=False),
    _numeric("DefaultTime2Retain", KeyType.NUMERIC_MIN, 20, 0, 3600, "default_time2retain",
             discovery_irrelevant=False),
    _numeric("MaxOutstandingR2T", KeyType.NUMERIC_MIN, 1, 1, 65535, "max_outstanding_r2t"),
    _boolean("DataPDUInOrder", KeyType.BOOLEAN_OR, "Yes", "data_pdu_in_order"),
    _boolean("DataSequenceInOrder", KeyType.BOOLEAN_OR, "Yes", "data_sequence_in_order"),
    _numeric("ErrorRecoveryLevel", KeyType.NUMERIC_MIN, 0, 0, 2, "error_recovery_level",
             discovery_irrelevant=False),
    KeySpec("SessionType", KeyType.DECLARATIVE, "Normal", _ANY_STAGE, Sender.INITIATOR, leading_only=True,
            values=("Discovery", "Normal"), param="session_type", redeclare=Redeclare.SAME_VALUE),
    KeySpec("TaskReporting", KeyType.LIST, "RFC3720", _IO, _BOTH, leading_only=True,
            irrelevant_when=(_DISCOVERY,), values=("RFC3720", "ResponseFence", "FastAbort"),
            param="task_reporting"),
    _numeric("iSCSIProtocolLevel", KeyType.NUMERIC_MIN, 1, 0, 31, "iscsi_protocol_level", leading_only=False,
             discovery_irrelevant=False),
    # RFC 4850, folded into RFC 7143: informational, declarative, recorded nowhere
    KeySpec("X#NodeArchitecture", KeyType.DECLARATIVE, None, _ANY_STAGE, _BOTH, leading_only=True),
    # "Obsoleted Keys": booleans may be answered No (their AND result), the intervals MUST be Rejected
    KeySpec("OFMarker", KeyType.BOOLEAN_AND, "No", _IO, _BOTH, scope=Scope.CONNECTION, obsolete=True),
    KeySpec("IFMarker", KeyType.BOOLEAN_AND, "No", _IO, _BOTH, scope=Scope.CONNECTION, obsolete=True),
    KeySpec("OFMarkInt", KeyType.NUMERIC_MIN, "2048", _IO, _BOTH, scope=Scope.CONNECTION, low=1, high=65535,
            obsolete=True),
    KeySpec("IFMarkInt", KeyType.NUMERIC_MIN, "2048", _IO, _BOTH, scope=Scope.CONNECTION, low=1, high=65535,
            obsolete=True),
    # 12.1: security stage only. The auth handler answers the CHAP keys; the negotiator picks AuthMethod.
    KeySpec("AuthMethod", KeyType.LIST, None, _SECURITY, _BOTH, scope=Scope.CONNECTION,
            values=("KRB5", "SRP", "CHAP", "None"), param="auth_method"),
    _chap("CHAP_A"),
    _chap("CHAP_I"),
    _chap("CHAP_C", max_length=4096),   # large-binary-value: a challenge may be 1024 bytes (0x + 2048 hex)
    _chap("CHAP_N"),
    _chap("CHAP_R", max_length=4096),
)

KEYS: Mapping[str, KeySpec] = MappingProxyType({spec.name: spec for spec in _ROWS})


def lookup(name: str) -> KeySpec | None:
    """The spec of a key, or None if it is unknown (it will be answered NotUnderstood)."""
    return KEYS.get(name)


def is_extension(name: str) -> bool:
    """Private (X-) or public (X#) extension key (RFC 7143 13.22)."""
    return name.startswith(("X-", "X#"))


def _depth(name: str) -> int:
    spec = KEYS.get(name)
    if spec is None or not spec.irrelevant_when:
        return 0
    return 1 + max(_depth(key) for cond in spec.irrelevant_when for key, _ in cond)


_RANK: Mapping[str, int] = MappingProxyType(
    {name: (len(KEYS) if spec.type is KeyType.AUTH else _depth(name)) for name, spec in KEYS.items()})


def evaluation_rank(name: str) -> int:
    """Sort key for the keys of one request, smallest first. A key is evaluated after the keys that decide
    whether it is relevant (SessionType < InitialR2T < FirstBurstLength), and CHAP keys come after AuthMethod."""
    return _RANK.get(name, 0)


# ---------------------------------------------------------------------------------------------- values and results

_DECIMAL = re.compile(r"[0-9]{1,20}")
_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,16}")


def parse_bool(value: str) -> bool | None:
    """boolean-value: exactly "Yes" or "No"."""
    return {"Yes": True, "No": False}.get(value)


def parse_number(value: str) -> int | None:
    """numerical-value as a decimal-constant or hex-constant (RFC 7143 6.1). Only ASCII digits, and bounded in
    length, so int() can neither take Unicode digits nor hit the big-int string limit."""
    if _DECIMAL.fullmatch(value):
        return int(value)
    if _HEX.fullmatch(value):
        return int(value, 16)
    return None


# Result functions (RFC 7143 6.2): the outcome of the initiator's offer and the target's own value.

def result_and(offered: bool, ours: bool) -> bool:
    return offered and ours


def result_or(offered: bool, ours: bool) -> bool:
    return offered or ours


def result_min(offered: int, ours: int) -> int:
    return min(offered, ours)


def result_max(offered: int, ours: int) -> int:
    return max(offered, ours)


def result_list(offered: Sequence[str], acceptable: Iterable[str]) -> str | None:
    """The first offered value that we accept, or None (answered Reject). "None" counts only if it is offered."""
    accept = set(acceptable)
    return next((value for value in offered if value in accept), None)


BOOLEAN_RESULT: Mapping[KeyType, Callable[[bool, bool], bool]] = MappingProxyType(
    {KeyType.BOOLEAN_AND: result_and, KeyType.BOOLEAN_OR: result_or})
NUMERIC_RESULT: Mapping[KeyType, Callable[[int, int], int]] = MappingProxyType(
    {KeyType.NUMERIC_MIN: result_min, KeyType.NUMERIC_MAX: result_max})
