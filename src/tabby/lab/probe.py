"""The lab's cheap signals, read without a process per look: routes in every host's kernel and
every agent's health, through sockets made once inside each namespace.

Why: a 50-host lab that waited by re-running the whole O(N²) ping matrix took 10 minutes to come
up. Whether every host's kernel has a route covering every other host's workload addresses, and
whether every agent is in sync, answer the same question ("is it routed yet?") for the cost of
one netlink dump and one HTTP request per host. A socket keeps the namespace it was created in,
so each is made once in a thread that entered the namespace (``cni.nl.in_netns``) and then used
from any thread. Not thread-safe: one caller at a time. Close a probe when done: an open socket
keeps its namespace alive after `ip netns del`.

Also here, pure: which pairs a sampled matrix checks.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tabby.cni.nl import in_netns
from tabby.dataplane.netlink import Netlink

T = TypeVar("T")
HEALTH_PORT = 9091  # the lab starts every agent with --metrics-port 9091


def _prefixes(routes: Iterable[str]) -> dict[int, dict[int, set[int]]]:
    """"addr/len" routes -> version -> prefix length -> networks (as integers), for lookups by mask."""
    out: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
    for r in routes:
        net = ipaddress.ip_network(r, strict=False)
        if net.prefixlen == 0:
            continue  # a default route covers everything and proves nothing
        out[net.version].setdefault(net.prefixlen, set()).add(int(net.network_address))
    return out


def covered(routes: dict[int, dict[int, set[int]]], address: str) -> bool:
    """Does any (non-default) route cover this address: one mask per prefix length present."""
    a = ipaddress.ip_address(address)
    bits = 128 if a.version == 6 else 32
    value = int(a)
    return any((value >> (bits - plen) << (bits - plen)) in nets for plen, nets in routes[a.version].items())


def missing_routes(routes_by_ns: dict[str, Iterable[str]],
                   addresses_by_ns: dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """Pure: namespace -> the addresses of workloads elsewhere that no route of its kernel covers.

    addresses_by_ns: the workload addresses each namespace owns (a host: its endpoints' addresses;
    the outside router: none). Every namespace must reach every other's."""
    out: dict[str, list[str]] = {}
    for ns, routes in routes_by_ns.items():
        table = _prefixes(routes)
        miss = [a for other, addrs in addresses_by_ns.items() if other != ns for a in addrs if not covered(table, a)]
        if miss:
            out[ns] = miss
    return out


@dataclass
class NsProbe:
    """One namespace's netlink socket (made inside it) and its agent's /healthz."""

    ns: str
    health: bool = True
    nl: Netlink | None = field(default=None, repr=False)

    def _fd(self) -> int:
        return os.open(f"/run/netns/{self.ns}", os.O_RDONLY | os.O_CLOEXEC)

    def _in(self, fn: Callable[[], T]) -> T:
        fd = self._fd()
        try:
            return in_netns(fd, fn)
        finally:
            os.close(fd)

    def routes(self) -> list[str]:
        """Every main-table unicast route of the namespace's kernel, any protocol."""
        if self.nl is None:
            self.nl = self._in(Netlink)
        return [r.dst for r in self.nl.routes(proto=None)]

    def healthz(self, timeout: float = 2.0) -> dict[str, object]:
        """The agent's /healthz body (with "status": the HTTP code), or {"error": ...}."""
        try:
            sock = self._in(lambda: socket.create_connection(("127.0.0.1", HEALTH_PORT), timeout=timeout))
        except OSError as e:
            return {"error": f"{self.ns}: /healthz: {e}"}
        with sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: agent\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        try:
            doc = json.loads(body)
            return {"status": int(head.split()[1]), **(doc if isinstance(doc, dict) else {})}
        except (ValueError, IndexError):
            return {"error": f"{self.ns}: /healthz answered {data[:200]!r}"}

    def close(self) -> None:
        if self.nl is not None:
            self.nl.close()
            self.nl = None


def pick_pairs(members: Sequence[str], n: int | None, rng: random.Random,
               always: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Pure: the (source, destination) pairs a matrix checks for one family.

    n None: every ordered pair. Otherwise every member once as source and once as destination (a
    random cycle through all of them), then random pairs until n more, plus ``always`` (the pair
    the lab's policy blocks, so a sampled matrix still proves policy). Distinct, never (m, m)."""
    if n is None:
        return [(a, b) for a in members for b in members if a != b]
    order = list(members)
    rng.shuffle(order)
    chosen = dict.fromkeys((order[i], order[(i + 1) % len(order)]) for i in range(len(order)) if len(order) > 1)
    for pair in always:
        chosen[pair] = None
    total = len(members) * (len(members) - 1)
    target = min(total, len(chosen) + n)
    while len(chosen) < target:
        a, b = rng.sample(order, 2)
        chosen[(a, b)] = None
    return list(chosen)
