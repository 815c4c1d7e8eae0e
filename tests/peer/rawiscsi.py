"""A deliberately tiny, blocking iSCSI initiator for the few checks libiscsi's tools cannot make.

libiscsi's `iscsi-inq URL/7` sends TEST UNIT READY right after login and stops at its CHECK
CONDITION, so it never shows what the target answers to an INQUIRY for a LUN that does not
exist (SPC-4 6.6.2: peripheral qualifier 011b, device type 1Fh). This client logs in
(AuthMethod=None, no digests), sends one CDB and returns status, data and sense. It is
checked against tgtd as well (see scripts/conformance's self-check in docs/conformance.md).
Not a general initiator: one connection, one command at a time, no R2T handling.
"""
from __future__ import annotations

import socket
import struct

OP_NOP_OUT, OP_SCSI_CMD, OP_LOGIN_REQ, OP_LOGOUT_REQ = 0x00, 0x01, 0x03, 0x06
OP_NOP_IN, OP_SCSI_RSP, OP_LOGIN_RSP, OP_DATA_IN, OP_LOGOUT_RSP, OP_REJECT = \
    0x20, 0x21, 0x23, 0x25, 0x26, 0x3F
IMMEDIATE = 0x40


class IscsiError(Exception):
    pass


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _keys(data: bytes) -> dict[str, str]:
    out = {}
    for kv in data.split(b"\0"):
        if b"=" in kv:
            k, v = kv.decode(errors="replace").split("=", 1)
            out[k] = v
    return out


def _text(keys: dict[str, str]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())


