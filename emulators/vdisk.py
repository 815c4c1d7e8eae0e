"""vdisk: a SCSI disk (SBC) backed by a file or a block device. Run as ``python -m emulators.vdisk``.

``hello.params``:
  path (required)      file or block device
  size                 LU size in bytes; a missing file is created sparse at this size (and a smaller one grown)
  create               create a missing file (default true)
  block_size           512 (default) or 4096
  physical_block_size  physical block size reported by READ CAPACITY(16), bytes (default: block_size)
  o_direct             open with O_DIRECT: I/O through page-aligned buffers, bypassing the page cache
  read_only            writes fail with DATA PROTECT, WRITE PROTECTED
  write_through        writes are durable before GOOD (O_DSYNC); caching page WCE=0
  thin                 UNMAP / WRITE SAME with UNMAP punch holes (default: true for regular files)
  rotation_rate        Block Device Characteristics MEDIUM ROTATION RATE (default 1: solid state)
  removable            removable medium (RMB): START STOP UNIT ejects/loads, PREVENT ALLOW MEDIUM REMOVAL
  xcopy_peers          other LUs EXTENDED COPY may use: [{naa = "hex", path = "...", block_size = 512,
                       read_only = false}] (the NAA as the peer LU reports it in VPD page 0x83)
  sanitize_rate        bytes per second a SANITIZE OVERWRITE may write (default 0: unlimited)
  software_write_protect  the control mode page's SWP bit is changeable (default false; see docs/conformance.md)
  workers              command threads (default 4; 0 runs every command on the reader thread)
  max_inflight         reported in ``ready`` (default 64)
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from typing import Any, Callable

from emulators.pyemu.runner import ParamError, main
from emulators.pyemu.sbc import SbcDevice
from emulators.pyemu.stores import FileStore
from emulators.pyemu.xcopy import CopyTarget

BLOCK_SIZES = (512, 1024, 2048, 4096)


def _flag(params: dict[str, Any], key: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ParamError(f"{key} must be true or false, not {value!r}")
    return value


def _peers(params: dict[str, Any]) -> dict[bytes, Callable[[], CopyTarget | None]]:
    """``xcopy_peers`` as NAA -> a function that opens the peer's image on first use (None if it cannot)."""
    peers = params.get("xcopy_peers") or []
    if not isinstance(peers, list):
        raise ParamError("xcopy_peers must be a list of {naa, path, block_size, read_only}")
    out: dict[bytes, Callable[[], CopyTarget | None]] = {}
    for i, peer in enumerate(peers):
        if not isinstance(peer, dict) or not isinstance(peer.get("path"), str):
            raise ParamError(f"xcopy_peers[{i}] needs naa and path")
        try:
            naa = bytes.fromhex(str(peer.get("naa", "")))
        except ValueError:
            naa = b""
        if len(naa) not in (8, 16):
            raise ParamError(f"xcopy_peers[{i}].naa must be 16 or 32 hex digits")
        block_size = peer.get("block_size", 512)
        if block_size not in BLOCK_SIZES:
            raise ParamError(f"xcopy_peers[{i}].block_size must be 512 or 4096, not {block_size!r}")
        out[naa] = _lazy_peer(peer["path"], block_size, _flag(peer, "read_only"))
    return out


def _lazy_peer(path: str, block_size: int, read_only: bool) -> Callable[[], CopyTarget | None]:
    lock = threading.Lock()
    opened: list[CopyTarget] = []

    def open_peer() -> CopyTarget | None:
        with lock:
            if not opened:
                try:
                    store = FileStore(path, None, create=False, read_only=read_only)
                except (OSError, ValueError) as exc:
                    print(f"emulator: EXTENDED COPY peer {path} unreachable: {exc}", file=sys.stderr)
                    return None
                opened.append(CopyTarget(store, block_size, store.size // block_size, read_only, True))
            return opened[0]
    return open_peer


def make_device(params: dict[str, Any], identity: dict[str, Any], emit: Callable[..., None]) -> SbcDevice:
    path = params.get("path")
    if not isinstance(path, str) or not path:
        raise ParamError("path (a file or block device) is required")
    size, block_size = params.get("size"), params.get("block_size", 512)
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ParamError(f"size must be a positive number of bytes, not {size!r}")
    if block_size not in BLOCK_SIZES:
        raise ParamError(f"block_size must be 512 or 4096, not {block_size!r}")
    physical = params.get("physical_block_size", block_size)
    if not isinstance(physical, int) or physical < block_size or physical & (physical - 1) \
            or physical // block_size > 1 << 15:
        raise ParamError(f"physical_block_size must be a power of two >= block_size, not {physical!r}")
    rate = params.get("sanitize_rate", 0)
    if not isinstance(rate, int) or rate < 0:
        raise ParamError(f"sanitize_rate must be a number of bytes per second, not {rate!r}")
    peers = _peers(params)
    thin = params.get("thin")
    read_only = _flag(params, "read_only")
    removable = _flag(params, "removable")
    store = FileStore(path, size, create=_flag(params, "create", True), read_only=read_only,
                      o_direct=_flag(params, "o_direct"), thin=None if thin is None else _flag(params, "thin"))
    if store.size < block_size:
        store.close()
        raise ParamError(f"{path} holds less than one block")
    serial = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
    marker = None if store.is_block else path + ".sanitize"
    return SbcDevice(store, identity, emit, block_size=block_size, read_only=read_only,
                     write_back=not _flag(params, "write_through"), physical_block=physical,
                     rotation_rate=int(params.get("rotation_rate", 1)), fallback_serial=serial,
                     product="VIRTUAL-DISK", removable=removable, copy_peers=peers, sanitize_marker=marker,
                     sanitize_rate=rate, software_write_protect=_flag(params, "software_write_protect"))


if __name__ == "__main__":
    main(make_device)
