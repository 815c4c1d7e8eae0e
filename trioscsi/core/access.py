"""Who may see what: initiator groups, their LUN maps and read-only mappings (SCST's "security groups").

Strategy: a target has a default map and any number of groups. A group matches initiator names (exact or
shell-style wildcards) and, optionally, source address ranges; the first matching group decides. An
initiator matching no group gets the default map when the target allows it, or sees nothing. The result for
one (initiator name, address) is computed once and cached until the configuration changes.
"""
from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lu import LogicalUnit


@dataclass(frozen=True, slots=True)
class LunMapping:
    """One LUN of one view: the logical unit, and whether this view may only read it."""
    lu: LogicalUnit
    read_only: bool = False


@dataclass
class InitiatorGroup:
    name: str
    initiators: Sequence[str]
    addresses: Sequence[str] = ()
    luns: Mapping[int, LunMapping] | None = None        # None: the target's default map
    _networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._networks = [ipaddress.ip_network(a, strict=False) for a in self.addresses]

    def matches(self, initiator_name: str, address: str) -> bool:
        name = initiator_name.lower()
        if not any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in self.initiators):
            return False
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)


class AccessControl:
    def __init__(self, default: Mapping[int, LunMapping], groups: Sequence[InitiatorGroup] = (),
                 default_access: bool = True) -> None:
        self.default = dict(default)
        self.groups = list(groups)
        self.default_access = default_access
        self._cache: dict[tuple[str, str], tuple[InitiatorGroup | None, Mapping[int, LunMapping] | None]] = {}

    def resolve(self, initiator_name: str, address: str) -> tuple[InitiatorGroup | None,
                                                                  Mapping[int, LunMapping] | None]:
        """(the matching group or None, the LUN map or None when the initiator may not use the target)."""
        key = (initiator_name, address)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._resolve(initiator_name, address)
        return cached

    def _resolve(self, initiator_name: str, address: str) -> tuple[InitiatorGroup | None,
                                                                   Mapping[int, LunMapping] | None]:
        for group in self.groups:
            if group.matches(initiator_name, address):
                return group, group.luns if group.luns is not None else self.default
        return None, self.default if self.default_access else None

    def logical_units(self) -> list[LogicalUnit]:
        seen: dict[int, LogicalUnit] = {}
        for view in [self.default] + [g.luns for g in self.groups if g.luns is not None]:
            for mapping in view.values():
                seen[id(mapping.lu)] = mapping.lu
        return list(seen.values())
