"""APTPL: one logical unit's persistent reservations in one JSON file, replaced atomically.

Strategy: `save` writes the whole state to a temporary file in the same directory, fsyncs it, renames it
over the old file and fsyncs the directory, so after a crash at any point the file holds either the old
state or the new one, never a mixture (a stray temporary file may remain; `load` never reads it).
`persist` applies the APTPL rule (SPC-4 5.13.5): the file exists only while the last REGISTER / REGISTER AND
MOVE said APTPL=1; otherwise it is removed, so a restart begins with no reservations.

What a restart restores (a power on, SPC-4 6.16.2): registrations, the reservation and APTPL; PRgeneration
starts again at zero, and SPC-2 reservations, which never survive a power loss, are dropped.

File format: {"format": "trioscsi-pr", "version": 1, "state": PrState.to_dict()}, UTF-8 JSON.
The calls block (fsync): from trio, run them with `trio.to_thread.run_sync`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from .pr_state import PrState

FORMAT, VERSION = "trioscsi-pr", 1
PathLike = str | os.PathLike[str]


class PrStoreError(Exception):
    """The file exists but does not hold a state this version can read."""


def encode(state: PrState) -> bytes:
    document = {"format": FORMAT, "version": VERSION, "state": state.to_dict()}
    return json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"


def decode(data: bytes, *, where: str = "<bytes>") -> PrState:
    """The state in a file's contents, as a power on restores it.

    Raises:
        PrStoreError: not JSON, not this format, or an inconsistent state.
    """
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError("not a trioscsi persistent reservation file")
        if document.get("version") != VERSION:
            raise ValueError(f"unsupported version {document.get('version')!r}")
        state = PrState.from_dict(document["state"])
    except (ValueError, KeyError, TypeError) as e:
        raise PrStoreError(f"{where}: {e}") from None
    state.generation = 0
    state.spc2_holder = None
    return state


def save(path: PathLike, state: PrState) -> None:
    """Replace the file at `path` with `state`, atomically and durably."""
    target = Path(path)
    data = encode(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def load(path: PathLike) -> PrState | None:
    """The state saved at `path`, or None when there is no file (APTPL was off, or never on)."""
    target = Path(path)
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        return None
    return decode(data, where=str(target))


def remove(path: PathLike) -> None:
    """Delete the file (durably); no error if it is not there."""
    target = Path(path)
    try:
        os.unlink(target)
    except FileNotFoundError:
        return
    _fsync_dir(target.parent)


def persist(path: PathLike, state: PrState) -> None:
    """Apply APTPL: save the state while `state.aptpl` is set, otherwise make sure no file remains."""
    if state.aptpl:
        save(path, state)
    else:
        remove(path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
