"""`trioscsi tape ...`: create cartridges and whole libraries for the vtape and vchanger emulators.

The cartridge format belongs to the emulators (docs/tape.md); this command only calls their library so the
two never disagree.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, label: str) -> Iterator[T]:
    """A one-line progress bar on stderr for anything that takes more than a moment."""
    width = 30
    for done, item in enumerate(items, 1):
        yield item
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        sys.stderr.flush()
    sys.stderr.write("\n")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str]) -> int:
    from emulators.pyemu.cartridge import create_cartridge, set_write_protect

    parser = argparse.ArgumentParser(prog="trioscsi tape", description="Create tape cartridges and libraries.")
    commands = parser.add_subparsers(dest="command", required=True)
    cart = commands.add_parser("cartridge", help="create one cartridge image")
    cart.add_argument("path")
    cart.add_argument("--barcode", required=True, help="volume tag, e.g. TRIO01L6")
    cart.add_argument("--capacity", default="10G", help="nominal capacity (default 10G)")
    cart.add_argument("--write-protect", action="store_true")
    lib = commands.add_parser("library", help="create a directory of cartridges and a library description")
    lib.add_argument("directory")
    lib.add_argument("--cartridges", type=int, default=10)
    lib.add_argument("--prefix", default="TRIO", help="barcode prefix (default TRIO)")
    lib.add_argument("--slots", type=int, default=0, help="storage slots (default: cartridges + 4)")
    lib.add_argument("--drives", type=int, default=2, help="drive LUNs 1..N, changer on LUN 0")
    lib.add_argument("--capacity", default="10G")
    args = parser.parse_args(argv)

    if args.command == "cartridge":
        if os.path.exists(args.path):
            parser.error(f"{args.path} exists; not overwriting a cartridge")
        create_cartridge(args.path, args.barcode, parse_size(args.capacity))
        if args.write_protect:
            set_write_protect(args.path, True)
        print(f"{args.path}: cartridge {args.barcode}, {args.capacity} nominal")
        return 0

    os.makedirs(args.directory, exist_ok=True)
    capacity = parse_size(args.capacity)
    barcodes = [f"{args.prefix}{n:02d}L6" for n in range(1, args.cartridges + 1)]
    for barcode in progress(barcodes, len(barcodes), "creating cartridges"):
        path = os.path.join(args.directory, f"{barcode}.img")
        if not os.path.exists(path):
            create_cartridge(path, barcode, capacity)
    slots = args.slots or args.cartridges + 4
    drives = ", ".join(f'{{ serial = "DRIVE{n:04d}", lun = {n} }}' for n in range(1, args.drives + 1))
    carts = ",\n  ".join(f'{{ barcode = "{b}", path = "{b}.img" }}' for b in barcodes)
    description = os.path.join(args.directory, "library.toml")
    with open(description, "w") as f:
        f.write(f"# vchanger library: use params = {{ library = \"{description}\" }} on the changer LUN\n"
                f"slots = {slots}\nie_slots = 2\ncapacity = {capacity}\n"
                f"state = \"library.state.json\"\ndrives = [ {drives} ]\ncartridges = [\n  {carts}\n]\n")
    print(f"{description}: {args.cartridges} cartridges, {slots} slots, {args.drives} drives")
    return 0
