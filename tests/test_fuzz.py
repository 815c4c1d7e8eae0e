"""Fuzzing the parts of the target that read what a peer sends: the PDU framing and decoder, the login state
machine (with CHAP), and the running server over TCP (before and after login).

Each property runs Hypothesis in batches of 50 examples until its share of a *time budget* (FUZZ_SECONDS,
default 20 s for the whole file) or its example count is spent, so the file stays bounded in the suite on any
machine.  A longer campaign, which also goes on after a failure to look for others (a crashed server is
restarted) and shrinks the wire examples:

    FUZZ_SECONDS=300 FUZZ_EXAMPLES=10000000 FUZZ_KEEP_GOING=1 FUZZ_SHRINK=1 python -m pytest tests/test_fuzz.py

The inputs run and the distinct failures (exception type and the line that raised it) per property are
printed at the end of the run (pytest's terminal summary).

Properties:
  * framing: any byte stream, fed in any chunking, with any digest settings and MaxRecvDataSegmentLength, yields
    PDUs or raises only PduError (PDU consumed, go on), DigestError or FramingError (fatal, repeated on every
    later call); it never holds more than it was fed;
  * valid PDU streams decode back to the PDUs that were encoded, in any chunking, with and without digests;
  * a decoded header re-encodes to a header that decodes to the same PDU;
  * login: any sequence of Login Requests (random flags, stages, versions, ISID/TSIH/CID/ITT, text made of real
    keys with odd values, or raw bytes), with and without CHAP, is answered with an encodable Login Response;
    after a failure the login stays failed; a login that succeeds had passed the security stage when CHAP
    was required;
  * the server (a subprocess): any mutated login exchange or full-feature-phase PDU stream ends with the
    connection closed once the peer closes its side, the server stays up, serves a new session, and logs no
    traceback.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from trioscsi.iscsi.chap import ChapAuthenticator, ChapCredentials, ChapPolicy
from trioscsi.iscsi.framing import NEED_DATA, DigestError, FramingError, PduReader, encode_pdu
from trioscsi.iscsi.keys import KEYS
from trioscsi.iscsi.login import LoginFailed, LoginMachine, LoginOutcome
from trioscsi.iscsi.negotiation import LoginStatus, TargetSettings
from trioscsi.iscsi.pdu import INITIATOR_PDUS, RESERVED_TAG, DataOut, LoginRequest, LoginResponse, \
    LogoutRequest, NopOut, Pdu, PduError, ScsiCommand, SnackRequest, TaskMgmtRequest, TextRequest, decode, \
    encode_header

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "20"))
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))      # 0: the per-property default below
KEEP_GOING = os.environ.get("FUZZ_KEEP_GOING", "") not in ("", "0")

# share of FUZZ_SECONDS per property (the wire properties are slower per example), and example counts
SHARES = {"reader_any_bytes": 0.10, "valid_streams": 0.08, "mutated_streams": 0.12, "decode_header": 0.06,
          "login": 0.20, "wire_login": 0.18, "wire_ffp": 0.26}
EXAMPLES = {"reader_any_bytes": 2000, "valid_streams": 1000, "mutated_streams": 2000, "decode_header": 4000,
            "login": 2000, "wire_login": 400, "wire_ffp": 400}
BATCH = 50                                  # examples per Hypothesis run; the budget is checked between runs

RUNS: Counter[str] = Counter()
DISTINCT: dict[str, dict[str, str]] = {}    # property -> failure signature -> Hypothesis's report


def signature(exc: BaseException) -> str:
    """One line per distinct failure, however many inputs hit it: the exception type, the innermost line it was
    raised from and the first line of its message (for a dead server: the server's own last exception)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
    message = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__} at {where}: {message}"


def fuzz(name: str, run_batch: Callable[[], None]) -> None:
    """Run Hypothesis batches of `BATCH` examples until the property's time share or example count is spent.

    A failure is recorded (and, with FUZZ_KEEP_GOING=1, fuzzing goes on to find others) and re-raised at the
    end, after Hypothesis has shrunk it."""
    deadline = time.monotonic() + FUZZ_SECONDS * SHARES[name]
    limit = FUZZ_EXAMPLES or EXAMPLES[name]
    first: BaseException | None = None
    while RUNS[name] < limit and time.monotonic() < deadline:
        try:
            run_batch()
        except Exception as exc:          # noqa: BLE001 - recorded, then re-raised below
            DISTINCT.setdefault(name, {}).setdefault(signature(exc), str(exc)[:2000])
            first = first or exc
            if not KEEP_GOING:
                break
    if first is not None:
        raise first


