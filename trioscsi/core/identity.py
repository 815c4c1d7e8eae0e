"""Designators only the core knows, spliced into the emulator's Device Identification VPD page (0x83).

The emulator reports the LU's own designators; the target port's (relative port, port group, SCSI name)
depend on the I_T nexus, so the core appends them (docs/emulator-protocol.md 6b).
"""
from __future__ import annotations

import struct

from .nexus import Nexus

INQUIRY = 0x12
DEVICE_IDENTIFICATION = 0x83
PROTOCOL_ISCSI = 0x5


def asks_for_device_identification(cdb: bytes) -> bool:
    return cdb[0] == INQUIRY and len(cdb) >= 6 and cdb[1] & 0x01 == 1 and cdb[2] == DEVICE_IDENTIFICATION


def widen_allocation(cdb: bytes) -> bytes:
    """The same INQUIRY asking for the whole page, so the core can append and truncate itself."""
    return cdb[:3] + b"\xff\xff" + cdb[5:]


def port_designators(nexus: Nexus, port_group: int = 1) -> bytes:
    relative = struct.pack(">BBBBHH", PROTOCOL_ISCSI << 4 | 1, 0x80 | 0x10 | 0x4, 0, 4, 0, nexus.relative_port)
    group = struct.pack(">BBBBHH", 0x01, 0x10 | 0x5, 0, 4, 0, port_group)
    name = nexus.target_port.encode() + b"\0"
    name += b"\0" * (-len(name) % 4)
    scsi_name = struct.pack(">BBBB", PROTOCOL_ISCSI << 4 | 3, 0x80 | 0x10 | 0x8, 0, len(name)) + name
    return relative + group + scsi_name


def complete_page(page: bytes, nexus: Nexus, allocation: int) -> bytes:
    """Append the port designators to a full VPD 0x83 page and cut it to the initiator's allocation."""
    if len(page) < 4 or page[1] != DEVICE_IDENTIFICATION:
        return page[:allocation]
    body = bytes(page[4:4 + struct.unpack_from(">H", page, 2)[0]]) + port_designators(nexus)
    return (bytes(page[:2]) + struct.pack(">H", len(body)) + body)[:allocation]
