"""null: a disk that stores nothing, for measuring the rest of the stack. Run as ``python -m emulators.null``.

Reads return zeros (slices of one preallocated buffer), writes are discarded; every other command is the vdisk's,
from the shared SBC table over a NullStore.

``hello.params``: size (bytes, default 1 TiB), block_size (512 or 4096, default 512), workers (default 0: a
command here is cheaper than a thread hand-off), max_inflight (default 64).
"""
from __future__ import annotations

from typing import Any, Callable

from emulators.pyemu.runner import ParamError, main
from emulators.pyemu.sbc import SbcDevice
from emulators.pyemu.stores import NullStore


def make_device(params: dict[str, Any], identity: dict[str, Any], emit: Callable[..., None]) -> SbcDevice:
    size, block_size = params.get("size", 1 << 40), params.get("block_size", 512)
    if block_size not in (512, 1024, 2048, 4096):
        raise ParamError(f"block_size must be 512 or 4096, not {block_size!r}")
    if not isinstance(size, int) or size < block_size:
        raise ParamError(f"size must be at least one block, not {size!r}")
    store = NullStore(size, SbcDevice.max_transfer_bytes)
    device = SbcDevice(store, identity, emit, block_size=block_size, physical_block=block_size,
                       fallback_serial="null-" + str(size), product="NULL-DISK")
    device.default_workers = 0           # type: ignore[attr-defined]
    return device


if __name__ == "__main__":
    main(make_device)
