"""Declarative TOML configuration: portals, targets, LUNs and their emulators.

Strategy: `tomllib` parses; `_Checker` walks the result with the path of every value, and each error names
the file, the line (found by walking the text's table headers, since tomllib keeps no positions) and the
dotted key.  The embedded default is an ordinary TOML document checked by the same code.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PORT = 3260
NBD_PORT = 10809
BUILTIN_EMULATORS = ("vdisk", "null", "vtape", "vchanger", "vcdrom")

DEFAULT_CONFIG = """\
# The embedded default: one demo target on loopback with a 1 GiB sparse disk, a null device and a tape library.
[[portal]]
listen = "127.0.0.1:3260"

[[target]]
name = "iqn.2026-11.org.trioscsi:demo"
alias = "trioscsi demo"

  # Removable, like a disk in a drive bay: START STOP UNIT ejects and loads it, PREVENT ALLOW MEDIUM REMOVAL
  # locks it, so clients and conformance suites can use every part of SBC.  Drop `removable` for a fixed disk.
  [[target.lun]]
  lun = 0
  emulator = "vdisk"
  params = { path = "demo-lun0.img", size = 1073741824, block_size = 512, create = true, removable = true }

  [[target.lun]]
  lun = 1
  emulator = "null"
  params = { size = 1073741824, block_size = 512 }

  # A tape library: a changer with ten cartridges (created on first start under the state dir) in slots 1-3 and
  # 10-16, slots 4-9 free, and its two drives.  Drives and changer are shared safely: the core enforces
  # reservations.
  [[target.lun]]
  lun = 2
  emulator = "vchanger"
  serial = "LIBRARY0001"
  params = { slots = 16, ie_slots = 2, media_dir = "tapes", state = "tapes/library.state.json", capacity = 1073741824, drives = [ { serial = "DRIVE0001", lun = 3 }, { serial = "DRIVE0002", lun = 4 } ], cartridges = [ { barcode = "TRIO01L6", path = "TRIO01L6.img", slot = 1 }, { barcode = "TRIO02L6", path = "TRIO02L6.img", slot = 2 }, { barcode = "TRIO03L6", path = "TRIO03L6.img", slot = 3 }, { barcode = "TRIO04L6", path = "TRIO04L6.img", slot = 10 }, { barcode = "TRIO05L6", path = "TRIO05L6.img", slot = 11 }, { barcode = "TRIO06L6", path = "TRIO06L6.img", slot = 12 }, { barcode = "TRIO07L6", path = "TRIO07L6.img", slot = 13 }, { barcode = "TRIO08L6", path = "TRIO08L6.img", slot = 14 }, { barcode = "TRIO09L6", path = "TRIO09L6.img", slot = 15 }, { barcode = "TRIO10L6", path = "TRIO10L6.img", slot = 16 } ] }

  [[target.lun]]
  lun = 3
  emulator = "vtape"
  serial = "DRIVE0001"

  [[target.lun]]
  lun = 4
  emulator = "vtape"
  serial = "DRIVE0002"
