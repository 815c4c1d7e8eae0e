"""vtape: a tape drive (SSC-3) over cartridge image files. Run as ``python -m emulators.vtape``.

``hello.params``:
  cartridge    path of a cartridge loaded at start (optional; see ``emulators.pyemu.cartridge.create_cartridge``)
  block_size   0 (default: variable-block mode) or the fixed block length in bytes
  serial       the drive's serial number when ``hello.identity`` does not fix one
  workers      command threads (default 1: a tape has one position, commands run in order)

Media control (docs/emulator-protocol.md §10): ``load`` {path}, ``unload``, ``restore`` {path, object, loaded,
block_size}, each answered by one ``done`` with the same tag; ``position`` events after every state change.
See docs/tape.md for the image format and the SCSI behaviour.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

from emulators.pyemu.runner import ParamError, main
from emulators.pyemu.ssc import MAX_BLOCK, SscDevice


class VtapeDevice(SscDevice):
    """The SSC device plus the core's media control messages (protocol §10.1)."""
    device_name = "vtape"

    def _load(self, msg: dict[str, Any]) -> None:
        path = msg.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("load needs path (text)")
        if self.path == path:
            return                                    # the same cartridge again: idempotent
        if self.path is not None:
            raise ValueError(f"the drive holds {self.path}")
        self.insert(path)
        self.emit("medium_changed")

    def _unload(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"unloaded": self.eject()}

    def _restore(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        path, obj = msg.get("path"), msg.get("object", 0)
        loaded, block_size = msg.get("loaded", True), msg.get("block_size", self.block_size)
        if (path is not None and not isinstance(path, str)) or not isinstance(obj, int) or obj < 0 \
                or not isinstance(block_size, int) or not 0 <= block_size <= MAX_BLOCK:
            raise ValueError("restore needs path (text or null), object (uint), loaded (bool), block_size (uint)")
        self.block_size = block_size
        if self.path != path:
            self.eject()
            if path is not None:
                self.insert(path, load=bool(loaded), count_load=False)
        self.loaded = bool(loaded) and path is not None
        if self.cart is None:
            return None
        self.cart.seek(obj)
        if self.cart.pos != obj:                      # the tape is shorter than the core remembers
            self.emit("medium_changed")
            return {"moved": True}
        return None


def make_device(params: dict[str, Any], identity: dict[str, Any], emit: Callable[..., None]) -> VtapeDevice:
    block_size, cartridge, serial = params.get("block_size", 0), params.get("cartridge"), params.get("serial")
    if not isinstance(block_size, int) or not 0 <= block_size <= MAX_BLOCK:
        raise ParamError(f"block_size must be 0 (variable) to {MAX_BLOCK}, not {block_size!r}")
    if cartridge is not None and (not isinstance(cartridge, str) or not cartridge):
        raise ParamError("cartridge must be the path of a cartridge image")
    if serial is not None and not isinstance(serial, str):
        raise ParamError("serial must be text")
    fallback = serial or "T" + hashlib.sha256(repr(sorted(params.items())).encode()).hexdigest()[:15]
    device = VtapeDevice(identity, emit, block_size=block_size, fallback_serial=fallback)
    if cartridge:
        device.insert(cartridge)
    return device


if __name__ == "__main__":
    main(make_device)
