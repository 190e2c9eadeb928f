"""The per-host agent loop.

Concurrency model: three feeder threads (the Store syncer, the netlink monitor, the status
writer) and one owner thread, this loop, which alone touches the calculation, the reconcilers
and the netlink socket. Feeders put items on one queue; the loop drains everything waiting,
folds it into the desired state, and applies once per drain, so a burst of changes costs one
batch of kernel writes.

Start-up, watch events, drift and the periodic resync all take the same path: desired state in
the trackers, a read of the kernel when a full check is due, then one apply of the delta. Nothing
is written to the kernel before the Store has delivered its first full view (``InSync``), and
nothing is deleted that tabby does not own (its route protocol number), so a restarted agent
never withdraws a route of an endpoint that still exists.

Failure: a bad record is reported by the syncer and skipped; a kernel write that fails leaves
its key pending and the endpoint in "error" with the kernel's reason, and is retried; a Store
outage leaves the dataplane as it is while the syncer reconnects.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gc
import ipaddress
import logging
import os
import queue
import random
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tabby.agent.calc import HostIndex, Touched
from tabby.agent.fabric import (
    bfd_actions,
    bird_inputs,
    endpoint_status,
    host_links,
    missing_secrets,
    password_files,
    password_why,
)
from tabby.agent.health import HealthServer, Metrics
from tabby.agent.last_good import LastGood
from tabby.agent.policy_calc import PolicyIndex
from tabby.agent.status import StatusWriter
from tabby.dataplane import netlink as nl
from tabby.dataplane.bird import BirdError, BirdReconciler, tcp_md5_failures
from tabby.dataplane.bird_config import bfd_targets, password_sessions, render, render_bfd
from tabby.dataplane.dnsmasq import DnsmasqError, DnsmasqReconciler
from tabby.dataplane.dnsmasq_config import Vm
from tabby.dataplane.dnsmasq_config import render as render_dnsmasq
from tabby.dataplane.links import LinkIndex, NeighbourTables, SysctlReconciler, set_host_sysctls
from tabby.dataplane.nat64 import ExitWatch, Nat64Error, Nat64Reconciler
from tabby.dataplane.nat64_config import TUN as NAT64_TUN
from tabby.dataplane.nat64_config import clash as nat64_clash
from tabby.dataplane.nat64_config import dns_servers as nat64_dns_servers
from tabby.dataplane.nat64_config import inputs as nat64_inputs
from tabby.dataplane.nat64_config import render as render_nat64
from tabby.dataplane.policy import PolicyReconciler
from tabby.dataplane.routes import RoutesReconciler
from tabby.model import ConfigSpec, canonical, decode, effective_config, refused_hosts
from tabby.model.codec import InvalidResource, _printable
from tabby.model.ipam import decode_ipam
from tabby.model.keys import (
    ENDPOINTS_PREFIX,
    IPAM_AFFINITIES_PREFIX,
    KIND_DIRS,
    bgp_status_key,
    endpoint_key,
    endpoint_prefix,
    ipam_affinity_prefix,
    kind_prefix,
    parse_key,
)
from tabby.model.resources import ignored_host_settings
from tabby.model.status import MAX_SESSIONS, one_line
from tabby.store import Store
from tabby.syncer import InSync, ResourceSyncer, Update

log = logging.getLogger(__name__)

RETRY_S = 2.0  # how soon a failed kernel write is tried again
BGP_CHECK_S = 5.0  # how often bird's liveness and sessions are checked
# how often the guests' answers for their allowed sources (VIPs) are read and nudged: with the
# neighbour timing calc.PAIR_NEIGH_TIMING, a VIP that moves is followed within ~1.2 s (keepalived's
# failover budget is 2 s); one netlink send for every pair, and only while this host has pairs
PAIR_PROBE_S = 0.3
# Why the cyclic garbage collector waits during a cold start: listing, decoding and folding
# thousands of endpoints allocates millions of objects that all stay alive, so its passes (80-100 ms
# of a cold start at 2,000 endpoints) find nothing to free. It is enabled again after the first
# apply, or after this long if the Store never answers.
COLD_GC_HOLD_S = 30.0
POLICY_CHECK_S = 5.0  # how often the nftables generation is compared (a full compare only if it moved)
# Other hosts' endpoints are read at most this often: a busy fabric costs an agent a wake-up per
# 0.5 s, not one per workload add anywhere. Only rule selectors' address sets and fabric-wide
# address claims wait for them; no route does (those come over BGP).
REMOTE_PACE_S = 0.5
# and once some came, the loop waits this long for the rest of the read before it folds them: a
# watch hands its events over one at a time, and each alone cost a whole turn (measured, docs)
PACED_FOLD_S = 0.05


DEFAULT_BGP_PASSWORD_DIR = Path("/etc/tabby/bgp-passwords")

MAX_CORRUPT_REPORTED = 100  # corrupt records named in this host's status (the log names every one)


def decode_record(key: str, value: bytes) -> Any:
    """Resources, and the one IPAM record the agent needs: this fabric's block affinities.
    Raises InvalidResource and nothing else. Endpoints in tabby's own bytes skip pydantic's
    validation (``canonical``: the same value, ~1.5x faster; a cold start decodes every one)."""
    if key.startswith(IPAM_AFFINITIES_PREFIX):
        return decode_ipam(key, value)
    return canonical.endpoint(key, value) or decode(key, value)



BFD_POLL_S = 0.05  # the BFD watcher's period: small beside BFD's own 300 ms detection


def read_passwords(paths: list[str], allowed: Path, quiet: bool = False) -> tuple[dict[str, str], list[str]]:
    """Each BGP password file's password (one line; the trailing newline dropped), and an error per
    file that could not be read or holds no usable password. The errors name the file, never its
    contents: they go to the log and the status. A session whose password is missing is rendered
    disabled, never without its password.

    Only files under ``allowed`` (the agent's --bgp-password-dir) are read: the path comes from the
    Store, and the agent is root; anywhere else a Store writer could have a host file (a key, a
    shadow file) sent as a TCP MD5 key, and learn from the status which files exist. (The check is
    on the path as written, normalised by the model: a symlink the operator put in the directory
    is followed, as a mounted secret's are.)"""
    from tabby.model.resources import check_password

    got: dict[str, str] = {}
    errors: list[str] = []
    inside = str(allowed).rstrip("/") + "/"
    for path in paths:
        if not path.startswith(inside):
            errors.append(f"password file {path}: not in the agent's --bgp-password-dir {allowed}; "
                          "its sessions are disabled")
            continue
        try:
            # a regular file only, looked at before it is opened (opening some devices acts: a
            # watchdog arms, a tape rewinds), and opened non-blocking: a FIFO would hang the loop
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                raw = f.read(256)
            text = raw.decode("ascii").rstrip("\r\n")
            got[path] = check_password(text, f"password file {path}")
        except (OSError, UnicodeDecodeError) as e:
            errors.append(f"password file {path}: {type(e).__name__}: {getattr(e, 'strerror', None) or 'not ASCII'}"
                          "; its sessions are disabled")
        except ValueError as e:
            errors.append(f"{e}; its sessions are disabled")
    for e in [] if quiet else errors:
        log.error("BGP: %s", e)
    return got, errors


class _InThread(threading.Thread):
    """A call run in a thread of its own; result() waits for it and raises what it raised."""

    def __init__(self, fn: Any) -> None:
        super().__init__(name=fn.__name__, daemon=True)
        self.fn = fn
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as e:  # raised again by result(), in the caller's thread
            self.error = e

    def result(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


class Agent:
    def __init__(self, store: Store, host: str, *, resync_s: float = 90.0, metrics_addr: str = "127.0.0.1",
                 metrics_port: int | None = 9091, status_ttl_s: float = 30.0, bgp: bool = True,
                 run_dir: Path | None = None, policy: bool = True, overrides: frozenset[str] = frozenset(),
                 bgp_password_dir: Path = DEFAULT_BGP_PASSWORD_DIR) -> None:
        """overrides: the Config fields (log_level, resync_interval_s, metrics_port) the command line
        set; the Store's Config steers the others, live. bgp_password_dir: the only directory whose
        files a BGPPeer's or Config's password_file may name."""
        self.store = store
        self.bgp_password_dir = bgp_password_dir
        self.host = host
        self.resync_s = resync_s
        self.next_resync = 0.0
        self.overrides = overrides
        self.metrics_addr = metrics_addr
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        # a syncer's items after its first listing wait here, and one ("pending", tag) in the queue
        # says so: the loop takes all that came meanwhile in one turn (a burst of remote adds cost
        # a whole turn each, the steps after the fold most of it: measured, docs)
        self.pending: dict[str, list[Any]] = {}
        self.pending_lock = threading.Lock()
        self.fold_at: dict[str, float] = {}  # a paced syncer's tag -> when its pending items are folded
        self.index = HostIndex(host)
        self.links = LinkIndex()
        self.netlink = nl.Netlink()
        self.routes = RoutesReconciler(self.netlink, self.links)
        self.sysctls = SysctlReconciler(self.links)
        self.policy_index = PolicyIndex()
        self.policy = PolicyReconciler() if policy else None
        self.policy_ok = True
        self.next_policy_check = 0.0
        self.endpoint_records: dict[str, Any] = {}  # every host's endpoints: rule selectors name them
        self.status = StatusWriter(store, host, ttl_s=status_ttl_s)
        self.metrics = Metrics()
        run_dir = run_dir or Path("/run/tabby") / host
        self.last_good = LastGood(run_dir / "last-good.json")
        seed = self.last_good.load(decode_record)
        # What an agent watches (docs/architecture.md, "What agents watch"): each kind but the
        # endpoints, and this host's block affinities, as ranges of their own (etcd's watch is one
        # range: a range around the endpoints would carry every workload add anywhere); its own
        # host's endpoints as they come; other hosts' endpoints paced (rule selectors and address
        # claims need them, routes never wait for them).
        ranges = {kind_dir: kind_prefix(kind) for kind, kind_dir in KIND_DIRS.items() if kind != "Endpoint"}
        ranges["affinities"] = ipam_affinity_prefix(host)
        self.syncers = {tag: ResourceSyncer(store, prefix, decoder=decode_record, seed=seed, exclude=())
                        for tag, prefix in ranges.items()}
        self.syncers["local"] = ResourceSyncer(store, endpoint_prefix(host), decoder=decode_record, seed=seed,
                                               exclude=())
        self.syncers["remote"] = ResourceSyncer(store, ENDPOINTS_PREFIX, decoder=decode_record, seed=seed,
                                                exclude=(endpoint_prefix(host),), pace_s=REMOTE_PACE_S)
        for syncer in self.syncers.values():
            syncer.on_corrupt = functools.partial(self._corrupt, syncer)
        self.synced: set[str] = set()  # the syncers whose first listing has been folded
        self.endpoint_copies: dict[str, dict[str, tuple[Any, int]]] = {}  # name -> key -> (record, created)
        self.metrics.count_watch_events(lambda: sum(s.events for s in self.syncers.values()))
        self.fabric: dict[str, Any] = {}  # every other record: hosts, pools, peers, config, own affinities
        self.created: dict[str, int] = {}  # fabric record key -> create revision (older wins conflicts)
        self.refused_hosts: dict[str, str] = {}  # hosts refused fabric-wide -> why
        self.config: ConfigSpec = effective_config(None, None)
        self.ignored_settings: list[str] = []  # fabric-wide fields this host's Config sets (logged once)
        self.corrupt: dict[str, tuple[str, str]] = {}  # key -> (field, error), as reported by the syncer
        self.policy_interfaces: set[str] = set()  # interfaces whose policy the kernel had at the last good apply
        self.bird = BirdReconciler(run_dir) if bgp else None
        # the liveness BIRD: BFD only, so that BFD survives a restart of the BGP speaker (bird_config.render_bfd)
        self.bfd_bird = BirdReconciler(run_dir / "bfd") if bgp else None
        self.bfd_targets: dict[str, tuple[str, ...]] = {}
        self.bfd_wake = threading.Event()  # set when BFD targets come (or at stop): the watcher sleeps on it till then
        self.dnsmasq = DnsmasqReconciler(run_dir)
        self.nat64 = Nat64Reconciler(run_dir / "nat64")
        self.nat64_dirty = True
        self.exit_watch: ExitWatch | None = None  # tayga and unbound: their exit wakes the loop
        self.neighbour_tables = NeighbourTables()
        # sized after the routes of the turn are in (permanent entries, what the agent writes, do
        # not count against the tables): at 2,000 endpoints it took ~45 ms, on a cold start's path
        self.neighbour_size_due = True
        self.dhcp_dirty = True
        self.bgp_dirty = True
        self.next_bgp_check = 0.0
        self.next_pair_probe = 0.0
        self.bgp_written: dict[str, Any] | None = None
        self.link_up: dict[int, bool] = {}  # ifindex -> up, as the monitor last said (unknown until it says)
        self.dhcp_unserved: tuple[str, ...] = ()  # /64s dnsmasq cannot serve (logged once each time they change)
        self.password_errors: list[str] = []  # BGP password files that could not be read (path only)
        self.password_paths: list[str] = []
        self.passwords_seen: dict[str, str] = {}
        self.with_password: frozenset[str] = frozenset()  # BGP protocols with a TCP MD5 password
        self.md5_baseline: int | None = None  # the kernel's MD5 drop count when the config was rendered
        # BIRD's routes (metric 32) never replace ours (TABBY_METRIC): their events, one per route
        # learnt, are dropped in the kernel (netlink.py, _drop_routes_of, measured)
        self.monitor = nl.Monitor(ignore_route_protos=(nl.RTPROT_BIRD,))
        self.in_sync = False
        self.stopping = threading.Event()
        # Cleared while we write to the kernel: the monitor then leaves the echoes of our own
        # writes in its socket buffer instead of parsing them one by one against us for the GIL.
        self.monitor_may_read = threading.Event()
        self.monitor_may_read.set()
        self.dirty: set[str] = set()  # endpoints whose status must be recomputed
        self.ep_states: dict[str, str] = {}
        self.state_counts: Counter[str] = Counter()
        self.full_check_due = True
        self.host_links_due = True  # this host's own links, exempt from the unknown-workload drops
        self.last_apply_ok = True
        self.started_at = time.monotonic()
        self._links_read_at_start = False
        self._gc_held = False  # start() disabled the garbage collector: run() enables it again
        self.routes_programmed_at: float | None = None  # first moment every route and neighbour was in
        self.sysctls_programmed_at: float | None = None
        self.health_server = HealthServer(metrics_addr, metrics_port, self.metrics, self.health) \
            if metrics_port is not None else None

    # -- feeders -------------------------------------------------------------------------

    def _corrupt(self, syncer: ResourceSyncer, key: str, error: Exception | None) -> None:
        """From a syncer's thread: a record turned corrupt (once per version), or was cured.
        The last good version goes to disk, so that a restarted agent keeps it too."""
        if error is not None:
            self.metrics.corrupt.inc()
        if error is None:
            self.last_good.forget(key)
        elif (kept := syncer.known.get(key)) is not None:  # (none yet: a seed may still serve it)
            try:
                self.last_good.set(key, syncer.created.get(key, 0), kept)
            except Exception:  # never in the way of the report below
                log.exception("cannot remember the last good version of %s", key)
        self.q.put(("corrupt", (key, error)))

    def _feed_store(self, tag: str, syncer: ResourceSyncer) -> None:
        """Items one by one, but the first listing whole, with its InSync: nothing is applied before
        it anyway, and handing thousands of items over one at a time made the two threads take
        turns at the GIL for each (a cold start spent most of its time there)."""
        listing: list[Any] | None = []
        try:
            for item in syncer:
                if listing is None:
                    with self.pending_lock:
                        waiting = self.pending.setdefault(tag, [])
                        waiting.append(item)
                        first = len(waiting) == 1  # the first since the loop took them: tell it
                    if first:
                        self.q.put(("pending", tag))
                    continue
                listing.append(item)
                if isinstance(item, InSync):
                    self.q.put(("listing", (tag, listing)))
                    listing = None
        except Exception:
            log.exception("store syncer %s died", tag)
            self.q.put(("fatal", f"store syncer {tag} died"))

    def _unbatched(self, items: list[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """The queue's items, with a syncer's first listing as its store items and then
        ("synced", the syncer's tag), and a syncer's pending items as they are when reached."""
        for kind, item in items:
            if kind == "listing":
                tag, listing = item
                for update in listing:
                    yield ("synced", tag) if isinstance(update, InSync) else ("store", update)
            elif kind == "pending":
                if self.syncers[item].pace_s:  # news that may come late: what follows comes in the same turn
                    self.fold_at.setdefault(item, time.monotonic() + PACED_FOLD_S)
                else:
                    yield from self._take(item)
            else:
                yield kind, item
        now = time.monotonic()
        for tag in [t for t, at in self.fold_at.items() if at <= now]:
            del self.fold_at[tag]
            yield from self._take(tag)

    def _take(self, tag: str) -> Iterator[tuple[str, Any]]:
        with self.pending_lock:
            taken = self.pending.pop(tag, [])
        for update in taken:
            yield "store", update

    def _feed_netlink(self) -> None:
        while not self.stopping.is_set():
            self.monitor_may_read.wait(1.0)
            try:
                changes = self.monitor.read()
            except Exception:  # the socket, or a message it could not parse: the thread goes on
                if self.stopping.is_set():
                    return
                log.exception("netlink monitor failed; forcing a full check")
                changes = [nl.Change("overflow", False)]
                time.sleep(0.5)
            if changes:
                self.q.put(("netlink", changes))

    # -- the loop ------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """ok (HTTP 200) while the agent has had a full view of the Store and serves it; a Store
        that fails after that does not make it unhealthy (the dataplane is left as it is, and a
        restart would not mend a full disk) but adds ``degraded``: which loop fails, and why."""
        ok = self.in_sync and not self.stopping.is_set()
        info: dict[str, Any] = {
            "host": self.host, "in_sync": self.in_sync, "last_apply_ok": self.last_apply_ok,
            "endpoints": len(self.index.plans), "pending_kernel_writes": self.routes.waiting()}
        nat64 = self.nat64.status()
        if nat64 is not None:
            info["nat64"] = nat64
        failing = [f for f in (*(s.failing for s in self.syncers.values()), self.status.failing) if f]
        if not self.status.alive() and not self.stopping.is_set():
            failing.append("status writer thread not running")
        if failing:
            info["degraded"] = "; ".join(failing)
        return ok, info

    def start(self) -> None:
        self._gc_held = gc.isenabled()  # see COLD_GC_HOLD_S
        gc.disable()
        # the Store is listed and decoded from the first moment, while this thread waits on the
        # kernel below (2 cores: the syscalls release the GIL); its items wait in the queue,
        # nothing is folded before run(). The forwarding writes run in a thread of their own:
        # each of their syscalls waits out the decode's GIL slice when it returns (5 ms each,
        # ~90 ms in all at 2,000 endpoints), which here would hold up the link dump behind them.
        for tag, syncer in self.syncers.items():
            threading.Thread(target=self._feed_store, args=(tag, syncer), name=f"store-{tag}", daemon=True).start()
        forwarding = _InThread(set_host_sysctls)
        try:
            self.links.refresh()
        finally:
            forwarding.result()  # waited for and told even when the dump failed (with that as its context)
        self._links_read_at_start = True
        threading.Thread(target=self._feed_netlink, name="netlink-monitor", daemon=True).start()
        if self.bfd_bird is not None:
            threading.Thread(target=self._watch_bfd, name="bfd-watcher", daemon=True).start()
        self.exit_watch = ExitWatch(lambda name: self.q.put(("exited", name)))
        self.started_wall = time.time()
        self._publish_host_info()
        self.status.start()
        if self.health_server is not None:
            self.health_server.start()
        log.info("agent for host %s started (metrics on %s)", self.host,
                 self.health_server.port if self.health_server else "off")

    def stop(self) -> None:
        self.stopping.set()
        self.bfd_wake.set()
        if self.exit_watch is not None:
            self.exit_watch.close()
        for syncer in self.syncers.values():
            syncer.stop()
        self.monitor.close()
        self.q.put(("stop", None))
        self.status.stop()
        if self.health_server is not None:
            self.health_server.stop()

    def run(self) -> None:
        """Until stop(): drain the queue, fold changes in, apply."""
        self.start()
        self.next_resync = time.monotonic() + self._jitter()
        retry_at: float | None = None
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                next_resync = self.next_resync
                deadline = min(next_resync, retry_at or next_resync,
                               self.next_bgp_check if self.bird is not None and self.in_sync else next_resync,
                               self.next_policy_check if self.policy is not None and self.in_sync else next_resync,
                               self.next_pair_probe if self.index.pair_owners and self.in_sync else next_resync,
                               *self.fold_at.values())
                items = []
                try:
                    items.append(self.q.get(timeout=max(0.0, deadline - now)))
                    while True:
                        items.append(self.q.get_nowait())
                except queue.Empty:
                    pass
                for kind, item in self._unbatched(items):
                    if kind == "stop":
                        return
                    if kind == "fatal":
                        raise RuntimeError(item)
                    try:
                        self._fold(kind, item)
                    except Exception:  # one item folded wrongly must not end the loop; a full check follows
                        log.exception("folding a %s change failed; it is skipped", kind)
                        self.metrics.errors.inc()
                        self.full_check_due = True
                now = time.monotonic()
                if now >= self.next_resync:
                    self.full_check_due = True
                    self.next_resync = now + self._jitter()
                    self.nat64.recheck()  # the tun, its routes and the resolver's address looked at again
                    self.nat64_dirty = True
                if retry_at is not None and now >= retry_at:
                    retry_at = None
                if not self.in_sync:
                    if self._gc_held and now - self.started_at > COLD_GC_HOLD_S:
                        self._release_gc()
                    continue
                # an unexpected failure in one step (a bug, a record no validator foresaw) is logged
                # and retried: it never ends the loop, and what is programmed stays as it is
                for step in (self._pair_step, self._nat64_step, self._apply, self._bgp_step, self._dhcp_step):
                    try:
                        if step() is False:
                            retry_at = time.monotonic() + RETRY_S
                    except Exception:
                        log.exception("agent step %s failed; retrying in %.0f s", step.__name__, RETRY_S)
                        self.metrics.errors.inc()
                        self.full_check_due = True
                        retry_at = time.monotonic() + RETRY_S
                if self._gc_held:
                    self._release_gc()
        finally:
            if self._gc_held:
                self._release_gc()
            self.stopping.set()
            if self.policy is not None:
                self.policy.close()

    def _release_gc(self) -> None:
        """The cold start is over (or the Store does not answer): collect garbage again."""
        self._gc_held = False
        gc.enable()

    def _pair_step(self) -> None:
        """Which local guests answer for their allowed sources now (see calc.py: a VIP is routed
        to the port whose guest holds it), folded in before the apply of the same turn."""
        now = time.monotonic()
        if now < self.next_pair_probe or not (self.index.pair_owners or self.index.answered):
            return
        self.next_pair_probe = now + PAIR_PROBE_S
        wanted = self.index.probes()
        items = {(addr, idx): (iface, addr) for iface, addr in wanted
                 if (idx := self.links.by_name.get(iface)) is not None}
        answers = {items[k]: yes for k, yes in self.netlink.probe_neighbours(list(items)).items()}
        for key in self.index.answered - wanted:  # no longer probed: forget the answer
            answers[key] = False
        for (iface, addr), yes in answers.items():
            self._push(self.index.set_answered(iface, addr, yes))

    def _bgp_step(self) -> None:
        if self.bird is not None:
            self._bgp(time.monotonic())

    def _dhcp_step(self) -> None:
        if self.dhcp_dirty:
            self._dhcp()

    def _bgp(self, now: float) -> None:
        assert self.bird is not None
        if not self.bgp_dirty and now < self.next_bgp_check:
            return
        dirty, self.bgp_dirty = self.bgp_dirty, False
        self.next_bgp_check = now + BGP_CHECK_S
        if not dirty and self.password_paths:
            # a password file changed (rotated, fixed): no Store event says so, so look at every check
            dirty = read_passwords(self.password_paths, self.bgp_password_dir, quiet=True)[0] != self.passwords_seen
        # the config is rendered when the fabric changed, not at every check: its inputs grow
        # with the number of hosts, and an idle agent must not
        if dirty:
            inputs = bird_inputs(self.host, self.fabric.values(), self.refused_hosts, self.config)
            if inputs is None:
                # no Host record (deleted), or this host is refused: no BGP at all, not the last config
                why = self.refused_hosts.get(self.host, "no Host record for this host")
                self.bird.set_config(None)
                self._set_bfd(None, {})
                if self.bird.pid() is not None:
                    log.warning("stopping BIRD: %s", why)
                    self.bird.stop()
                doc = {"host": self.host, "sessions": [], "error": one_line(f"no BGP: {why}")}
                if doc != self.bgp_written:
                    self.bgp_written = doc
                    self.status.set_doc(bgp_status_key(self.host), {**doc, "at": time.time()})
                return
            self.password_paths = password_files(inputs)
            passwords, pw_errors = read_passwords(self.password_paths, self.bgp_password_dir)
            self.password_errors, self.passwords_seen = pw_errors, passwords
            inputs = dataclasses.replace(inputs, passwords={**inputs.passwords, **passwords})
            self.password_errors += missing_secrets(inputs)
            self.bird.set_config(render(inputs))
            self.with_password = password_sessions(inputs)
            self.md5_baseline = self._md5_failures()
            self._set_bfd(render_bfd(inputs), bfd_targets(inputs))
        elif self.bird.desired is None:
            return  # no BGP here (see above) until the fabric changes
        try:
            self.bird.apply()
        except (BirdError, OSError, subprocess.TimeoutExpired) as e:
            log.error("BIRD: %s", e)
            self.bird.last_error = str(e)
        if self.bfd_bird is not None and self.bfd_bird.desired is not None:
            try:
                self.bfd_bird.apply()
            except (BirdError, OSError, subprocess.TimeoutExpired) as e:
                log.error("BFD BIRD: %s", e)
                self.bfd_bird.last_error = str(e)
        sessions = self.bird.sessions() if self.bird.pid() else []
        if self.with_password:
            now_md5 = self._md5_failures()
            password_why(sessions, self.with_password, now_md5 is not None and self.md5_baseline is not None
                         and now_md5 > self.md5_baseline)
        doc = {"host": self.host, "sessions": [{k: one_line(v) if isinstance(v, str) else v for k, v in x.items()}
                                               for x in sessions[:MAX_SESSIONS]],
               "error": one_line("; ".join(e for e in (self.bird.last_error, *self.password_errors) if e)) or None}
        if doc != self.bgp_written:  # status is written when it changes, not every check ("at": when)
            self.bgp_written = doc
            self.status.set_doc(bgp_status_key(self.host), {**doc, "at": time.time()})

    @staticmethod
    def _md5_failures() -> int | None:
        try:
            return tcp_md5_failures()
        except (OSError, ValueError):
            return None

    def _set_bfd(self, text: str | None, targets: dict[str, tuple[str, ...]]) -> None:
        assert self.bfd_bird is not None
        self.bfd_bird.set_config(text)
        self.bfd_targets = targets
        self.bfd_wake.set()
        if text is None and self.bfd_bird.pid() is not None:
            self.bfd_bird.stop()

    def _watch_bfd(self) -> None:
        """Every BFD_POLL_S: read the liveness BIRD's BFD sessions and disable (enable) the BGP
        sessions whose peer BFD lost (found again). Disabling a session withdraws its routes at
        once; BFD detects in 300 ms, so a dead peer's routes go in about 0.35 s. A new BGP speaker
        (restarted: all sessions enabled) gets the disabled set again."""
        assert self.bird is not None and self.bfd_bird is not None
        was_up: set[str] = set()
        disabled: set[str] = set()
        bird_pid: int | None = None
        while not self.stopping.wait(BFD_POLL_S):
            # BFD turned off (or this host's BGP gone): what it disabled is enabled again below
            targets = self.bfd_targets if self.bfd_bird.desired is not None else {}
            if not targets and not disabled:
                # no BFD session here (the default: mesh BFD is off): no 20 Hz timer either, which
                # alone costs an idle agent ~0.2% of a core on this VM; woken when targets come
                self.bfd_wake.wait()
                self.bfd_wake.clear()
                continue
            try:
                states = self.bfd_bird.bfd_sessions() if targets else {}
                pid = self.bird.pid()
                if pid != bird_pid:
                    bird_pid, disabled = pid, set()
                if pid is None:
                    continue
                off, on = bfd_actions(targets, states, was_up, disabled)
            except (BirdError, OSError) as e:
                log.debug("BFD watch: %s", e)
                continue
            for proto in sorted(off):
                try:
                    self.bird.control(f"disable {proto}")
                    disabled.add(proto)
                    log.warning("BFD lost the peer of %s: session disabled (routes withdrawn)", proto)
                except (BirdError, OSError) as e:
                    log.debug("BFD watch: disable %s: %s", proto, e)  # tried again next turn
            for proto in sorted(on):
                try:
                    self.bird.control(f"enable {proto}")
                    log.info("BFD found the peer of %s again (or BFD is off): session enabled", proto)
                except BirdError as e:
                    if e.code < 8000:  # BIRD not reached: try again next turn
                        continue
                    log.debug("BFD watch: enable %s: %s", proto, e)  # gone from the config: nothing to enable
                except OSError:
                    continue
                disabled.discard(proto)

    def _dhcp(self) -> None:
        """RA and DHCP for this host's VMs whose tap exists (dnsmasq only starts on existing taps)."""
        self.dhcp_dirty = False
        st = self.index.state
        vms = []
        for name, plan in self.index.plans.items():
            if plan.orchestrator != "vm" or st.interfaces.get(plan.interface) != name or name in st.errors:
                continue
            if plan.interface not in self.links.by_name:
                continue
            vms.append(Vm(plan.interface, plan.mac, tuple(a for a in plan.addresses if ":" in a),
                          tuple(a for a in plan.addresses if ":" not in a)))
        # a nat64 pool's VMs get the DNS64 resolver (DHCPv6 option 23 and RA RDNSS)
        pools = [r.spec.model_copy(update={"dns_servers": nat64_dns_servers(r.spec, self.config)})
                 if r.spec.nat64 else r.spec for r in self.fabric.values() if getattr(r, "kind", None) == "IPPool"]
        try:
            rendered = render_dnsmasq(vms, pools, self.dnsmasq.run_dir, claimed=self.index.addr_owners) \
                if vms else None
            unserved = rendered.unserved if rendered is not None else ()
            if unserved != self.dhcp_unserved:
                for why in unserved:
                    log.warning("dnsmasq: %s", why)
                self.dhcp_unserved = unserved
            self.dnsmasq.set_desired(rendered, vms)
            self.dnsmasq.apply()
        except (DnsmasqError, OSError, subprocess.SubprocessError) as e:
            log.error("dnsmasq: %s", e)
            self.dhcp_dirty = True  # try again on the next turn that has anything to do

    def _nat64_step(self) -> bool | None:
        """NAT64 and DNS64 run here while a local workload has an address in a nat64 pool (each
        host translates its own workloads); a failure is logged, kept in the status, and tried
        again in RETRY_S (False). A disabled nat64 pool still serves the workloads it has."""
        if not self.nat64_dirty:
            return None
        self.nat64_dirty = False
        ok = False
        before = self.nat64.status()
        try:
            pools = [r.spec for r in self.fabric.values() if getattr(r, "kind", None) == "IPPool"]
            nat_pools = [p.cidr for p in pools if p.nat64]
            st = self.index.state
            wanted = any(ipaddress.ip_address(a) in net for name, plan in self.index.plans.items()
                         if st.interfaces.get(plan.interface) == name for a in plan.addresses if ":" in a
                         for net in nat_pools)
            host = self.fabric.get(f"{kind_prefix('Host')}{self.host}")
            host_v6 = None if host is None or host.spec.ipv6_address is None else str(host.spec.ipv6_address)
            inp = nat64_inputs(pools, self.config, host_v6) if wanted else None
            clash = nat64_clash(inp, [r for r in self.fabric.values() if getattr(r, "kind", None) in
                                      ("IPPool", "Host")]) if inp is not None else None
            if clash is not None:  # refused; what runs now stays as it is
                raise Nat64Error(f"refused: {clash}")
            rendered = render_nat64(inp, self.nat64.run_dir) if inp is not None else None
            self.policy_index.set_nat64(inp.pool4 if inp is not None else None, inp.clients if inp else ())
            self.nat64.set_desired(rendered)
            self.nat64.apply()
            ok = True
        except Nat64Error as e:
            log.error("NAT64: %s", e)
            self.nat64.last_error = str(e)
        finally:
            if not ok:
                self.nat64_dirty = True  # tried again (an unexpected error is the loop's to log)
            if self.exit_watch is not None:
                self.exit_watch.watch(self.nat64.pids())
            if self.nat64.status() != before:
                self._publish_host_info()
        return ok

    def _jitter(self) -> float:
        return self.resync_s * random.uniform(0.9, 1.1)

    def _fold(self, kind: str, item: Any) -> None:
        if kind == "synced":  # one syncer's first listing is in: in sync once all have
            self.synced.add(item)
            if len(self.synced) == len(self.syncers) and not self.in_sync:
                log.info("in sync with the store at revision %d: %d local endpoints",
                         max(s.revision for s in self.syncers.values()), len(self.index.plans))
                self._resynced()
                self.status.forget_others(set(self.index.plans))  # gone while this agent was not running
            return
        if kind == "store":
            if isinstance(item, InSync):  # a relist (the watch fell behind compaction, a Store fault)
                if self.in_sync:
                    self._resynced()
                return
            assert isinstance(item, Update)
            self.metrics.store_events.inc()
            parsed = parse_key(item.key)
            if parsed is not None and parsed[0] in ("Policy", "Profile", "IPPool"):
                setter = {"Policy": self.policy_index.set_policy, "Profile": self.policy_index.set_profile,
                          "IPPool": self.policy_index.set_pool}[parsed[0]]
                setter(parsed[1], item.resource)
            if parsed is None or parsed[0] != "Endpoint":
                if item.resource is None:
                    self.fabric.pop(item.key, None)
                    self.created.pop(item.key, None)
                else:
                    self.fabric[item.key] = item.resource
                    self.created[item.key] = item.created
                self.bgp_dirty = True
                self.nat64_dirty = True  # pools, Config and this host's fabric address steer NAT64
                if parsed is not None and parsed[0] in ("Host", "BGPPeer", "Config"):
                    self.host_links_due = True  # its fabric address, its peers' links, the prefixes
                if item.key.startswith(kind_prefix("IPPool")):
                    self.dhcp_dirty = True  # dnsmasq's ranges follow the pools
                if parsed is not None and parsed[0] == "Host":
                    self._check_hosts()
                if parsed is not None and parsed[0] == "Config":
                    self._configure()
                return
            name = parsed[1]
            resource, created = self._endpoint_record(name, item)
            old = self.index.plans.get(name)
            if (old is not None and old.orchestrator == "vm") or \
                    (resource is not None and resource.spec.orchestrator == "vm"):
                self.dhcp_dirty = True
            was_local = name in self.index.plans
            touched = self.index.update(name, resource, created)
            if was_local or name in self.index.plans:
                self.nat64_dirty = True  # a local workload on (or off) a nat64 pool
            self._push(touched)
            if was_local or name in self.index.plans:
                self.neighbour_size_due = True
            if resource is None:
                self.endpoint_records.pop(name, None)
            else:
                self.endpoint_records[name] = resource
            for n in {name} | touched.endpoints:
                self._policy_endpoint(n)
            if was_local and name not in self.index.plans:
                self.status.set(name, None)
                self._set_state(name, None)
                self.dirty.discard(name)
        elif kind == "netlink":
            for change in item:  # one at a time: a batch holds up to Monitor.DRAIN of them
                try:
                    self._on_netlink(change)
                except Exception:
                    log.exception("folding netlink change %s failed; it is skipped", change)
                    self.metrics.errors.inc()
                    self.full_check_due = True
        elif kind == "exited":  # tayga or unbound ended: started again by _nat64_step
            log.warning("NAT64: %s is not running; starting it again", item)
            self.nat64_dirty = True
        elif kind == "corrupt":
            key, error = item
            if error is None:
                self.corrupt.pop(key, None)
            else:
                field = error.field if isinstance(error, InvalidResource) else "(document)"
                self.corrupt[key] = (field, str(error))
            self._publish_host_info()
            parsed = parse_key(key)
            if parsed is not None and parsed[0] == "Endpoint" and parsed[1] in self.index.plans:
                self.dirty.add(parsed[1])  # its status says the last good version is what runs

    def _resynced(self) -> None:
        self.in_sync = True
        self.full_check_due = True
        self.neighbour_size_due = True

    def _endpoint_record(self, name: str, item: Update) -> tuple[Any | None, int]:
        """(record, create revision) of the endpoint called name, after item. One name on two hosts
        is one endpoint mid-move (``ResourceClient.apply`` creates under the new host, then deletes
        under the old, and the two arrive by different watches in either order): this host's copy
        if it has one, else the newest."""
        copies = self.endpoint_copies.setdefault(name, {})
        if item.resource is None:
            copies.pop(item.key, None)
        else:
            copies[item.key] = (item.resource, item.created)
        if not copies:
            del self.endpoint_copies[name]
            return None, 0
        return copies.get(endpoint_key(self.host, name)) or max(copies.values(), key=lambda rc: rc[1])

    def _policy_endpoint(self, name: str) -> None:
        """Feed one endpoint to the policy index: local only if it owns its interface here; an
        endpoint refused for a conflict contributes nothing (its addresses are another's)."""
        plan = self.index.plans.get(name)
        local = plan is not None and self.index.state.interfaces.get(plan.interface) == name
        record = None if self.index.refused(name) else self.endpoint_records.get(name)
        self.policy_index.set_endpoint(name, record, local and record is not None)

    def _check_hosts(self) -> None:
        """Refuse Hosts whose fabric address or router id an older Host has (every agent alike)."""
        prefix = kind_prefix("Host")
        hosts = [(r, self.created.get(k, 0)) for k, r in self.fabric.items() if k.startswith(prefix)]
        refused = refused_hosts(hosts)
        if refused != self.refused_hosts:
            for name, why in refused.items():
                if self.refused_hosts.get(name) != why:
                    log.error("host %s refused%s: %s", name, " (this host: no BGP)" if name == self.host else "", why)
            self.refused_hosts = refused
            self._publish_host_info()

    def _configure(self) -> None:
        """Config records (global, then this host's) -> the settings the agent applies."""
        specs = {r.metadata.name: r.spec for k, r in self.fabric.items() if k.startswith(kind_prefix("Config"))}
        ignored = ignored_host_settings(specs.get(f"host.{self.host}"))
        if ignored != self.ignored_settings:
            self.ignored_settings = ignored
            if ignored:
                log.warning("Config host.%s sets %s: fabric-wide, taken from Config global only (a host's own "
                            "AS is its Host record's asn)", self.host, ", ".join(ignored))
        try:
            cfg = effective_config(specs.get("global"), specs.get(f"host.{self.host}"))
        except ValueError as e:  # two good records that make a bad pair: keep the settings in force
            log.error("Config: global and host.%s do not combine, settings kept: %s", self.host, one_line(str(e)))
            return
        if cfg == self.config:
            return
        old, self.config = self.config, cfg
        assert cfg.workload_interface_prefixes is not None and cfg.log_level is not None
        self.policy_index.set_workload_prefixes(cfg.workload_interface_prefixes)
        if "log_level" not in self.overrides and cfg.log_level != old.log_level:
            logging.getLogger().setLevel(cfg.log_level.upper())
            log.warning("log level %s (Config)", cfg.log_level)
        if "resync_interval_s" not in self.overrides and cfg.resync_interval_s != self.resync_s:
            assert cfg.resync_interval_s is not None
            self.resync_s = cfg.resync_interval_s
            self.next_resync = min(self.next_resync, time.monotonic() + self._jitter())
            log.info("full kernel check every %.0f s (Config)", self.resync_s)
        if "metrics_port" not in self.overrides and self.health_server is not None \
                and cfg.metrics_port != old.metrics_port:
            self._serve_metrics(cfg.metrics_port)
        if (cfg.default_asn, cfg.node_to_node_mesh) != (old.default_asn, old.node_to_node_mesh):
            self.bgp_dirty = True
        if cfg.dns64_server != old.dns64_server:
            self.dhcp_dirty = True  # the resolver VMs on nat64 pools are given

    def _serve_metrics(self, port: int | None) -> None:
        """Move /healthz and /metrics to another port: the new one listens before the old one stops."""
        try:
            new = HealthServer(self.metrics_addr, port or 0, self.metrics, self.health)
        except OSError as e:
            log.error("metrics port %s (Config) not taken, staying on %s: %s", port,
                      self.health_server.port if self.health_server else "-", e)
            return
        new.start()
        old, self.health_server = self.health_server, new
        if old is not None:
            old.stop()
        log.info("metrics and health on %s:%d (Config)", self.metrics_addr, new.port)

    def _publish_host_info(self) -> None:
        """What this host's status record says beside liveness: refusals, corrupt records seen."""
        # the key is another program's text: escaped and cut, or it would make this record undecodable
        corrupt = [{"key": _printable(k, 1000), "field": _printable(f, 1000), "error": _printable(e, 4000)}
                   for k, (f, e) in sorted(self.corrupt.items())[:MAX_CORRUPT_REPORTED]]
        # one assignment: the status thread reads it whole at the next heartbeat
        self.status.host_info = {"started": self.started_wall, "corrupt": corrupt, "refused": [
            f"host {n}: {why}" for n, why in sorted(self.refused_hosts.items())],
            "neighbour_table": self.neighbour_tables.status() or None, "nat64": self.nat64.status()}

    def _on_netlink(self, change: nl.Change) -> None:
        if change.kind == "overflow":  # events were lost: whatever a lost one would have set off
            log.warning("kernel events were lost (the netlink monitor's socket overflowed): a full check "
                        "of routes, neighbours, links, NAT64 and dnsmasq follows")
            self.metrics.monitor_overflows.inc()
            self.full_check_due = True
            self.nat64.recheck()
            self.nat64_dirty = True
            self.dhcp_dirty = True
        elif change.kind == "link":
            if change.key == NAT64_TUN or (change.deleted and self.links.by_index.get(change.ifindex) == NAT64_TUN):
                self.nat64.recheck()  # gone, or changed (down: its routes went with it)
                self.nat64_dirty = True
            if change.deleted:
                self.link_up.pop(change.ifindex, None)
                name = self.links.removed(change.ifindex)
                if name is not None:
                    self.routes.interface_gone(name)
                    self.sysctls.interface_gone(name)
                    self._dirty_iface(name)
            elif change.key:
                known = self.links.by_name.get(change.key) == change.ifindex
                renamed = self.links.by_index.get(change.ifindex)
                if renamed is not None and renamed != change.key:
                    # a rename: what was programmed on the old name is on this device under its new
                    # name (removed there unless an endpoint names it), and a new device of the old
                    # name must get it all again
                    self.routes.interface_renamed(renamed, change.key)
                    self.sysctls.interface_gone(renamed)
                    self._dirty_iface(renamed)
                self.links.added(change.key, change.ifindex)
                if not known:
                    self.sysctls.interface_gone(change.key)  # a new device: its sysctls start afresh
                    self._dirty_iface(change.key)
                was_up = self.link_up.get(change.ifindex)
                if change.up is not None:
                    self.link_up[change.ifindex] = change.up
                    if known and was_up is not None and was_up != change.up:
                        self._dirty_iface(change.key)  # its endpoint's status says down (or up again)
                if known and was_up is False and change.up:
                    # set down and up again: the kernel dropped the IPv4 routes on it when it went
                    # down and said nothing of it (IPv6 does say); they are put back now, not at
                    # the next full check
                    self.routes.interface_gone(change.key)
                    self._dirty_iface(change.key)
        elif change.kind == "addr":
            # an address came or went: if on a link named like a workload's that no endpoint owns, it
            # may be this host's own (an uplink addressed after start). Not IPv6 link-local ones:
            # every new veth gets one (a CNI add plumbs its veth before the Endpoint is written),
            # and a workload's host side never holds any other (nor does a new link alone say more)
            name = self.links.by_index.get(change.ifindex)
            try:
                ip = ipaddress.ip_address(change.key)
                global_addr = not (ip.version == 6 and ip.is_link_local)
            except ValueError:  # no address in the message: look again, to be sure
                global_addr = True
            if name is not None and global_addr:
                self._maybe_host_link(name)
        else:
            self.routes.on_change(change)

    def _maybe_host_link(self, name: str) -> None:
        """A link that may be one of the host's own: look at the host links again this turn."""
        if name.startswith(self.policy_index.workload_prefixes) and name not in self.index.state.interfaces:
            self.host_links_due = True

    def _dirty_iface(self, iface: str) -> None:
        owner = self.index.state.interfaces.get(iface)
        if owner is not None:
            self.dirty.add(owner)
            if self.index.plans[owner].orchestrator == "vm":
                self.dhcp_dirty = True

    def _push(self, t: Touched) -> None:
        st = self.index.state
        for dst in t.routes:
            self.routes.set_route(dst, st.routes.get(dst))
        for key in t.neighbours:
            self.routes.set_neighbour(key, st.neighbours.get(key))
        for key in t.proxies:
            self.routes.set_proxy(key, key in st.proxies)
        for iface in t.interfaces:
            self.sysctls.set_interface(iface, st.sysctls.get(iface))
        self.dirty.update(n for n in t.endpoints if n in self.index.plans)

    def _apply(self) -> bool:
        t0 = time.perf_counter()
        full = self.full_check_due
        if full:
            if self._links_read_at_start:
                self._links_read_at_start = False  # start() has just read them for this first check
            else:
                self.links.refresh()
                # forwarding too (start() set it): a `sysctl --system` or a distribution's file that
                # turned it off stopped all routing through this host until a restart
                try:
                    if off := set_host_sysctls():
                        log.warning("forwarding was turned off (%s): on again", ", ".join(off))
                except OSError as e:
                    log.error("cannot turn forwarding on: %s", e)
            self.routes.resync()
            self.metrics.resyncs.inc()
            self.dirty.update(self.index.plans)
            self.full_check_due = False
        if full or self.host_links_due:
            self._host_links()
        policy_ok = self._apply_policy(full)
        if self.policy is None or policy_ok:
            self.policy_interfaces = set(self.index.state.interfaces)
            hold: set[str] = set()
        else:  # fail closed: a workload whose policy is not in the kernel gets no route yet
            hold = set(self.index.state.interfaces) - self.policy_interfaces
        attempted = self._attempted_owners()
        self.monitor_may_read.clear()
        try:
            applied, failed = self.routes.apply(hold)  # routes first: traffic flows before the fine-tuning
        finally:
            self.monitor_may_read.set()
        if self.routes_programmed_at is None and self.routes.waiting() == 0:
            self.routes_programmed_at = time.monotonic()
            log.info("all routes and neighbours programmed %.3f s after start",
                     self.routes_programmed_at - self.started_at)
        if self.neighbour_size_due:  # issue 16 item 2: says once (log, host status) when it cannot
            self.neighbour_size_due = False
            if self.neighbour_tables.size(len(self.index.plans)):  # steps of 1024
                self._publish_host_info()
        if full and self.sysctls_programmed_at is not None:
            # drift check of values we wrote before; at start-up everything is pending anyway
            self.sysctls.read_back()
        failed_sysctls = self.sysctls.apply()
        if self.sysctls_programmed_at is None and not self.sysctls.tracker.pending_updates:
            self.sysctls_programmed_at = time.monotonic()
        if applied or failed or failed_sysctls:
            self.metrics.apply_seconds.observe(time.perf_counter() - t0)
            log.debug("applied %d kernel changes, %d failed, in %.1f ms", applied, failed,
                      (time.perf_counter() - t0) * 1000)
        if failed or failed_sysctls:
            self.metrics.errors.inc(failed + failed_sysctls)
        self.dirty |= attempted
        self._write_statuses()
        self.last_apply_ok = not (failed or failed_sysctls) and policy_ok
        return self.last_apply_ok and not self._retryable_pending()

    def _host_links(self) -> None:
        """Which of this host's own links a workload prefix covers (see ``fabric.host_links``): the
        addresses are dumped only when a link no endpoint owns is named like a workload."""
        self.host_links_due = False
        ifaces = self.index.state.interfaces
        covered = {n for n in self.links.by_name if n.startswith(self.policy_index.workload_prefixes)
                   and n not in ifaces}
        addresses: list[tuple[str, str]] = []
        if covered:
            try:
                names = self.links.by_index
                addresses = [(n, a) for i, a in self.netlink.addresses() if (n := names.get(i, "")) in covered]
            except OSError as e:  # the links of the last look stay exempt
                log.warning("cannot read this host's addresses (its links stay as they were): %s", e)
                self.host_links_due = True
                return
        self.policy_index.set_host_links(host_links(self.host, self.fabric.values(), addresses))

    def _apply_policy(self, full: bool) -> bool:
        """Policy goes in before routes, so a new workload is never reachable unfiltered."""
        if self.policy is None:
            return True
        replaces, patches = self.policy.replaces, self.policy.patches
        try:
            ok = self.policy.apply(self.policy_index)
        except Exception:  # a policy no writer foresaw: the routes of workloads already policed still go in
            log.exception("policy: writing the table failed; workloads whose policy is not in get no route")
            self.metrics.errors.inc()
            self.policy.replace_due = True
            ok = False
        now = time.monotonic()
        just_replaced = self.policy.replaces != replaces  # the kernel holds exactly what we wrote
        due = full or now >= self.next_policy_check
        if due:  # moved on even when nothing is compared: the loop sleeps until it, so a past time would spin
            self.next_policy_check = now + POLICY_CHECK_S
        if ok and due and not just_replaced and self.policy.check(self.policy_index, force=full):
            self.metrics.policy_drift.inc()
            ok = self.policy.last_error is None
        self.metrics.policy_writes.labels("replace").inc(self.policy.replaces - replaces)
        self.metrics.policy_writes.labels("patch").inc(self.policy.patches - patches)
        if ok != self.policy_ok:
            self.dirty.update(self.index.plans)  # every local endpoint's status names the policy state
            self.policy_ok = ok
        return ok

    def _retryable_pending(self) -> bool:
        """Pending writes whose device exists (so waiting alone will not help): retry on a timer."""
        idx = self.links.by_name
        return any(i in idx for i in self.routes.routes.pending_updates.values()) or \
            any(k[0] in idx for k in self.routes.neighbours.pending_updates)

    def _attempted_owners(self) -> set[str]:
        st = self.index.state
        owners: set[str] = set()
        for iface in (*self.routes.routes.pending_updates.values(),
                      *(k[0] for k in self.routes.neighbours.pending_updates),
                      *(k[0] for k in self.routes.proxies.pending_updates)):
            n = st.interfaces.get(iface)
            if n is not None:
                owners.add(n)
        return owners

    def _set_state(self, name: str, state: str | None) -> None:
        old = self.ep_states.pop(name, None)
        if old is not None:
            self.state_counts[old] -= 1
        if state is not None:
            self.ep_states[name] = state
            self.state_counts[state] += 1

    def _write_statuses(self) -> None:
        st = self.index.state
        for name in self.dirty:
            plan = self.index.plans.get(name)
            if plan is None:
                continue
            state, reason = self._endpoint_status(name, plan.interface, st.errors.get(name))
            self._set_state(name, state)
            self.status.set(name, state, one_line(reason))
        self.dirty.clear()
        for state in ("up", "down", "error", "conflict"):
            self.metrics.endpoints.labels(state).set(self.state_counts[state])

    def _endpoint_status(self, name: str, iface: str, conflict: str | None) -> tuple[str, str]:
        routes, neighs, proxies = self.index.endpoint_keys(name)
        failures = [self.routes.failures[k] for k in
                    [*(("route", r) for r in routes), *(("neigh", n) for n in neighs), *(("proxy", p) for p in proxies)]
                    if k in self.routes.failures]
        failures += [self.sysctls.failures[p] for p in self.sysctls.by_iface.get(iface, {})
                     if p in self.sysctls.failures]
        pending = any(r in self.routes.routes.pending_updates for r in routes) or \
            any(n in self.routes.neighbours.pending_updates for n in neighs) or self.sysctls.pending_for(iface)
        corrupt = self.corrupt.get(endpoint_key(self.host, name))
        index = self.links.by_name.get(iface)
        return endpoint_status(conflict=conflict, interface=iface, present=index is not None,
                               policy_error=self.policy.last_error if self.policy is not None else None,
                               policy_covers=iface in self.policy_interfaces, failures=failures,
                               corrupt=corrupt[1] if corrupt else None, pending=pending,
                               link_down=index is not None and self.link_up.get(index) is False)
