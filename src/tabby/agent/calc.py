"""The pure calculation: Endpoints -> what this host's kernel should hold.

No I/O. ``HostIndex`` is updated one endpoint at a time and reports which keys it touched, so a
change costs work in proportion to itself, not to the number of endpoints; ``host_state`` is
the same thing from scratch, and tests hold the two equal under any order of updates.

Conflicts fail closed and deterministically: if two endpoints on this host claim one
interface, or one address, the endpoint whose name sorts first keeps it and the other is in
error for it (it never takes over traffic meant for the first). Endpoints of other hosts
contribute nothing here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EndpointPlan:
    name: str
    interface: str
    mac: str
    addresses: tuple[str, ...]  # plain addresses, IPv6 first
    ipv6_gateway: str | None
    has_v6: bool
    has_v4: bool
    orchestrator: str = "container"


def plan_endpoint(ep: Any) -> EndpointPlan:
    s = ep.spec
    return EndpointPlan(
        name=ep.metadata.name,
        interface=s.interface,
        mac=s.mac,
        addresses=tuple(str(a.ip) for a in (*s.ipv6_addresses, *s.ipv4_addresses)),
        ipv6_gateway=str(s.ipv6_gateway) if s.ipv6_gateway is not None else None,
        has_v6=bool(s.ipv6_addresses),
        has_v4=bool(s.ipv4_addresses),
        orchestrator=s.orchestrator,
    )


def host_prefix(addr: str) -> str:
    return f"{addr}/128" if ":" in addr else f"{addr}/32"


def interface_sysctls(plan: EndpointPlan) -> dict[str, str]:
    """Per-interface settings, as paths under /proc/sys/net.

    IPv6: no RAs accepted from the workload, forwarding on, proxy NDP where a gateway address is
    answered for, and no random proxy delay (up to 0.8 s otherwise). IPv4: proxy ARP (a container's
    default route points at 169.254.1.1, which nothing owns), strict reverse-path filtering.
    """
    i = plan.interface
    out: dict[str, str] = {}
    if plan.has_v6:
        out[f"ipv6/conf/{i}/accept_ra"] = "0"
        out[f"ipv6/conf/{i}/forwarding"] = "1"
        out[f"ipv6/neigh/{i}/proxy_delay"] = "0"
        if plan.ipv6_gateway is not None:
            out[f"ipv6/conf/{i}/proxy_ndp"] = "1"
    if plan.has_v4:
        out[f"ipv4/conf/{i}/proxy_arp"] = "1"
        out[f"ipv4/conf/{i}/rp_filter"] = "1"
        out[f"ipv4/neigh/{i}/proxy_delay"] = "0"
    return out


@dataclass
class HostState:
    routes: dict[str, str] = field(default_factory=dict)  # "addr/128" -> interface
    neighbours: dict[tuple[str, str], str] = field(default_factory=dict)  # (interface, addr) -> MAC
    proxies: set[tuple[str, str]] = field(default_factory=set)  # (interface, IPv6 gateway) for proxy NDP
    sysctls: dict[str, dict[str, str]] = field(default_factory=dict)  # interface -> {path: value}
    interfaces: dict[str, str] = field(default_factory=dict)  # interface -> endpoint name
    errors: dict[str, str] = field(default_factory=dict)  # endpoint name -> why (conflicts)


@dataclass
class Touched:
    routes: set[str] = field(default_factory=set)
    neighbours: set[tuple[str, str]] = field(default_factory=set)
    proxies: set[tuple[str, str]] = field(default_factory=set)
    interfaces: set[str] = field(default_factory=set)
    endpoints: set[str] = field(default_factory=set)


class HostIndex:
    def __init__(self, host: str) -> None:
        self.host = host
        self.plans: dict[str, EndpointPlan] = {}
        self.if_owners: dict[str, set[str]] = {}
        self.addr_owners: dict[str, set[str]] = {}
        self.state = HostState()

    def update(self, name: str, endpoint: Any | None) -> Touched:
        """Apply one endpoint's new version (None: gone, or moved to another host)."""
        t = Touched()
        old = self.plans.pop(name, None)
        if old is not None:
            self._unindex(old, t)
        if endpoint is not None and endpoint.spec.host == self.host:
            plan = plan_endpoint(endpoint)
            if plan == old:
                self._index(plan, Touched())
                self.plans[name] = plan
                return Touched()
            self.plans[name] = plan
            self._index(plan, t)
        t.endpoints.add(name)
        self._recompute(t)
        return t

    def _index(self, plan: EndpointPlan, t: Touched) -> None:
        self.if_owners.setdefault(plan.interface, set()).add(plan.name)
        t.interfaces.add(plan.interface)
        for a in plan.addresses:
            self.addr_owners.setdefault(a, set()).add(plan.name)
            t.routes.add(host_prefix(a))

    def _unindex(self, plan: EndpointPlan, t: Touched) -> None:
        owners = self.if_owners.get(plan.interface, set())
        owners.discard(plan.name)
        if not owners:
            self.if_owners.pop(plan.interface, None)
        t.interfaces.add(plan.interface)
        for a in plan.addresses:
            owners = self.addr_owners.get(a, set())
            owners.discard(plan.name)
            if not owners:
                self.addr_owners.pop(a, None)
            t.routes.add(host_prefix(a))
            t.neighbours.add((plan.interface, a))
        if plan.ipv6_gateway is not None:
            t.proxies.add((plan.interface, plan.ipv6_gateway))

    def _if_winner(self, iface: str) -> str | None:
        owners = self.if_owners.get(iface)
        return min(owners) if owners else None

    def _recompute(self, t: Touched) -> None:
        st = self.state
        # interface ownership first: it decides who may hold addresses
        for iface in list(t.interfaces):
            for n in self.if_owners.get(iface, ()):
                t.endpoints.add(n)
                t.routes.update(host_prefix(a) for a in self.plans[n].addresses)
                if self.plans[n].ipv6_gateway is not None:
                    t.proxies.add((iface, self.plans[n].ipv6_gateway))
            winner = self._if_winner(iface)
            old_sysctls = st.sysctls.get(iface)
            if winner is None:
                st.interfaces.pop(iface, None)
                st.sysctls.pop(iface, None)
            else:
                st.interfaces[iface] = winner
                st.sysctls[iface] = interface_sysctls(self.plans[winner])
            if old_sysctls != st.sysctls.get(iface):
                t.interfaces.add(iface)
        for prefix in list(t.routes):
            addr = prefix.rsplit("/", 1)[0]
            eligible = [n for n in self.addr_owners.get(addr, ())
                        if self._if_winner(self.plans[n].interface) == n]
            t.endpoints.update(self.addr_owners.get(addr, ()))
            old_iface = st.routes.get(prefix)
            if eligible:
                plan = self.plans[min(eligible)]
                st.routes[prefix] = plan.interface
                st.neighbours[(plan.interface, addr)] = plan.mac
                t.neighbours.add((plan.interface, addr))
            else:
                st.routes.pop(prefix, None)
            if old_iface is not None and old_iface != st.routes.get(prefix):
                st.neighbours.pop((old_iface, addr), None)
                t.neighbours.add((old_iface, addr))
        for iface, addr in list(t.neighbours):
            if st.routes.get(host_prefix(addr)) != iface:
                st.neighbours.pop((iface, addr), None)
        for key in list(t.proxies):
            iface, gw = key
            winner = self._if_winner(iface)
            if winner is not None and self.plans[winner].ipv6_gateway == gw:
                st.proxies.add(key)
            else:
                st.proxies.discard(key)
        for n in t.endpoints:
            st.errors.pop(n, None)
            plan = self.plans.get(n)
            if plan is None:
                continue
            winner = self._if_winner(plan.interface)
            if winner != n:
                st.errors[n] = f"interface {plan.interface} is also claimed by endpoint {winner}"
                continue
            lost = [a for a in plan.addresses if min(
                (o for o in self.addr_owners[a] if self._if_winner(self.plans[o].interface) == o), default=n) != n]
            if lost:
                holders = {a: min(self.addr_owners[a]) for a in lost}
                st.errors[n] = "; ".join(f"address {a} is also claimed by endpoint {h}" for a, h in holders.items())

    def endpoint_keys(self, name: str) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
        """The routes, neighbours and proxy entries this endpoint holds now."""
        plan = self.plans.get(name)
        if plan is None or self.state.interfaces.get(plan.interface) != name:
            return [], [], []
        st = self.state
        routes = [host_prefix(a) for a in plan.addresses if st.routes.get(host_prefix(a)) == plan.interface]
        neighs = [(plan.interface, a) for a in plan.addresses if (plan.interface, a) in st.neighbours]
        proxies = [(plan.interface, plan.ipv6_gateway)] if plan.ipv6_gateway and \
            (plan.interface, plan.ipv6_gateway) in st.proxies else []
        return routes, neighs, proxies


def host_state(endpoints: Iterable[Any], host: str) -> HostState:
    """This host's desired state from a full set of endpoints: the reference for HostIndex."""
    index = HostIndex(host)
    for ep in sorted(endpoints, key=lambda e: e.metadata.name):
        index.update(ep.metadata.name, ep)
    return index.state
