"""Text-mode negotiation for the target (RFC 7143 section 6 and the keys of section 13), sans I/O.

Strategy: `parse_text` turns a complete data segment into (key, value) pairs. A `Negotiator` answers them for
one login, and may then go on to answer full feature phase Text requests. Each key's behaviour comes from its
row in `keys.KEYS`. This module holds only the rules that apply to all keys (result functions, repeats, stage
and sender checks, relevance) and the mapping from keys to `TargetSettings`.

Errors carry their wire answer. Whatever must fail the login raises `NegotiationError` with a `LoginStatus`. A
bad value for a single key is answered "Reject" and the login goes on.

What is passed to the caller rather than answered here:
  * CHAP_* keys go to the `auth` handler given to the Negotiator. It is called once per request with the agreed
    AuthMethod and the request's authentication pairs, and its answers are put into the response in the place
    of the first such key. It raises NegotiationError(AUTHENTICATION_FAILURE) to refuse.
  * SendTargets (full feature phase only) is not answered. After `respond()` it is in `Negotiator.passthrough`.
    The caller builds the answer, which may need several Text Response PDUs (C bit).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable, Protocol, Union

from .keys import (BOOLEAN_RESULT, KEYS, NUMERIC_RESULT, KeySpec, KeyType, Phase, Redeclare, Scope, Sender,
                   evaluation_rank, parse_bool, parse_number, result_list)
from .text_format import LoginStatus, NegotiationError, encode_text, parse_text

__all__ = [
    "LoginStatus", "NegotiationError", "parse_text", "encode_text", "TargetSettings", "SessionParams",
    "AuthHandler", "Negotiator", "REJECT", "IRRELEVANT", "NOT_UNDERSTOOD", "STAGE_SECURITY", "STAGE_OPERATIONAL",
    "STAGE_FULL_FEATURE",
]

REJECT, IRRELEVANT, NOT_UNDERSTOOD = "Reject", "Irrelevant", "NotUnderstood"
_RESERVED = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})
STAGE_SECURITY, STAGE_OPERATIONAL, STAGE_FULL_FEATURE = 0, 1, 3
_STAGE_PHASE = {STAGE_SECURITY: Phase.SECURITY, STAGE_OPERATIONAL: Phase.OPERATIONAL,
                STAGE_FULL_FEATURE: Phase.FULL_FEATURE}
_PHASE_NAME = {Phase.SECURITY: "security", Phase.OPERATIONAL: "operational", Phase.FULL_FEATURE: "full feature"}


def _fail(status: LoginStatus, message: str) -> NegotiationError:
    return NegotiationError.of(status, message)


def _yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


# ---------------------------------------------------------------------------------------------- settings and results

_DIGESTS = ("None", "CRC32C")


@dataclass(frozen=True)
class TargetSettings:
    """What the target is willing to do, from configuration. The defaults are what a fast target offers."""
    max_recv_data_segment_length: int = 262144   # declared by the target to the initiator
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    max_connections: int = 1
    error_recovery_level: int = 0
    header_digests: tuple[str, ...] = _DIGESTS    # acceptable values; the first is what we would offer
    data_digests: tuple[str, ...] = _DIGESTS
    default_time2wait: int = 2
    default_time2retain: int = 20
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    target_alias: str | None = None
    target_portal_group_tag: int = 1
    auth_methods: tuple[str, ...] = ("None",)
    task_reporting: tuple[str, ...] = ("RFC3720",)
    iscsi_protocol_level: int = 1

    def __post_init__(self) -> None:
        for attr, key in _SETTING_KEY.items():
            spec = KEYS[key]
            value = getattr(self, attr)
            if spec.low is not None and spec.high is not None and not spec.low <= value <= spec.high:
                raise ValueError(f"{attr}={value} is outside {spec.low}..{spec.high}")
            if spec.type is KeyType.LIST and (not value or not set(value) <= set(spec.values)):
                raise ValueError(f"{attr}={value!r}: choose from {spec.values}")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("first_burst_length exceeds max_burst_length")
        if not 512 <= self.max_recv_data_segment_length < 2**24:
            raise ValueError("max_recv_data_segment_length is outside 512..2**24-1")
        if not 0 <= self.target_portal_group_tag <= 65535:
            raise ValueError("target_portal_group_tag is outside 0..65535")


# TargetSettings attribute -> the key whose result it bounds (the target's side of the result function)
_SETTING_KEY = {
    "header_digests": "HeaderDigest", "data_digests": "DataDigest", "max_connections": "MaxConnections",
    "initial_r2t": "InitialR2T", "immediate_data": "ImmediateData", "max_burst_length": "MaxBurstLength",
    "first_burst_length": "FirstBurstLength", "default_time2wait": "DefaultTime2Wait",
    "default_time2retain": "DefaultTime2Retain", "max_outstanding_r2t": "MaxOutstandingR2T",
    "data_pdu_in_order": "DataPDUInOrder", "data_sequence_in_order": "DataSequenceInOrder",
    "error_recovery_level": "ErrorRecoveryLevel", "auth_methods": "AuthMethod",
    "task_reporting": "TaskReporting", "iscsi_protocol_level": "iSCSIProtocolLevel",
}
_KEY_SETTING = {key: attr for attr, key in _SETTING_KEY.items()}


@dataclass
class SessionParams:
    """The negotiated values. They start at the RFC defaults; the Negotiator updates them in place."""
    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    default_time2wait: int = 2
    default_time2retain: int = 20
    initiator_max_recv_data_segment_length: int = 8192   # limits our Data-In / Text / Login Response segments
    target_max_recv_data_segment_length: int = 8192      # what we declared: limits what we accept
    session_type: str = "Normal"
    initiator_name: str = ""
    initiator_alias: str | None = None
    target_name: str = ""
    target_portal_group_tag: int | None = None           # as declared by us
    task_reporting: str = "RFC3720"
    iscsi_protocol_level: int = 1
    auth_method: str | None = None                       # None until AuthMethod is agreed

    def for_new_connection(self) -> SessionParams:
        """A copy for another connection of this session: session-wide values kept, per-connection reset."""
        fresh = SessionParams()
        reset = {spec.param: getattr(fresh, spec.param) for spec in KEYS.values()
                 if spec.scope is Scope.CONNECTION and spec.param is not None}
        reset["target_max_recv_data_segment_length"] = fresh.target_max_recv_data_segment_length
        return replace(self, **reset)


def _to_param(spec: KeySpec, value: str) -> object:
    """Wire value -> SessionParams attribute value."""
    if spec.name in ("HeaderDigest", "DataDigest"):
        return value == "CRC32C"
    if spec.type in BOOLEAN_RESULT:
        return value == "Yes"
    if spec.type in NUMERIC_RESULT or spec.type is KeyType.NUMERIC_DECLARATIVE:
        return parse_number(value)
    return value


def _to_wire(spec: KeySpec, value: object) -> str:
    """SessionParams attribute value -> wire value (for relevance conditions)."""
    if spec.name in ("HeaderDigest", "DataDigest"):
        return "CRC32C" if value else "None"
    if isinstance(value, bool):
        return _yes_no(value)
    return str(value)


class AuthHandler(Protocol):
    def __call__(self, method: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Answer one request's authentication pairs under the agreed AuthMethod.

        Raises:
            NegotiationError: AUTHENTICATION_FAILURE (or INITIATOR_ERROR) to fail the login.
        """