def batch_settings(fn: Callable[..., None], *, shrink: bool = True) -> Callable[..., None]:
    """Settings for one batch.  Shrinking a wire example costs a connection per step, so the wire properties
    shrink only when FUZZ_SHRINK=1 (the suite reports their failing input as found)."""
    phases = list(Phase) if shrink or os.environ.get("FUZZ_SHRINK") == "1" else \
        [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=BATCH, deadline=None, database=None, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])(fn)


def wire_settings(fn: Callable[..., None]) -> Callable[..., None]:
    return batch_settings(fn, shrink=False)


@pytest.fixture(scope="module", autouse=True)
def report(run_summary: list[tuple[str, str]]) -> Iterator[None]:
    yield
    lines = [f"{name:18} {RUNS[name]:8d} inputs  {len(DISTINCT.get(name, {})):3d} distinct failures"
             + "".join(f"\n    {sig}" for sig in DISTINCT.get(name, {})) for name in SHARES]
    run_summary.append((f"fuzz (FUZZ_SECONDS={FUZZ_SECONDS:g})", "\n".join(lines)))


# ---- strategies ---------------------------------------------------------------------------------------------

u8, u16, u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "lun": st.integers(0, 2**64 - 1), "attr": st.integers(0, 7), "csg": st.integers(0, 3),
    "nsg": st.integers(0, 3), "function": st.integers(0, 0x7F), "type": st.integers(0, 0xF),
    "reason": st.integers(0, 0x7F), "isid": st.binary(min_size=6, max_size=6),
    "cdb": st.binary(min_size=16, max_size=16) | st.binary(min_size=17, max_size=64),
    "bidi_read_length": st.none() | u32, "data": st.binary(max_size=300),
    "version_max": u8, "version_min": u8, "tsih": u16, "cid": u16,
}


