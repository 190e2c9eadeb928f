"""Endpoint routes, permanent neighbours and proxy NDP entries, programmed in pipelined batches.

Ownership: everything this reconciler writes carries route/neighbour protocol ``TABBY_PROTO``,
and only objects with that protocol are ever read back as ours or deleted, so a foreign route
or neighbour on the same device survives. Adds go before deletes, and every add is a replace,
so an endpoint whose interface changed is never left without a route in between.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from tabby.dataplane import netlink as nl
from tabby.dataplane.links import LinkIndex
from tabby.dataplane.tracker import DeltaTracker

log = logging.getLogger(__name__)

CREATE = nl.NLM_F_CREATE | nl.NLM_F_REPLACE

NeighKey = tuple[str, str]  # (interface, address)
# an op's name -> (an addition?, what it writes: the key of failures and of the tracker)
_OPS = {f"{verb}-{kind}": (verb == "add", kind) for verb in ("add", "del") for kind in ("route", "neigh", "proxy")}


class RoutesReconciler:
    def __init__(self, netlink: nl.Netlink, links: LinkIndex) -> None:
        self.nl = netlink
        self.links = links
        self.routes: DeltaTracker[str, str] = DeltaTracker()  # "addr/len" -> interface
        self.neighbours: DeltaTracker[NeighKey, str] = DeltaTracker()  # -> MAC
        self.proxies: DeltaTracker[NeighKey, bool] = DeltaTracker()
        self.failures: dict[tuple[str, object], str] = {}  # ("route", dst) | ("neigh", key) -> reason

    # -- desired ---------------------------------------------------------------------------

    def set_route(self, dst: str, iface: str | None) -> None:
        if iface is None:
            self.routes.delete_desired(dst)
            self.failures.pop(("route", dst), None)
        else:
            self.routes.set_desired(dst, iface)

    def set_neighbour(self, key: NeighKey, mac: str | None) -> None:
        if mac is None:
            self.neighbours.delete_desired(key)
            self.failures.pop(("neigh", key), None)
        else:
            self.neighbours.set_desired(key, mac)

    def set_proxy(self, key: NeighKey, present: bool) -> None:
        if present:
            self.proxies.set_desired(key, True)
        else:
            self.proxies.delete_desired(key)
            self.failures.pop(("proxy", key), None)

    # -- actual ----------------------------------------------------------------------------

    def resync(self) -> None:
        """Read back everything we own; the next apply fixes every difference."""
        names = self.links.by_index
        self.routes.replace_dataplane({r.dst: names[r.ifindex] for r in self.nl.routes()
                                       if r.ifindex in names and r.metric == nl.TABBY_METRIC})
        self.neighbours.replace_dataplane({
            (names[n.ifindex], n.ip): n.mac or "" for n in self.nl.neighbours()
            if n.proto == nl.TABBY_PROTO and n.ifindex in names and n.state & nl.NUD_PERMANENT})
        self.proxies.replace_dataplane({(names[n.ifindex], n.ip): True for n in self.nl.neighbours(proxy=True)
                                        if n.proto == nl.TABBY_PROTO and n.ifindex in names})

    def on_change(self, change: nl.Change) -> None:
        """A monitor event: if it undid something of ours, mark it to be put back."""
        if change.kind == "route":
            ours = change.key in self.routes.desired or change.key in self.routes.dataplane
            if ours and (change.deleted or change.proto != nl.TABBY_PROTO):
                self.routes.dataplane_gone(change.key)
        elif change.kind == "neigh":
            iface = self.links.by_index.get(change.ifindex)
            key = (iface or "", change.key)
            changed_mac = key in self.neighbours.desired and change.mac is not None \
                and change.mac != self.neighbours.desired[key]
            if change.deleted or change.proto != nl.TABBY_PROTO or changed_mac:
                if key in self.neighbours.desired or key in self.neighbours.dataplane:
                    self.neighbours.dataplane_gone(key)
                if key in self.proxies.desired or key in self.proxies.dataplane:
                    self.proxies.dataplane_gone(key)

    def interface_renamed(self, old: str, new: str) -> None:
        """The device called old is now called new, with everything we wrote on it: that is what
        the kernel holds (so it is removed from new unless an endpoint names new; it was left
        there, and after its endpoint went, until the full check), and a device called old gets
        it all again."""
        for dst, i in list(self.routes.dataplane.items()):
            if i == old:
                self.routes.dataplane_is(dst, new)
        for tracker in (self.neighbours, self.proxies):
            for key in [k for k in tracker.dataplane if k[0] == old]:
                value = tracker.dataplane[key]
                tracker.dataplane_gone(key)
                tracker.dataplane_is((new, key[1]), value)  # type: ignore[arg-type]

    def interface_gone(self, iface: str) -> None:
        """The kernel dropped the device and everything on it."""
        for dst, i in list(self.routes.dataplane.items()):
            if i == iface:
                self.routes.dataplane_gone(dst)
        for tracker in (self.neighbours, self.proxies):
            for key in [k for k in tracker.dataplane if k[0] == iface]:
                tracker.dataplane_gone(key)

    # -- apply -----------------------------------------------------------------------------

    def apply(self, hold: Collection[str] = ()) -> tuple[int, int]:
        """Program every pending change whose interface exists, except additions on the
        interfaces in ``hold`` (their policy is not in the kernel yet). Returns (applied, failed)."""
        idx = self.links.by_name
        ops: list[tuple[str, object, bytes]] = []
        for dst, iface in self.routes.pending_updates.items():
            i = idx.get(iface)
            if i:
                if iface not in hold:
                    ops.append(("add-route", dst, nl.route_msg(nl.RTM_NEWROUTE, dst, i, CREATE)))
            elif dst in self.routes.dataplane:  # its device is not there, and ours routes it elsewhere (a
                # device renamed away from the endpoint's name, which no policy chain names): not there
                ops.append(("del-route", dst, nl.route_msg(nl.RTM_DELROUTE, dst, 0)))
        for key, mac in self.neighbours.pending_updates.items():
            i = idx.get(key[0])
            if i and key[0] not in hold:
                ops.append(("add-neigh", key, nl.neigh_msg(nl.RTM_NEWNEIGH, key[1], i, mac, CREATE)))
        for key in self.proxies.pending_updates:
            i = idx.get(key[0])
            if i and key[0] not in hold:
                ops.append(("add-proxy", key, nl.neigh_msg(nl.RTM_NEWNEIGH, key[1], i, None, CREATE, proxy=True)))
        for dst in self.routes.pending_deletes:
            ops.append(("del-route", dst, nl.route_msg(nl.RTM_DELROUTE, dst, 0)))
        for key in self.neighbours.pending_deletes:
            i = idx.get(key[0])
            if i:
                ops.append(("del-neigh", key, nl.neigh_msg(nl.RTM_DELNEIGH, key[1], i, None)))
        for key in self.proxies.pending_deletes:
            i = idx.get(key[0])
            if i:
                ops.append(("del-proxy", key, nl.neigh_msg(nl.RTM_DELNEIGH, key[1], i, None, proxy=True)))
        if not ops:
            self._forget_deletes_on_missing_devices()
            return 0, 0
        failures = {(f.op, f.obj): f for f in self.nl.apply(ops)}
        trackers = {"route": self.routes, "neigh": self.neighbours, "proxy": self.proxies}
        for op, obj, _ in ops:  # 40,000 at a cold start of 10,000: no per-op work that a lookup can do
            add, kind = _OPS[op]
            if failures and (failure := failures.get((op, obj))) is not None:
                self.failures[(kind, obj)] = str(failure)
                log.warning("%s", failure)
                continue
            if self.failures:
                self.failures.pop((kind, obj), None)
            tracker = trackers[kind]
            if add:
                tracker.applied_update(obj, tracker.desired[obj])  # type: ignore[index]
            else:
                tracker.applied_delete(obj)  # type: ignore[arg-type]
        self._forget_deletes_on_missing_devices()
        return len(ops) - len(failures), len(failures)

    def _forget_deletes_on_missing_devices(self) -> None:
        idx = self.links.by_name
        for kind, tracker in (("neigh", self.neighbours), ("proxy", self.proxies)):
            for key in [k for k in tracker.pending_deletes if k[0] not in idx]:
                tracker.applied_delete(key)  # type: ignore[arg-type]
                self.failures.pop((kind, key), None)  # (its failed delete's reason: kept, it grew for ever)

    def waiting(self) -> int:
        trackers = (self.routes, self.neighbours, self.proxies)
        return sum(len(t.pending_updates) + len(t.pending_deletes) for t in trackers)
