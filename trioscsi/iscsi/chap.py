"""CHAP for the iSCSI security stage, target side (RFC 7143 12.1.3, RFC 1994), sans I/O.

Strategy: one `ChapAuthenticator` per login is the Negotiator's `auth` handler:
    I->T CHAP_A=<A1,A2,...>                            T->I CHAP_A=<A> CHAP_I=<I> CHAP_C=<C>
    I->T CHAP_N=<N> CHAP_R=<R> [CHAP_I=<I'> CHAP_C=<C'>]  T->I nothing, or for mutual CHAP CHAP_N=<N'> CHAP_R=<R'>
R = H(I || secret || C), H by CHAP_A: 5 MD5, 6 SHA-1, 7 SHA-256, 8 SHA3-256 (as the Linux target and open-iscsi
number them). As in Linux, our challenge is as long as the digest (16, 20, 32, 32 bytes) and CHAP_I is one byte.
CHAP_R / CHAP_C are read in hex (0x) or base64 (0b) and written in hex.

Failures raise NegotiationError: AUTHENTICATION_FAILURE when the initiator cannot prove who it is (no acceptable
CHAP_A, wrong name or response, mutual CHAP we cannot do, reflection, replay), INITIATOR_ERROR when the keys do not
fit the step, TARGET_ERROR when our random source misbehaves. Messages may name the user, never a secret or a
response. Secrets are masked in every repr and str.

Choices: the algorithm is the first in the initiator's list that the policy allows (RFC 7143 6.2.1; Linux and
open-iscsi do the same), so leave weak algorithms out of the policy to forbid them. No acceptable algorithm is a
Login reject (RFC 7143 12.1.3 allows only that or a CHAP_A/I/C answer, not CHAP_A=Reject). The target's and the
initiator's secrets must differ (12.1.3). `ReplayGuard`, process-wide by default, sees every challenge we send and
every mutual challenge we answer, and refuses repeats and reflections across all connections.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from .keys import parse_number
from .negotiation import LoginStatus, NegotiationError

__all__ = [
    "ALGORITHMS", "MIN_SECRET_LENGTH", "ChapCredentials", "ChapPolicy", "ChapAuthenticator", "ReplayGuard",
    "chap_response", "decode_binary", "encode_binary", "load_secret", "generate_secret", "describe_policy",
]

log = logging.getLogger("trioscsi.iscsi.chap")

ALGORITHMS: dict[int, tuple[str, str]] = {   # CHAP_A -> (display name, hashlib name)
    5: ("MD5", "md5"), 6: ("SHA-1", "sha1"), 7: ("SHA-256", "sha256"), 8: ("SHA3-256", "sha3_256")}
MIN_SECRET_LENGTH = 12        # open-iscsi refuses shorter ones (without IPsec): off-line dictionary attacks
_MASK = "***"


def _hash_available(name: str) -> bool:
    try:
        return bool(hashlib.new(name))
    except ValueError:        # e.g. MD5 in FIPS mode; Linux skips it there too
        return False


_AVAILABLE = frozenset(number for number, (_, name) in ALGORITHMS.items() if _hash_available(name))


def chap_response(algorithm: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 4.1: H(identifier octet || secret || challenge)."""
    digest = hashlib.new(ALGORITHMS[algorithm][1])
    digest.update(bytes((identifier,)) + secret + challenge)
    return digest.digest()


# ---------------------------------------------------------------------------------------------- value encodings

_HEX = re.compile(r"[0-9a-fA-F]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def decode_binary(value: str) -> bytes:
    """A binary value in hex (0x/0X, an odd digit count has an implied leading 0) or base64 (0b/0B, padding
    optional), RFC 7143 6.1. Raises ValueError, whose message does not repeat the value."""
    prefix, body = value[:2], value[2:]
    if prefix in ("0x", "0X") and _HEX.fullmatch(body):
        return bytes.fromhex(body if len(body) % 2 == 0 else "0" + body)
    if prefix in ("0b", "0B") and _BASE64.fullmatch(body):
        core = body.rstrip("=")
        if len(core) % 4 != 1 and (core == body or len(body) % 4 == 0):
            try:
                return base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
            except binascii.Error:
                pass
    raise ValueError("not a 0x hex or 0b base64 constant")


def encode_binary(data: bytes) -> str:
    return "0x" + data.hex()


# ---------------------------------------------------------------------------------------------- credentials and policy

@dataclass(frozen=True)
class ChapCredentials:
    """A CHAP name and secret (bytes; `load_secret` makes them from configuration), masked in repr and str."""
    user: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes):
            raise TypeError("a CHAP secret is bytes")
        if not self.user or "\0" in self.user or len(self.user.encode()) > 255:
            raise ValueError("a CHAP user name is 1..255 bytes without NUL")
        if not self.secret or b"\0" in self.secret:
            raise ValueError(f"the CHAP secret of user {self.user!r} is empty or contains NUL")
        if self.weak:
            log.warning("the CHAP secret of user %r is shorter than %d bytes", self.user, MIN_SECRET_LENGTH)

    @property
    def weak(self) -> bool:
        return len(self.secret) < MIN_SECRET_LENGTH

    def __repr__(self) -> str:
        return f"ChapCredentials(user={self.user!r}, secret={_MASK})"

    __str__ = __repr__


