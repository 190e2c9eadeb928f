"""The lab's topology as plain data, and its naming scheme, written down in one place.

    tbl-fab            the fabric: a bridge br0 joining every host (a top-of-rack switch)
    tbl-h<N>           host N: eth0 on the fabric, fd00:f::N/64 (and 10.255.0.N/24 unless IPv6-only);
                       runs the tabby agent and BIRD
    tbl-h<N>-c<M>      container M on host N, made by tabby-cni: eth0 with a /128 (and /32), default
                       route via the host end's link-local; the plugin names the host end tby<hash>
    tbl-h<N>-v<M>      VM M on host N: eth0 gets its address from its own DHCP client; tap<N>v<M>
    tbl-out            the outside router: fd00:f::fe on the fabric, fd00:99::1 (10.99.0.1) on lo
    tbl-t1, tbl-t2     with --tors 2 --unnumbered: the ToRs instead of the bridge and tbl-out (lab/tor.py)
Pools: fd00:e::/112 (IPv6, /122 blocks) and 10.65.0.0/16 (IPv4, /26 blocks, unless IPv6-only).
With --nat64: the IPv6 pool is a nat64 pool; hosts and the outside router have IPv4 on the fabric
even when the workloads are IPv6-only; the outside router serves the zone outside.example
(10.99.0.53) whose one name, v4only.outside.example, is an IPv4-only service (10.99.0.80:8064).
Every name starts with ``tbl`` so that ``tabby lab down`` can find leftovers after a crash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PREFIX = "tbl"  # the default; tests pass their own so that labs never collide
V6_FABRIC = "fd00:f::/64"
V4_FABRIC = "10.255.0.0/24"
V6_POOL = "fd00:e::/112"
V4_POOL = "10.65.0.0/16"
OUTSIDE_V6 = "fd00:99::1"  # "a destination outside the data center", on the outside router's loopback
OUTSIDE_V4 = "10.99.0.1"
OUTSIDE_FABRIC_V6 = "fd00:f::fe"
OUTSIDE_FABRIC_V4 = "10.255.0.254"
OUTSIDE_ASN = 65100
ETCD_V6 = "fd00:f::fd"  # the lab's etcd (with --store etcd), in its own namespace on the fabric
TCP_PORT = 8080  # every workload and the outside router answer TCP here, for the matrix
# --nat64. Why not the well-known prefix 64:ff9b::/96: RFC 6052 (3.1) forbids it for private IPv4,
# and tayga enforces that; the lab's outside world is 10.x (traffic stays inside the lab)
NAT64_PREFIX = "fd00:64::/96"
NAT64_POOL4 = "10.64.0.0/24"
DNS64_SERVER = "fd00:53::1"  # every host's resolver, on its loopback
OUTSIDE_DNS = "10.99.0.53"  # the outside router's name server (the zone below)
OUTSIDE_ZONE = "outside.example"
OUTSIDE_NAME = "v4only.outside.example"
OUTSIDE_SERVICE_V4 = "10.99.0.80"  # an IPv4-only service: answers with the address it saw the client from
NAT64_PORT = 8064

_PREFIX_RULE = re.compile(r"[a-z][a-z0-9]{2,7}")
# Prefixes other software gives its network namespaces ("<prefix>-<id>"), which `tabby lab down`
# (it sweeps "<prefix>-*") would otherwise take for the lab's: CNI runtimes (containerd, CRI-O),
# podman, Neutron's L3/DHCP/metadata agents, OVN's metadata agent, and "ns" (ip netns examples).
FOREIGN_PREFIXES = frozenset({"cni", "netns", "qrouter", "qdhcp", "snat", "fip", "qlbaas", "ovnmeta", "ns"})


def check_prefix(prefix: str) -> str:
    """The lab prefix, or ValueError saying why it is refused. Every lab command checks it.

    Rule: 3..8 characters, lower-case letters and digits, starting with a letter, and not one of
    FOREIGN_PREFIXES. Why each part: the prefix becomes namespace names ("<prefix>-h1"), interface
    names ("<prefix>p1", within Linux's 15 characters) and a directory name under the lab roots, so
    nothing but [a-z0-9] (no "/", ".", "..", nothing empty); ``lab down`` removes every namespace
    named "<prefix>-*", so a prefix must be specific enough not to match what is not a lab's: at
    least 3 characters, and none that other software is known to use for its namespaces."""
    if not isinstance(prefix, str) or not _PREFIX_RULE.fullmatch(prefix):
        shown = repr(prefix)[:40]
        raise ValueError(f"lab prefix {shown}: 3..8 lower-case letters and digits, starting with a letter")
    if prefix in FOREIGN_PREFIXES:
        raise ValueError(f"lab prefix {prefix!r}: other software names its namespaces {prefix}-*; pick another")
    return prefix


@dataclass(frozen=True)
class LabHost:
    index: int
    ipv6_only: bool
    prefix: str = PREFIX
    nat64: bool = False  # IPv4 on the fabric for the translator, even when the workloads are IPv6-only

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def ns(self) -> str:
        return f"{self.prefix}-{self.name}"

    @property
    def v6(self) -> str:
        return f"fd00:f::{self.index}"

    @property
    def v4(self) -> str | None:
        return None if self.ipv6_only and not self.nat64 else f"10.255.0.{self.index}"

    @property
    def bridge_port(self) -> str:
        return f"{self.prefix}p{self.index}"


@dataclass(frozen=True)
class LabWorkload:
    host: LabHost
    index: int

    @property
    def name(self) -> str:
        return f"{self.host.name}-c{self.index}"

    @property
    def ns(self) -> str:
        return f"{self.host.prefix}-{self.name}"



@dataclass(frozen=True)
class LabVm:
    """A VM: a namespace whose eth0 gets its address only from a real DHCP client (dhclient or dhcpcd),
    configured by ``tabby guest render``; the host end of its veth plays the tap."""

    host: LabHost
    index: int
    client: str = "dhclient"
    tap_name: str | None = None  # given by an orchestrator (Neutron: "tap" + port id); else derived
    mac_address: str | None = None
    ipv4: bool | None = None  # does the guest ask for IPv4 too; None: unless the lab is IPv6-only

    @property
    def name(self) -> str:
        return f"{self.host.name}-v{self.index}"

    @property
    def ns(self) -> str:
        return f"{self.host.prefix}-{self.name}"

    @property
    def tap(self) -> str:
        return self.tap_name or f"tap{self.host.index}v{self.index}"

    @property
    def mac(self) -> str:
        return self.mac_address or f"52:54:00:00:{self.host.index:02x}:{self.index:02x}"

    @property
    def handle(self) -> str:
        return f"lab.{self.name}"


@dataclass(frozen=True)
class Topology:
    hosts: tuple[LabHost, ...]
    workloads: tuple[LabWorkload, ...]
    ipv6_only: bool = False
    prefix: str = PREFIX
    route_reflectors: tuple[int, ...] = ()  # host indexes that reflect; empty: full mesh
    vms: tuple[LabVm, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)
    tors: int = 0  # 2: a routed fabric, every host on two ToRs over link-local only (lab/tor.py)
    nat64: bool = False  # the IPv6 pool is a nat64 pool; the outside offers an IPv4-only named service

    @property
    def fabric_v4(self) -> bool:
        """IPv4 between hosts and the outside router (workloads may still be IPv6-only)."""
        return not self.ipv6_only or self.nat64

    @property
    def nat64_blocked(self) -> str | None:
        """The workload whose egress to the NAT64 prefix the lab's policy denies (shown blocked):
        the last container, else the last VM; None without NAT64 or with fewer than two."""
        if not self.nat64:
            return None
        members = [w.name for w in self.workloads] or [v.name for v in self.vms]
        return members[-1] if len(members) >= 2 else None

    @property
    def fabric_ns(self) -> str:
        return f"{self.prefix}-fab"

    @property
    def blocked_pair(self) -> tuple[str, str] | None:
        """(source, destination) that the lab's policy blocks, to show that policy is enforced:
        the first container of host 1 may not open anything to the first container of the last host
        (the reverse direction stays open). None when there are not two containers to pick."""
        if len(self.workloads) < 2:
            return None
        src = self.workloads[0]
        remote = [w for w in self.workloads if w.host != src.host]
        dst = next(w for w in remote if w.host == remote[-1].host) if remote else self.workloads[1]
        return src.name, dst.name

    @property
    def outside_ns(self) -> str:
        return f"{self.prefix}-t2" if self.tors else f"{self.prefix}-out"  # ToR 2 plays it (lab/tor.py)

    @property
    def etcd_ns(self) -> str:
        return f"{self.prefix}-etcd"


def topology(hosts: int, containers: int, ipv6_only: bool = False, prefix: str = PREFIX,
             route_reflectors: tuple[int, ...] = (), vms: int = 0, tors: int = 0, nat64: bool = False) -> Topology:
    if not 1 <= hosts <= 200:
        raise ValueError("--hosts must be 1..200")
    if not 0 <= containers <= 50:
        raise ValueError("--containers must be 0..50 per host")
    check_prefix(prefix)
    hs = tuple(LabHost(i, ipv6_only, prefix, nat64) for i in range(1, hosts + 1))
    ws = tuple(LabWorkload(h, j) for h in hs for j in range(1, containers + 1))
    if any(not 1 <= i <= hosts for i in route_reflectors):
        raise ValueError("route reflectors must be host indexes 1..hosts")
    if not 0 <= vms <= 20:
        raise ValueError("--vms must be 0..20 per host")
    # VMs alternate between the two DHCP clients the seed's images use
    vs = tuple(LabVm(h, j, "dhclient" if j % 2 else "dhcpcd") for h in hs for j in range(1, vms + 1))
    if tors not in (0, 2):
        raise ValueError("--tors must be 2 (a GoBGP and a BIRD top-of-rack router), or none")
    if tors and route_reflectors:
        raise ValueError("--tors: hosts peer with the ToRs only; no route reflector")
    if nat64 and tors:
        raise ValueError("--nat64 with --tors is not built (the NAT64 lab has the bridge and the outside router)")
    return Topology(hs, ws, ipv6_only, prefix, tuple(route_reflectors), vs, tors=tors, nat64=nat64)
