"""Removable media under the core's control (docs/emulator-protocol.md §10): the `load`, `unload` and
`restore` control messages, and the `position` event that lets the core put a restarted emulator back.

A mixin for tape drives and CD-ROM drives alike.  The device provides `state()` (the map the core keeps),
`emit`, and one handler per control message (`_load`, `_unload`, `_restore`, each raising ValueError to
refuse); `media_lock` serialises control messages with commands where the device runs several workers.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, ContextManager


class MediaControl:
    device_name = "emulator"
    emit: Callable[..., None]
    _reported: tuple[Any, ...] | None = None

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def media_lock(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def control(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        op, tag = msg.get("op"), msg.get("tag")
        handler = {"load": self._load, "unload": self._unload, "restore": self._restore}.get(str(op))
        if handler is None or not isinstance(tag, int):
            print(f"{self.device_name}: ignoring {op!r} (unknown op or no tag)", file=sys.stderr)
            return None
        with self.media_lock:
            try:
                extra = handler(msg)
            except ValueError as exc:
                return {"op": "done", "tag": tag, "status": 2, "message": str(exc), **self.state()}
            self.report()
            return {"op": "done", "tag": tag, "status": 0, **(extra or {}), **self.state()}

    def report(self) -> None:
        """Emit ``position`` if the state changed since the last report (before the done of what changed it)."""
        state = self.state()
        key = tuple(state.values())
        if key != self._reported:
            self._reported = key
            self.emit("position", **state)

    def _load(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        raise ValueError("load is not supported")

    def _unload(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        raise ValueError("unload is not supported")

    def _restore(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        raise ValueError("restore is not supported")
