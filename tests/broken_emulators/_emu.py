"""A deliberately tiny emulator skeleton for the broken emulators the checker tests run (stdlib + cbor2 only).

`serve(on_cmd)` speaks docs/emulator-protocol.md well enough to get through the handshake: it answers hello
with a small disk's ready, ping with pong, exits 0 at EOF, and hands each cmd to `on_cmd`.  Each broken
emulator in this directory changes one thing.  If hello.params has `pidfile`, the process writes its pid there
(so a test can check that the checker killed it).
"""
from __future__ import annotations

import os
import struct
import sys
from typing import Any, Callable

import cbor2

stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
SENSE_INVALID_OPCODE = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])


def read_exactly(n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stdin.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_frame() -> dict[str, Any] | None:
    head = read_exactly(4)
    if head is None:
        return None
    body = read_exactly(struct.unpack(">I", head)[0])
    return None if body is None else cbor2.loads(body)


def frame(message: dict[str, Any]) -> bytes:
    body = cbor2.dumps(message)
    return struct.pack(">I", len(body)) + body


def write(data: bytes) -> None:
    stdout.write(data)
    stdout.flush()


def send(message: dict[str, Any]) -> None:
    write(frame(message))


def ready(hello: dict[str, Any]) -> dict[str, Any]:
    pidfile = hello.get("params", {}).get("pidfile")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
    return {"op": "ready", "version": 1, "device_type": 0, "identity": hello.get("identity", {}),
            "capacity": {"block_size": 512, "blocks": 2048}}


def answer(cmd: dict[str, Any]) -> dict[str, Any]:
    """TEST UNIT READY is GOOD; everything else is ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE."""
    if cmd["cdb"][0] == 0x00:
        return {"op": "done", "tag": cmd["tag"], "status": 0}
    return {"op": "done", "tag": cmd["tag"], "status": 2, "sense": SENSE_INVALID_OPCODE}


def serve(on_cmd: Callable[[dict[str, Any]], None] = lambda cmd: send(answer(cmd)),
          on_hello: Callable[[dict[str, Any]], None] = lambda hello: send(ready(hello))) -> None:
    while (message := read_frame()) is not None:
        if message["op"] == "hello":
            on_hello(message)
        elif message["op"] == "ping":
            send({"op": "pong", "tag": message["tag"]})
        elif message["op"] == "cmd":
            on_cmd(message)
    sys.exit(0)