def pdu_strategy(cls: type) -> st.SearchStrategy[Any]:
    def field(f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
        return st.booleans() if f.type == "bool" else FIELDS.get(f.name, u32)
    return st.builds(cls, **{f.name: field(f) for f in dataclasses.fields(cls)})


initiator_pdu = st.one_of([pdu_strategy(cls) for cls in INITIATOR_PDUS])
reader_settings = st.fixed_dictionaries({
    "header_digest": st.booleans(), "data_digest": st.booleans(),
    "max_recv_data_segment_length": st.sampled_from([512, 8192, 65536, 1 << 24]),
})


def wire(pdus: list[Any], header_digest: bool, data_digest: bool) -> bytes:
    return b"".join(bytes(b) for pdu in pdus for b in encode_pdu(pdu, header_digest=header_digest,
                                                                     data_digest=data_digest))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def drain(reader: PduReader, chunks: list[bytes]) -> list[Any]:
    """Feed every chunk and take everything out, checking the reader's error contract as we go."""
    out: list[Any] = []
    fed = 0
    fatal: Exception | None = None
    for chunk in chunks:
        reader.feed(chunk)
        fed += len(chunk)
        assert reader.buffered <= fed
        for _ in range(len(chunk) + 2):           # at most one PDU per byte, then NEED_DATA
            try:
                pdu = reader.next_pdu()
            except (PduError, DigestError, FramingError) as exc:
                fatal_now = isinstance(exc, FramingError) or (isinstance(exc, DigestError) and exc.header_digest)
                if fatal is not None:
                    assert type(exc) is type(fatal), "a failed reader must repeat its error"
                if fatal_now:
                    fatal = exc
                    break
                out.append(exc)
                continue
            assert fatal is None, "a failed reader returned a PDU"
            if pdu is NEED_DATA:
                break
            assert isinstance(pdu, Pdu)
            out.append(pdu)
        else:
            raise AssertionError("next_pdu never asked for more data")
        if fatal is not None:
            with pytest.raises(type(fatal)):
                reader.next_pdu()
            return out
    return out


# ---- framing and decoder ------------------------------------------------------------------------------------

def test_reader_survives_any_byte_stream() -> None:
    @batch_settings
    @given(data=st.binary(max_size=4096) | st.lists(initiator_pdu, max_size=4).map(lambda p: wire(p, False, False)),
           cuts=st.lists(st.integers(0, 5000), max_size=8), config=reader_settings)
    def one(data: bytes, cuts: list[int], config: dict[str, Any]) -> None:
        RUNS["reader_any_bytes"] += 1
        drain(PduReader(**config), chunked(data, cuts))
    fuzz("reader_any_bytes", one)


def test_valid_pdu_streams_decode_back_in_any_chunking() -> None:
    @batch_settings
    @given(pdus=st.lists(initiator_pdu, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 3000), max_size=10),
           header_digest=st.booleans(), data_digest=st.booleans())
    def one(pdus: list[Any], cuts: list[int], header_digest: bool, data_digest: bool) -> None:
        RUNS["valid_streams"] += 1
        reader = PduReader(header_digest=header_digest, data_digest=data_digest,
                           max_recv_data_segment_length=1 << 24)
        decoded = drain(reader, chunked(wire(pdus, header_digest, data_digest), cuts))
        assert decoded == pdus
        assert reader.buffered == 0
    fuzz("valid_streams", one)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 10**6), st.integers(0, 0xFFFFFF)),
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value in mutations:
        if not buf:
            buf += bytes([value & 0xFF])
            continue
        at = where % len(buf)
        if kind == "flip":
            buf[at] ^= value
        elif kind == "cut":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = bytes([value])
        else:                                    # rewrite a DataSegmentLength (offset 5 of some header)
            start = (at // 48) * 48
            if start + 8 <= len(buf):
                buf[start + 5:start + 8] = value.to_bytes(3, "big")
    return bytes(buf)


def test_reader_survives_mutated_pdu_streams() -> None:
    @batch_settings
    @given(pdus=st.lists(initiator_pdu, min_size=1, max_size=5),
           mutations=st.lists(mutation, min_size=1, max_size=4), cuts=st.lists(st.integers(0, 3000), max_size=6),
           config=reader_settings)
    def one(pdus: list[Any], mutations: list[tuple[str, int, int]], cuts: list[int],
            config: dict[str, Any]) -> None:
        RUNS["mutated_streams"] += 1
        data = mutate(wire(pdus, config["header_digest"], config["data_digest"]), mutations)
        drain(PduReader(**config), chunked(data, cuts))
    fuzz("mutated_streams", one)


def test_decoded_header_reencodes_to_the_same_pdu() -> None:
    @batch_settings
    @given(bhs=st.binary(min_size=48, max_size=48),
           ahs_words=st.lists(st.binary(min_size=4, max_size=4), max_size=8), data=st.binary(max_size=16))
    def one(bhs: bytes, ahs_words: list[bytes], data: bytes) -> None:
        RUNS["decode_header"] += 1
        ahs = b"".join(ahs_words)
        try:
            pdu = decode(bhs, ahs, data)
        except PduError:
            return
        header = encode_header(pdu)
        assert decode(header[:48], header[48:], data) == pdu
    fuzz("decode_header", one)


# ---- login ---------------------------------------------------------------------------------------------------

TARGET = "iqn.2026-11.org.trioscsi:fuzz"
CHAP_USER, CHAP_SECRET = "fuzzer", b"a-secret-of-16-bytes"


class FakeContext:
    """The portal's decisions for the login machine: one target; CHAP when `chap`."""

    def __init__(self, chap: bool) -> None:
        self.chap = chap
        self.bound = 0

    def target_settings(self, target_name: str | None, initiator_name: str, session_type: str) -> TargetSettings:
        if target_name is not None and target_name != TARGET:
            raise LoginFailed(LoginStatus.NOT_FOUND, f"no target {target_name}")
        return TargetSettings(auth_methods=("CHAP",) if self.chap else ("None",))

    def bind_session(self, outcome: LoginOutcome) -> int:
        self.bound += 1
        return 0x1234

    def authenticator(self, target_name: str | None, initiator_name: str,
                      session_type: str) -> ChapAuthenticator | None:
        if not self.chap:
            return None
        return ChapAuthenticator(ChapPolicy(incoming=ChapCredentials(CHAP_USER, CHAP_SECRET)))


KEY_NAMES = sorted(KEYS) + ["InitiatorName", "TargetName", "SessionType", "AuthMethod", "CHAP_A", "CHAP_N",
                            "CHAP_R", "CHAP_I", "CHAP_C", "X-com.example.vendor", "X#NodeArchitecture",
                            "NotAKey", "a" * 70, ""]
VALUES = ["None", "CRC32C", "CRC32C,None", "Yes", "No", "Normal", "Discovery", "CHAP", "CHAP,None", "5", "7", "8",
          "0", "1", "512", "8192", "65536", "16777215", "16777216", "4294967296", "-1", "0x10", "", "Reject",
          "Irrelevant", "NotUnderstood", TARGET, "iqn.2026-11.org.example:fuzz", "0x" + "ab" * 16, "x" * 300,
          CHAP_USER, "RFC3720", "\u00e9\u00e8", "a=b", "1,2,3,4,5,6,7,8,9"]
text_pair = st.tuples(st.sampled_from(KEY_NAMES) | st.text(max_size=12),
                      st.sampled_from(VALUES) | st.text(max_size=40))
login_text = st.one_of(
    st.lists(text_pair, max_size=12).map(lambda pairs: b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)),
    st.binary(max_size=200),
)
good_start = [("InitiatorName", "iqn.2026-11.org.example:fuzz"), ("SessionType", "Normal"),
              ("TargetName", TARGET), ("AuthMethod", "CHAP,None")]


