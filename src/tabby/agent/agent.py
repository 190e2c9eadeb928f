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

import logging
import queue
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tabby.agent.calc import HostIndex, Touched
from tabby.agent.health import HealthServer, Metrics
from tabby.agent.policy_calc import PolicyIndex
from tabby.agent.status import StatusWriter
from tabby.dataplane import netlink as nl
from tabby.dataplane.bird import BirdError, BirdReconciler
from tabby.dataplane.bird_config import BirdInputs, render
from tabby.dataplane.dnsmasq import DnsmasqError, DnsmasqReconciler
from tabby.dataplane.dnsmasq_config import Vm
from tabby.dataplane.dnsmasq_config import render as render_dnsmasq
from tabby.dataplane.links import LinkIndex, SysctlReconciler, set_host_sysctls
from tabby.dataplane.policy import PolicyReconciler
from tabby.dataplane.routes import RoutesReconciler
from tabby.model import decode
from tabby.model.ipam import Affinity
from tabby.model.keys import (
    IPAM_AFFINITIES_PREFIX,
    IPAM_BLOCKS_PREFIX,
    IPAM_GC_KEY,
    IPAM_HANDLES_PREFIX,
    PREFIX,
    STATUS_PREFIX,
    bgp_status_key,
    kind_prefix,
    parse_key,
)
from tabby.store import Store
from tabby.syncer import InSync, ResourceSyncer, Update

log = logging.getLogger(__name__)

RETRY_S = 2.0  # how soon a failed kernel write is tried again
BGP_CHECK_S = 5.0  # how often bird's liveness and sessions are checked
POLICY_CHECK_S = 5.0  # how often the nftables generation is compared (a full compare only if it moved)


