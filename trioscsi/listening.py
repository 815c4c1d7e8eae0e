"""TCP listening shared by every transport: bind each address a host name resolves to, and accept connections
forever (a full file table is a pause, not the end of the listener)."""
from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

log = logging.getLogger("trioscsi")

_TRANSIENT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def listen(host: str, port: int) -> list[trio.socket.SocketType]:
    """Listening sockets for every address of `host` (IPv6 ones v6-only, so IPv4 and IPv6 bind side by side)."""
    infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets = []
    seen = set()
    for family, kind, proto, _, address in infos:
        if address in seen:
            continue
        seen.add(address)
        sock = trio.socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind(address)
        sock.listen(128)
        sockets.append(sock)
    return sockets


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def accept_forever(listener: trio.socket.SocketType, on_connection: Callable[[trio.SocketStream], None],
                         what: str) -> None:
    """Accept connections on `listener` and hand each (TCP_NODELAY set) to `on_connection`, which starts its
    task; EMFILE and the like are logged and retried after 100 ms."""
    async with trio.SocketListener(listener) as socket_listener:
        while True:
            try:
                stream = await socket_listener.accept()
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    log.error("%s accept failed (%s); retrying in 100 ms", what, exc)
                    await trio.sleep(0.1)
                    continue
                raise
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            on_connection(stream)
