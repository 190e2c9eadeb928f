"""BIRD 2 configuration for one host, as a pure function of the fabric's resources.

What a host tells its peers: its affine IPAM blocks as aggregates (each with a blackhole in the
local kernel, so an unassigned address in the block goes nowhere else), plus single /128 and /32
routes of local workloads whose address lies outside its own blocks (borrowed, or written
without IPAM). Never a default route, never anything outside tabby's pools, and never a route it
learned over BGP (except a route reflector reflecting to its clients).

Sessions: one per peer and address family (IPv6 between IPv6 fabric addresses, IPv4 between
IPv4 ones), so an IPv6-only fabric has no IPv4 at all. Topology: full iBGP mesh; or, when some
hosts carry a route-reflector cluster id, reflectors peer with everyone (others as clients) and
other hosts only with reflectors; plus BGPPeer resources (global or for one host).
Timers: a short connect delay (a trial here: default ~4.7 s to establish, ``connect delay time
1`` ~0.85 s) and graceful restart, so a bird restart keeps the peers' routes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tabby.dataplane.netlink import TABBY_PROTO
from tabby.model.resources import BFD_DEFAULT_MS, BFD_DEFAULT_MULT, check_password


@dataclass(frozen=True)
class BirdInputs:
    host: Any  # this Host
    hosts: tuple[Any, ...]  # every Host, this one included
    peers: tuple[Any, ...] = ()  # BGPPeer resources
    pools: tuple[Any, ...] = ()  # IPPools
    blocks: tuple[str, ...] = ()  # this host's affine blocks
    mesh: bool = True
    default_asn: int = 64512  # for Hosts that name no AS of their own (Config default_asn)
    mesh_bfd: bool = False  # BFD on mesh and reflector sessions (Config mesh_bfd)
    mesh_password: str | None = None  # the mesh's password source (``password_key``)
    # password source (a file's path, or "secret:<name>") -> its password, as the agent read it or
    # Config bgp_secrets has it (checked with check_password); a source named by a session but
    # missing here could not be read: that session is rendered disabled
    passwords: Mapping[str, str] = field(default_factory=dict)


def _ident(text: str) -> str:
    """A BIRD protocol name: letters, digits, underscores; a hash keeps distinct names distinct.
    64 bits of it: with 24, two of ~4,300 hosts named alike past the cut collided ("already
    defined": the config refused). 47 characters at most: BIRD's longest ``dynamic name`` is 48
    with its "_" (tried with bird -p)."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", text)[:30]
    return f"{base}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _set(prefixes: list[str], family: int) -> str:
    if not prefixes:
        return "[ ::/128 ]" if family == 6 else "[ 0.0.0.0/32 ]"  # BIRD has no empty prefix set
    return "[ " + ", ".join(prefixes) + " ]"


def password_key(password_file: str | None, password_secret: str | None) -> str | None:
    """Where a session's password comes from: a file's (absolute) path, or "secret:<name>"."""
    return password_file if password_file is not None else (
        None if password_secret is None else f"secret:{password_secret}")


def _peers_here(inp: BirdInputs) -> list[Any]:
    me = inp.host.metadata.name
    return [p for p in sorted(inp.peers, key=lambda x: x.metadata.name) if p.spec.host in (None, me)]


def _peer_family(ps: Any) -> int:
    return 6 if ps.peer_ip is None else ps.peer_ip.version


def families(inp: BirdInputs) -> list[int]:
    """The address families this host routes: those of its fabric addresses, IPv6 when any session
    runs over IPv6 link-local (an unnumbered uplink), and IPv4 when an IPv6 session carries IPv4
    (extended next hop) and there is an IPv4 pool: a host with no IPv4 anywhere still routes IPv4
    workloads then."""
    spec = inp.host.spec
    fams = {f for f, addr in ((6, spec.ipv6_address), (4, spec.ipv4_address)) if addr is not None}
    peers = _peers_here(inp)
    for p in peers:  # a link-local session speaks from the link's own address, whatever the host has
        if p.spec.peer_ip is None or p.spec.peer_ip.is_link_local:
            fams.add(_peer_family(p.spec))
    if any(p.spec.extended_next_hop for p in peers) and any(p.spec.cidr.version == 4 for p in inp.pools):
        fams.add(4)
    return [f for f in (6, 4) if f in fams]