def decode_record(key: str, value: bytes) -> Any:
    """Resources, and the one IPAM record the agent needs: this fabric's block affinities."""
    if key.startswith(IPAM_AFFINITIES_PREFIX):
        try:
            return Affinity.model_validate_json(value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return decode(key, value)


class Agent:
    def __init__(self, store: Store, host: str, *, resync_s: float = 90.0, metrics_addr: str = "127.0.0.1",
                 metrics_port: int | None = 9091, status_ttl_s: float = 30.0, bgp: bool = True,
                 run_dir: Path | None = None, policy: bool = True) -> None:
        self.store = store
        self.host = host
        self.resync_s = resync_s
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
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
        self.syncer = ResourceSyncer(
            store, PREFIX, on_corrupt=self._corrupt, decoder=decode_record,
            exclude=(STATUS_PREFIX, IPAM_BLOCKS_PREFIX, IPAM_HANDLES_PREFIX, IPAM_GC_KEY))
        self.fabric: dict[str, Any] = {}  # every other record: hosts, pools, peers, affinities, config
        run_dir = run_dir or Path("/run/tabby") / host
        self.bird = BirdReconciler(run_dir) if bgp else None
        self.dnsmasq = DnsmasqReconciler(run_dir)
        self.dhcp_dirty = True
        self.bgp_dirty = True
        self.next_bgp_check = 0.0
        self.monitor = nl.Monitor()
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
        self.last_apply_ok = True
        self.started_at = time.monotonic()
        self._links_read_at_start = False
        self.routes_programmed_at: float | None = None  # first moment every route and neighbour was in
        self.sysctls_programmed_at: float | None = None
        self.health_server = HealthServer(metrics_addr, metrics_port, self.metrics, self.health) \
            if metrics_port is not None else None

    # -- feeders -------------------------------------------------------------------------

    def _corrupt(self, key: str, error: str) -> None:
        self.metrics.corrupt.inc()
        parsed = parse_key(key)
        if parsed is not None and parsed[1] in self.index.plans:
            # the last good version stays programmed; say so on the endpoint
            self.q.put(("corrupt", (parsed[1], error)))

    def _feed_store(self) -> None:
        try:
            for item in self.syncer:
                self.q.put(("store", item))
        except Exception:
            log.exception("store syncer died")
            self.q.put(("fatal", "store syncer died"))

    def _feed_netlink(self) -> None:
        while not self.stopping.is_set():
            self.monitor_may_read.wait(1.0)
            try:
                changes = self.monitor.read()
            except OSError:
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
        failing = [f for f in (self.syncer.failing, self.status.failing) if f]
        if not self.status.alive() and not self.stopping.is_set():
            failing.append("status writer thread not running")
        if failing:
            info["degraded"] = "; ".join(failing)
        return ok, info

    def start(self) -> None:
        for note in set_host_sysctls(endpoints=0):
            log.info("%s", note)
        self.links.refresh()
        self._links_read_at_start = True
        threading.Thread(target=self._feed_netlink, name="netlink-monitor", daemon=True).start()
        threading.Thread(target=self._feed_store, name="store-syncer", daemon=True).start()
        self.status.host_info = {"started": time.time()}
        self.status.start()
        if self.health_server is not None:
            self.health_server.start()
        log.info("agent for host %s started (metrics on %s)", self.host,
                 self.health_server.port if self.health_server else "off")

    def stop(self) -> None:
        self.stopping.set()
        self.syncer.stop()
        self.monitor.close()
        self.q.put(("stop", None))
        self.status.stop()
        if self.health_server is not None:
            self.health_server.stop()

    def run(self) -> None:
        """Until stop(): drain the queue, fold changes in, apply."""
        self.start()
        next_resync = time.monotonic() + self._jitter()
        retry_at: float | None = None
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                deadline = min(next_resync, retry_at or next_resync,
                               self.next_bgp_check if self.bird is not None and self.in_sync else next_resync,
                               self.next_policy_check if self.policy is not None and self.in_sync else next_resync)
                items = []
                try:
                    items.append(self.q.get(timeout=max(0.0, deadline - now)))
                    while True:
                        items.append(self.q.get_nowait())
                except queue.Empty:
                    pass
                for kind, item in items:
                    if kind == "stop":
                        return
                    if kind == "fatal":
                        raise RuntimeError(item)
                    self._fold(kind, item)
                now = time.monotonic()
                if now >= next_resync:
                    self.full_check_due = True
                    next_resync = now + self._jitter()
                if retry_at is not None and now >= retry_at:
                    retry_at = None
                if self.in_sync and not self._apply():
                    retry_at = time.monotonic() + RETRY_S
                if self.in_sync and self.bird is not None:
                    self._bgp(now)
                if self.in_sync and self.dhcp_dirty:
                    self._dhcp()
        finally:
            self.stopping.set()
            if self.policy is not None:
                self.policy.close()

    def bird_inputs(self) -> BirdInputs | None:
        """What bird needs from the Store; None while this host has no Host record (no BGP yet)."""
        hosts = [r for k, r in self.fabric.items() if getattr(r, "kind", None) == "Host"]
        me = next((h for h in hosts if h.metadata.name == self.host), None)
        if me is None:
            return None
        kinds: dict[str, list[Any]] = {}
        for r in self.fabric.values():
            kinds.setdefault(getattr(r, "kind", "Affinity"), []).append(r)
        cfg = {r.metadata.name: r.spec for r in kinds.get("Config", [])}
        mesh = True
        for name in ("global", f"host.{self.host}"):
            if name in cfg and cfg[name].node_to_node_mesh is not None:
                mesh = cfg[name].node_to_node_mesh
        blocks = tuple(a.cidr for a in kinds.get("Affinity", []) if a.host == self.host and a.state == "confirmed")
        return BirdInputs(host=me, hosts=tuple(hosts), peers=tuple(kinds.get("BGPPeer", [])),
                          pools=tuple(kinds.get("IPPool", [])), blocks=blocks, mesh=mesh)

    def _bgp(self, now: float) -> None:
        assert self.bird is not None
        if not self.bgp_dirty and now < self.next_bgp_check:
            return
        self.bgp_dirty = False
        self.next_bgp_check = now + BGP_CHECK_S
        inputs = self.bird_inputs()
        if inputs is None:
            return
        try:
            self.bird.set_config(render(inputs))
            self.bird.apply()
        except (BirdError, OSError, subprocess.TimeoutExpired) as e:
            log.error("BIRD: %s", e)
            self.bird.last_error = str(e)
        self.status.set_doc(bgp_status_key(self.host), {
            "host": self.host, "sessions": self.bird.sessions() if self.bird.pid() else [],
            "error": self.bird.last_error, "at": time.time()})

    def _dhcp(self) -> None:
        """RA and DHCP for this host's VMs whose tap exists (dnsmasq only starts on existing taps)."""
        self.dhcp_dirty = False
        st = self.index.state
        vms = []
        for name, plan in self.index.plans.items():
            if plan.orchestrator != "vm" or st.interfaces.get(plan.interface) != name:
                continue
            if plan.interface not in self.links.by_name:
                continue
            vms.append(Vm(plan.interface, plan.mac, tuple(a for a in plan.addresses if ":" in a),
                          tuple(a for a in plan.addresses if ":" not in a)))
        pools = [r.spec.cidr for r in self.fabric.values() if getattr(r, "kind", None) == "IPPool"]
        try:
            self.dnsmasq.set_desired(render_dnsmasq(vms, pools, self.dnsmasq.run_dir) if vms else None, vms)
            self.dnsmasq.apply()
        except (DnsmasqError, OSError, subprocess.SubprocessError) as e:
            log.error("dnsmasq: %s", e)
            self.dhcp_dirty = True  # try again on the next turn that has anything to do

    def _jitter(self) -> float:
        return self.resync_s * random.uniform(0.9, 1.1)

    def _fold(self, kind: str, item: Any) -> None:
        if kind == "store":
            if isinstance(item, InSync):
                if not self.in_sync:
                    log.info("in sync with the store at revision %d: %d local endpoints",
                             item.revision, len(self.index.plans))
                self.in_sync = True
                self.full_check_due = True
                for note in set_host_sysctls(endpoints=len(self.index.plans)):
                    log.debug("%s", note)
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
                else:
                    self.fabric[item.key] = item.resource
                self.bgp_dirty = True
                if item.key.startswith(kind_prefix("IPPool")):
                    self.dhcp_dirty = True  # dnsmasq's ranges follow the pools
                return
            name = parsed[1]
            old = self.index.plans.get(name)
            if (old is not None and old.orchestrator == "vm") or \
                    (item.resource is not None and item.resource.spec.orchestrator == "vm"):
                self.dhcp_dirty = True
            was_local = name in self.index.plans
            touched = self.index.update(name, item.resource)
            self._push(touched)
            if item.resource is None:
                self.endpoint_records.pop(name, None)
            else:
                self.endpoint_records[name] = item.resource
            for n in {name} | touched.endpoints:
                self._policy_endpoint(n)
            if was_local and name not in self.index.plans:
                self.status.set(name, None)
                self._set_state(name, None)
                self.dirty.discard(name)
        elif kind == "netlink":
            for change in item:
                self._on_netlink(change)
        elif kind == "corrupt":
            name, error = item
            self.status.set(name, "error", f"newest record is corrupt, last good version kept: {error}")

    def _policy_endpoint(self, name: str) -> None:
        """Feed one endpoint to the policy index: local only if it owns its interface here."""
        plan = self.index.plans.get(name)
        local = plan is not None and self.index.state.interfaces.get(plan.interface) == name
        self.policy_index.set_endpoint(name, self.endpoint_records.get(name), local)

    def _on_netlink(self, change: nl.Change) -> None:
        if change.kind == "overflow":
            self.full_check_due = True
        elif change.kind == "link":
            if change.deleted:
                name = self.links.removed(change.ifindex)
                if name is not None:
                    self.routes.interface_gone(name)
                    self.sysctls.interface_gone(name)
                    self._dirty_iface(name)
            elif change.key:
                known = self.links.by_name.get(change.key) == change.ifindex
                self.links.added(change.key, change.ifindex)
                if not known:
                    self.sysctls.interface_gone(change.key)  # a new device: its sysctls start afresh
                    self._dirty_iface(change.key)
        else:
            self.routes.on_change(change)

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
            self.routes.resync()
            self.metrics.resyncs.inc()
            self.dirty.update(self.index.plans)
            self.full_check_due = False
        policy_ok = self._apply_policy(full)
        attempted = self._attempted_owners()
        self.monitor_may_read.clear()
        try:
            applied, failed = self.routes.apply()  # routes first: traffic flows before the fine-tuning
        finally:
            self.monitor_may_read.set()
        if self.routes_programmed_at is None and self.routes.waiting() == 0:
            self.routes_programmed_at = time.monotonic()
            log.info("all routes and neighbours programmed %.3f s after start",
                     self.routes_programmed_at - self.started_at)
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

    def _apply_policy(self, full: bool) -> bool:
        """Policy goes in before routes, so a new workload is never reachable unfiltered."""
        if self.policy is None:
            return True
        replaces, patches = self.policy.replaces, self.policy.patches
        ok = self.policy.apply(self.policy_index)
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
            self.status.set(name, state, reason)
        self.dirty.clear()
        for state in ("up", "down", "error"):
            self.metrics.endpoints.labels(state).set(self.state_counts[state])

    def _endpoint_status(self, name: str, iface: str, conflict: str | None) -> tuple[str, str]:
        if conflict and self.index.state.interfaces.get(iface) != name:
            return "error", conflict
        if iface not in self.links.by_name:
            return "down", f"interface {iface} not present"
        routes, neighs, proxies = self.index.endpoint_keys(name)
        reasons = [self.routes.failures[k] for k in
                   [*(("route", r) for r in routes), *(("neigh", n) for n in neighs), *(("proxy", p) for p in proxies)]
                   if k in self.routes.failures]
        reasons += [self.sysctls.failures[p] for p in self.sysctls.by_iface.get(iface, {})
                    if p in self.sysctls.failures]
        if conflict:
            reasons.insert(0, conflict)
        if self.policy is not None and self.policy.last_error:
            reasons.append(f"policy not programmed: {self.policy.last_error}")
        if reasons:
            return "error", "; ".join(reasons)
        pending = any(r in self.routes.routes.pending_updates for r in routes) or \
            any(n in self.routes.neighbours.pending_updates for n in neighs) or self.sysctls.pending_for(iface)
        if pending:
            return "down", "programming"
        return "up", ""