"""


class ConfigError(Exception):
    def __init__(self, file: str, line: int | None, key: str, message: str) -> None:
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key}: {message}")
        self.file, self.line, self.key = file, line, key


@dataclass
class IscsiSettings:
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    header_digest: tuple[str, ...] = ("None", "CRC32C")
    data_digest: tuple[str, ...] = ("None", "CRC32C")
    default_time2wait: int = 2
    default_time2retain: int = 20
    nop_interval: float = 30.0
    nop_timeout: float = 30.0
    login_timeout: float = 15.0


@dataclass
class ChapConfig:
    """CHAP credentials: what the initiator must prove, and optionally what the target proves (mutual)."""
    user: str
    secret: bytes = field(repr=False)
    mutual_user: str | None = None
    mutual_secret: bytes | None = field(default=None, repr=False)
    algorithms: tuple[int, ...] = (8, 7, 6, 5)


@dataclass
class GroupLun:
    lun: int
    device: str
    read_only: bool = False


@dataclass
class GroupConfig:
    name: str
    initiators: list[str]
    addresses: list[str] = field(default_factory=list)
    chap: ChapConfig | None = None
    luns: list[GroupLun] | None = None


@dataclass
class LunConfig:
    lun: int
    emulator: str
    argv: list[str]
    params: dict[str, Any]
    read_only: bool = False
    serial: str = ""
    naa: bytes = b""
    vendor: str = "TRIOSCSI"
    product: str = ""
    revision: str = "0001"
    command_timeout: float = 30.0
    name: str = ""
    serialize: bool | None = None
    ping_interval: float = 5.0          # emulator health check
    ping_timeout: float = 10.0          # an emulator silent this long after a ping is killed and restarted


@dataclass
class TargetConfig:
    name: str
    alias: str | None = None
    tpgt: int = 1
    queue_depth: int = 64
    luns: list[LunConfig] = field(default_factory=list)
    iscsi: IscsiSettings = field(default_factory=IscsiSettings)
    default_access: bool = True
    chap: ChapConfig | None = None
    groups: list[GroupConfig] = field(default_factory=list)


@dataclass
class NbdConfig:
    """One NBD export (docs/nbd.md): a disk LUN of a target, offered under `export` on `listen`."""
    listen: tuple[str, int]
    export: str
    target: str
    lun: int = 0
    read_only: bool = False
    initiator: str | None = None        # the initiator name the target's ACL sees (default: nbd:<address>)
    relative_port: int = 2              # the relative target port identifier of the NBD target port


@dataclass
class Config:
    file: str
    portals: list[tuple[str, int]]
    targets: list[TargetConfig]
    state_dir: str | None = None
    discovery_chap: ChapConfig | None = None
    nbd: list[NbdConfig] = field(default_factory=list)


_IQN = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:.+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")


def parse_listen(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT', 'HOST' -> (host, port)."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?|([0-9a-fA-F:]+)", text)
    if not m:
        raise ValueError(f"not HOST:PORT: {text!r}")
    host = m.group(1) or m.group(3) or m.group(5)
    port = int(m.group(2) or m.group(4) or default_port)
    if not 0 <= port < 65536:  # 0: any free port (tests)
        raise ValueError(f"port out of range: {port}")
    return host, port


def load(path: str | None) -> Config:
    if path is None:
        return parse(DEFAULT_CONFIG, "<embedded default>")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(path, None, "-", exc.strerror or str(exc)) from None
    return parse(text, path)


def parse(text: str, file: str) -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(file, int(m.group(1)) if m else None, "-", f"not valid TOML: {exc}") from None
    return _Checker(text, file).config(doc)


class _Checker:
    def __init__(self, text: str, file: str) -> None:
        self.lines = text.splitlines()
        self.file = file

    def fail(self, path: list[str | int], message: str) -> ConfigError:
        return ConfigError(self.file, self._locate(path), _dotted(path), message)

    def _locate(self, path: list[str | int]) -> int | None:
        """The line defining `path` (e.g. ['target', 0, 'lun', 1, 'params']), by walking table headers."""
        counters: dict[str, int] = {}
        current: list[str | int] = []
        best: int | None = None
        for number, raw in enumerate(self.lines, 1):
            line = raw.strip()
            header = re.fullmatch(r"\[\[\s*([\w.-]+)\s*\]\]|\[\s*([\w.-]+)\s*\]", line.split("#")[0].strip())
            if header:
                name = header.group(1) or header.group(2)
                parts = name.split(".")
                current = []
                for depth, part in enumerate(parts):
                    current.append(part)
                    if header.group(1) and depth == len(parts) - 1:
                        key = ".".join(map(str, current))
                        counters[key] = counters.get(key, -1) + 1
                        current.append(counters[key])
                    elif header.group(1) is None or depth < len(parts) - 1:
                        key = ".".join(map(str, current))
                        if key in counters:
                            current.append(counters[key])
                if current == path[:len(current)] and best is None and len(current) == len(path):
                    best = number
                continue
            m = re.match(r"([\w-]+)\s*=", line)
            if m and current + [m.group(1)] == path[:len(current) + 1]:
                return number
        return best

    def config(self, doc: dict[str, Any]) -> Config:
        self._known(doc, [], {"portal", "target", "server", "discovery", "nbd"})
        server = doc.get("server", {})
        self._known(server, ["server"], {"state_dir"})
        portals = []
        for i, portal in enumerate(self._list(doc, "portal", [])):
            self._known(portal, ["portal", i], {"listen"})
            try:
                portals.append(parse_listen(self._get(portal, ["portal", i, "listen"], str)))
            except ValueError as exc:
                raise self.fail(["portal", i, "listen"], str(exc)) from None
        if not portals:
            portals = [("127.0.0.1", DEFAULT_PORT)]
        targets = [self.target(t, i) for i, t in enumerate(self._list(doc, "target", []))]
        names = [t.name for t in targets]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise self.fail(["target", i, "name"], f"target {name} defined twice")
        discovery = doc.get("discovery", {})
        self._known(discovery, ["discovery"], {"chap"})
        discovery_chap = self.chap(discovery["chap"], ["discovery", "chap"]) if "chap" in discovery else None
        nbd = [self.nbd(table, ["nbd", i], targets) for i, table in enumerate(self._list(doc, "nbd", []))]
        seen: dict[tuple[tuple[str, int], str], int] = {}
        for i, export in enumerate(nbd):
            if (export.listen, export.export) in seen:
                raise self.fail(["nbd", i, "export"], f"export {export.export!r} is already offered on "
                                                      f"{export.listen[0]}:{export.listen[1]}")
            seen[(export.listen, export.export)] = i
        return Config(self.file, portals, targets, server.get("state_dir"), discovery_chap, nbd)

    def nbd(self, table: Any, path: list[str | int], targets: list[TargetConfig]) -> NbdConfig:
        """An [[nbd]] export: which target's LUN, where, under which name (docs/nbd.md)."""
        self._known(table, path, {"listen", "export", "target", "lun", "read_only", "initiator",
                                  "relative_port"})
        for key in ("export", "target"):
            if key not in table:     # a missing key has no line of its own: name the table's
                raise ConfigError(self.file, self._locate(path), _dotted(path + [key]), "required key is missing")
        try:
            listen = parse_listen(self._get(table, path + ["listen"], str, f"127.0.0.1:{NBD_PORT}"), NBD_PORT)
        except ValueError as exc:
            raise self.fail(path + ["listen"], str(exc)) from None
        export = self._get(table, path + ["export"], str)
        if len(export.encode()) > 4096 or "\0" in export:
            raise self.fail(path + ["export"], "an NBD export name is at most 4096 bytes, without NUL")
        name = self._get(table, path + ["target"], str)
        target = next((t for t in targets if t.name == name), None)
        if target is None:
            raise self.fail(path + ["target"], f"no [[target]] named {name!r}")
        number = self._int(table, path + ["lun"], 0, 0, 16383)
        lun = next((entry for entry in target.luns if entry.lun == number), None)
        if lun is None:
            raise self.fail(path + ["lun"], f"{name} has no LUN {number}")
        if lun.emulator in ("vtape", "vchanger", "vcdrom"):
            raise self.fail(path + ["lun"], f"LUN {number} is a {lun.emulator}: NBD exports disks only")
        initiator = self._get(table, path + ["initiator"], str, None)
        if initiator is not None and not initiator:
            raise self.fail(path + ["initiator"], "expected a non-empty initiator name")
        return NbdConfig(listen=listen, export=export, target=name, lun=number,
                         read_only=self._get(table, path + ["read_only"], bool, False), initiator=initiator,
                         relative_port=self._int(table, path + ["relative_port"], 2, 1, 65535))

    def target(self, table: dict[str, Any], i: int) -> TargetConfig:
        path: list[str | int] = ["target", i]
        self._known(table, path, {"name", "alias", "tpgt", "queue_depth", "lun", "iscsi", "default_access",
                                  "chap", "group"})
        name = self._get(table, path + ["name"], str)
        if not _IQN.match(name):
            raise self.fail(path + ["name"], f"{name!r} is not an iqn., eui. or naa. name")
        target = TargetConfig(name=name, alias=table.get("alias"),
                              tpgt=self._int(table, path + ["tpgt"], 1, 1, 65535),
                              queue_depth=self._int(table, path + ["queue_depth"], 64, 1, 4096))
        target.iscsi = self.iscsi(table.get("iscsi", {}), path + ["iscsi"])
        seen: set[int] = set()
        for j, lun in enumerate(self._list(table, "lun", path)):
            cfg = self.lun(lun, path + ["lun", j], name)
            if cfg.lun in seen:
                raise self.fail(path + ["lun", j, "lun"], f"LUN {cfg.lun} mapped twice")
            seen.add(cfg.lun)
            target.luns.append(cfg)
        names = [lun.name for lun in target.luns]
        for j, lun in enumerate(target.luns):
            if names.index(lun.name) != j:
                raise self.fail(path + ["lun", j, "name"], f"device name {lun.name!r} used twice")
        target.default_access = self._get(table, path + ["default_access"], bool, True)
        if "chap" in table:
            target.chap = self.chap(table["chap"], path + ["chap"])
        for j, group in enumerate(self._list(table, "group", path)):
            target.groups.append(self.group(group, path + ["group", j], set(names)))
        return target

    def chap(self, table: Any, path: list[str | int]) -> ChapConfig:
        from .iscsi.chap import load_secret
        self._known(table, path, {"user", "secret", "mutual_user", "mutual_secret", "algorithms"})
        secrets: dict[str, bytes] = {}
        for key in ("secret", "mutual_secret"):
            if key in table:
                try:
                    secrets[key] = load_secret(self._get(table, path + [key], str))
                except ValueError as exc:
                    raise self.fail(path + [key], str(exc)) from None
        if "secret" not in secrets:
            raise self.fail(path + ["secret"], "required key is missing")
        if ("mutual_user" in table) != ("mutual_secret" in table):
            raise self.fail(path + ["mutual_user"], "mutual CHAP needs both mutual_user and mutual_secret")
        algorithms = tuple(self._get(table, path + ["algorithms"], list, [8, 7, 6, 5]))
        if not algorithms or any(a not in (5, 6, 7, 8) for a in algorithms):
            raise self.fail(path + ["algorithms"], "expected CHAP_A values among 5 (MD5), 6 (SHA-1), "
                                                   "7 (SHA-256), 8 (SHA3-256)")
        return ChapConfig(user=self._get(table, path + ["user"], str), secret=secrets["secret"],
                          mutual_user=table.get("mutual_user"), mutual_secret=secrets.get("mutual_secret"),
                          algorithms=algorithms)

    def group(self, table: Any, path: list[str | int], devices: set[str]) -> GroupConfig:
        self._known(table, path, {"name", "initiators", "addresses", "chap", "luns"})
        initiators = self._get(table, path + ["initiators"], list)
        if not initiators or not all(isinstance(i, str) and i for i in initiators):
            raise self.fail(path + ["initiators"], "expected a non-empty list of initiator names or patterns")
        addresses = self._get(table, path + ["addresses"], list, [])

        for address in addresses:
            try:
                ipaddress.ip_network(str(address), strict=False)
            except ValueError:
                raise self.fail(path + ["addresses"], f"{address!r} is not an address or CIDR range") from None
        group = GroupConfig(name=self._get(table, path + ["name"], str, f"group{path[-1]}"),
                            initiators=list(initiators), addresses=[str(a) for a in addresses])
        if "chap" in table:
            group.chap = self.chap(table["chap"], path + ["chap"])
        if "luns" in table:
            group.luns = []
            seen: set[int] = set()
            for k, entry in enumerate(self._get(table, path + ["luns"], list)):
                where = path + ["luns", k]
                self._known(entry, where, {"lun", "device", "read_only"})
                number = self._int(entry, where + ["lun"], None, 0, 16383)
                device = self._get(entry, where + ["device"], str)
                if device not in devices:
                    raise self.fail(where + ["device"], f"no [[target.lun]] named {device!r} "
                                                        f"(known: {', '.join(sorted(devices))})")
                if number in seen:
                    raise self.fail(where + ["lun"], f"LUN {number} mapped twice in this group")
                seen.add(number)
                group.luns.append(GroupLun(number, device, self._get(entry, where + ["read_only"], bool, False)))
        return group

    def iscsi(self, table: dict[str, Any], path: list[str | int]) -> IscsiSettings:
        s = IscsiSettings()
        self._known(table, path, set(IscsiSettings.__dataclass_fields__))
        s.max_recv_data_segment_length = self._int(table, path + ["max_recv_data_segment_length"],
                                                   s.max_recv_data_segment_length, 512, 16777215)
        s.max_burst_length = self._int(table, path + ["max_burst_length"], s.max_burst_length, 512, 16777215)
        s.first_burst_length = self._int(table, path + ["first_burst_length"], s.first_burst_length, 512,
                                         16777215)
        s.max_outstanding_r2t = self._int(table, path + ["max_outstanding_r2t"], 1, 1, 65535)
        s.default_time2wait = self._int(table, path + ["default_time2wait"], 2, 0, 3600)
        s.default_time2retain = self._int(table, path + ["default_time2retain"], 20, 0, 3600)
        for key in ("initial_r2t", "immediate_data"):
            if key in table:
                setattr(s, key, self._get(table, path + [key], bool))
        for key in ("header_digest", "data_digest"):
            if key in table:
                values = self._get(table, path + [key], list)
                if not values or any(v not in ("None", "CRC32C") for v in values):
                    raise self.fail(path + [key], 'expected a list of "None" and/or "CRC32C"')
                setattr(s, key, tuple(values))
        for key in ("nop_interval", "nop_timeout", "login_timeout"):
            if key in table:
                value = self._get(table, path + [key], (int, float))
                if value < 0:
                    raise self.fail(path + [key], "must not be negative")
                setattr(s, key, float(value))
        return s

    def lun(self, table: dict[str, Any], path: list[str | int], target: str) -> LunConfig:
        self._known(table, path, {"lun", "emulator", "command", "params", "read_only", "serial", "naa",
                                  "vendor", "product", "revision", "command_timeout", "name", "serialize",
                                  "ping_interval", "ping_timeout"})
        number = self._int(table, path + ["lun"], None, 0, 16383)
        emulator = table.get("emulator")
        command = table.get("command")
        if command is not None:
            if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
                raise self.fail(path + ["command"], "expected a non-empty list of strings")
            argv = list(command)
            emulator = emulator or Path(command[0]).name
        elif emulator in BUILTIN_EMULATORS:
            argv = [sys.executable, "-m", f"emulators.{emulator}"]
        else:
            raise self.fail(path + ["emulator"], f"expected one of {', '.join(BUILTIN_EMULATORS)} "
                                                 f"(or give 'command'), got {emulator!r}")
        params = table.get("params", {})
        if not isinstance(params, dict):
            raise self.fail(path + ["params"], "expected a table")
        stable = hashlib.sha256(f"{target}/{number}".encode()).digest()
        serial = table.get("serial") or stable[:8].hex()
        naa_text = table.get("naa")
        if naa_text is not None:
            try:
                naa = bytes.fromhex(str(naa_text))
            except ValueError:
                naa = b""
            if len(naa) not in (8, 16) or naa[0] >> 4 not in (2, 3, 5, 6):
                raise self.fail(path + ["naa"], "expected 16 or 32 hex digits of an NAA 2, 3, 5 or 6 name")
        else:
            # NAA 6 (IEEE registered extended) with a locally administered company id, stable per LU name.
            naa = bytes([0x60, 0x01, 0x40, 0x50 | (stable[8] & 0x0F)]) + stable[9:21]
        timeout = table.get("command_timeout", 30)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise self.fail(path + ["command_timeout"], "expected a positive number of seconds")
        return LunConfig(lun=number, emulator=str(emulator), argv=argv, params=dict(params),
                         read_only=bool(self._get(table, path + ["read_only"], bool, False)),
                         serial=str(serial)[:32], naa=naa,
                         vendor=str(table.get("vendor", "TRIOSCSI"))[:8],
                         product=str(table.get("product", f"{emulator}"))[:16],
                         revision=str(table.get("revision", "0001"))[:4], command_timeout=float(timeout),
                         name=str(self._get(table, path + ["name"], str, f"lun{number}")),
                         serialize=self._get(table, path + ["serialize"], bool, None),
                         ping_interval=self._seconds(table, path + ["ping_interval"], 5.0),
                         ping_timeout=self._seconds(table, path + ["ping_timeout"], 10.0))

    # ---- small typed accessors -------------------------------------------------------------------------------

    def _known(self, table: Any, path: list[str | int], allowed: set[str]) -> None:
        if not isinstance(table, dict):
            raise self.fail(path, "expected a table")
        for key in table:
            if key not in allowed:
                raise self.fail(path + [key], f"unknown key (expected one of {', '.join(sorted(allowed))})")

    def _list(self, table: dict[str, Any], key: str, path: list[str | int]) -> list[Any]:
        value = table.get(key, [])
        if not isinstance(value, list):
            raise self.fail(path + [key], f"expected [[{key}]] tables")
        return value

    _MISSING = object()

    def _get(self, table: dict[str, Any], path: list[str | int], kind: Any, default: Any = _MISSING) -> Any:
        key = path[-1]
        if key not in table:
            if default is self._MISSING:
                raise self.fail(path, "required key is missing")
            return default
        value = table[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(path, f"expected {names}, got {type(value).__name__}")
        return value

    def _seconds(self, table: dict[str, Any], path: list[str | int], default: float) -> float:
        value = self._get(table, path, (int, float), default)
        if isinstance(value, bool) or value <= 0:
            raise self.fail(path, "expected a positive number of seconds")
        return float(value)

    def _int(self, table: dict[str, Any], path: list[str | int], default: int | None, low: int,
             high: int) -> int:
        value = self._get(table, path, int, self._MISSING if default is None else default)
        if not low <= value <= high:
            raise self.fail(path, f"{value} is outside {low}..{high}")
        return int(value)


def _dotted(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out
