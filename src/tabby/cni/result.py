"""The ADD result in the shape of each spec version (SPEC.md and libcni's pkg/types/040, 100).

0.3.0, 0.3.1, 0.4.0: every ``ips`` entry carries ``"version": "4" | "6"``; 1.0.0 drops it; 1.1.0
adds ``mtu`` to interfaces and routes. A ``prevResult`` (tabby chained after another plugin) is
kept: its interfaces, ips, routes and dns come first, and tabby's ips point past its interfaces.
"""

from __future__ import annotations

from typing import Any

from tabby.model.plain import Frozen


class Plumbed(Frozen):
    """What ADD made: the host end, the container end, the addresses and the routes."""

    __slots__ = ("host_if", "host_mac", "ifname", "ips", "mac", "mtu", "routes", "sandbox")
    host_if: str
    host_mac: str
    ifname: str
    mac: str
    sandbox: str
    mtu: int
    ips: tuple[tuple[str, str], ...]  # ("addr/len", gateway)
    routes: tuple[tuple[str, str], ...]  # ("dst/len", gateway)

    def __init__(self, host_if: str, host_mac: str, ifname: str, mac: str, sandbox: str, mtu: int,
                 ips: tuple[tuple[str, str], ...], routes: tuple[tuple[str, str], ...]) -> None:
        self._set(host_if=host_if, host_mac=host_mac, ifname=ifname, mac=mac, sandbox=sandbox, mtu=mtu, ips=ips,
                  routes=routes)


def at_least(version: str, floor: str) -> bool:
    return tuple(int(x) for x in version.split(".")) >= tuple(int(x) for x in floor.split("."))


def build(version: str, p: Plumbed, prev: dict[str, Any] | None = None, route_mtu: int | None = None,
          nameservers: tuple[str, ...] = ()) -> dict[str, Any]:
    """nameservers: resolvers tabby gives this attachment (DNS64 on a nat64 pool), before a
    prevResult's own."""
    v11 = at_least(version, "1.1.0")
    prev = prev or {}

    def listed(key: str) -> list[dict[str, Any]]:  # a previous plugin's entries; anything else is left out
        got = prev.get(key)
        return [i for i in got if isinstance(i, dict)] if isinstance(got, list) else []

    interfaces = listed("interfaces")
    base = len(interfaces)
    host = {"name": p.host_if, "mac": p.host_mac}
    cont: dict[str, Any] = {"name": p.ifname, "mac": p.mac, "sandbox": p.sandbox}
    if v11 and p.mtu:
        host["mtu"] = cont["mtu"] = p.mtu
    interfaces += [host, cont]
    ips = listed("ips")
    for addr, gw in p.ips:
        ip: dict[str, Any] = {"address": addr, "gateway": gw, "interface": base + 1}
        if not at_least(version, "1.0.0"):
            ip = {"version": "6" if ":" in addr else "4", **ip}
        ips.append(ip)
    routes = listed("routes")
    for dst, gw in p.routes:
        route: dict[str, Any] = {"dst": dst, "gw": gw}
        if v11 and route_mtu:
            route["mtu"] = route_mtu
        routes.append(route)
    out: dict[str, Any] = {"cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes}
    dns = dict(prev["dns"]) if isinstance(prev.get("dns"), dict) and prev["dns"] else {}
    if nameservers:
        # ours first: a resolver without DNS64 ahead of it would answer IPv4-only names with nothing
        # (and glibc reads three); a previous plugin's that are no list of strings are left out
        theirs = dns.get("nameservers")
        theirs = [a for a in theirs if isinstance(a, str) and a not in nameservers] if isinstance(theirs, list) else []
        dns["nameservers"] = [*nameservers, *theirs]
    if dns:
        out["dns"] = dns
    return out
