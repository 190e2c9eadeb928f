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
import itertools
import json
import os
import random
import socket
import struct
import time
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
    last_status: int = 0

    def _in(self, fn: Callable[[], T]) -> T:
        return in_ns(self.ns, fn)

    def routes(self) -> list[str]:
        """Every main-table unicast route of the namespace's kernel, any protocol."""
        if self.nl is None:
            self.nl = self._in(Netlink)
        return [r.dst for r in self.nl.routes(proto=None)]

    def get(self, path: str, timeout: float = 2.0) -> str:
        """GET path from the agent's health server (HTTP/1.0: read to the end); the body. OSError
        when nothing answers."""
        sock = self._in(lambda: socket.create_connection(("127.0.0.1", HEALTH_PORT), timeout=timeout))
        with sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        self.last_status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        return data.partition(b"\r\n\r\n")[2].decode(errors="replace")

    def healthz(self, timeout: float = 2.0) -> dict[str, object]:
        """The agent's /healthz body (with "status": the HTTP code), or {"error": ...}."""
        try:
            body = self.get("/healthz", timeout)
            doc = json.loads(body)
        except (OSError, ValueError) as e:
            return {"error": f"{self.ns}: /healthz: {e}"}
        return {"status": self.last_status, **(doc if isinstance(doc, dict) else {})}

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


# -- checks in-process --------------------------------------------------------------------------
#
# Why not `ip netns exec NS ping` per check: that is two processes per check, and a sampled matrix
# at 100 hosts is thousands of checks (measured: 6,560 checks of a 20-host lab took 116 s in 16
# threads, mostly ping's 0.2 s interval and process start-up). A check here is a thread that
# enters the source namespace and uses a socket: an ICMP echo (raw socket, as ping does) or a
# TCP connection to the lab's listener, read to its end (the listener answers its name).

_ICMP_IDENT = itertools.count(1)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(address: str, timeout: float = 2.0, every: float = 0.3) -> tuple[bool, str]:
    """One ICMP echo exchange from the calling thread's namespace: a request every ``every`` s
    until a reply (a first request may be lost while the neighbour is resolved) or the timeout."""
    v6 = ":" in address
    ident = next(_ICMP_IDENT) & 0xFFFF
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                         socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    with sock:
        deadline = time.monotonic() + timeout
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            head = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, seq)
            payload = b"tabby-lab"
            packet = head + payload if v6 else head[:2] + struct.pack("!H", _checksum(head + payload)) + head[4:] + \
                payload  # the kernel sums ICMPv6 itself
            try:
                sock.sendto(packet, (address, 0))
            except OSError as e:
                return False, f"ping {address}: {e.strerror}"
            wait_until = min(deadline, time.monotonic() + every)
            while (left := wait_until - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, src = sock.recvfrom(2048)
                except TimeoutError:
                    break
                body = data if v6 else data[(data[0] & 0x0F) * 4:]
                if len(body) >= 8 and body[0] == (129 if v6 else 0) and src[0] == address and \
                        struct.unpack_from("!H", body, 4)[0] == ident:
                    return True, f"reply from {address} (request {seq})"
    return False, f"ping {address}: no reply in {timeout:.1f} s"


def tcp(address: str, port: int, timeout: float = 2.0) -> tuple[bool, str]:
    """Connect, read to the end: reached when the listener said something (its name)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            data = b""
            while len(data) < 4096 and (chunk := sock.recv(4096)):
                data += chunk
    except OSError as e:
        return False, f"tcp {address}:{port}: {e.strerror or e}"
    text = data.decode(errors="replace").strip()
    return bool(text), text or f"tcp {address}:{port}: connected, nothing said"


def resolve(name: str, server: str, rdtype: str = "AAAA", timeout: float = 3.0) -> tuple[bool, list[str] | str]:
    """Ask one resolver (UDP, from the calling thread's namespace) for name's records of rdtype:
    (True, the addresses) or (False, why). dnspython builds and parses the messages."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode

    try:
        answer = dns.query.udp(dns.message.make_query(name, rdtype), server, timeout=timeout)
    except (dns.exception.DNSException, OSError) as e:
        return False, f"{rdtype} {name} from {server}: {type(e).__name__}: {e}"
    if answer.rcode() != dns.rcode.NOERROR:
        return False, f"{rdtype} {name} from {server}: {dns.rcode.to_text(answer.rcode())}"
    return True, sorted(rd.address for rrset in answer.answer for rd in rrset if hasattr(rd, "address"))


def in_ns(ns: str, fn: Callable[[], T]) -> T:
    """fn() in a thread that entered the named namespace (/run/netns/NS)."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return in_netns(fd, fn)
    finally:
        os.close(fd)
