"""vchanger: a tape library (SMC-3) whose drives are vtape LUs. Run as ``python -m emulators.vchanger``.

``hello.params`` (all may also come from a TOML file named by ``library``; keys given inline win):
  library         path of a TOML library description with the keys below
  state           JSON file where the element contents persist (default: ``<library>.state.json``; without
                  either, moves are not persisted)
  transport       address of the medium transport element (default 1)
  slots           number of storage slots (required, >= 1); first_slot: first address (default 1000)
  ie_slots        number of import/export slots (default 0); first_ie: first address (default 10)
  drives          [{serial, lun, vendor?, product?}]: the drive LUs, in element order; first_drive (default 500)
  cartridges      [{barcode, path, slot? | ie? | drive?}]: slot and ie count from 1, drive from 0 (as mtx
                  does); without a place a cartridge goes to the first empty slot
  media_dir       directory for relative cartridge paths (default: the library file's directory, else cwd)
  create_missing  create missing cartridge images (default true) of ``capacity`` bytes (default 10 GiB)

Moves into and out of drives become ``move`` events (docs/emulator-protocol.md §10); ``ready.drives`` tells the
core what every drive holds so that it can reconcile the drive LUs at start. See docs/tape.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tomllib
from typing import Any, Callable

from emulators.pyemu.cartridge import create_cartridge
from emulators.pyemu.runner import ParamError, main
from emulators.pyemu.smc import DT, IE, MT, ST, Drive, Element, SmcDevice, Volume

STATE_VERSION = 1


def _int(params: dict[str, Any], key: str, default: int, low: int = 0) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 0xFFFF:
        raise ParamError(f"{key} must be an integer from {low} to 65535, not {value!r}")
    return value


def load_params(params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The inline params over the TOML library file's; and the file's directory."""
    library = params.get("library")
    if library is None:
        return dict(params), None
    try:
        with open(library, "rb") as f:
            merged = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ParamError(f"library {library}: {exc}") from None
    merged.update({k: v for k, v in params.items() if k != "library"})
    merged.setdefault("state", f"{library}.state.json")
    return merged, os.path.dirname(os.path.abspath(library))


def build_elements(p: dict[str, Any], base_dir: str | None) -> tuple[list[Element], list[dict[str, Any]]]:
    """The empty elements, and the configured cartridges with absolute paths."""
    slots, ie_slots = _int(p, "slots", 0, 1), _int(p, "ie_slots", 0)
    first_slot, first_ie, first_drive = _int(p, "first_slot", 1000), _int(p, "first_ie", 10), \
        _int(p, "first_drive", 500)
    drives = p.get("drives", [])
    if not isinstance(drives, list) or not all(isinstance(d, dict) and isinstance(d.get("serial"), str)
                                               for d in drives):
        raise ParamError("drives must be a list of {serial, lun, vendor?, product?}")
    elements = [Element(MT, _int(p, "transport", 1))]
    elements += [Element(ST, first_slot + i) for i in range(slots)]
    elements += [Element(IE, first_ie + i) for i in range(ie_slots)]
    for i, d in enumerate(drives):
        lun = d.get("lun")
        if lun is not None and (not isinstance(lun, int) or lun < 0):
            raise ParamError(f"drives[{i}].lun must be a LUN number")
        elements.append(Element(DT, first_drive + i, drive=Drive(d["serial"], lun, str(d.get("vendor", "TRIOSCSI")),
                                                                 str(d.get("product", "VIRTUAL-TAPE")))))
    if max(e.address for e in elements) > 0xFFFF:
        raise ParamError("element addresses must stay below 65536")
    media_dir = p.get("media_dir", base_dir or os.getcwd())
    carts = []
    for i, c in enumerate(p.get("cartridges", [])):
        if not isinstance(c, dict) or not isinstance(c.get("barcode"), str) or not isinstance(c.get("path"), str):
            raise ParamError(f"cartridges[{i}] needs barcode and path")
        carts.append({**c, "path": os.path.join(media_dir, c["path"])})
    if len({c["barcode"] for c in carts}) != len(carts):
        raise ParamError("two cartridges share a barcode")
    return elements, carts


