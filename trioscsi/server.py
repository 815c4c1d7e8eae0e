"""The server: builds logical units, targets and transports from a configuration and owns their lifetimes.

Ownership (one nursery, named owners): the server nursery runs one supervisor per emulator, the iSCSI
service (which owns its portals, connections and sessions) and the NBD service (its listeners and
connections).  SIGINT/SIGTERM cancel it with a grace period so emulators get EOF on stdin and flush before
they exit.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field

import trio

from .scsi.sense import Asc

from collections.abc import Callable, Mapping

from .config import Config, ConfigError, LunConfig, TargetConfig
from .core.access import AccessControl, InitiatorGroup, LunMapping
from .core.lu import LogicalUnit, LuOptions
from .core.target import ScsiTarget
from .emu.supervisor import Emulator, EmulatorSpec
from .iscsi.portal import ExportedTarget, IscsiService
from .nbd.server import NbdExport, NbdService

log = logging.getLogger("trioscsi")

SHUTDOWN_GRACE = 5.0


def _emulator_env() -> dict[str, str]:
    """Built-in emulators come from the same tree as this server, whatever pip points at."""
    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {"PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH", "")) if p)}


def _view(luns: Mapping[int, LunMapping]) -> dict[int, tuple[int, bool]]:
    return {n: (id(m.lu), m.read_only) for n, m in luns.items()}

STARTUP_WAIT = 20.0


@dataclass
class Server:
    config: Config
    state_dir: str
    emulators: list[Emulator] = field(default_factory=list)
    _lus: dict[str, list[LogicalUnit]] = field(default_factory=dict)
    iscsi: IscsiService | None = None
    nbd: NbdService | None = None

    def build(self) -> None:
        exported = [ExportedTarget(t, self._target(t)) for t in self.config.targets]
        self._wire_drives(exported)
        self.iscsi = IscsiService(exported, self.config.portals, discovery_chap=self.config.discovery_chap)
        by_name = {t.config.name: t.scsi for t in exported}
        self.nbd = NbdService([NbdExport(e, by_name[e.target]) for e in self.config.nbd])

    def _target(self, config: TargetConfig) -> ScsiTarget:
        devices = {lun.name: (lun, self._logical_unit(config, lun)) for lun in config.luns}
        self._lus[config.name] = [lu for _, lu in devices.values()]
        default = {lun.lun: LunMapping(lu, lun.read_only) for lun, lu in devices.values()}
        groups = [InitiatorGroup(g.name, g.initiators, g.addresses,
                                 None if g.luns is None else
                                 {m.lun: LunMapping(devices[m.device][1], m.read_only or devices[m.device][0].read_only)
                                  for m in g.luns})
                  for g in config.groups]
        return ScsiTarget(config.name, AccessControl(default, groups, config.default_access))

    def apply_access(self, config: Config) -> None:
        """Apply changed initiator groups, LUN maps and CHAP of existing targets without a restart.

        Only sessions whose view changed notice: a session that lost its target is closed, one whose LUN map
        changed gets REPORTED LUNS DATA HAS CHANGED. Adding devices or targets still needs a restart."""
        assert self.iscsi is not None
        for new in config.targets:
            exported = self.iscsi.targets.get(new.name)
            if exported is None:
                log.warning("reload: new target %s needs a restart", new.name)
                continue
            devices = {lun.name: lu for lun, lu in zip(exported.config.luns, self._lus[new.name])}
            unknown = {m.device for g in new.groups for m in (g.luns or [])} - set(devices)
            unknown |= {lun.name for lun in new.luns} - set(devices)
            if unknown:
                log.warning("reload: %s: new devices %s need a restart; target left unchanged", new.name,
                            ", ".join(sorted(unknown)))
                continue
            scsi = exported.scsi
            before = {s: _view(scsi.lun_map(s.nexus)) for s in self.iscsi.registry if s.target is scsi}
            default = {lun.lun: LunMapping(devices[lun.name], lun.read_only) for lun in new.luns}
            groups = [InitiatorGroup(g.name, g.initiators, g.addresses,
                                     None if g.luns is None else
                                     {m.lun: LunMapping(devices[m.device], m.read_only) for m in g.luns})
                      for g in new.groups]
            scsi.access = AccessControl(default, groups, new.default_access)
            exported.config.groups, exported.config.chap = new.groups, new.chap
            exported.config.default_access = new.default_access
            for session, old_view in before.items():
                nexus = session.nexus
                if not scsi.may_use(nexus.initiator_name, nexus.initiator_address):
                    log.info("reload: %s lost access to %s; closing its session", nexus.initiator_port, new.name)
                    self.iscsi.registry.remove(session)
                    session.close()
                elif _view(scsi.lun_map(nexus)) != old_view:
                    log.info("reload: LUN map of %s on %s changed", nexus.initiator_port, new.name)
                    for mapping in scsi.lun_map(nexus).values():
                        mapping.lu.unit_attentions.raise_for(nexus, Asc.REPORTED_LUNS_DATA_HAS_CHANGED)
        if self.nbd is not None:
            self.nbd.apply_access()
        log.info("reload: access rules applied")

    def _wire_drives(self, exported: list[ExportedTarget]) -> None:
        """Let a changer find its drives: by the drive's serial anywhere, else by LUN in its own target."""
        by_serial = {lun.serial: lu for t in exported for lun, lu in zip(t.config.luns, self._lus[t.config.name])}
        for t in exported:
            by_lun = {lun.lun: lu for lun, lu in zip(t.config.luns, self._lus[t.config.name])}
            for lu in self._lus[t.config.name]:
                lu.resolve_drive = (lambda serial, number, by_lun=by_lun:
                                    by_serial.get(serial or "") or by_lun.get(number if number is not None else -1))

    def _logical_unit(self, target: TargetConfig, lun: LunConfig) -> LogicalUnit:
        name = f"{target.name.rsplit(':', 1)[-1]}/lun{lun.lun}"
        params = dict(lun.params)
        if lun.read_only:
            params["read_only"] = True      # read-only for everyone: the emulator reports WP itself
        identity = {"naa": lun.naa, "serial": lun.serial, "vendor": lun.vendor, "product": lun.product,
                    "revision": lun.revision}
        emulator = Emulator(EmulatorSpec(name=name, argv=lun.argv, params=params, identity=identity,
                                         cwd=self.state_dir, ping_interval=lun.ping_interval,
                                         ping_timeout=lun.ping_timeout, env=_emulator_env()))
        self.emulators.append(emulator)
        reservation_file = os.path.join(self.state_dir, "reservations",
                                        f"{target.name.replace(':', '_')}-lun{lun.lun}.pr")
        return LogicalUnit(name, emulator, LuOptions(command_timeout=lun.command_timeout,
                                                     read_only=lun.read_only,
                                                     reservation_file=reservation_file,
                                                     serialize=lun.serialize))

    async def run(self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        if self.iscsi is None:
            self.build()
        assert self.iscsi is not None
        async with trio.open_nursery() as nursery:
            for emulator in self.emulators:
                nursery.start_soon(emulator.run)
            await self._wait_for_emulators()
            await nursery.start(self._serve_admin)
            if self.nbd is not None and self.nbd.listeners:
                await nursery.start(self.nbd.serve)     # before the portals: "iSCSI answers" means all is up
            bound = await nursery.start(self.iscsi.serve)
            task_status.started(bound)

    async def _serve_admin(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A Unix socket in the state dir (root only): `status`, `restart LU` (live upgrade of one emulator)."""
        path = os.path.join(self.state_dir, "admin.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(8)
        task_status.started()
        await trio.serve_listeners(self._admin_command, [trio.SocketListener(sock)])

    async def _admin_command(self, stream: trio.abc.Stream) -> None:
        async with stream:
            with trio.move_on_after(60):
                request = (await stream.receive_some(4096)).decode(errors="replace").split()
                await stream.send_all(await self.admin(request))

    async def admin(self, request: list[str]) -> bytes:
        """One admin request: `status`, `restart LU` (live upgrade of one emulator), `load LU PATH` and
        `unload LU` (change the medium of a CD-ROM or tape drive).  The answer starts with `error:` on failure."""
        by_name = {e.spec.name: e for e in self.emulators}
        lus = {lu.name: lu for target in self._lus.values() for lu in target}
        verb, args = (request[0], request[1:]) if request else ("", [])
        if verb == "status" and not args:
            lines = [f"{e.spec.name} pid={e.pid} restarts={e.restarts} retried={e.retried_commands} "
                     f"up={e.info is not None and not e.crash_looping}" for e in self.emulators]
            return ("\n".join(lines) + "\n").encode()
        if verb == "restart" and len(args) == 1 and args[0] in by_name:
            await by_name[args[0]].restart()
            await by_name[args[0]].wait_ready()
            return f"restarted {args[0]} (pid {by_name[args[0]].pid})\n".encode()
        if (verb, len(args)) in (("load", 2), ("unload", 1)) and args[0] in lus:
            path = args[1] if verb == "load" else None
            log.info("admin: %s %s%s", verb, args[0], f" {path}" if path else "")
            why = await lus[args[0]].replace_medium(path)
            return (f"error: {why}\n" if why else f"{verb}ed {args[0]}{f' {path}' if path else ''}\n").encode()
        return (f"error: expected `status`, `restart LU`, `load LU PATH` or `unload LU` (LUs: "
                f"{', '.join(by_name)})\n").encode()

    async def _wait_for_emulators(self) -> None:
        """Give every emulator a chance to come up before the portals open; a broken one must not keep the
        others from being served (its LU answers NOT READY until it works)."""
        async def ready_or_hopeless(emulator: Emulator) -> None:
            while emulator.info is None and not emulator.crash_looping:
                with trio.move_on_after(0.2):
                    await emulator.wait_ready()

        with trio.move_on_after(STARTUP_WAIT):
            async with trio.open_nursery() as waiting:
                for emulator in self.emulators:
                    waiting.start_soon(ready_or_hopeless, emulator)
        for emulator in self.emulators:
            if emulator.info is None:
                log.error("%s: emulator not ready after %.0f s; serving the other LUs meanwhile",
                          emulator.spec.name, STARTUP_WAIT)


async def serve_until_signalled(server: Server, reload: Callable[[], Config] | None = None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            log.info("trioscsi ready")
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if reload is None:
                        log.warning("SIGHUP: running on the embedded default; nothing to reload")
                        continue
                    try:
                        server.apply_access(reload())
                    except ConfigError as exc:
                        log.error("SIGHUP: configuration not reloaded: %s", exc)
                    continue
                log.info("%s received: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
                nursery.cancel_scope.cancel()
                break
