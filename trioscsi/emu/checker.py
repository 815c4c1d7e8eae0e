"""Conformance checker for emulators: `python -m trioscsi.emu.checker [OPTIONS] -- CMD ARGS...`.

It plays the core's side of docs/emulator-protocol.md against any emulator command and prints a report: one
line per check, PASS / FAIL / WARN / SKIP / NOT RUN, and for every failure the protocol section (§N of
docs/emulator-protocol.md) or the SCSI clause behind it.  It exits 0 when nothing failed, 1 otherwise, 2 when it
could not start the command at all.

Strategy: one trio task reads the emulator's stdout and turns bytes into frames with a diagnosing frame reader
(`FrameReader`: it says *why* a stream is not the protocol: little-endian length, a missing length prefix,
text on stdout, a length that counts itself, a frame cut short).  Each frame is checked against the §8 schema
and dispatched: `done` wakes the command waiting for its tag, `pong` its ping; a second `done`, a `done` for a
tag not in flight, a malformed frame or an event before `ready` is recorded as a *violation*.  Checks
(`checker_cases.py`) run one after the other; after each, a ping round trip flushes the pipe and every violation
seen meanwhile is charged to that check.

Invariants: every wait has a deadline (reply, ready, exit, and one per check), so the checker never hangs; the
emulator runs in its own process group, which is killed (SIGKILL) and reaped at the end whatever happened.  When
the emulator exits or stops answering (a check timed out and a ping then got no pong) the remaining checks are
reported NOT RUN instead of each waiting out its own timeout.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from .checker_process import IDENTITY, CheckFailed, EmulatorProcess, Outcome, Skipped, Warned
# Re-exported for the tests and for authors who script the checker.
from .checker_process import FrameReader, FramingError, schema_problems  # noqa: F401

# ---- running a battery --------------------------------------------------------------------------------------

@dataclass
class Options:
    argv: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=lambda: dict(IDENTITY))
    cwd: str | None = None
    timeout: float = 10.0            # one reply (done, pong)
    ready_timeout: float = 10.0
    exit_timeout: float = 5.0
    depth: int = 64
    large: int = 1 << 20
    unknown_opcode: int = 0xFF
    verify: bool = True              # data written can be read back (not so for a null device)
    skip: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)


@dataclass
class Report:
    options: Options
    outcomes: list[Outcome] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return any(o.status in ("FAIL", "NOT RUN") for o in self.outcomes)

    def outcome(self, check: str) -> Outcome | None:
        return next((o for o in self.outcomes if o.check == check), None)

    def text(self) -> str:
        lines = [f"trioscsi emulator checker: {' '.join(self.options.argv)}"]
        if self.summary:
            lines.append(f"  {self.summary}")
        width = max([len(o.check) for o in self.outcomes] + [10])
        for o in self.outcomes:
            lines.append(f"{o.status:<7} {o.check:<{width}}  {o.detail}".rstrip())
            if o.clauses and o.status in ("FAIL", "WARN", "NOT RUN"):
                lines.append(f"{'':<{width + 10}}see {'; '.join(dict.fromkeys(o.clauses))}")
        counts = {s: sum(o.status == s for o in self.outcomes) for s in ("PASS", "FAIL", "WARN", "SKIP", "NOT RUN")}
        if self.failed and self.stderr:
            lines.append("emulator stderr (last lines):")
            lines += [f"  | {line}" for line in self.stderr[-15:]]
        lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['WARN']} warnings, "
                     f"{counts['SKIP']} skipped, {counts['NOT RUN']} not run in {self.seconds:.1f} s: "
                     f"{'FAILED' if self.failed else 'OK'}")
        return "\n".join(lines)


class Session:
    """What a check sees: the process, the options, what `ready` said, and scratch state shared by checks."""

    def __init__(self, emu: EmulatorProcess, options: Options) -> None:
        self.emu = emu
        self.options = options
        self.ready: dict[str, Any] = {}
        self.notes: dict[str, Any] = {}
        self.hung = ""
        self.lost = 0           # checks in which a command went unanswered


async def _run_check(session: Session, report: Report, name: str, fn: Any) -> None:
    emu = session.emu
    if session.hung:
        report.outcomes.append(Outcome(name, "NOT RUN", session.hung))
        return
    mark = len(emu.violations)
    status, detail, clauses = "PASS", "", []
    try:
        with trio.fail_after(max(30.0, 4 * session.options.timeout, session.options.ready_timeout + 10)):
            detail = await fn(session) or ""
    except Skipped as exc:
        status, detail = "SKIP", str(exc)
    except Warned as exc:
        status, detail, clauses = "WARN", exc.message, [exc.clause] if exc.clause else []
    except CheckFailed as exc:
        status, detail, clauses = "FAIL", exc.message, [exc.clause] if exc.clause else []
    except trio.TooSlowError:
        status, detail = "FAIL", "the check did not finish within its deadline"
    except Exception as exc:     # an answer so odd that the check tripped over it: still the emulator's failure
        status, detail = "FAIL", f"could not interpret the emulator's answer ({type(exc).__name__}: {exc})"
    if status == "FAIL" and clauses and "exactly one done" in clauses[0]:
        session.lost += 1
    if session.ready and not emu.gone.is_set() and not emu.stdin_closed:
        try:
            await emu.ping()       # flush: replies already written reach us before the pong
        except CheckFailed as exc:
            session.hung = f"not run: the emulator stopped answering during {name} ({exc.message})"
            if status == "PASS":
                status, detail, clauses = "FAIL", f"{detail}; then {exc.message}".lstrip("; "), [exc.clause]
    if emu.gone.is_set() and not session.hung and not emu.stdin_closed:
        session.hung = f"not run: {emu.gone_reason}"
    if session.lost >= 2 and not session.hung:
        session.hung = "not run: commands went unanswered in two checks (each would wait out --timeout)"
    seen = [v for v in emu.violations[mark:] if v.clause != "WARN"]
    warnings = [v for v in emu.violations[mark:] if v.clause == "WARN"]
    fresh = [v.message for v in seen if v.message not in detail]      # not what the check already said
    if seen:
        extra = "; ".join(fresh[:4]) + (f" (+{len(fresh) - 4} more)" if len(fresh) > 4 else "")
        detail = "; ".join(x for x in (detail if status == "FAIL" else "", extra) if x)
        status = "FAIL"
        clauses += [v.clause for v in seen]
    elif warnings and status == "PASS":
        status, detail = "WARN", "; ".join(v.message for v in warnings)
    report.outcomes.append(Outcome(name, status, detail, clauses))


async def run_checks(options: Options) -> Report:
    """Run the whole battery against `options.argv`; never raises for anything the emulator does."""
    from . import checker_cases as cases

    report = Report(options)
    began = time.monotonic()
    picked = [c for c in cases.CHECKS if (not options.only or any(c[0].startswith(p) for p in options.only))
              and not any(c[0].startswith(p) for p in options.skip)]
    session = await _battery(options, report, [("handshake.ready", cases.handshake, cases.always)] + picked)
    report.stderr = list(session.emu.stderr)
    report.summary = session.notes.get("summary", "")
    if session.ready and "version" not in options.skip and not options.only:   # needs a process of its own
        await _battery(options, report, [("handshake.version_refused", cases.version_refused, cases.always)])
    report.seconds = time.monotonic() - began
    return report


async def _battery(options: Options, report: Report, checks: list[Any]) -> Session:
    """Start one emulator process, run `checks` against it in order, then kill it (always)."""
    emu = EmulatorProcess(options.argv, options.cwd, options.timeout)
    session = Session(emu, options)
    try:
        async with trio.open_nursery() as nursery:
            try:
                await emu.start(nursery)
            except OSError as exc:
                report.outcomes.append(Outcome("handshake.start", "FAIL", f"cannot start {options.argv[0]}: {exc}"))
                return session
            for i, (name, fn, applies) in enumerate(checks):
                if session.ready and not applies(session):
                    continue
                await _run_check(session, report, name, fn)
                if i == 0 and len(checks) > 1 and not session.ready:
                    session.hung = session.hung or "not run: no usable ready"
            await emu.kill()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await emu.kill()
    return session


# ---- command line -------------------------------------------------------------------------------------------

def parse_param(text: str) -> tuple[str, Any]:
    """`key=value`; the value is read as JSON when it parses (numbers, true/false, lists), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trioscsi emulator check",
                                description="Check an emulator command against docs/emulator-protocol.md.",
                                epilog="example: python -m trioscsi.emu.checker --param size=8388608 -- ./ramdisk")
    p.add_argument("--param", action="append", default=[], type=parse_param, metavar="KEY=VALUE",
                   help="hello.params entry (value parsed as JSON when possible); repeatable")
    p.add_argument("--identity", action="append", default=[], type=parse_param, metavar="KEY=VALUE",
                   help="override a hello.identity entry (naa as hex); repeatable")
    p.add_argument("--cwd", help="run the emulator in this directory (the core uses the state dir)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one reply (default 10)")
    p.add_argument("--ready-timeout", type=float, default=10.0, help="seconds to wait for ready (default 10)")
    p.add_argument("--exit-timeout", type=float, default=5.0, help="seconds to exit after EOF (default 5)")
    p.add_argument("--depth", type=int, default=64, help="commands in flight in the concurrency check")
    p.add_argument("--large", type=int, default=1 << 20, help="bytes in the large-transfer check (default 1 MiB)")
    p.add_argument("--unknown-opcode", type=lambda s: int(s, 0), default=0xFF,
                   help="an opcode the emulator does not implement (default 0xff)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not compare data read with data written (a null device that discards writes)")
    p.add_argument("--skip", action="append", default=[], metavar="CHECK",
                   help="skip checks whose name starts with this (repeatable); 'version' skips the second spawn")
    p.add_argument("--only", action="append", default=[], metavar="CHECK", help="run only these checks")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return p


def options_from_args(argv: list[str]) -> Options:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        _parser().error("give the emulator command after --")
    identity = dict(IDENTITY)
    for key, value in args.identity:
        identity[key] = bytes.fromhex(str(value)) if key == "naa" else str(value)
    same = ("cwd", "timeout", "ready_timeout", "exit_timeout", "depth", "large", "unknown_opcode", "verify", "skip",
            "only")
    return Options(argv=command, params=dict(args.param), identity=identity, **{k: getattr(args, k) for k in same})


def main(argv: list[str] | None = None) -> int:
    """`trioscsi emulator check [OPTIONS] -- CMD ARGS...`: 0 all passed, 1 something failed, 2 usage/startup."""
    options = options_from_args(sys.argv[1:] if argv is None else argv)
    report = trio.run(run_checks, options)
    print(report.text(), flush=True)
    if report.outcomes and report.outcomes[0].check == "handshake.start":
        return 2
    return 1 if report.failed else 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: checker_cases imports trioscsi.emu.checker, and
    # its exception classes must be the ones `_run_check` catches.
    from trioscsi.emu.checker import main as _main
    sys.exit(_main())