@st.composite
def login_request(draw: st.DrawFn, first: bool) -> LoginRequest:
    text = draw(login_text)
    if first and draw(st.booleans()):
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in good_start) + text
    return LoginRequest(
        transit=draw(st.booleans()), cont=draw(st.booleans()) and draw(st.booleans()),
        csg=draw(st.integers(0, 3)), nsg=draw(st.integers(0, 3)), version_max=draw(st.sampled_from([0, 0, 1, 255])),
        version_min=draw(st.sampled_from([0, 0, 1])), isid=draw(st.sampled_from([b"\x80" + bytes(5), b"\x00" * 6])
                                                                 | st.binary(min_size=6, max_size=6)),
        tsih=draw(st.sampled_from([0, 0, 1, 0x1234])), itt=draw(st.sampled_from([1, 1, 2])),
        cid=draw(st.sampled_from([0, 0, 1])), cmdsn=draw(u32), expstatsn=draw(u32), data=text)


def test_login_machine_answers_every_request() -> None:
    @batch_settings
    @given(chap=st.booleans(), first=login_request(True), rest=st.lists(login_request(False), max_size=6))
    def one(chap: bool, first: LoginRequest, rest: list[LoginRequest]) -> None:
        RUNS["login"] += 1
        check_login(chap, [first, *rest])
    fuzz("login", one)


def check_login(chap: bool, requests: list[LoginRequest]) -> None:
    context = FakeContext(chap)
    machine = LoginMachine(context, expcmdsn_window=1)
    statsn = None
    for request in requests:
        was_failed = machine.failed
        response = machine.receive(request)
        assert isinstance(response, LoginResponse)
        header = encode_header(response)                       # encodable: every field fits the wire
        assert decode(header[:48], header[48:], response.data) == response
        status = response.status_class << 8 | response.status_detail
        assert response.status_class in (0, 1, 2, 3)
        if was_failed:
            assert machine.failed and status != 0, "a failed login went on"
        if status:
            assert machine.failed and not response.transit
        if statsn is not None:
            assert response.statsn == (statsn + 1) & 0xFFFFFFFF
        statsn = response.statsn
        assert response.itt == request.itt
        if machine.outcome is not None:
            assert not machine.failed and context.bound == 1
            if chap:
                assert machine._auth is not None and machine._auth.may_leave_security("CHAP"), \
                    "logged in without CHAP"
            break


# ---- the server over TCP -------------------------------------------------------------------------------------


