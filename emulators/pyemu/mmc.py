"""MMC-6: a read-only CD/DVD-ROM drive (peripheral type 5, RMB=1) over disc image files.

Strategy: the drive is a tray that holds at most one disc (``disc``: an image path, opened read-only through
``stores.FileStore``) and is open or closed; the medium is *ready* when a readable disc lies in the closed tray.
Commands that need the medium are answered NOT READY by one gate in ``execute`` (None, and free, while the
medium is ready), so their handlers never check. The disc has the layout of a pressed data disc: one complete
session holding one data track (mode 1) from LBA 0 to the end of the image, which is what an ISO 9660 or UDF
image is; READ TOC, READ DISC/TRACK INFORMATION and READ SUB-CHANNEL all describe that one track. The profile
is CD-ROM (0x0008) for an image a CD can hold, DVD-ROM (0x0010) beyond.

Media changes reach initiators three ways, because Linux's sr uses all three: NOT READY 3A while there is no
medium, a ``medium_changed`` event (the core's UNIT ATTENTION 28/00 to every nexus) when a disc is put in, and
the media class of GET EVENT STATUS NOTIFICATION, whose last event is kept per I_T nexus so every nexus sees
each change once (closing the tray on the disc that was on it is such an event, but no unit attention).
PREVENT ALLOW MEDIUM REMOVAL is per nexus, as in sbc, and ends with the nexus or a reset. The medium is
read-only: WRITE(10)/(12) and WRITE AND VERIFY(10) end in DATA PROTECT, WRITE PROTECTED; MMC's other writing
commands (BLANK, FORMAT UNIT, CLOSE TRACK, ...) are not implemented (20/00), as on a ROM drive. State changes
happen under one lock; READ only takes a snapshot of the store, and a store a disc change replaced stays open
until ``close`` so that a READ running on another worker never reads a recycled descriptor.
"""
from __future__ import annotations

import os
import struct
import sys
import threading
from typing import Any, Callable

from .media import MediaControl
from .runner import current_nexus
from .sense import (Asc, ScsiError, SenseKey, invalid_field, invalid_param, lba_out_of_range, write_protected)
from .spc import VERSION_ISCSI, VERSION_SAM5, VERSION_SPC4, ModePage, Result, ScsiDevice, cmd
from .stores import FileStore

VERSION_MMC6 = 0x04E0
BLOCK, SHIFT = 2048, 11
PROFILE_CD, PROFILE_DVD = 0x0008, 0x0010
CD_MAX_BLOCKS = 449_850                # 99:59:74 less the 2 s pregap: the last address MSF can name on a CD
TRAY_OPEN, INCOMPATIBLE_FORMAT, REMOVAL_PREVENTED = 0x3A02, 0x3002, 0x5302
NO_CHANGE, NEW_MEDIA, MEDIA_REMOVAL = 0, 2, 3          # media event codes (MMC-6 6.7.2.5)
CLASS_OPERATIONAL, CLASS_POWER, CLASS_MEDIA = 1, 2, 4
SUPPORTED_CLASSES = (1 << CLASS_OPERATIONAL) | (1 << CLASS_POWER) | (1 << CLASS_MEDIA)
# Opcodes that touch the medium: NOT READY without one. Everything else (INQUIRY, MODE SENSE, GET
# CONFIGURATION, GET EVENT STATUS NOTIFICATION, START STOP UNIT, ...) works with an empty drive.
NEEDS_MEDIUM = frozenset((0x00, 0x25, 0x28, 0x2A, 0x2E, 0x42, 0x43, 0x51, 0x52, 0xA8, 0xAA))
SPEED = 7056                           # kB/s in the capabilities page: 40x CD (Linux divides by 176)

_R10 = struct.Struct(">2xIxH").unpack_from       # lba, blocks
_R12 = struct.Struct(">2xII").unpack_from


def msf(lba: int) -> bytes:
    """A TOC address as 0, minute, second, frame (75 frames a second, 2 s of pregap before LBA 0)."""
    frames = lba + 150
    m, s, f = frames // 4500, frames // 75 % 60, frames % 75
    return bytes((0, 255, 59, 74)) if m > 255 else bytes((0, m, s, f))


def address(lba: int, as_msf: int) -> bytes:
    return msf(lba) if as_msf else struct.pack(">I", lba)


