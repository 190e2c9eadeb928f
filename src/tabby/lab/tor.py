"""The lab's routed fabric (``tabby lab up --tors 2 --unnumbered``): two top-of-rack routers, every
host dual-homed to both over point-to-point links that carry only IPv6 link-local addresses.

    <prefix>-t1      ToR 1: gobgpd (AS 65501) and the lab's FIB syncer (``lab.gobgp``); downlink d<N>
    <prefix>-t2      ToR 2: BIRD (AS 65502), fe80::2 on every downlink d<N>; it also plays the
                     outside router: fd00:99::1 (10.99.0.1) on its loopback, announced to the hosts
    host N           up1 to ToR 1, up2 to ToR 2 (link-local only); its fabric address fd00:f::N/128
                     on lo; AS 64600+N; no host mesh: hosts hear each other through the ToRs

The hosts' sessions are BGPPeer records, global (every host has the same uplink names): ``tor1``
unnumbered (no peer_ip: the host listens on up1 for any link-local speaker, gobgpd connects),
``tor2`` by link-local address (fe80::2 on up2, the host connects, BIRD listens with a dynamic
``neighbor range``), with BFD (GoBGP 3.10 has none). Both carry IPv4 with IPv6 next hops, so no
link has IPv4 at all. The BIRD config of ToR 2 is ``render_bird`` (pure).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tabby.lab import gobgp, netns
from tabby.lab.topology import OUTSIDE_V4, OUTSIDE_V6, V6_FABRIC, LabHost
from tabby.model import validate
from tabby.model.names import check_interface_name
from tabby.model.resources import BFD_DEFAULT_MS, BFD_DEFAULT_MULT

if TYPE_CHECKING:
    from tabby.lab.lab import Lab

TOR_ASNS = (65501, 65502)
TOR2_LL = "fe80::2"  # ToR 2's address on every downlink (a link-local is per link: one for all)
HOST_ASN_BASE = 64600  # host N is AS 64600+N: eBGP to the ToRs, and no AS-path loop between hosts
UPLINKS = ("up1", "up2")


def host_asn(h: LabHost) -> int:
    return HOST_ASN_BASE + h.index


def downlink(h: LabHost) -> str:
    return f"d{h.index}"


def tor_ns(prefix: str, i: int) -> str:
    return f"{prefix}-t{i}"


def render_bird(asn: int, hosts: Sequence[tuple[str, int]], v4: bool,
                loopbacks: Sequence[tuple[str, str, str]] = ()) -> str:
    """ToR 2's BIRD: per downlink a dynamic neighbour range (the host connects from its link-local),
    BFD, IPv4 over the IPv6 session, everything learnt passed on (it is the hosts' transit) plus its
    loopback (the outside addresses); routes into the kernel, ECMP merged. And a multihop listener
    on its loopback (fd00:99::1) for hosts' fabric addresses, which it reaches by the static routes
    in ``loopbacks`` (address, the host's link-local, downlink): a peer one hop away, for a BGPPeer
    with ``multihop``."""
    fams = [6, 4] if v4 else [6]
    conf = ["router id 10.255.255.2;", "log stderr all;", "protocol device { scan time 10; }"]
    for f in fams:
        conf += [f'protocol direct lo{f} {{ ipv{f}; interface "lo"; }}',
                 f"protocol kernel k{f} {{ ipv{f} {{ import none; export where source = RTS_BGP || "
                 f'proto = "loops{f}"; }}; merge paths on; }}']
    # via the host's link-local: a host answers neighbour solicitations only for addresses on the
    # interface they came in on, and its fabric address is on lo
    conf.append("protocol static loops6 { ipv6; " + " ".join(
        f"route {ipaddress.IPv6Address(a)}/128 via {ipaddress.IPv6Address(ll)}%{check_interface_name(d)};"
        for a, ll, d in loopbacks) + " }")
    conf.append(f"protocol bgp mh {{ local {OUTSIDE_V6} as {int(asn)}; neighbor range {V6_FABRIC} external; "
                'multihop 2; dynamic name "mh_"; hold time 9; keepalive time 3; error wait time 1, 10; '
                'ipv6 { import all; export where proto = "lo6"; next hop self; }; }')
    conf.append(f'protocol bfd {{ interface "d*" {{ min rx interval {BFD_DEFAULT_MS} ms; '
                f"min tx interval {BFD_DEFAULT_MS} ms; multiplier {BFD_DEFAULT_MULT}; }}; }}")
    for dev, peer_as in hosts:
        check_interface_name(dev)
        chans = []
        for f in fams:
            enh = " extended next hop on;" if f == 4 else ""
            chans.append(f'ipv{f} {{ import all; export where source = RTS_BGP || proto = "lo{f}"; '
                         f"next hop self;{enh} }};")
        conf.append(f"protocol bgp {dev} {{ local as {int(asn)}; neighbor range fe80::/10 as {int(peer_as)}; "
                    f'interface "{dev}"; dynamic name "{dev}_"; direct; bfd on; hold time 9; keepalive time 3; '
                    f"connect delay time 1; error wait time 1, 10; graceful restart on; {' '.join(chans)} }}")
    return "\n".join(conf) + "\n"


def _host_side(h: LabHost) -> None:
    """The host's namespace without a fabric bridge port: its fabric address on lo; no DAD (so the
    uplinks' link-locals are usable at once and gobgpd finds them)."""
    netns.add_netns(h.ns)
    netns.ip("link", "set", "lo", "up", ns=h.ns)
    netns.nsexec(h.ns, ["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"])
    netns.ip("addr", "add", f"{h.v6}/128", "dev", "lo", ns=h.ns)


def _tor_side(ns: str) -> None:
    netns.add_netns(ns)
    netns.ip("link", "set", "lo", "up", ns=ns)
    netns.nsexec(ns, ["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0",
                      "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1"])


def _links(lab: Lab, h: LabHost) -> None:
    """h's two uplinks, made in h's namespace with their peer ends moved into the ToRs at once."""
    for i, up in enumerate(UPLINKS, 1):
        tor = tor_ns(lab.topo.prefix, i)
        netns.ip("link", "add", up, "type", "veth", "peer", "name", downlink(h), "netns", tor, ns=h.ns)
        if i == 2:
            netns.ip("addr", "add", f"{TOR2_LL}/64", "dev", downlink(h), "nodad", ns=tor)
        netns.ip("link", "set", downlink(h), "up", ns=tor)
        netns.ip("link", "set", up, "up", ns=h.ns)


def hosts(lab: Lab, parallel: Any) -> None:
    """Both ToR namespaces, then every host with its uplinks (in parallel, as the bridge lab does)."""
    for i in (1, 2):
        _tor_side(tor_ns(lab.topo.prefix, i))

    def one(h: LabHost) -> None:
        _host_side(h)
        _links(lab, h)

    parallel(one, lab.topo.hosts)


def _learn_neighbours(ns: str, devs: Sequence[str]) -> None:
    """gobgpd reads each unnumbered neighbour's link-local from the kernel's neighbour table at start
    and exits if one is missing: an all-nodes ping per downlink fills it."""
    def one(dev: str) -> None:
        # a veth's carrier (and so its link-local) comes up a moment after both ends are up
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            netns.nsexec(ns, ["ping", "-6", "-c", "1", "-W", "1", f"ff02::1%{dev}"])
            if "fe80" in netns.ip("-6", "neigh", "show", "dev", dev, ns=ns):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{ns}: no link-local neighbour on {dev}")

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(one, devs))


def _link_local(ns: str, dev: str) -> str:
    addrs = json.loads(netns.ip("-j", "-6", "addr", "show", "dev", dev, "scope", "link", ns=ns))[0]["addr_info"]
    return str(addrs[0]["local"])


def routers(lab: Lab) -> None:
    """Start ToR 1 (gobgpd and its FIB syncer) and ToR 2 (BIRD, with the outside addresses)."""
    prefix, v4 = lab.topo.prefix, not lab.topo.ipv6_only
    devs = [downlink(h) for h in lab.topo.hosts]
    run = lab.run_dir / "tors"
    run.mkdir(parents=True, exist_ok=True)
    t1, t2 = tor_ns(prefix, 1), tor_ns(prefix, 2)
    (run / "gobgpd.toml").write_text(gobgp.render(TOR_ASNS[0], "10.255.255.1", devs))
    _learn_neighbours(t1, devs)
    netns.spawn(t1, ["gobgpd", "-f", str(run / "gobgpd.toml"), "--api-hosts", "127.0.0.1:50051",
                     "--pprof-disable", "-p"], lab.dir / "gobgpd.log")
    netns.spawn(t1, [sys.executable, "-m", "tabby.lab.gobgp"], lab.dir / "gobgp-fib.log")
    netns.ip("addr", "add", f"{OUTSIDE_V6}/128", "dev", "lo", ns=t2)
    if v4:
        netns.ip("addr", "add", f"{OUTSIDE_V4}/32", "dev", "lo", ns=t2)
    (run / "bird.conf").write_text(render_bird(TOR_ASNS[1], [(downlink(h), host_asn(h)) for h in lab.topo.hosts],
                                               v4, [(h.v6, _link_local(h.ns, UPLINKS[1]), downlink(h))
                                                    for h in lab.topo.hosts]))
    subprocess.run(["ip", "netns", "exec", t2, "bird", "-c", str(run / "bird.conf"), "-s", str(run / "bird.ctl"),
                    "-P", str(run / "bird.pid")], check=True, capture_output=True)
    lab._tcp_server(t2)  # it answers the matrix as the outside router


def resources(lab: Lab, apply: Any) -> None:
    """Host records (fabric address on lo, an AS each), no mesh, and the two ToRs as global peers."""
    for h in lab.topo.hosts:
        apply(validate({"kind": "Host", "metadata": {"name": h.name},
                        "spec": {"ipv6_address": h.v6, "asn": host_asn(h)}}))
    apply(validate({"kind": "Config", "metadata": {"name": "global"}, "spec": {"node_to_node_mesh": False}}))
    apply(validate({"kind": "BGPPeer", "metadata": {"name": "tor1"}, "spec": {
        "interface": UPLINKS[0], "asn": TOR_ASNS[0], "extended_next_hop": True, "fabric": True}}))
    apply(validate({"kind": "BGPPeer", "metadata": {"name": "tor2"}, "spec": {
        "peer_ip": TOR2_LL, "interface": UPLINKS[1], "asn": TOR_ASNS[1], "extended_next_hop": True,
        "fabric": True, "bfd": True}}))