def _quote(text: str) -> str:
    """A BIRD string literal; only text already checked to hold no quote or backslash gets here."""
    if '"' in text or "\\" in text or "\n" in text:
        raise ValueError("refusing to quote text with a quote, backslash or newline into BIRD's config")
    return f'"{text}"'


def render(inp: BirdInputs) -> str:
    """The BGP speaker's config (BFD is the liveness BIRD's: ``render_bfd``)."""
    return _render(inp)[0]


def bfd_targets(inp: BirdInputs) -> dict[str, tuple[str, ...]]:
    """BFD peer ("addr" or "fe80::..%iface") -> the BGP protocols to disable while BFD says it is down."""
    return _render(inp)[1]


def password_sessions(inp: BirdInputs) -> frozenset[str]:
    """Names of the BGP protocols that carry a TCP MD5 password (a dynamic one's instances are
    named after it: ``<name>_1``...), so that a status can say why one of them stays down."""
    return _render(inp)[2]


def render_bfd(inp: BirdInputs) -> str | None:
    """The liveness BIRD: BFD only, beside the BGP speaker, so that BFD follows the host (its kernel,
    its links) and not the BGP speaker's process. Why apart: BIRD's own BFD dies with BIRD, so a
    BIRD restart alone (which graceful restart covers) became a withdrawal at every peer; with
    BFD here, a killed BGP speaker leaves BFD up and graceful restart works, while a dead host or
    link stops both. A BFD session exists only on request: each target is a static BFD neighbor
    (nothing is routed). None when no session asks for BFD."""
    targets = bfd_targets(inp)
    if not targets:
        return None
    timers = (f"min rx interval {BFD_DEFAULT_MS} ms; min tx interval {BFD_DEFAULT_MS} ms; "
              f"multiplier {BFD_DEFAULT_MULT};")
    out = [f"# Generated by tabby for host {inp.host.metadata.name}: BFD only (see bird_config.render_bfd).",
           f"router id {inp.host.effective_router_id()};", "log stderr all;", "",
           "protocol device { scan time 10; }", "",
           "protocol bfd {", f"  interface \"*\" {{ {timers} }};"]
    for t in sorted(targets):
        addr, _, iface = t.partition("%")
        # the interface quoted: as a bare symbol after '%', BIRD refused "eth0.100", "1up" and keywords
        out.append(f"  neighbor {addr} dev {_quote(iface)};" if iface else f"  neighbor {addr};")
    out.append("}")
    return "\n".join(out) + "\n"