def _place(elements: list[Element], cart: dict[str, Any]) -> Element | None:
    """The element a configured cartridge asks for (if free), else the first empty slot."""
    kinds = {"slot": (ST, 1), "ie": (IE, 1), "drive": (DT, 0)}
    for key, (kind, origin) in kinds.items():
        if key in cart:
            same = [e for e in elements if e.kind == kind]
            value = cart[key]
            index: int = value - origin if isinstance(value, int) and not isinstance(value, bool) else -1
            if 0 <= index < len(same) and same[index].volume is None:
                return same[index]
            print(f"vchanger: {cart['barcode']}: {key} {cart[key]} is not free; using the first empty slot",
                  file=sys.stderr)
    return next((e for e in elements if e.kind == ST and e.volume is None), None)


class Library:
    """The element contents and their state file."""

    def __init__(self, elements: list[Element], carts: list[dict[str, Any]], state: str | None,
                 create: bool, capacity: int) -> None:
        self.elements, self.state = elements, state
        by_address = {e.address: e for e in elements}
        saved = self._read_state()
        known = set()
        for addr, item in (saved or {}).items():
            e = by_address.get(int(addr))
            volume = Volume(item["barcode"], item["path"])
            if e is None or e.kind == MT:
                e = _place(elements, {"barcode": volume.barcode})
                if e is None:
                    print(f"vchanger: no room for {volume.barcode} (element {addr} is gone)", file=sys.stderr)
                    continue
            e.volume, e.source = volume, item.get("source")
            known.add(volume.barcode)
        for cart in carts:
            if cart["barcode"] in known:
                continue
            e = _place(elements, cart)
            if e is None:
                raise ParamError(f"no empty slot for cartridge {cart['barcode']}")
            e.volume, e.source = Volume(cart["barcode"], cart["path"]), (e.address if e.kind in (ST, IE) else None)
        for e in elements:
            if e.volume and create and not os.path.exists(e.volume.path):
                os.makedirs(os.path.dirname(os.path.abspath(e.volume.path)), exist_ok=True)
                create_cartridge(e.volume.path, e.volume.barcode, capacity)
        if saved is None:
            self.save()

    def _read_state(self) -> dict[str, Any] | None:
        if not self.state or not os.path.exists(self.state):
            return None
        try:
            with open(self.state) as f:
                doc = json.load(f)
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"state version {doc.get('version')}")
            return dict(doc["elements"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ParamError(f"state file {self.state}: {exc}") from None

    def save(self) -> None:
        """Write the state file atomically (temporary file, fsync, rename, fsync of the directory)."""
        if not self.state:
            return
        doc = {"version": STATE_VERSION, "elements": {
            str(e.address): {"barcode": e.volume.barcode, "path": e.volume.path, "source": e.source}
            for e in self.elements if e.volume}}
        tmp = f"{self.state}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state)
        fd = os.open(os.path.dirname(os.path.abspath(self.state)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_device(params: dict[str, Any], identity: dict[str, Any], emit: Callable[..., None]) -> SmcDevice:
    p, base_dir = load_params(params)
    elements, carts = build_elements(p, base_dir)
    create, capacity = p.get("create_missing", True), p.get("capacity", 10 << 30)
    if not isinstance(create, bool) or not isinstance(capacity, int):
        raise ParamError("create_missing must be true or false and capacity a number of bytes")
    if not p.get("state"):
        print("vchanger: no state file: moves are lost when the emulator restarts", file=sys.stderr)
    library = Library(elements, carts, p.get("state"), create, capacity)
    serial = "L" + hashlib.sha256(repr([(e.address, e.drive) for e in elements]).encode()).hexdigest()[:15]
    try:
        return SmcDevice(elements, identity, emit, library.save, fallback_serial=str(p.get("serial", serial)))
    except ValueError as exc:
        raise ParamError(str(exc)) from None


if __name__ == "__main__":
    main(make_device)