class WireServer:
    """The server as a subprocess (tests/peer/harness.py); `ensure()` starts a new one if the last one died,
    so that FUZZ_KEEP_GOING=1 can look for more than one crash."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.generation = 0
        self.srv: Any = None
        self.ensure()

    def ensure(self) -> Any:
        from peer.harness import TrioscsiServer, null, vdisk
        if self.srv is not None and self.srv.alive():
            return self.srv
        if self.srv is not None:
            self.srv.stop()
        self.generation += 1
        workdir = self.workdir / f"server{self.generation}"
        self.srv = TrioscsiServer(workdir, luns=[vdisk(0, workdir / "disk0.img", 4 << 20), null(1, 1 << 30)],
                                  iqn=TARGET, config_kw={"queue_depth": 32, "iscsi_params": {
                                      "login_timeout": 3, "nop_interval": 0,
                                      "max_recv_data_segment_length": 65536}})
        self.srv.start()
        return self.srv

    @property
    def port(self) -> int:
        return int(self.srv.port)

    def alive(self) -> bool:
        return bool(self.srv.alive())

    def log_tail(self, lines: int) -> str:
        return str(self.srv.log_tail(lines))

    def last_exception(self) -> str:
        """The last exception the server's log shows (what killed it), e.g. 'ValueError: ...'."""
        found = re.findall(r"^[\s|]*([A-Za-z_.]*(?:Error|Exception|Group)): (.*)$", self.srv.log(), re.M)
        return ": ".join(found[-1]) if found else "no exception in its log"

    def check(self, send: Callable[[], object]) -> None:
        """Run one exchange; turn the server's death into a failure that names the server's exception."""
        try:
            send()
        except (OSError, AssertionError):
            if not self.alive():
                raise AssertionError(f"the server died: {self.last_exception()}") from None
            raise
        if not self.alive():
            raise AssertionError(f"the server died: {self.last_exception()}")

    def stop(self) -> None:
        self.srv.stop()


@pytest.fixture(scope="module")
def wire_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WireServer]:
    server = WireServer(tmp_path_factory.mktemp("fuzz-server"))
    yield server
    server.stop()


def healthy(wire: WireServer) -> None:
    """The server is up, logs in a new session and runs a command, and has logged no traceback."""
    from peer.rawiscsi import RawSession
    srv = wire.srv
    assert srv.alive(), f"the server died: {wire.last_exception()}"
    with RawSession(srv.host, srv.port, TARGET, initiator="iqn.2026-11.org.example:health") as raw:
        raw.login()
        status, _, _ = raw.scsi(1, bytes(6))
        status, data, _ = raw.scsi(1, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), 512)
        assert status == 0 and data == bytes(512)
    log = srv.log()
    assert "Traceback" not in log, f"the server logged an exception: {wire.last_exception()}"


def exchange(port: int, payload: bytes, *, log_in: bool, isid: int) -> bytes:
    """Connect (and log in), send `payload`, close our side; the target must close within 5 s."""
    from peer.rawiscsi import RawSession
    if log_in:
        raw = RawSession("127.0.0.1", port, TARGET, initiator="iqn.2026-11.org.example:fuzz", timeout=5)
        raw.isid = bytes([0x80, 0, 0, 0]) + (isid & 0xFFFF).to_bytes(2, "big")
        raw.login()
        sock = raw.sock
    else:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    received = b""
    try:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b""                               # the target already dropped us: fine
        deadline = time.monotonic() + 5
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                return received
            except socket.timeout:
                raise AssertionError("the target kept the connection open 5 s after the peer closed it") from None
            if not chunk:
                return received
            received += chunk
    finally:
        sock.close()


@st.composite
def login_exchange(draw: st.DrawFn) -> bytes:
    first = draw(login_request(True))
    rest = draw(st.lists(login_request(False), max_size=3))
    data = wire([first, *rest], False, False)
    if draw(st.booleans()):
        data = mutate(data, draw(st.lists(mutation, min_size=1, max_size=3)))
    return data


def test_server_survives_fuzzed_logins(wire_server: WireServer) -> None:
    @wire_settings
    @given(payload=login_exchange())
    def one(payload: bytes) -> None:
        RUNS["wire_login"] += 1
        wire_server.check(lambda: exchange(wire_server.port, payload, log_in=False, isid=0))

    def batch() -> None:
        wire_server.ensure()
        one()
        healthy(wire_server)
    fuzz("wire_login", batch)


