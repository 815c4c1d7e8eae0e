"""Commands per second through the real wire: ``python -m emulators.pyemu.bench [--depth N] [--workers N]``.

A synchronous driver keeps ``depth`` READ(10)s (or WRITE(10)s) in flight against a vdisk or null emulator
subprocess and reports the rate. Used to keep the hot path honest; numbers move with the machine's load.
"""
from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time

from .client import EmuClient


def run(module: str, count: int, depth: int, size: int, write: bool, params: dict) -> float:
    with EmuClient(module) as c:
        ready = c.hello(params)
        bs = ready["capacity"]["block_size"]
        blocks = ready["capacity"]["blocks"]
        n = size // bs
        op = 0x2A if write else 0x28
        data = b"\xa5" * size if write else None
        span = max(1, min(blocks // n, 1 << 16))
        cdbs = [struct.pack(">BBIBHB", op, 0, (i % span) * n, 0, n, 0) for i in range(span)]
        for i in range(min(span, 256)):                      # warm the page cache and the code paths
            c.cmd(cdbs[i], data, 0 if write else size)
        start = time.perf_counter()
        inflight: list[int] = []
        sent = got = 0
        while got < count:
            while sent < count and len(inflight) < depth:
                inflight.append(c.submit(cdbs[sent % span], data, 0 if write else size, tag=sent))
                sent += 1
            done = c.recv()
            assert done and done["op"] == "done" and done["status"] == 0, done
            inflight.remove(done["tag"])
            got += 1
        rate = count / (time.perf_counter() - start)
        c.close()
        return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--module", default="emulators.vdisk")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--o-direct", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        params: dict = {"path": os.path.join(tmp, "bench.img"), "size": 256 << 20, "o_direct": args.o_direct}
        if args.workers is not None:
            params["workers"] = args.workers
        rate = run(args.module, args.count, args.depth, args.size, args.write, params)
    print(f"{args.module} {'WRITE' if args.write else 'READ'}(10) {args.size} B, depth {args.depth}, "
          f"workers {args.workers}: {rate:,.0f} commands/s")


if __name__ == "__main__":
    main()
