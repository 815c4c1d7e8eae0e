"""vcdrom: a read-only CD/DVD-ROM drive (MMC-6) over disc images. Run as ``python -m emulators.vcdrom``.

``hello.params``:
  path      the image in the drive at start (ISO 9660, UDF: any file of 2048-byte blocks), opened read-only;
            absent: an empty drive
  loaded    true (default): the tray is closed and the disc ready; false: the disc lies in the open tray until a
            START STOP UNIT (LOEJ, START) closes it
  profile   "auto" (default: CD-ROM up to 449,850 blocks, about 878 MiB; DVD-ROM beyond), "cd" or "dvd"
  serial    the unit serial number when ``hello.identity`` fixes none (default: derived from ``path``)
  workers   command threads (default 1: media control must stay in order with commands, protocol §10.1)

The initiator ejects with START STOP UNIT (LOEJ, START 0) and loads the same disc again with LOEJ, START 1.
Media control (docs/emulator-protocol.md §10, ``ready.features`` has "removable"): ``load {path}`` puts a disc in
an empty drive (or closes the tray on the same disc) and makes it ready, ``unload`` takes the disc out,
``restore {path, loaded}`` puts a restarted drive back without a unit attention; each is answered by one
``done`` with the resulting state, and ``position`` events report every change. See docs/vcdrom.md.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from emulators.pyemu.mmc import MmcDevice
from emulators.pyemu.runner import ParamError, main


class VcdromDevice(MmcDevice):
    """The MMC drive plus the core's media control messages (protocol §10.1)."""
    device_name = "vcdrom"

    @property
    def media_lock(self) -> Any:
        return self.lock                # the drive runs commands on worker threads

    def _load(self, msg: dict[str, Any]) -> None:
        """Insert ``path`` and close the tray. The disc already in the drive is closed in again; another disc
        must be unloaded first, as a drive holds one (protocol §10.1)."""
        path = msg.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("load needs path (text)")
        if self.disc == path and self.store is not None:
            self.close_tray()                       # ready already: nothing changes
            return
        if self.disc not in (None, path):
            raise ValueError(f"the drive holds {self.disc}: unload it first")
        if self.disc is not None:
            self.take_out()                         # the same image, unreadable before: try it again
        self.insert(path)
        self.set_tray(False)
        self.medium_arrived()                       # even an unreadable disc is news (then NOT READY 30/02)

    def _unload(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Take the disc out, unless an initiator has locked the tray: an operator's eject button is ignored
        while medium removal is prevented, and a mounted file system keeps its disc."""
        if self.prevented():
            raise ValueError("medium removal is prevented (PREVENT ALLOW MEDIUM REMOVAL)")
        return {"unloaded": self.take_out()}

    def _restore(self, msg: dict[str, Any]) -> None:
        path, loaded = msg.get("path"), msg.get("loaded", True)
        if (path is not None and not isinstance(path, str)) or not isinstance(loaded, bool):
            raise ValueError("restore needs path (text or null) and loaded (bool)")
        if self.disc != path:
            if self.disc is not None:
                self.take_out()
            if path is not None:
                self.insert(path)
        self.set_tray(path is not None and not loaded)


def make_device(params: dict[str, Any], identity: dict[str, Any], emit: Callable[..., None]) -> VcdromDevice:
    path, loaded = params.get("path"), params.get("loaded", True)
    profile, serial = params.get("profile", "auto"), params.get("serial")
    if path is not None and (not isinstance(path, str) or not path):
        raise ParamError("path must be the path of a disc image")
    if not isinstance(loaded, bool):
        raise ParamError(f"loaded must be true or false, not {loaded!r}")
    if profile not in ("auto", "cd", "dvd"):
        raise ParamError(f"profile must be auto, cd or dvd, not {profile!r}")
    if serial is not None and not isinstance(serial, str):
        raise ParamError("serial must be text")
    basis = os.path.realpath(path) if path else repr(sorted(params.items()))
    fallback = serial or "CD" + hashlib.sha256(basis.encode()).hexdigest()[:14]
    device = VcdromDevice(identity, emit, fallback_serial=fallback, profile=profile)
    if path:
        device.insert(path)
        if device.store is None:
            raise ParamError(f"path: {device.bad}")
        device.set_tray(not loaded)
    return device


if __name__ == "__main__":
    main(make_device)