@dataclass(frozen=True)
class ChapPolicy:
    """What one target asks of a login. incoming: what the initiator must prove (None: no authentication).
    outgoing: what the target proves when the initiator asks for mutual CHAP. algorithms: the CHAP_A values
    allowed; the initiator's order of preference decides among them."""
    incoming: ChapCredentials | None
    outgoing: ChapCredentials | None = None
    algorithms: tuple[int, ...] = (8, 7, 6, 5)

    def __post_init__(self) -> None:
        if not self.algorithms or len(set(self.algorithms)) != len(self.algorithms) or not set(
                self.algorithms) <= set(ALGORITHMS):
            raise ValueError(f"algorithms={self.algorithms!r}: distinct values from {sorted(ALGORITHMS)}")
        if self.outgoing is not None and self.incoming is None:
            raise ValueError("mutual CHAP (outgoing credentials) needs incoming credentials too")
        if self.outgoing is not None and self.incoming is not None and hmac.compare_digest(
                self.outgoing.secret, self.incoming.secret):
            raise ValueError("the target's CHAP secret must differ from the initiator's (RFC 7143 12.1.3)")

    @property
    def required(self) -> bool:
        return self.incoming is not None

    @property
    def auth_methods(self) -> tuple[str, ...]:
        """The value for TargetSettings.auth_methods."""
        return ("CHAP",) if self.required else ("None",)

    def describe(self) -> str:
        """One line for logs, secrets masked."""
        if self.incoming is None:
            return "no authentication"
        mutual = f"; mutual: {_describe(self.outgoing)}" if self.outgoing else "; no mutual"
        return f"CHAP ({', '.join(ALGORITHMS[a][0] for a in self.algorithms)}): {_describe(self.incoming)}{mutual}"


def _describe(creds: ChapCredentials) -> str:
    return f"user {creds.user!r}, secret {_MASK}" + (" (weak: shorter than 12 bytes)" if creds.weak else "")


def describe_policy(policy: ChapPolicy | None) -> str:
    return "no authentication" if policy is None else policy.describe()


def generate_secret(nbytes: int = 16) -> str:
    """A random secret of nbytes of entropy as text an initiator configuration can hold (RFC 7143 12.1.3 asks
    for a means to generate random 128-bit secrets)."""
    return secrets.token_urlsafe(nbytes)


def load_secret(value_or_file: str | bytes) -> bytes:
    """A secret from configuration: the literal value, or `file:/path`: a regular file without group or other
    permission bits (chmod 600), one trailing newline removed. ValueErrors name the file, never its content."""
    if isinstance(value_or_file, bytes):
        secret = value_or_file
    elif value_or_file.startswith("file:"):
        secret = _read_secret_file(value_or_file[len("file:"):])
    else:
        secret = value_or_file.encode()
    if not secret:
        raise ValueError("empty CHAP secret")
    return secret


