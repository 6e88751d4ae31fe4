"""The host: its state (view, router, anchor tree, links, processes) and the I/O around it.

`Host` is what the capabilities in ww.host.caps call. It owns the host↔host links: it dials
configured peers (again, with backoff, whenever the link drops) and hosts it hears of through
gossip (the host with the smaller peer id dials, so each pair gets one link), and accepts
links dialed to it. Anchors under `/<other peer>/...` are reached over the link to that peer,
through a lease held there for the local lease, so they vanish with their holder too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ww.auth import ClusterKey, issue_credentials, peer_id_of
from ww.host.anchors import AnchorTree
from ww.host.caps import HostCapability
from ww.host.config import Address, HostConfig, format_address, parse_address
from ww.host.lease import Lease
from ww.host.links import Link, PeerLinkCapability
from ww.host.paths import Parts, format_path, parse_path
from ww.host.pubsub import Envelope, PubSubError, Router
from ww.host.restarts import RestartError, RestartRecord, RestartStore, check_policy
from ww.host.supervisor import Process, Run, supervise
from ww.host.view import GossipError, HostRecord, Membership
from ww.host.volumes import VolumeError, Volumes
from ww.rom import Rom, RomError
from ww.rpc import Capability, CapabilityError, Connection, Ref

if TYPE_CHECKING:
    from ww.rom.executor import Executor, ProcessHandle

log = logging.getLogger("ww.host")

LINK_WAIT = 5.0
"""Seconds a call for a remote anchor waits for the link to a host that is in the view."""

KEEP_EXITED = 256
"""Exited processes `ps` still lists (with their exit codes), newest kept."""

DIAL_TIMEOUT = 10.0
MAX_BACKOFF = 5.0

Dialer = Callable[[Address], Awaitable[trio.abc.Stream]]


class Host:
    """One host's state and behaviour; `run_host` (ww.host.server) gives it sockets."""

    def __init__(
        self,
        config: HostConfig,
        peer_id: str,
        addr: Address,
        nursery: trio.Nursery,
        dialer: Dialer,
        executor: Executor | None = None,
        cluster_key: ClusterKey | None = None,
        restarts: RestartStore | None = None,
    ) -> None:
        self.config = config
        self.cluster_key = cluster_key
        self.peer_id = peer_id
        self.addr = addr
        self.nursery = nursery
        self.executor = executor
        self._dialer = dialer
        me = HostRecord(peer_id, (format_address(addr),), dict(config.meta), config.ttl)
        self.view = Membership(me)
        self.router = Router(peer_id)
        self.tree = AnchorTree(on_removed=self._release_value)
        self.links: dict[str, Link] = {}  # peer -> the link that carries traffic
        self._spare_links: dict[str, list[Link]] = {}
        self.connections: set[Connection] = set()
        self._link_changed = trio.Event()
        self._dialing: set[str] = set()
        self._next_dial: dict[str, tuple[float, float]] = {}  # peer -> (not before, backoff)
        self._processes: dict[int, Process] = {}  # by the pid of the current run
        self.restarts = restarts
        self.volumes = Volumes(config.data_dir / "volumes", peer_id)
        self._volume_holders: dict[Path, Process | None] = {}  # None: starting

    # --- capabilities for a connection ------------------------------------------------------

    def bootstrap(
        self, name: str, certified_peer: str | None = None
    ) -> tuple[HostCapability, Lease]:
        lease = Lease(name)
        return HostCapability(self, lease, certified_peer), lease

    def now(self) -> float:
        return trio.current_time()

    # --- the view -----------------------------------------------------------------------------

    def live_hosts(self) -> list[dict[str, Any]]:
        now, wall = self.now(), time.time()
        return [
            {
                "peer": m.record.peer,
                "addrs": list(m.record.addrs),
                "meta": dict(m.record.meta),
                "last_seen": wall - (now - m.last_seen),
            }
            for m in self.view.live(now)
        ]

    def gossip(self) -> list[dict[str, Any]]:
        return self.view.gossip(self.now())

    def on_gossip(self, records: object) -> None:
        if not isinstance(records, list):
            raise CapabilityError("gossip must be a list of membership records")
        try:
            new = self.view.merge(records, self.now())
        except GossipError as e:
            raise CapabilityError(str(e)) from None
        for peer in new:
            log.info("host %s joined the view", peer)
        if new:
            self.dial_new_hosts()

    def credentials(self) -> bytes | None:
        """What a process of ours needs to dial hosts of the cluster itself: a bundle from
        `issue_credentials`, or None when the cluster has no key (plain TCP)."""
        return None if self.cluster_key is None else issue_credentials(self.cluster_key)

    def hello(self) -> dict[str, Any]:
        return {"peer": self.peer_id, "ns": self.config.ns, "record": self.view.me.to_wire(0.0)}

    def _check_hello(self, hello: object, certified: str | None) -> str:
        """Validate a linking host's hello and add it to the view; its peer id.

        `certified` is the peer id its TLS certificate proves, if the connection has one."""
        if not isinstance(hello, dict) or not isinstance(hello.get("peer"), str):
            raise CapabilityError("peer_link needs a hello map with the peer id")
        peer: str = hello["peer"]
        if certified is not None and peer != certified:
            raise CapabilityError(f"hello says host {peer} but the certificate says {certified}")
        if hello.get("ns") != self.config.ns:
            raise CapabilityError(
                f"host {peer} is in cluster namespace {hello.get('ns')!r}, not {self.config.ns!r}"
            )
        if peer == self.peer_id:
            raise CapabilityError(f"host {peer} dialed itself")
        try:
            record, age = HostRecord.from_wire(hello.get("record"))
        except GossipError as e:
            raise CapabilityError(str(e)) from None
        if record.peer != peer:
            raise CapabilityError(f"hello from host {peer} carries the record of {record.peer}")
        if self.view.observe(record, age, self.now()):
            log.info("host %s joined the view", peer)
        return peer

    # --- pubsub -------------------------------------------------------------------------------

    def publish(self, topic: str, data: bytes) -> None:
        self._send_all(self.router.publish(topic, data, self._live_links()))

    def on_deliver(self, envelopes: object, sender: str | None) -> None:
        if not isinstance(envelopes, list):
            raise CapabilityError("deliver needs a list of envelopes")
        for raw in envelopes:
            try:
                env = Envelope.from_wire(raw)
            except PubSubError as e:
                raise CapabilityError(f"bad envelope from {sender}: {e}") from None
            self._send_all(self.router.receive(env, self._live_links()))

    def _live_links(self) -> list[str]:
        return [peer for peer, link in self.links.items() if not link.closed]

    def _send_all(self, outgoing: list[tuple[str, Envelope]]) -> None:
        for peer, env in outgoing:
            link = self.links.get(peer)
            if link is not None:
                link.send(env)

    # --- anchors --------------------------------------------------------------------------------

    async def remote_anchor(self, parts: Parts, lease: Lease) -> Ref:
        """The anchor at `parts` on the host that owns it, held there for `lease`."""
        peer = parts[0]
        link = await self._link_to(peer)
        remote = link.remote_leases.get(lease.id)
        if remote is None:
            remote = await link.ref.call("lease")
            if lease.ended or link.closed:
                self.nursery.start_soon(remote.release)
                raise CapabilityError(f"the connection to /{peer} went away; try again")
            link.remote_leases[lease.id] = remote

            def drop() -> None:
                if link.remote_leases.pop(lease.id, None) is not None:
                    self.nursery.start_soon(remote.release)

            lease.on_end(drop)
        anchor: Ref = await remote.call("anchor", format_path(parts))
        return anchor

    async def _link_to(self, peer: str) -> Link:
        with trio.move_on_after(LINK_WAIT):
            while True:
                link = self.links.get(peer)
                if link is not None and not link.closed:
                    return link
                if self.view.get(peer, self.now()) is None:
                    raise CapabilityError(f"no host {peer} in the cluster; `ww ls /` lists hosts")
                self.dial_new_hosts()
                await self._link_changed.wait()
        raise CapabilityError(f"host {peer} is in the view but not connected; try again")

    def _release_value(self, value: Any) -> None:
        if isinstance(value, Ref):
            self.nursery.start_soon(value.release)

    # --- processes ------------------------------------------------------------------------------

    async def spawn(
        self,
        rom: bytes | str,
        args: list[str],
        limits: dict[str, float] | None = None,
        *,
        at: Parts | None = None,
        volume: bool = False,
        restart: str = "no",
        record_id: str | None = None,
    ) -> Process:
        """Run a ROM. `at`: the anchor (parts from the peer id on, on this host) where its
        Process hangs while it runs; `volume`: give it the anchor's volume (one holder at a
        time); `restart`: "no", "on-failure" or "always" (then recorded in the data dir,
        under `record_id` when restarting a recorded one)."""
        if self.executor is None:
            raise CapabilityError("this host does not run ROMs")
        try:
            restart = check_policy(restart)
        except RestartError as e:
            raise CapabilityError(str(e)) from None
        if volume and not at:
            raise CapabilityError("a volume belongs to an anchor; spawn at one: anchor.spawn(...)")
        loaded = self._load_rom(rom)
        limits = dict(limits or {})
        directory: Path | None = None
        if volume:
            assert at is not None
            directory = self._take_volume(at[1:])
        home = None if at is None else format_path(at)
        record = None
        if restart != "no" and self.restarts is not None:
            id = record_id or RestartStore.new_id()
            record = RestartRecord(
                id, loaded.cid, tuple(args), restart, home, volume, tuple(limits.items())
            )
        start = functools.partial(self._start_run, loaded, args, limits, at, directory, home)
        try:
            if record is not None:  # first, so that a run never goes without its record
                assert self.restarts is not None
                try:
                    self.restarts.save(record)
                except OSError as e:
                    raise CapabilityError(f"cannot record the restart policy: {e}") from None
            run = await start()
        except BaseException:
            if directory is not None:
                self._volume_holders.pop(directory, None)
            if record is not None and record_id is None and self.restarts is not None:
                self.restarts.remove(record.id)
            raise
        process = Process(run, restart, home, directory)
        if directory is not None:
            self._volume_holders[directory] = process
        if record is not None and self.restarts is not None:
            process.record_id = record.id
            process.on_kill = functools.partial(self.restarts.remove, record.id)
        self._processes[run.handle.pid] = process
        self._hang(process, run)
        self.nursery.start_soon(
            supervise, process, start, self._run_ended, self._new_run, self._process_ended
        )
        log.info("spawned %s %s as pid %d", run.handle.name, args, run.handle.pid)
        return process

    async def _start_run(
        self,
        rom: Rom,
        args: list[str],
        limits: dict[str, float],
        at: Parts | None,
        volume: Path | None,
        home: str | None,
    ) -> Run:
        assert self.executor is not None
        lease = Lease("process")

        def capability(handle: ProcessHandle) -> Capability:
            lease.name = f"process {handle.pid} ({handle.name})"
            return HostCapability(self, lease)

        if volume is not None:
            try:
                volume.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CapabilityError(f"cannot make volume {volume}: {e.strerror}") from None
        memory = limits.get("memory")
        try:
            handle = await self.executor.spawn(
                rom,
                args,
                capability,
                memory_limit=None if memory is None else int(memory),
                cpu_seconds=limits.get("cpu_seconds"),
                volume=volume,
                home=home,
            )
        except RomError as e:
            lease.end()
            raise CapabilityError(str(e)) from None
        return Run(handle, lease)

    def _take_volume(self, local: Parts) -> Path:
        try:
            directory = self.volumes.get(local).path
        except VolumeError as e:
            raise CapabilityError(str(e)) from None
        if directory in self._volume_holders:
            holder = self._volume_holders[directory]
            who = "a process that is starting" if holder is None else f"pid {holder.pid}"
            hint = "" if holder is None else f"; `ww kill {holder.pid}` first"
            raise CapabilityError(
                f"the volume of {self.volumes.anchor_of(local)} is held by {who}{hint}"
            )
        self._volume_holders[directory] = None  # taken while the process starts
        return directory

    def _hang(self, process: Process, run: Run) -> None:
        """Hang the run's Process capability at the process's anchor, owned by its lease."""
        if process.anchor is None or run.lease.ended:
            return
        from ww.host.caps import ProcessCapability

        parts = parse_path(process.anchor)[1:]
        with contextlib.suppress(ValueError):
            self.tree.store(parts, ProcessCapability(process), run.lease)

    def _run_ended(self, process: Process, code: int) -> None:
        process.run.lease.end()
        handle = process.run.handle
        log.info("pid %d (%s) exited with %d", handle.pid, handle.name, code)

    def _new_run(self, process: Process, run: Run) -> None:
        old = process.run.handle
        self._processes.pop(old.pid, None)
        if self.executor is not None:
            self.executor.forget(old.pid)
        process.run = run
        self._processes[run.handle.pid] = process
        self._hang(process, run)
        log.info(
            "restarted %s as pid %d (restart %d)", run.handle.name, run.handle.pid, process.restarts
        )

    def _process_ended(self, process: Process) -> None:
        if process.volume is not None and self._volume_holders.get(process.volume) is process:
            del self._volume_holders[process.volume]
        if process.record_id is not None and self.restarts is not None:
            self.restarts.remove(process.record_id)
        exited = [p for p in self.processes() if p.ended]
        for old in exited[: max(0, len(exited) - KEEP_EXITED)]:
            del self._processes[old.pid]
            if self.executor is not None:
                self.executor.forget(old.pid)

    def list_volumes(self) -> list[dict[str, Any]]:
        rows = []
        for volume, size in self.volumes.list():
            holder = self._volume_holders.get(volume.path)
            rows.append(
                {
                    "anchor": self.volumes.anchor_of(volume.local),
                    "path": str(volume.path),
                    "size": size,
                    "pid": None if holder is None else holder.pid,
                    "in_use": volume.path in self._volume_holders,
                }
            )
        return rows

    def remove_volume(self, anchor: object) -> None:
        try:
            local = self.volumes.parse(anchor)
            directory = self.volumes.get(local).path
            if directory in self._volume_holders:
                holder = self._volume_holders[directory]
                who = "a starting process" if holder is None else f"pid {holder.pid}"
                raise CapabilityError(f"the volume of {anchor} is in use by {who}; stop it first")
            self.volumes.remove(local)
        except ValueError as e:
            raise CapabilityError(str(e)) from None
        except OSError as e:
            raise CapabilityError(f"cannot remove the volume of {anchor}: {e.strerror}") from None
        log.info("removed the volume of %s", anchor)

    async def start_recorded(self, records: list[RestartRecord]) -> None:
        """Start the processes that restart records name (at host start)."""
        for record in records:
            try:
                await self._start_record(record)
            except Exception as e:
                log.warning("cannot start recorded process %s: %s", record.id, one_line(e))

    async def _start_record(self, record: RestartRecord) -> None:
        at = None
        if record.anchor is not None:
            at = parse_path(record.anchor)
            if not at or at[0] != self.peer_id:
                raise CapabilityError(f"its anchor {record.anchor} is not on this host")
        await self.spawn(
            record.cid,
            list(record.args),
            dict(record.limits),
            at=at,
            volume=record.volume,
            restart=record.restart,
            record_id=record.id,
        )
        log.info("started recorded process %s at %s", record.id, record.anchor or "no anchor")

    def _load_rom(self, rom: object) -> Rom:
        assert self.executor is not None
        try:
            if isinstance(rom, bytes):
                loaded = Rom.load(rom)
                self.executor.cache_put(rom)
                return loaded
            if isinstance(rom, str):
                cached = self.executor.cache_get(rom)
                if cached is None:
                    raise CapabilityError(f"no ROM {rom} cached on this host; send the ROM itself")
                return cached
        except RomError as e:
            raise CapabilityError(str(e)) from None
        raise CapabilityError(f"spawn takes ROM bytes or a content id, not {type(rom).__name__}")

    def processes(self) -> list[Process]:
        return sorted(self._processes.values(), key=lambda p: p.handle.started_at)

    def process(self, pid: object) -> Process:
        record = self._processes.get(pid) if isinstance(pid, int) else None
        if record is None:
            raise CapabilityError(f"no process {pid} on this host; `ww ps` lists them")
        return record

    # --- links ------------------------------------------------------------------------------------

    async def accept_link(
        self, hello: dict[str, Any], ref: object, certified: str | None
    ) -> dict[str, Any]:
        """A host dialed us and offers its PeerLink; register the link and offer ours."""
        if not isinstance(ref, Ref):
            raise CapabilityError("peer_link needs the dialing host's PeerLink capability")
        peer = self._check_hello(hello, certified)
        local = PeerLinkCapability(self)
        link = self._add_link(Link(self, peer, ref, local))
        self.nursery.start_soon(self._run_link, link, True)
        self.dial_new_hosts()
        return {"hello": self.hello(), "link": local}

    async def keep_peer(self, addr: Address) -> None:
        """Stay linked to a configured peer: dial, and dial again with backoff when it drops."""
        backoff = 0.1
        where = format_address(addr)
        while True:
            if not self._linked_at(where):
                try:
                    await self._dial(addr)
                    backoff = 0.1
                except Exception as e:
                    log.info("cannot link to peer %s: %s", where, one_line(e))
            await trio.sleep(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)

    def dial_new_hosts(self) -> None:
        """Dial hosts in the view we have no link to (when our peer id is the smaller)."""
        now = self.now()
        for member in self.view.live(now)[1:]:
            peer = member.record.peer
            if peer in self.links or peer in self._dialing or self.peer_id > peer:
                continue
            not_before, _ = self._next_dial.get(peer, (0.0, 0.0))
            if now < not_before or not member.record.addrs:
                continue
            self._dialing.add(peer)
            self.nursery.start_soon(self._dial_member, peer, member.record.addrs)

    async def _dial_member(self, peer: str, addrs: tuple[str, ...]) -> None:
        try:
            for text in addrs:
                try:
                    await self._dial(parse_address(text), expect=peer)
                    self._next_dial.pop(peer, None)
                    return
                except Exception as e:
                    log.info("cannot link to %s at %s: %s", peer, text, one_line(e))
            _, backoff = self._next_dial.get(peer, (0.0, 0.05))
            backoff = min(MAX_BACKOFF, backoff * 2)
            self._next_dial[peer] = (self.now() + backoff, backoff)
        finally:
            self._dialing.discard(peer)

    async def _dial(self, addr: Address, expect: str | None = None) -> None:
        """Dial `addr`, link, and serve the link until it closes."""
        with trio.fail_after(DIAL_TIMEOUT):
            stream = await self._dialer(addr)
        cap, lease = self.bootstrap(f"link to {format_address(addr)}")
        try:
            async with Connection.open(stream, cap, name=f"link {format_address(addr)}") as conn:
                local = PeerLinkCapability(self)
                with trio.fail_after(DIAL_TIMEOUT):
                    answer = await conn.bootstrap().call("peer_link", self.hello(), local)
                if not isinstance(answer, dict) or not isinstance(answer.get("link"), Ref):
                    raise CapabilityError("the peer answered peer_link with something else")
                peer = self._check_hello(answer.get("hello"), peer_id_of(stream))
                if expect is not None and peer != expect:
                    log.warning("expected host %s at %s, found %s", expect, addr, peer)
                link = self._add_link(Link(self, peer, answer["link"], local))
                self.dial_new_hosts()
                self.connections.add(conn)
                try:
                    await self._run_link(link, False)
                finally:
                    self.connections.discard(conn)
        finally:
            lease.end()

    def _add_link(self, link: Link) -> Link:
        """Register a link; with two links to one host (both dialed at once) the newer one
        carries traffic and the other takes over if it closes first."""
        others = self._spare_links.setdefault(link.peer, [])
        previous = self.links.get(link.peer)
        if previous is not None and not previous.closed:
            log.debug("a second link to %s; the newer one carries traffic", link.peer)
            others.append(previous)
        self.links[link.peer] = link
        self._notify_links()
        return link

    def _remove_link(self, link: Link) -> None:
        spares = [s for s in self._spare_links.pop(link.peer, []) if s is not link and not s.closed]
        if self.links.get(link.peer) is link:
            if spares:
                self.links[link.peer] = spares.pop()
            else:
                del self.links[link.peer]
        if spares:
            self._spare_links[link.peer] = spares
        self._notify_links()

    async def _run_link(self, link: Link, accepted: bool) -> None:
        """Run a registered link until it or its connection closes, then forget it."""
        side = "accepted" if accepted else "dialed"
        log.info("linked with %s (%s)", link.peer, side)
        conn = link.ref.connection

        async def watch_connection() -> None:
            await conn.closed.wait()
            link.close()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_connection)
                await link.run()
                nursery.cancel_scope.cancel()
        finally:
            link.close()
            self._remove_link(link)
            log.info("link with %s (%s) closed", link.peer, side)
            if accepted:
                with trio.CancelScope(shield=True):
                    await conn.aclose()

    def _linked_at(self, where: str) -> bool:
        for peer, link in self.links.items():
            member = self.view.get(peer, self.now())
            if not link.closed and member is not None and where in member.record.addrs:
                return True
        return False

    def _notify_links(self) -> None:
        self._link_changed.set()
        self._link_changed = trio.Event()

    # --- housekeeping -------------------------------------------------------------------------

    async def tick_loop(self) -> None:
        """Every heartbeat interval: expire hosts past their TTL and dial new ones."""
        while True:
            for peer in self.view.expire(self.now()):
                log.info("host %s left the view (no heartbeat for its TTL)", peer)
            self.dial_new_hosts()
            await trio.sleep(self.config.heartbeat_interval)

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self.connections),
            "exports": sum(conn.export_count() for conn in self.connections),
            "anchors": len(self.tree),
            "subscriptions": self.router.subscribers(),
            "links": len(self._live_links()),
            "hosts": len(self.view.live(self.now())),
            "processes": sum(1 for p in self._processes.values() if p.handle.exit_code is None),
            "remote_leases": sum(len(link.remote_leases) for link in self.links.values()),
        }


def one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
