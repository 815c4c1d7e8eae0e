"""Command line: `trioscsi serve` (and later the tape and emulator tools)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from . import config as config_module
from .server import Server, serve_until_signalled


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["emulator", "check"]:
        # The checker has its own option parser (emulator command lines follow `--`).
        from .emu.checker import main as check_main
        return check_main(argv[2:])
    if argv[:1] == ["admin"]:
        return _admin(argv[1:])
    if argv[:1] == ["tape"]:
        from .tape_cli import main as tape_main
        return tape_main(argv[1:])
    parser = argparse.ArgumentParser(prog="trioscsi", description="A SCSI target in user space.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the target")
    serve.add_argument("--config", help="TOML configuration (default: the embedded demo target)")
    serve.add_argument("--listen", action="append", metavar="HOST:PORT",
                       help="listen here instead of the configured portals (repeatable)")
    serve.add_argument("--state-dir", help="images and persistent state (default: ./state)")
    serve.add_argument("--log-level", default=os.environ.get("TRIOSCSI_LOG", "info"),
                       choices=["debug", "info", "warning", "error"])
    commands.add_parser("emulator", help="emulator tools: `trioscsi emulator check -- COMMAND ARGS...` "
                                         "runs the protocol checker against an emulator")
    commands.add_parser("admin", help="talk to a running server: `trioscsi admin [--state-dir DIR] status` "
                                       "`restart LU` (restart one emulator without failing a command), "
                                       "`load LU PATH` / `unload LU` (change a CD-ROM's or tape drive's medium)")
    commands.add_parser("tape", help="create cartridges and libraries: `trioscsi tape cartridge|library --help`")
    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config")
    args = parser.parse_args(argv)

    if args.command == "check-config":
        try:
            config_module.load(args.config)
        except config_module.ConfigError as exc:
            print(f"trioscsi: {exc}", file=sys.stderr)
            return 2
        print(f"{args.config}: OK")
        return 0

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        config = config_module.load(args.config)
        if args.listen:
            config.portals = [config_module.parse_listen(text) for text in args.listen]
    except config_module.ConfigError as exc:
        print(f"trioscsi: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"trioscsi: --listen: {exc}", file=sys.stderr)
        return 2
    state_dir = os.path.abspath(args.state_dir or config.state_dir or "state")
    server = Server(config, state_dir)
    try:
        reload = (lambda: config_module.load(args.config)) if args.config else None
        trio.run(serve_until_signalled, server, reload)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _admin(argv: list[str]) -> int:
    import socket
    parser = argparse.ArgumentParser(prog="trioscsi admin")
    parser.add_argument("--state-dir", default="state")
    parser.add_argument("command", nargs="+", help="status | restart LU | load LU PATH | unload LU")
    args = parser.parse_args(argv)
    if args.command[0] == "load" and len(args.command) == 3:
        args.command[2] = os.path.abspath(args.command[2])      # the server resolves paths in its state dir
    path = os.path.join(args.state_dir, "admin.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(90)
            sock.connect(path)
            sock.sendall(" ".join(args.command).encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    except OSError as exc:
        print(f"trioscsi admin: {path}: {exc}", file=sys.stderr)
        return 2
    text = reply.decode(errors="replace")
    print(text, end="")
    return 1 if text.startswith("error") else 0