def feature(code: int, version: int, persistent: bool, current: bool, body: bytes = b"") -> bytes:
    """A GET CONFIGURATION feature descriptor (MMC-6 5.2.2)."""
    return struct.pack(">HBB", code, version << 2 | persistent << 1 | current, len(body)) + body


class MmcDevice(MediaControl, ScsiDevice):
    """A CD/DVD-ROM drive with a tray (see the module docstring).

    Args:
        profile: "auto" (CD-ROM up to ``CD_MAX_BLOCKS`` blocks, DVD-ROM beyond), "cd" or "dvd".
    """

    device_type = 5
    removable = True
    version_descriptors = (VERSION_SAM5, VERSION_SPC4, VERSION_MMC6, VERSION_ISCSI)
    max_transfer_bytes = 8 * 1024 * 1024
    default_workers = 1                  # media control stays in order with commands (protocol §10.1)

    def __init__(self, identity: dict[str, Any], emit: Callable[..., None] | None = None, *,
                 fallback_serial: str = "0", product: str = "VIRTUAL-CDROM", profile: str = "auto") -> None:
        super().__init__(identity, emit, fallback_serial, product)
        self.profile_choice = profile
        self.lock = threading.RLock()
        self.disc: str | None = None         # the image in the drive (on the tray when it is open)
        self.store: Any = None               # its FileStore; None while empty or when the image is unreadable
        self.blocks = 0
        self.bad = ""                        # why the disc cannot be read
        self.tray_open = False
        self.max_xfer = self.max_transfer_bytes >> SHIFT
        self._retired: list[Any] = []
        self._preventing: set[Any] = set()  # the I_T nexuses that prevent medium removal
        self._event_seq, self._event_code = 0, NO_CHANGE
        self._seen: dict[Any, int] = {}      # nexus -> the last media event it was told (or knew at first sight)
        self._reported: tuple[Any, ...] | None = None
        self._setup_tables()
        self._update_gate()

    def _setup_tables(self) -> None:
        r10, r12 = (0xFF,) * 4 + (0, 0xFF, 0xFF), (0xFF,) * 8
        self.add_commands({
            0x1B: cmd("START STOP UNIT", self.start_stop, 0x1B, 0x01, 0, 0, 0xF3, 0x07),
            0x1E: cmd("PREVENT ALLOW MEDIUM REMOVAL", self.prevent_allow, 0x1E, 0, 0, 0, 0x03, 0x07),
            0x25: cmd("READ CAPACITY", self.read_capacity, 0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0x07),
            0x28: cmd("READ(10)", self.read, 0x28, 0x18, *r10, 0x07),
            0x2A: cmd("WRITE(10)", self.write, 0x2A, 0x08, *r10, 0x07),
            0x2E: cmd("WRITE AND VERIFY(10)", self.write, 0x2E, 0x02, *r10, 0x07),
            0x42: cmd("READ SUB-CHANNEL", self.read_subchannel, 0x42, 0x02, 0x40, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF,
                      0x07),
            0x43: cmd("READ TOC/PMA/ATIP", self.read_toc, 0x43, 0x02, 0x0F, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xC7),
            0x46: cmd("GET CONFIGURATION", self.get_configuration, 0x46, 0x03, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF,
                      0x07),
            0x4A: cmd("GET EVENT STATUS NOTIFICATION", self.event_status, 0x4A, 0x01, 0, 0, 0xFF, 0, 0, 0xFF,
                      0xFF, 0x07),
            0x51: cmd("READ DISC INFORMATION", self.disc_information, 0x51, 0x07, 0, 0, 0, 0, 0, 0xFF, 0xFF,
                      0x07),
            0x52: cmd("READ TRACK INFORMATION", self.track_information, 0x52, 0x03, 0xFF, 0xFF, 0xFF, 0xFF, 0,
                      0xFF, 0xFF, 0x07),
            0xA8: cmd("READ(12)", self.read, 0xA8, 0x18, *r12, 0x80, 0x07),
            0xAA: cmd("WRITE(12)", self.write, 0xAA, 0x08, *r12, 0x80, 0x07),
            0xB6: cmd("SET STREAMING", self.accept, 0xB6, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0x07),
            0xBB: cmd("SET CD SPEED", self.accept, 0xBB, 0x03, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0x07),
            0xBD: cmd("MECHANISM STATUS", self.mechanism_status, 0xBD, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0,
                      0x07),
        })
        # Read/write error recovery (MMC-6 7.3): read retry count 5, nothing changeable.
        self.add_mode_page(ModePage(0x01, 0, bytes((0, 5, 0, 0, 0, 0, 0, 0, 0, 0)), bytes(10)))
        self.capabilities = ModePage(0x2A, 0, self._capabilities(False), bytes(20))
        self.add_mode_page(self.capabilities)

    @staticmethod
    def _capabilities(locked: bool) -> bytes:
        """CD/DVD capabilities and mechanical status page (MMC-3 5.5.10) bytes 2..21, what sr's
        get_capabilities reads: reads CD-R/RW and DVD-ROM, writes nothing, multi-session, tray with eject and
        lock (LOCK STATE follows PREVENT ALLOW MEDIUM REMOVAL), read speed."""
        mechanism = 0x20 | 0x08 | 0x01 | (0x02 if locked else 0)
        return struct.pack(">BBBBBBHHHHBBHH", 0x0B, 0, 0x40, 0, mechanism, 0, SPEED, 0, 0, SPEED, 0, 0, 0, 0)

    # -- protocol glue --------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.store is not None and not self.tray_open

    def ready_info(self) -> dict[str, Any]:
        state = self.state()
        self._reported = tuple(state.values())
        return {"identity": self.ident.as_map(), "features": ["removable", "read_only"], "medium": state,
                "capacity": {"block_size": BLOCK, "blocks": self.blocks}}

    def state(self) -> dict[str, Any]:
        """What the core keeps to put a restarted emulator back (protocol §10): the disc and whether it is ready."""
        return {"path": self.disc, "object": 0, "loaded": self.ready, "block_size": BLOCK}

    def quick(self, cdb: bytes, xfer: int) -> bool:
        return cdb[0] in (0x28, 0x00) and xfer <= 65536

    def execute(self, cdb: bytes, data: Any, xfer: int) -> Result:
        nexus = current_nexus()
        if nexus not in self._seen:          # a new nexus starts with the events before it as seen
            self._seen[nexus] = self._event_seq
        return super().execute(cdb, data, xfer)

    def close(self) -> None:
        for store in self._retired + [self.store]:
            if store is not None:
                store.close()
        self._retired, self.store = [], None

    # -- the medium (callers hold ``lock``) ----------------------------------------------------------------------
    def insert(self, path: str) -> None:
        """Put ``path`` on the tray (the drive must be empty); an unreadable image stays there, NOT READY."""
        self.disc, self.bad, self.blocks = path, "", 0
        try:
            if not os.path.exists(path):
                raise ValueError(f"{path} does not exist")
            store = FileStore(path, None, create=False, read_only=True)
        except (OSError, ValueError) as exc:
            self.bad = str(exc)
        else:
            if store.size:
                self.store, self.blocks = store, -(-store.size >> SHIFT)   # a short last block reads as zeros
            else:
                store.close()
                self.bad = f"{path} is empty"
        if self.bad:
            print(f"vcdrom: disc {path} unreadable: {self.bad}", file=sys.stderr)
        self._update_gate()

    def take_out(self) -> str | None:
        """Empty the drive (the tray ends closed); returns the disc's path."""
        path, was_ready = self.disc, self.ready
        if self.store is not None:
            self._retired.append(self.store)
        self.disc, self.store, self.blocks, self.bad, self.tray_open = None, None, 0, "", False
        self._update_gate()
        if was_ready:
            self.media_event(MEDIA_REMOVAL)
        return path

    def set_tray(self, tray_open: bool) -> None:
        """Open or close the tray without telling anyone (start-up, restore after a restart)."""
        self.tray_open = tray_open
        self._update_gate()

    def open_tray(self) -> None:
        if not self.tray_open:
            was_ready, self.tray_open = self.ready, True
            self._update_gate()
            if was_ready:
                self.media_event(MEDIA_REMOVAL)

    def close_tray(self) -> None:
        """Close the tray on the disc that was on it: a new-media event, but no unit attention. The disc cannot
        have changed while the tray was open (only ``load`` of another image changes it, and that raises 28/00),
        and Linux, which closes the tray itself when /dev/srN is opened, fails the reads of that very open if a
        NOT READY TO READY CHANGE follows (sr refuses I/O to a device marked changed). QEMU's CD-ROM does the
        same."""
        if self.tray_open:
            self.tray_open = False
            self._update_gate()
            if self.disc is not None:
                self.media_event(NEW_MEDIA)

    def medium_arrived(self) -> None:
        """A disc was put in (protocol ``load``): every nexus gets UNIT ATTENTION 28/00 and a new-media event."""
        self.emit("medium_changed")
        self.media_event(NEW_MEDIA)

    def media_event(self, code: int) -> None:
        self._event_seq += 1
        self._event_code = code

    def prevented(self) -> bool:
        return bool(self._preventing)

    def profile(self) -> int:
        """The current profile: 0 without a readable disc."""
        if self.store is None:
            return 0
        if self.profile_choice == "auto":
            return PROFILE_DVD if self.blocks > CD_MAX_BLOCKS else PROFILE_CD
        return PROFILE_DVD if self.profile_choice == "dvd" else PROFILE_CD

    def _update_gate(self) -> None:
        self._gate = None if self.ready else self._not_ready

    def _not_ready(self, cdb: bytes) -> Result | None:
        if self.tray_open:
            err = ScsiError(SenseKey.NOT_READY, TRAY_OPEN)
        elif self.disc is None:
            err = ScsiError(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
        elif self.store is None:
            err = ScsiError(SenseKey.NOT_READY, INCOMPATIBLE_FORMAT)
        else:
            return None
        if cdb[0] == 0x03 and len(cdb) >= 6:        # REQUEST SENSE reports the condition (SPC-4 6.39)
            return Result(0, None, err.sense(bool(cdb[1] & 1))[:cdb[4]])
        if cdb[0] in NEEDS_MEDIUM:
            return Result(2, err.sense(self.d_sense), None)
        return None

    # -- reading --------------------------------------------------------------------------------------------------
    def read(self, cdb: bytes, data: Any, xfer: int) -> Any:
        lba, blocks = (_R10 if cdb[0] == 0x28 else _R12)(cdb)
        store, total = self.store, self.blocks      # one snapshot: a disc change may swap them meanwhile
        if blocks > total or lba > total - blocks:
            raise lba_out_of_range()
        if blocks > self.max_xfer:
            raise invalid_field(7 if cdb[0] == 0x28 else 6)
        if not blocks:
            return None
        return store.read(lba << SHIFT, blocks << SHIFT)

    def write(self, cdb: bytes, data: Any, xfer: int) -> None:
        raise write_protected()                     # a ROM disc (MMC-6 4.5: the medium is not writable)

    def read_capacity(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        if not cdb[8] & 1 and any(cdb[2:6]):
            raise invalid_field(2)                   # an LBA without PMI
        return struct.pack(">II", self.blocks - 1, BLOCK)

    def read_toc(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        """READ TOC/PMA/ATIP (MMC-6 6.33): format 0 (TOC), 1 (session info), 2 (raw TOC, CDs). The format may
        come in bits 7-6 of the control byte, as older drives took it and Linux's sr still sends it."""
        as_msf, fmt, number, alloc = cdb[1] & 0x02, cdb[2] & 0x0F, cdb[6], (cdb[7] << 8) | cdb[8]
        if not fmt:
            fmt = cdb[9] >> 6
        if fmt == 0:
            if 1 < number != 0xAA:
                raise invalid_field(6)                # past the last track, and not the lead-out
            body = bytes((1, 1)) + (self._toc_entry(1, 0, as_msf) if number <= 1 else b"") \
                + self._toc_entry(0xAA, self.blocks, as_msf)
        elif fmt == 1:
            body = bytes((1, 1)) + self._toc_entry(1, 0, as_msf)
        elif fmt == 2 and self.profile() == PROFILE_CD:
            if number > 1:
                raise invalid_field(6)                # there is one session
            lead_out = msf(self.blocks)[1:]
            points = ((0xA0, bytes((1, 0, 0))), (0xA1, bytes((1, 0, 0))), (0xA2, lead_out), (1, msf(0)[1:]))
            body = bytes((1, 1)) + b"".join(bytes((1, 0x14, 0, point, 0, 0, 0, 0)) + p for point, p in points)
        else:
            raise invalid_field(2)                    # PMA, ATIP, CD-TEXT: not on a pressed disc
        return (struct.pack(">H", len(body)) + body)[:alloc]

    @staticmethod
    def _toc_entry(track: int, lba: int, as_msf: int) -> bytes:
        return bytes((0, 0x14, track, 0)) + address(lba, as_msf)      # ADR 1, CONTROL 4: a data track

    def disc_information(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        """READ DISC INFORMATION (MMC-6 6.22), standard disc information: a complete disc, one complete
        session, track 1 only; lead-in and lead-out addresses FFFFFFFF as for any complete disc."""
        if cdb[1] & 0x07:
            raise invalid_field(1, 2)                 # track or POW resources: not on a ROM disc
        body = struct.pack(">HBBBBBBBBBB4sII8sBB", 32, 0x0E, 1, 1, 1, 1, 0, 0, 0, 0, 0, bytes(4), 0xFFFFFFFF,
                           0xFFFFFFFF, bytes(8), 0, 0)
        return body[:(cdb[7] << 8) | cdb[8]]

    def track_information(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        """READ TRACK INFORMATION (MMC-6 6.31) of track 1, asked for by an LBA in it (type 0), its number
        (type 1) or its session (type 2). Start + size is what Linux takes for the last written block."""
        kind, number = cdb[1] & 0x03, struct.unpack_from(">I", cdb, 2)[0]
        if kind == 3:
            raise invalid_field(1, 1)
        if (kind == 0 and number >= self.blocks) or (kind and number != 1):
            raise invalid_field(2)                    # no such LBA, track (0 = lead-in) or session
        blocking = 16 if self.profile() == PROFILE_DVD else 0
        body = struct.pack(">HBBxBBBIIIIIIBBxx", 34, 1, 1, 0x04, 0x01, 0, 0, 0, 0, blocking, self.blocks, 0, 0, 0)
        return body[:(cdb[7] << 8) | cdb[8]]

    def read_subchannel(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        """READ SUB-CHANNEL (MMC-6 6.32), a drive that plays no audio: the position is the start of track 1;
        no media catalogue number and no ISRC (MCVAL/TCVAL 0)."""
        as_msf, subq, fmt, alloc = cdb[1] & 0x02, cdb[2] & 0x40, cdb[3], (cdb[7] << 8) | cdb[8]
        if not subq:
            body = b""
        elif fmt == 1:
            body = bytes((1, 0x14, 1, 1)) + address(0, as_msf) + bytes(4)   # track-relative 0: no pregap
        elif fmt == 2:
            body = bytes((2, 0, 0, 0)) + bytes(16)
        elif fmt == 3:
            if cdb[6] != 1:
                raise invalid_field(6)
            body = bytes((3, 0x14, 1, 0)) + bytes(16)
        else:
            raise invalid_field(3)
        return (struct.pack(">BBH", 0, 0x15, len(body)) + body)[:alloc]   # 15h: no current audio status

    # -- configuration and events ---------------------------------------------------------------------------------
    def features(self) -> list[bytes]:
        """Feature descriptors, in ascending order (MMC-6 5.3): Profile List, Core, Morphing, Removable
        Medium, Random Readable, Multi-Read, CD Read, DVD Read, Power Management."""
        profile = self.profile()
        ready, cd, dvd = profile != 0, profile == PROFILE_CD, profile == PROFILE_DVD
        profiles = b"".join(struct.pack(">HBx", p, p == profile) for p in (PROFILE_DVD, PROFILE_CD))
        return [feature(0x0000, 0, True, True, profiles),
                feature(0x0001, 2, True, True, struct.pack(">IB3x", 1, 0x01)),    # SCSI family, DBE
                feature(0x0002, 1, True, True, bytes(4)),                           # polled events only
                feature(0x0003, 0, True, True, bytes((0x29, 0, 0, 0))),             # tray, eject, lock
                feature(0x0010, 0, False, ready, struct.pack(">IHBx", BLOCK, 16 if dvd else 1, 0)),
                feature(0x001D, 0, False, cd),
                feature(0x001E, 2, False, cd, bytes(4)),
                feature(0x001F, 1, False, dvd, bytes(4)),
                feature(0x0100, 0, True, True)]

    def get_configuration(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        """GET CONFIGURATION (MMC-6 6.6): RT 0 all features from STARTING FEATURE NUMBER on, 1 the current
        ones, 2 that one feature."""
        rt, start, alloc = cdb[1] & 0x03, (cdb[2] << 8) | cdb[3], (cdb[7] << 8) | cdb[8]
        if rt == 3:
            raise invalid_field(1, 1)
        chosen = []
        for f in self.features():
            code = f[0] << 8 | f[1]
            if code == start if rt == 2 else code >= start and (rt == 0 or f[2] & 1):
                chosen.append(f)
        body = b"".join(chosen)
        return (struct.pack(">IxxH", 4 + len(body), self.profile()) + body)[:alloc]

    def event_status(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        """GET EVENT STATUS NOTIFICATION (MMC-6 6.7), polled: a pending media event first, else "no change" of
        the lowest requested class. Reporting a media event consumes it for the asking nexus."""
        if not cdb[1] & 0x01:
            raise invalid_field(1, 0)                 # asynchronous notification: not supported
        wanted, alloc = cdb[4] & SUPPORTED_CLASSES, (cdb[7] << 8) | cdb[8]
        if not wanted:
            return struct.pack(">HBB", 2, 0x80, SUPPORTED_CLASSES)[:alloc]           # NEA: no event available
        with self.lock:
            nexus = current_nexus()
            pending = self._seen.get(nexus, self._event_seq) < self._event_seq
            if wanted & 1 << CLASS_MEDIA and (pending or wanted == 1 << CLASS_MEDIA):
                code = self._event_code if pending else NO_CHANGE
                self._seen[nexus] = self._event_seq
                status = (0x02 if self.disc is not None and not self.tray_open else 0) | (0x01 if self.tray_open
                                                                                            else 0)
                klass, desc = CLASS_MEDIA, bytes((code, status, 0, 0))
            elif wanted & 1 << CLASS_OPERATIONAL:
                klass, desc = CLASS_OPERATIONAL, bytes(4)                        # no change, available
            else:
                klass, desc = CLASS_POWER, bytes((0, 1, 0, 0))                   # no change, active
        return (struct.pack(">HBB", 2 + len(desc), klass, SUPPORTED_CLASSES) + desc)[:alloc]

    def mechanism_status(self, cdb: bytes, data: Any, xfer: int) -> bytes:
        """MECHANISM STATUS (MMC-6 6.11): idle, door open or closed, no changer slots."""
        return struct.pack(">BBxxxBH", 0, 0x10 if self.tray_open else 0, 0, 0)[:(cdb[8] << 8) | cdb[9]]

    def accept(self, cdb: bytes, data: Any, xfer: int) -> None:
        """SET CD SPEED, SET STREAMING: an image has one speed; the request is taken and changes nothing."""

    # -- tray and removal -----------------------------------------------------------------------------------------
    def start_stop(self, cdb: bytes, data: Any, xfer: int) -> None:
        """START STOP UNIT (MMC-6 6.40): LOEJ with START 0 opens the tray, with START 1 closes it. A POWER
        CONDITION, or START without LOEJ, changes nothing a virtual drive has."""
        power, loej, start = cdb[4] >> 4, cdb[4] & 0x02, cdb[4] & 0x01
        if power or not loej:
            return
        with self.lock:
            if start:
                self.close_tray()
            elif self._preventing:
                raise ScsiError(SenseKey.ILLEGAL_REQUEST, REMOVAL_PREVENTED)
            else:
                self.open_tray()
            self.report()

    def prevent_allow(self, cdb: bytes, data: Any, xfer: int) -> None:
        """PREVENT ALLOW MEDIUM REMOVAL (MMC-6 6.12): bit 0 locks the tray for the sending nexus; bit 1
        (persistent prevent, which only shapes eject-request events) is accepted and has no further effect."""
        with self.lock:
            if cdb[4] & 0x01:
                self._preventing.add(current_nexus())
            else:
                self._preventing.discard(current_nexus())
            self._lock_state()

    def _lock_state(self) -> None:
        self.capabilities.current = self._capabilities(bool(self._preventing))

    def nexus_lost(self, nexus: Any) -> None:
        """SPC-4: an I_T nexus loss ends that nexus's prevention; its event bookkeeping goes too."""
        with self.lock:
            self._preventing.discard(nexus)
            self._seen.pop(nexus, None)
            self._lock_state()

    def reset(self) -> None:
        """A logical unit reset or hard reset ends every prevention (SPC-4 6.13)."""
        with self.lock:
            self._preventing.clear()
            self._lock_state()

    def check_block_descriptor(self, desc: bytes, offset: int) -> None:
        """MODE SELECT may name the block length only as 2048 (or 0): the drive reads whole user-data blocks."""
        if len(desc) != 8:
            raise invalid_param(offset - 1)
        if int.from_bytes(desc[5:8], "big") not in (0, BLOCK):
            raise invalid_param(offset + 5)