def _render(inp: BirdInputs) -> tuple[str, dict[str, tuple[str, ...]], frozenset[str]]:
    targets: dict[str, list[str]] = {}
    with_password: set[str] = set()
    h = inp.host
    me = h.metadata.name
    spec = h.spec
    fams = families(inp)
    pools = {6: [], 4: []}  # type: dict[int, list[str]]
    for p in inp.pools:
        pools[p.spec.cidr.version].append(f"{p.spec.cidr}+")
    blocks = {6: [], 4: []}  # type: dict[int, list[str]]
    for b in sorted(inp.blocks):
        blocks[ipaddress.ip_network(b).version].append(b)
    is_rr = spec.route_reflector_cluster_id is not None
    reflectors = [x for x in inp.hosts if x.spec.route_reflector_cluster_id is not None]
    peers = [p for p in _peers_here(inp) if _peer_family(p.spec) in fams]

    out = [f"# Generated by tabby for host {me}. Do not edit: the agent rewrites it.",
           f"router id {h.effective_router_id()};",
           "log stderr all;",
           "timeformat protocol iso long;",
           "",
           "protocol device { scan time 10; }",
           ""]
    for f in fams:
        t = f"v{f}"
        out += [f"define POOLS{f} = {_set(pools[f], f)};",
                f"define BLOCKS{f} = {_set([f'{b}+' for b in blocks[f]], f)};",
                "",
                f"filter kernel_in{f} {{ if net ~ POOLS{f} && krt_source = {TABBY_PROTO} then accept; reject; }}",
                # BGP routes got past an import filter already: from hosts only pool prefixes, from external
                # peers anything but them
                f"filter kernel_out{f} {{ if source = RTS_BGP || proto = \"blocks{f}\" then accept; reject; }}",
                f"filter bgp_in{f} {{ if net ~ POOLS{f} && net.len > 0 then accept; reject; }}",
                # an external peer (a top-of-rack router) may give a default and outside prefixes, never
                # a route into tabby's own pools
                f"filter ext_in{f} {{ if net ~ POOLS{f} then reject; accept; }}",
                # a fabric peer (a ToR between hosts) also brings the other hosts' routes: anything but
                # this host's own blocks (a default, outside prefixes, other hosts' pool prefixes)
                f"filter fabric_in{f} {{ if net ~ BLOCKS{f} then reject; accept; }}",
                # what this host originates: its blocks, and local workload routes outside them
                f"filter bgp_out{f} {{ if net ~ POOLS{f} && (proto = \"blocks{f}\" || "
                f"(proto = \"kernel{f}\" && !(net ~ BLOCKS{f}))) then accept; reject; }}",
                f"filter rr_out{f} {{ if net ~ POOLS{f} && (proto = \"blocks{f}\" || "
                f"(proto = \"kernel{f}\" && !(net ~ BLOCKS{f})) || source = RTS_BGP) then accept; reject; }}",
                "",
                f"protocol kernel kernel{f} {{",
                f"  ip{t} {{ import filter kernel_in{f}; export filter kernel_out{f}; }};",
                "  learn; scan time 10; merge paths on; graceful restart;",
                "}",
                f"protocol static blocks{f} {{",
                f"  ip{t};"]
        out += [f"  route {b} blackhole;" for b in blocks[f]]
        out += ["}", ""]
    # error wait time: after a session error (a link that went down) BIRD waits 60 s before trying
    # again by default, and a ToR's dynamic session sits idle meanwhile: a fabric wants it back in 1 s
    out += ["template bgp tabby_peer {",
            "  hold time 9; keepalive time 3; connect retry time 1; connect delay time 1; error wait time 1, 10;",
            "  graceful restart on; graceful restart time 120;",
            "}", ""]

    def password(path: str | None) -> tuple[list[str], bool]:
        """The password line for a session, and whether the session can run (its file was read)."""
        if path is None:
            return [], True
        pw = inp.passwords.get(path)
        if pw is None:
            return [], False
        return [f"  password {_quote(check_password(pw, path))};"], True

    def session(name: str, local: Any, peer: Any, peer_as: int, family: int, *, rr_client: bool = False,
                export: str = "bgp_out", direct: bool = True, interface: str | None = None,
                imports: str = "bgp_in", bfd: bool = False, enh: bool = False, multihop: int | None = None,
                password_file: str | None = None) -> list[str]:
        pw, usable = password(password_file)
        if pw:
            with_password.add(_ident(name))
        lines = [f"protocol bgp {_ident(name)} from tabby_peer {{",
                 f"  description \"{name}\";"]
        if not usable:
            lines.append("  disabled;  # its password file could not be read: no session without its password")
        lines.append(f"  local {local} as {spec.asn or inp.default_asn};" if local is not None
                     else f"  local as {spec.asn or inp.default_asn};")
        if peer is None:  # unnumbered: whoever speaks BGP from a link-local address on that link
            lines += [f"  neighbor range fe80::/10 as {peer_as};",
                      f"  interface {_quote(str(interface))};",
                      f"  dynamic name \"{_ident(name)}_\";"]
        else:  # the interface quoted, not "%name": a bare symbol cannot be "eth0.100". An IPv6 link-local
            # peer always has one (the model); an IPv4 one (169.254/16) may not: the kernel's route picks
            lines.append(f"  neighbor {peer} as {peer_as};")
            if interface:
                lines.append(f"  interface {_quote(interface)};")
        if multihop is not None:
            lines.append(f"  multihop {int(multihop)};")
        elif direct:
            lines.append("  direct;")
        else:
            lines.append("  multihop;")
        if bfd and peer is not None:  # BFD is the liveness BIRD's: the agent disables this while it is down
            # a link-local peer scoped by its link when it names one (always in IPv6: fe80::/10 is on
            # every link; 169.254.0.1 on two uplinks was one BFD session, and one link down took
            # both sessions down), as bird.bfd_sessions keys them
            key = f"{peer}%{interface}" if peer.is_link_local and interface else str(peer)
            targets.setdefault(key, []).append(_ident(name))
        lines += pw
        if rr_client:
            lines.append(f"  rr client; rr cluster id {spec.route_reflector_cluster_id};")
        # a reflector passes its clients' next hops on unchanged (else every path bends through it);
        # everywhere else the next hop is this host's fabric address
        nh = "next hop self ebgp;" if export == "rr_out" else "next hop self;"
        gw = " gateway direct;" if direct and multihop is None else " gateway recursive;"
        chans = [family] + ([4] if enh and family == 6 and 4 in fams else [])
        for c in chans:
            lines.append(f"  ipv{c} {{ import filter {imports}{c}; export filter {export}{c}; {nh}{gw}"
                         + (" extended next hop on;" if c != family else "") + " };")
        lines.append("}")
        return lines

    for other in sorted(inp.hosts, key=lambda x: x.metadata.name):
        if other.metadata.name == me:
            continue
        if reflectors:
            other_rr = other.spec.route_reflector_cluster_id is not None
            if not (is_rr or other_rr):
                continue  # two clients: they hear each other through the reflectors
            # an iBGP client only: BIRD refuses the whole file for "rr client" on an eBGP
            # session (a host of another AS), and the reflector's clients then had no routes
            rr_client = is_rr and not other_rr and (other.spec.asn or inp.default_asn) == (spec.asn or inp.default_asn)
            export = "rr_out" if is_rr else "bgp_out"
        elif not inp.mesh:
            continue
        else:
            rr_client, export = False, "bgp_out"
        for f in fams:
            mine = spec.ipv6_address if f == 6 else spec.ipv4_address
            theirs = other.spec.ipv6_address if f == 6 else other.spec.ipv4_address
            if theirs is None or mine is None:
                continue
            out += session(f"host {other.metadata.name} v{f}", mine, theirs, other.spec.asn or inp.default_asn, f,
                           rr_client=rr_client, export=export, bfd=inp.mesh_bfd,
                           password_file=inp.mesh_password)
            out.append("")
    for peer in peers:
        ps = peer.spec
        f = _peer_family(ps)
        link_local = ps.peer_ip is None or ps.peer_ip.is_link_local
        mine = None if link_local else (spec.ipv6_address if f == 6 else spec.ipv4_address)
        if not link_local and mine is None:
            continue  # no address of that family to speak from
        out += session(f"peer {peer.metadata.name}", mine, ps.peer_ip, ps.asn, f, interface=ps.interface,
                       imports="fabric_in" if ps.fabric else "ext_in", bfd=ps.bfd, enh=ps.extended_next_hop,
                       multihop=ps.multihop, password_file=password_key(ps.password_file, ps.password_secret))
        out.append("")
    return "\n".join(out).rstrip() + "\n", {k: tuple(v) for k, v in targets.items()}, frozenset(with_password)