def _read_secret_file(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ValueError(f"cannot open CHAP secret file {path!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"CHAP secret file {path!r} is not a regular file")
        if info.st_mode & 0o077:
            raise ValueError(f"CHAP secret file {path!r} is accessible by group or others (mode "
                             f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        data = b""
        while len(data) <= 4096 and (chunk := os.read(fd, 4097 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > 4096:
        raise ValueError(f"CHAP secret file {path!r} is longer than 4096 bytes")
    data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    if not data:
        raise ValueError(f"CHAP secret file {path!r} is empty")
    return data


# ---------------------------------------------------------------------------------------------- replay guard

def _fail(status: LoginStatus, message: str) -> NegotiationError:
    return NegotiationError.of(status, message)


class ReplayGuard:
    """The challenges we sent and the mutual ones we answered, for all logins. Refuses a challenge we would send
    twice (broken random source), an initiator challenge seen before (replay, whatever the identifier) or equal to
    one we sent on any connection (reflection), and lengths out of bounds. Keeps the last `capacity`; thread-safe."""

    def __init__(self, *, capacity: int = 65536, min_target_challenge: int = 16, min_initiator_challenge: int = 16,
                 max_challenge: int = 1024) -> None:
        self.capacity, self.max_challenge = capacity, max_challenge
        self.min_target_challenge, self.min_initiator_challenge = min_target_challenge, min_initiator_challenge
        self._seen: OrderedDict[bytes, str] = OrderedDict()   # challenge hash -> "target" / "initiator"
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def issue(self, challenge: bytes) -> None:
        """Record a challenge the target is about to send. Raises NegotiationError(TARGET_ERROR)."""
        if not self.min_target_challenge <= len(challenge) <= self.max_challenge:
            raise _fail(LoginStatus.TARGET_ERROR, f"CHAP challenge of {len(challenge)} bytes is out of bounds")
        if not self._add(challenge, "target"):
            raise _fail(LoginStatus.TARGET_ERROR, "the random source repeated a CHAP challenge")

    def accept(self, challenge: bytes) -> None:
        """Check and record an initiator's mutual CHAP challenge. Raises NegotiationError(AUTHENTICATION_FAILURE)."""
        if not self.min_initiator_challenge <= len(challenge) <= self.max_challenge:
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, f"mutual CHAP challenge of {len(challenge)} bytes; "
                        f"{self.min_initiator_challenge}..{self.max_challenge} are accepted")
        with self._lock:
            origin = self._seen.get(self._key(challenge))
        if origin == "target":
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, "mutual CHAP challenge reflects one the target sent")
        if origin is not None or not self._add(challenge, "initiator"):
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, "mutual CHAP challenge was used before (replay)")

    @staticmethod
    def _key(challenge: bytes) -> bytes:
        return hashlib.blake2b(challenge, digest_size=16).digest()

    def _add(self, challenge: bytes, origin: str) -> bool:
        key = self._key(challenge)
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = origin
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        return True


SHARED_REPLAY_GUARD = ReplayGuard()


# ---------------------------------------------------------------------------------------------- the authenticator

class _State(Enum):
    START = "waiting for CHAP_A"
    CHALLENGED = "waiting for CHAP_N/CHAP_R"
    DONE = "authenticated"
    FAILED = "failed"


class ChapAuthenticator:
    """The target's side of CHAP for one login: an AuthHandler for `Negotiator(..., auth=...)`.

    The login may leave the security stage only when `may_leave_security()` says so, and may not skip the
    security stage while `required` (see `require_authenticated()`).
    """

    def __init__(self, policy: ChapPolicy, *, random: Callable[[int], bytes] = os.urandom,
                 replay_guard: ReplayGuard | None = None) -> None:
        self.policy = policy
        self._random = random
        self._guard = replay_guard if replay_guard is not None else SHARED_REPLAY_GUARD
        self._state = _State.START
        self.algorithm: int | None = None    # the agreed CHAP_A
        self.mutual = False                  # the target proved itself too
        self._identifier = 0
        self._challenge = b""

    @property
    def required(self) -> bool:
        return self.policy.required

    @property
    def authenticated(self) -> bool:
        return self._state is _State.DONE

    def __repr__(self) -> str:
        user = self.policy.incoming.user if self.policy.incoming else None
        name = ALGORITHMS[self.algorithm][0] if self.algorithm else None
        return f"<ChapAuthenticator {self._state.value}, user={user!r}, algorithm={name}, mutual={self.mutual}>"

    def __call__(self, method: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """One request's CHAP keys (the Negotiator forbids repeats within a login, so a dict loses nothing)."""
        try:
            return self._step(method, dict(pairs))
        except NegotiationError:
            self._state = _State.FAILED
            raise

    def may_leave_security(self, auth_method: str | None) -> bool:
        """The initiator asks to leave the security stage (T=1). True: let it. False: stay (answer T=0) while
        the CHAP exchange is under way. Raises NegotiationError(AUTHENTICATION_FAILURE) when authentication is
        required and can no longer succeed (AuthMethod=CHAP not agreed, or the exchange failed)."""
        if not self.required or self._state is _State.DONE:
            return True
        if auth_method == "CHAP" and self._state is not _State.FAILED:
            return False
        raise _fail(LoginStatus.AUTHENTICATION_FAILURE, "CHAP authentication is required and did not complete"
                    f" (AuthMethod={auth_method or 'not agreed'})")

    def require_authenticated(self) -> None:
        """For a login that skips the security stage: refuse it if authentication is required."""
        if self.required and not self.authenticated:
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, "CHAP authentication is required; the login skipped "
                        "the security stage")

    # -------------------------------------------------------------------------------------------- steps

    def _step(self, method: str, keys: dict[str, str]) -> list[tuple[str, str]]:
        if self._state is _State.FAILED:
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, "CHAP already failed in this login")
        if method != "CHAP":
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, f"AuthMethod={method} is not supported")
        if self.policy.incoming is None:
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, "no CHAP credentials are configured for this target")
        if self._state is _State.START:
            return self._challenge_initiator(keys)
        if self._state is _State.CHALLENGED:
            return self._verify(keys, self.policy.incoming)
        raise _fail(LoginStatus.INITIATOR_ERROR, f"{_names(keys)} after CHAP authentication completed")

    def _challenge_initiator(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        if set(keys) != {"CHAP_A"}:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"{_names(keys)} where CHAP_A alone was expected")
        offered = [parse_number(item.strip()) for item in keys["CHAP_A"].split(",")]
        allowed = [a for a in self.policy.algorithms if a in _AVAILABLE]
        algorithm = next((a for a in offered if a in allowed), None)
        if algorithm is None:
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, f"no acceptable CHAP_A in {keys['CHAP_A'][:64]!r} "
                        f"(this target allows {','.join(map(str, allowed)) or 'none'})")
        size = hashlib.new(ALGORITHMS[algorithm][1]).digest_size
        identifier, challenge = self._random(1), self._random(size)
        if len(identifier) != 1 or len(challenge) != size:
            raise _fail(LoginStatus.TARGET_ERROR, "the random source returned too few bytes")
        self._guard.issue(challenge)
        self.algorithm, self._identifier, self._challenge = algorithm, identifier[0], challenge
        self._state = _State.CHALLENGED
        return [("CHAP_A", str(algorithm)), ("CHAP_I", str(identifier[0])), ("CHAP_C", encode_binary(challenge))]

    def _verify(self, keys: dict[str, str], incoming: ChapCredentials) -> list[tuple[str, str]]:
        assert self.algorithm is not None
        extra = set(keys) - {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
        if extra:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"{_names(extra)} where CHAP_N and CHAP_R were expected")
        if ("CHAP_I" in keys) != ("CHAP_C" in keys):
            raise _fail(LoginStatus.INITIATOR_ERROR, "mutual CHAP needs both CHAP_I and CHAP_C")
        name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or response is None:
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, "CHAP_N and CHAP_R are both required")
        try:
            received = decode_binary(response)
        except ValueError:
            received = b""    # malformed: counted as a wrong response, after the same work
        expected = chap_response(self.algorithm, self._identifier, incoming.secret, self._challenge)
        name_ok = hmac.compare_digest(name.encode(), incoming.user.encode())
        if not (hmac.compare_digest(received, expected) & name_ok):
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, f"CHAP authentication of user {name[:64]!r} failed")
        if "CHAP_C" not in keys:
            self._state = _State.DONE
            return []
        return self._answer_mutual(keys["CHAP_I"], keys["CHAP_C"], name)

    def _answer_mutual(self, raw_identifier: str, raw_challenge: str, name: str) -> list[tuple[str, str]]:
        assert self.algorithm is not None
        outgoing = self.policy.outgoing
        if outgoing is None:
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, f"user {name[:64]!r} asked for mutual CHAP; this "
                        "target has no credentials of its own")
        identifier = parse_number(raw_identifier)
        if identifier is None or identifier > 255:
            raise _fail(LoginStatus.INITIATOR_ERROR, "CHAP_I is not a number in 0..255")
        try:
            challenge = decode_binary(raw_challenge)
        except ValueError as exc:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"CHAP_C: {exc}") from None
        if hmac.compare_digest(challenge, self._challenge):
            raise _fail(LoginStatus.AUTHENTICATION_FAILURE, "mutual CHAP challenge reflects the target's")
        self._guard.accept(challenge)
        self._state, self.mutual = _State.DONE, True
        response = chap_response(self.algorithm, identifier, outgoing.secret, challenge)
        return [("CHAP_N", outgoing.user), ("CHAP_R", encode_binary(response))]


def _names(keys: Iterable[str]) -> str:
    return ", ".join(sorted(keys)) or "no CHAP keys"