# ---------------------------------------------------------------------------------------------- the negotiator

class _Defer(Enum):
    AUTH = "auth"   # the key goes to the auth handler, with the request's other authentication keys


_Answer = Union[tuple[str, str], _Defer, None]


class Negotiator:
    """Target side of one login's text negotiation: all its Login Request PDUs, security then operational stage.
    After the login it also answers full feature phase Text requests (stage 3).

    Calling pattern per complete request (after C-bit continuations are joined):
        answer = neg.respond(pairs, stage=csg) + neg.target_declarations(stage=csg)
    Leave the operational stage only when `neg.complete` is true.

    Args:
        settings: the target's policy.
        leading: first connection of its session (TSIH 0). LO keys are refused otherwise.
        params: values to continue from. Use `old.for_new_connection()` for another connection of a session, or
            the session's params for full feature phase Text negotiation. They are updated in place.
        auth: answers CHAP_* keys. It is required if settings.auth_methods names anything but "None".
    """

    def __init__(self, settings: TargetSettings, *, leading: bool, params: SessionParams | None = None,
                 auth: AuthHandler | None = None) -> None:
        if auth is None and set(settings.auth_methods) - {"None"}:
            raise ValueError("settings.auth_methods needs an auth handler")
        self.settings = settings
        self.leading = leading
        self.auth = auth
        self.params = params if params is not None else SessionParams()
        self.passthrough: list[tuple[str, str]] = []   # keys the caller answers (SendTargets), from the last request
        self._seen: dict[str, str] = {}       # keys the initiator sent in this login / text sequence
        self._offered: dict[str, str] = {}    # our offers still waiting for an answer
        self._sent: set[str] = set()          # keys we declared or offered
        self._first_response_done = False
        self._full_feature = False

    @property
    def complete(self) -> bool:
        """All target offers have been answered."""
        return not self._offered

    def begin_sequence(self) -> None:
        """Start a new full feature phase text negotiation (a new Text request with TTT 0xffffffff). A key may be
        negotiated again in a new sequence but not twice in one sequence."""
        self._seen.clear()
        self._offered.clear()
        self._sent.clear()
        self.passthrough = []

    def check_first_request(self, pairs: Sequence[tuple[str, str]]) -> None:
        """The first Login Request must name the initiator, and the target too for a normal session.

        Raises:
            NegotiationError: MISSING_PARAMETER, or SESSION_TYPE_NOT_SUPPORTED for an unknown SessionType.
        """
        keys = {key for key, _ in pairs}
        session_type = next((v for k, v in pairs if k == "SessionType"), self.params.session_type)
        if "InitiatorName" not in keys:
            raise _fail(LoginStatus.MISSING_PARAMETER, "the first Login Request has no InitiatorName")
        if session_type not in KEYS["SessionType"].values:
            raise _fail(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType={session_type}")
        if session_type == "Normal" and "TargetName" not in keys:
            raise _fail(LoginStatus.MISSING_PARAMETER, "a normal session's first Login Request has no TargetName")

    def respond(self, pairs: list[tuple[str, str]], *, stage: int) -> list[tuple[str, str]]:
        """Answer one request's keys. Stage 0 is security, 1 operational, 3 full feature phase Text.

        Returns the target's response pairs, in the order of the keys they answer. The first login response also
        declares TargetPortalGroupTag (and TargetAlias, if set) for a normal session. Unknown keys are answered
        NotUnderstood, bad values Reject, keys irrelevant to the session Irrelevant. Declarative keys and
        answers to our offers get no answer. SendTargets goes to `passthrough`. In full feature phase, a key
        that belongs to the login only is answered Reject.

        Raises:
            NegotiationError: the login must fail. Causes: a key repeated in one negotiation, an LO key on a
                non-leading connection, a key in the wrong stage or from the wrong sender, missing InitiatorName
                or TargetName in the first request, an unknown SessionType, or an inadmissible answer to an offer.
        """
        phase = self._enter(stage)
        if not self._first_response_done and phase is not Phase.FULL_FEATURE:
            self.check_first_request(pairs)
        self.passthrough = []
        slots: list[list[tuple[str, str]]] = [[] for _ in pairs]
        auth: list[tuple[str, str]] = []
        auth_slot = -1
        for index in sorted(range(len(pairs)), key=lambda i: evaluation_rank(pairs[i][0])):
            key, value = pairs[index]
            answer = self._answer(key, value, phase)
            if answer is _Defer.AUTH:
                auth_slot = index if auth_slot < 0 else min(auth_slot, index)
                auth.append((key, value))
            elif answer is not None:
                slots[index].append(answer)
        if auth:
            slots[auth_slot] = self._authenticate(auth)
        self._clamp_first_burst(slots)
        out = [pair for slot in slots for pair in slot]
        if not self._first_response_done and phase is not Phase.FULL_FEATURE:
            self._first_response_done = True
            out += self._first_declarations()
        return out

    def target_declarations(self, *, stage: int) -> list[tuple[str, str]]:
        """Keys the target declares or offers on its own in the operational stage, each once per login.

        It always declares MaxRecvDataSegmentLength. It offers each operational key whose wanted value differs
        from the RFC default, unless the initiator already sent that key or the key is irrelevant or LO on a
        non-leading connection. The initiator's answers come back through `respond()`. Other stages declare
        nothing here.
        """
        if _STAGE_PHASE.get(stage) is not Phase.OPERATIONAL:
            return []
        out: list[tuple[str, str]] = []
        mrdsl = "MaxRecvDataSegmentLength"
        if mrdsl not in self._sent:
            self._sent.add(mrdsl)
            self.params.target_max_recv_data_segment_length = self.settings.max_recv_data_segment_length
            out.append((mrdsl, str(self.settings.max_recv_data_segment_length)))
        for name, attr in _KEY_SETTING.items():
            spec = KEYS[name]
            if (name in self._seen or name in self._sent or Phase.OPERATIONAL not in spec.phases
                    or (spec.leading_only and not self.leading) or self._irrelevant(spec)):
                continue
            offer = self._offer_value(spec, getattr(self.settings, attr))
            if offer is not None and offer != spec.default:
                self._sent.add(name)
                self._offered[name] = offer
                out.append((name, offer))
        return out

    # -------------------------------------------------------------------------------------------- internals

    def _enter(self, stage: int) -> Phase:
        phase = _STAGE_PHASE.get(stage)
        if phase is None:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"no negotiation in stage {stage}")
        if phase is Phase.FULL_FEATURE and not self._full_feature:
            self._full_feature = True
            self.begin_sequence()
        elif phase is not Phase.FULL_FEATURE and self._full_feature:
            raise _fail(LoginStatus.INITIATOR_ERROR, "login negotiation after full feature phase began")
        return phase

    def _answer(self, key: str, value: str, phase: Phase) -> _Answer:
        """One key: the answer pair, None for no answer, or _Defer.AUTH for the auth handler."""
        spec = KEYS.get(key)
        self._check_repeat(key, value, spec)
        if spec is None:
            return key, NOT_UNDERSTOOD
        if Sender.INITIATOR not in spec.senders:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"{key} is sent only by targets")
        if phase not in spec.phases:
            if phase is Phase.FULL_FEATURE:
                return key, REJECT
            raise _fail(LoginStatus.INITIATOR_ERROR, f"{key} is not allowed in the {_PHASE_NAME[phase]} stage")
        if spec.leading_only and not self.leading:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"{key} is leading-only and this connection is not leading")
        if spec.obsolete:
            return key, ("No" if spec.type is KeyType.BOOLEAN_AND else REJECT)
        if key in self._offered:
            self._take_answer(spec, value)
            return None
        if self._irrelevant(spec):
            return key, IRRELEVANT
        return _HANDLERS[spec.type](self, spec, value)

    def _check_repeat(self, key: str, value: str, spec: KeySpec | None) -> None:
        if key in self._offered:
            return
        if key in self._seen:
            mode = spec.redeclare if spec is not None else Redeclare.NEVER
            if mode is Redeclare.NEVER or (mode is Redeclare.SAME_VALUE and self._seen[key] != value):
                raise _fail(LoginStatus.INITIATOR_ERROR, f"{key} sent again in one negotiation")
        self._seen[key] = value

    def _irrelevant(self, spec: KeySpec) -> bool:
        return any(all(self._current(k) == v for k, v in cond) for cond in spec.irrelevant_when)

    def _current(self, name: str) -> str | None:
        spec = KEYS[name]
        if spec.param is None:
            return spec.default
        return _to_wire(spec, getattr(self.params, spec.param))

    def _record(self, spec: KeySpec, value: str) -> None:
        if spec.param is not None:
            setattr(self.params, spec.param, _to_param(spec, value))

    def _ours(self, spec: KeySpec) -> object:
        return getattr(self.settings, _KEY_SETTING[spec.name])

    def _boolean(self, spec: KeySpec, value: str) -> tuple[str, str]:
        offered = parse_bool(value)
        if offered is None:
            return spec.name, REJECT
        result = _yes_no(BOOLEAN_RESULT[spec.type](offered, bool(self._ours(spec))))
        self._record(spec, result)
        return spec.name, result

    def _numeric(self, spec: KeySpec, value: str) -> tuple[str, str]:
        offered = self._in_range(spec, value)
        if offered is None:
            return spec.name, REJECT
        ours = self._ours(spec)
        assert isinstance(ours, int)
        result = str(NUMERIC_RESULT[spec.type](offered, ours))
        self._record(spec, result)
        return spec.name, result

    def _numeric_declared(self, spec: KeySpec, value: str) -> tuple[str, str] | None:
        number = self._in_range(spec, value)
        if number is None:
            return spec.name, REJECT
        self._record(spec, str(number))
        return None

    def _list(self, spec: KeySpec, value: str) -> tuple[str, str]:
        offered = value.split(",")
        if any(not item or item in _RESERVED for item in offered):
            return spec.name, REJECT
        ours = self._ours(spec)
        assert isinstance(ours, tuple)
        choice = result_list(offered, ours)
        if choice is None:
            return spec.name, REJECT
        self._record(spec, choice)
        return spec.name, choice

    def _declarative(self, spec: KeySpec, value: str) -> tuple[str, str] | None:
        if spec.name == "SessionType" and value not in spec.values:
            raise _fail(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType={value}")
        if spec.name in ("InitiatorName", "TargetName") and not value:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"empty {spec.name}")
        self._record(spec, value)
        return None

    def _auth(self, spec: KeySpec, value: str) -> _Defer:
        return _Defer.AUTH

    def _request(self, spec: KeySpec, value: str) -> None:
        self.passthrough.append((spec.name, value))

    def _in_range(self, spec: KeySpec, value: str) -> int | None:
        number = parse_number(value)
        if number is None or (spec.low is not None and number < spec.low) or (
                spec.high is not None and number > spec.high):
            return None
        return number

    def _authenticate(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        method = self.params.auth_method
        if method is None or method == "None":
            raise _fail(LoginStatus.INITIATOR_ERROR, "authentication keys without an agreed AuthMethod")
        if self.auth is None:
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, f"no handler for AuthMethod={method}")
        return list(self.auth(method, pairs))

    def _take_answer(self, spec: KeySpec, value: str) -> None:
        """The initiator's answer to our offer: check it is a value the result function allows, then keep it."""
        offered = self._offered.pop(spec.name)
        self._seen[spec.name] = value
        if value in _RESERVED:
            return   # Reject / Irrelevant / NotUnderstood: the current (default) value stays
        if not self._admissible(spec, offered, value):
            raise _fail(LoginStatus.INITIATOR_ERROR, f"{spec.name}={value} does not answer {spec.name}={offered}")
        self._record(spec, value)

    def _admissible(self, spec: KeySpec, offered: str, value: str) -> bool:
        if spec.type in BOOLEAN_RESULT:
            answer, ours = parse_bool(value), parse_bool(offered)
            return answer is not None and ours is not None and BOOLEAN_RESULT[spec.type](answer, ours) == answer
        if spec.type in NUMERIC_RESULT:
            answer_n, ours_n = self._in_range(spec, value), parse_number(offered)
            return (answer_n is not None and ours_n is not None
                    and NUMERIC_RESULT[spec.type](answer_n, ours_n) == answer_n)
        return spec.type is KeyType.LIST and value in offered.split(",")

    def _offer_value(self, spec: KeySpec, ours: object) -> str | None:
        if spec.type is KeyType.LIST:   # offer only if our first choice is not already the default
            assert isinstance(ours, tuple)
            return ",".join(ours) if ours[0] != spec.default else None
        if isinstance(ours, bool):
            return _yes_no(ours)
        if isinstance(ours, int):
            if spec.name == "FirstBurstLength" and "MaxBurstLength" in self._seen:
                ours = min(ours, self.params.max_burst_length)
            return str(ours)
        return None

    def _clamp_first_burst(self, slots: list[list[tuple[str, str]]]) -> None:
        """FirstBurstLength MUST NOT exceed MaxBurstLength (RFC 7143 13.14): lower our answer, or the result."""
        params = self.params
        if params.first_burst_length <= params.max_burst_length:
            return
        params.first_burst_length = params.max_burst_length
        for slot in slots:
            for i, (key, value) in enumerate(slot):
                if key == "FirstBurstLength" and value not in _RESERVED:
                    slot[i] = (key, str(params.max_burst_length))

    def _first_declarations(self) -> list[tuple[str, str]]:
        """RFC 7143 13.9: TargetPortalGroupTag in the first login response of a normal session."""
        if self.params.session_type != "Normal":
            return []
        tpgt = self.settings.target_portal_group_tag
        self.params.target_portal_group_tag = tpgt
        self._sent.add("TargetPortalGroupTag")
        out = [("TargetPortalGroupTag", str(tpgt))]
        if self.settings.target_alias:
            self._sent.add("TargetAlias")
            out.append(("TargetAlias", self.settings.target_alias))
        return out


_HANDLERS: dict[KeyType, Callable[[Negotiator, KeySpec, str], _Answer]] = {
    KeyType.BOOLEAN_AND: Negotiator._boolean,
    KeyType.BOOLEAN_OR: Negotiator._boolean,
    KeyType.NUMERIC_MIN: Negotiator._numeric,
    KeyType.NUMERIC_MAX: Negotiator._numeric,
    KeyType.NUMERIC_DECLARATIVE: Negotiator._numeric_declared,
    KeyType.LIST: Negotiator._list,
    KeyType.DECLARATIVE: Negotiator._declarative,
    KeyType.AUTH: Negotiator._auth,
    KeyType.REQUEST: Negotiator._request,
}