class RawSession:
    def __init__(self, host: str, port: int, target: str,
                 initiator: str = "iqn.2026-11.org.trioscsi:peer-raw", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.target, self.initiator = target, initiator
        self.isid = bytes([0x80, 0x12, 0x34, 0x56, 0x00, 0x01])   # random-format ISID
        self.tsih = 0
        self.cmdsn = 1
        self.expstatsn = 0
        self.itt = 0
        self.negotiated: dict[str, str] = {}
        self.login_itt = self._next_itt()     # one ITT for every PDU of the login (like open-iscsi)

    # -- PDU I/O
    def _send(self, bhs: bytearray, data: bytes = b"") -> None:
        bhs[5:8] = len(data).to_bytes(3, "big")
        self.sock.sendall(bytes(bhs) + _pad(data))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise IscsiError("connection closed by target")
            buf += chunk
        return bytes(buf)

    def _recv(self) -> tuple[bytes, bytes]:
        bhs = self._recv_exact(48)
        ahs = bhs[4] * 4
        dlen = int.from_bytes(bhs[5:8], "big")
        rest = self._recv_exact(ahs + dlen + (-dlen % 4))
        return bhs, rest[ahs:ahs + dlen]

    def _next_itt(self) -> int:
        self.itt += 1
        return self.itt

    # -- login
    def _login_pdu(self, csg: int, nsg: int, keys: dict[str, str]) -> tuple[bytes, bytes]:
        bhs = bytearray(48)
        bhs[0] = IMMEDIATE | OP_LOGIN_REQ
        bhs[1] = 0x80 | (csg << 2) | nsg          # Transit
        bhs[8:14] = self.isid
        struct.pack_into(">HIHxxII", bhs, 14, self.tsih, self.login_itt, 0, self.cmdsn,
                         self.expstatsn)
        self._send(bhs, _text(keys))
        rbhs, data = self._recv()
        if rbhs[0] & 0x3F != OP_LOGIN_RSP:
            raise IscsiError(f"expected a Login Response, got opcode {rbhs[0] & 0x3F:#x}")
        status = (rbhs[36], rbhs[37])
        if status != (0, 0):
            raise IscsiError(f"login failed: status class {status[0]:#04x} detail {status[1]:#04x}")
        self.expstatsn = struct.unpack_from(">I", rbhs, 24)[0] + 1
        self.tsih = struct.unpack_from(">H", rbhs, 14)[0]
        return rbhs, data

    def login(self, offer: dict[str, str] | None = None) -> dict[str, str]:
        """Security stage (AuthMethod=None) then operational stage to full feature phase.
        Returns the keys the target answered in the operational stage."""
        self._login_pdu(0, 1, {"InitiatorName": self.initiator, "SessionType": "Normal",
                               "TargetName": self.target, "AuthMethod": "None"})
        ops = {"HeaderDigest": "None", "DataDigest": "None", "MaxRecvDataSegmentLength": "262144",
               "InitialR2T": "Yes", "ImmediateData": "Yes", "MaxBurstLength": "262144",
               "FirstBurstLength": "65536", "DefaultTime2Wait": "2", "DefaultTime2Retain": "0",
               "MaxOutstandingR2T": "1", "DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes",
               "ErrorRecoveryLevel": "0", "MaxConnections": "1"}
        ops.update(offer or {})
        for _ in range(5):
            rbhs, data = self._login_pdu(1, 3, ops)
            self.negotiated.update(_keys(data))
            if rbhs[1] & 0x80 and rbhs[1] & 0x03 == 3:
                return self.negotiated
            ops = {}
        raise IscsiError("target did not move to full feature phase")

    # -- commands
    def scsi(self, lun: int, cdb: bytes, read_len: int = 0) -> tuple[int, bytes, bytes]:
        """One command with an optional Data-In; returns (status, data, sense)."""
        itt = self._next_itt()
        bhs = bytearray(48)
        bhs[0] = OP_SCSI_CMD
        bhs[1] = 0x80 | (0x40 if read_len else 0) | 0x01      # Final, Read, SIMPLE
        bhs[8:16] = (lun << 48 if lun < 256 else (0x4000 | lun) << 48).to_bytes(8, "big")
        struct.pack_into(">IIII", bhs, 16, itt, read_len, self.cmdsn, self.expstatsn)
        bhs[32:48] = cdb.ljust(16, b"\0")
        self.cmdsn += 1
        self._send(bhs)
        data = bytearray()
        while True:
            rbhs, seg = self._recv()
            op = rbhs[0] & 0x3F
            if op == OP_NOP_IN:
                continue
            if op == OP_REJECT:
                raise IscsiError(f"target rejected the command (reason {rbhs[2]:#x})")
            if op == OP_DATA_IN:
                off = struct.unpack_from(">I", rbhs, 40)[0]
                data[off:off + len(seg)] = seg
                if rbhs[1] & 0x01:                                   # S bit: status here
                    self.expstatsn = struct.unpack_from(">I", rbhs, 24)[0] + 1
                    return rbhs[3], bytes(data), b""
                continue
            if op == OP_SCSI_RSP:
                self.expstatsn = struct.unpack_from(">I", rbhs, 24)[0] + 1
                if rbhs[2] != 0:
                    raise IscsiError(f"iSCSI response {rbhs[2]:#x} (target failure)")
                sense = b""
                if len(seg) >= 2:
                    n = int.from_bytes(seg[:2], "big")
                    sense = bytes(seg[2:2 + n])
                return rbhs[3], bytes(data), sense
            raise IscsiError(f"unexpected opcode {op:#x}")

    def inquiry(self, lun: int, alloc: int = 96) -> tuple[int, bytes, bytes]:
        return self.scsi(lun, bytes([0x12, 0, 0, alloc >> 8, alloc & 0xFF, 0]), alloc)

    def logout(self) -> None:
        bhs = bytearray(48)
        bhs[0] = IMMEDIATE | OP_LOGOUT_REQ
        bhs[1] = 0x80
        struct.pack_into(">IHxxII", bhs, 16, self._next_itt(), 0, self.cmdsn, self.expstatsn)
        try:
            self._send(bhs)
            self._recv()
        except (OSError, IscsiError):
            pass

    def close(self) -> None:
        try:
            self.logout()
        finally:
            self.sock.close()

    def __enter__(self) -> "RawSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sense_key_asc(sense: bytes) -> tuple[int, int, int] | None:
    """(key, asc, ascq) from fixed (70h/71h) or descriptor (72h/73h) sense data."""
    if len(sense) < 4:
        return None
    code = sense[0] & 0x7F
    if code in (0x70, 0x71) and len(sense) >= 14:
        return sense[2] & 0x0F, sense[12], sense[13]
    if code in (0x72, 0x73):
        return sense[1] & 0x0F, sense[2], sense[3]
    return None
