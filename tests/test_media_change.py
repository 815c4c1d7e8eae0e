"""An operator changes the disc in a CD-ROM LU (`trioscsi admin load|unload`, `Server.admin`) while an initiator
uses it: the initiator sees MEDIUM MAY HAVE CHANGED and the new capacity, a locked tray keeps its disc (even
across an emulator crash), and a device without removable media says so."""
from __future__ import annotations

import os
import signal
import struct

import trio

from test_stack import first_command, running_server, session

CONFIG = """
[[portal]]
listen = "127.0.0.1:0"

[[target]]
name = "iqn.2026-11.org.trioscsi:stack"
  [[target.lun]]
  lun = 0
  emulator = "vcdrom"
  params = { path = "a.iso" }
  [[target.lun]]
  lun = 1
  emulator = "null"
  params = { size = 1048576 }
"""
LU = "stack/lun0"
READ_CAPACITY = bytes((0x25,)) + bytes(9)
PREVENT, ALLOW = bytes((0x1E, 0, 0, 0, 1, 0)), bytes((0x1E, 0, 0, 0, 0, 0))


async def capacity_blocks(ini: object) -> int:
    result = await ini.scsi(READ_CAPACITY, read=8)  # type: ignore[attr-defined]
    assert result.status == 0, result
    return struct.unpack(">I", result.data[:4])[0] + 1


async def test_operator_changes_the_disc_and_the_initiator_is_told(tmp_path: object) -> None:
    with open(os.path.join(str(tmp_path), "a.iso"), "wb") as f:
        f.write(os.urandom(2048 * 16))
    other = os.path.join(str(tmp_path), "b.iso")
    with open(other, "wb") as f:
        f.write(os.urandom(2048 * 40))
    async with running_server(tmp_path, CONFIG) as (server, port), session(port) as ini:
        await first_command(ini)
        assert await capacity_blocks(ini) == 16

        assert await server.admin(["load", LU, other]) == f"loaded {LU} {other}\n".encode()
        ua = await ini.scsi(bytes(6))
        assert (ua.status, ua.sense_key, ua.asc) == (2, 6, 0x2800)
        assert await capacity_blocks(ini) == 40

        assert (await ini.scsi(PREVENT)).status == 0
        refused = await server.admin(["unload", LU])
        assert refused.startswith(b"error:") and b"prevented" in refused
        assert await capacity_blocks(ini) == 40                     # the locked disc stayed in
        assert (await ini.scsi(ALLOW)).status == 0
        assert await server.admin(["unload", LU]) == f"unloaded {LU}\n".encode()
        empty = await ini.scsi(bytes(6))
        assert (empty.status, empty.sense_key, empty.asc >> 8) == (2, 2, 0x3A)   # MEDIUM NOT PRESENT

        assert (await server.admin(["unload", "stack/lun1"])).startswith(b"error: stack/lun1 is not a removable")
        assert (await server.admin(["load", "nosuch", other])).startswith(b"error: expected")


async def test_a_locked_tray_stays_locked_across_an_emulator_crash(tmp_path: object) -> None:
    """The core replays the PREVENT ALLOW MEDIUM REMOVAL of every nexus that holds one into a restarted
    emulator: a crash must not let anyone eject a disc an initiator has locked."""
    with open(os.path.join(str(tmp_path), "a.iso"), "wb") as f:
        f.write(os.urandom(2048 * 16))
    eject = bytes((0x1B, 0, 0, 0, 0x02, 0))
    async with running_server(tmp_path, CONFIG) as (server, port), session(port) as ini:
        await first_command(ini)
        assert (await ini.scsi(PREVENT)).status == 0
        emulator = server.emulators[0]
        old_pid = emulator.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        with trio.fail_after(20):
            while emulator.pid in (None, old_pid) or emulator.info is None:
                await trio.sleep(0.05)
            await emulator.wait_ready()
        refused = await ini.scsi(eject)
        assert (refused.status, refused.sense_key, refused.asc) == (2, 5, 0x5302)   # MEDIUM REMOVAL PREVENTED
        assert (await server.admin(["unload", LU])).startswith(b"error:")
        assert (await ini.scsi(ALLOW)).status == 0
        assert (await ini.scsi(eject)).status == 0
