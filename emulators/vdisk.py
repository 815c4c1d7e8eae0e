"""vdisk: a SCSI disk (SBC) backed by a file or a block device. Run as ``python -m emulators.vdisk``.

``hello.params``:
  path (required)   file or block device
  size              LU size in bytes; a missing file is created sparse at this size (and a smaller one grown)
  create            create a missing file (default true)
  block_size        512 (default) or 4096
  o_direct          open with O_DIRECT: I/O through page-aligned buffers, bypassing the page cache
  read_only         writes fail with DATA PROTECT, WRITE PROTECTED
  write_through     writes are durable before GOOD (O_DSYNC); caching page WCE=0
  thin              UNMAP / WRITE SAME with UNMAP punch holes (default: true for regular files)
  rotation_rate     Block Device Characteristics MEDIUM ROTATION RATE (default 1: solid state)
  workers           command threads (default 4; 0 runs every command on the reader thread)
  max_inflight      reported in ``ready`` (default 64)
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from emulators.pyemu.runner import ParamError, main
from emulators.pyemu.sbc import SbcDevice
from emulators.pyemu.stores import FileStore


def _flag(params: dict[str, Any], key: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ParamError(f"{key} must be true or false, not {value!r}")
    return value


def make_device(params: dict[str, Any], identity: dict[str, Any], emit: Callable[..., None]) -> SbcDevice:
    path = params.get("path")
    if not isinstance(path, str) or not path:
        raise ParamError("path (a file or block device) is required")
    size, block_size = params.get("size"), params.get("block_size", 512)
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ParamError(f"size must be a positive number of bytes, not {size!r}")
    if block_size not in (512, 1024, 2048, 4096):
        raise ParamError(f"block_size must be 512 or 4096, not {block_size!r}")
    thin = params.get("thin")
    read_only = _flag(params, "read_only")
    store = FileStore(path, size, create=_flag(params, "create", True), read_only=read_only,
                      o_direct=_flag(params, "o_direct"), thin=None if thin is None else _flag(params, "thin"))
    if store.size < block_size:
        store.close()
        raise ParamError(f"{path} holds less than one block")
    serial = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
    return SbcDevice(store, identity, emit, block_size=block_size, read_only=read_only,
                     write_back=not _flag(params, "write_through"), physical_block=store.fs_block,
                     rotation_rate=int(params.get("rotation_rate", 1)), fallback_serial=serial,
                     product="VIRTUAL-DISK")


if __name__ == "__main__":
    main(make_device)