CDB_OPCODES = [0x00, 0x03, 0x12, 0x1A, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x41, 0x42, 0x5A, 0x5E, 0x5F, 0x88, 0x89,
               0x8A, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA3, 0x16, 0x17, 0x04, 0x48, 0x83, 0x84, 0x7F, 0xFF]


@st.composite
def ffp_pdu(draw: st.DrawFn, cmdsn: int) -> Any:
    """A full-feature-phase PDU aimed at the real LUNs; lengths stay small (a huge EDTL is its own test)."""
    kind = draw(st.sampled_from(["scsi", "scsi", "scsi", "nop", "data", "tmf", "text", "logout", "snack"]))
    itt = draw(st.integers(1, 40))
    lun = draw(st.sampled_from([0, 1, 1 << 48, 7 << 48]) | st.integers(0, 2**64 - 1))
    data = draw(st.binary(max_size=600))
    if kind == "scsi":
        cdb = bytes([draw(st.sampled_from(CDB_OPCODES))]) + draw(st.binary(min_size=15, max_size=15))
        if draw(st.booleans()):
            cdb = cdb[:1] + bytes(5) + cdb[6:]              # small LBAs: mostly in range
        return ScsiCommand(immediate=draw(st.booleans()), final=draw(st.booleans()), read=draw(st.booleans()),
                           write=draw(st.booleans()), attr=draw(st.integers(0, 7)),
                           lun=draw(st.sampled_from([0, 1 << 48])), itt=itt,
                           edtl=draw(st.integers(0, 1 << 20)), cmdsn=cmdsn, cdb=cdb, data=data)
    if kind == "nop":
        return NopOut(immediate=draw(st.booleans()), lun=lun, itt=draw(st.sampled_from([itt, RESERVED_TAG])),
                      ttt=draw(st.sampled_from([RESERVED_TAG, 1, 2])), cmdsn=cmdsn, data=data)
    if kind == "data":
        return DataOut(final=draw(st.booleans()), lun=lun, itt=itt, ttt=draw(st.sampled_from([RESERVED_TAG, 1, 2])),
                       datasn=draw(st.integers(0, 3)), buffer_offset=draw(st.sampled_from([0, 512, 1024]) | u32),
                       data=data)
    if kind == "tmf":
        return TaskMgmtRequest(immediate=draw(st.booleans()), function=draw(st.integers(0, 0x7F)), lun=lun,
                               itt=itt, rtt=draw(st.integers(1, 40) | u32), cmdsn=cmdsn,
                               refcmdsn=draw(u32), expdatasn=draw(u32))
    if kind == "text":
        return TextRequest(immediate=draw(st.booleans()), final=draw(st.booleans()), cont=draw(st.booleans()),
                           lun=lun, itt=itt, ttt=draw(st.sampled_from([RESERVED_TAG, 1])), cmdsn=cmdsn,
                           data=draw(login_text))
    if kind == "logout":
        return LogoutRequest(immediate=draw(st.booleans()), reason=draw(st.integers(0, 0x7F)), itt=itt,
                             cid=draw(st.sampled_from([0, 1])), cmdsn=cmdsn)
    return SnackRequest(type=draw(st.integers(0, 0xF)), lun=lun, itt=itt, ttt=draw(u32), begrun=draw(u32),
                        runlength=draw(u32))


@st.composite
def ffp_stream(draw: st.DrawFn) -> bytes:
    pdus = [draw(ffp_pdu(1 + i if draw(st.integers(0, 9)) else draw(u32))) for i in range(draw(st.integers(1, 8)))]
    data = wire(pdus, False, False)
    if draw(st.integers(0, 3)) == 0:
        data = mutate(data, draw(st.lists(mutation, min_size=1, max_size=3)))
    return data


def test_server_survives_fuzzed_full_feature_phase(wire_server: WireServer) -> None:
    @wire_settings
    @given(payload=ffp_stream(), isid=u16)
    def one(payload: bytes, isid: int) -> None:
        RUNS["wire_ffp"] += 1
        wire_server.check(lambda: exchange(wire_server.port, payload, log_in=True, isid=isid))

    def batch() -> None:
        wire_server.ensure()
        one()
        healthy(wire_server)
    fuzz("wire_ffp", batch)


def test_server_is_healthy_after_the_fuzzing(wire_server: WireServer) -> None:
    healthy(wire_server)
