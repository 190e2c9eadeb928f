"""Pure: what the agent derives from the fabric's records, apart from the loop that holds them.

``bird_inputs`` turns the Store's Hosts, pools, peers and block affinities into this host's BIRD
inputs; ``endpoint_status`` turns what the reconcilers know about one endpoint into the state
and reason its status record says. No I/O; the agent calls these with what it has folded in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from tabby.dataplane.bird_config import BirdInputs, password_key
from tabby.model import ConfigSpec
from tabby.model.resources import DEFAULT_ASN


def password_sources(inputs: BirdInputs) -> list[str]:
    """Every password source this host's sessions name (``password_key``)."""
    me = inputs.host.metadata.name
    keys = {password_key(p.spec.password_file, p.spec.password_secret) for p in inputs.peers
            if p.spec.host in (None, me)}
    keys.add(inputs.mesh_password)
    return sorted(k for k in keys if k is not None)


def password_files(inputs: BirdInputs) -> list[str]:
    """The password files among them (the agent reads them: I/O stays out of here)."""
    return [k for k in password_sources(inputs) if k.startswith("/")]


def missing_secrets(inputs: BirdInputs) -> list[str]:
    """Config secrets a session names that Config bgp_secrets does not have (its sessions are disabled)."""
    return [f"Config bgp_secrets has no {k.removeprefix('secret:')!r}; its sessions are disabled"
            for k in password_sources(inputs) if k.startswith("secret:") and k not in inputs.passwords]


def bird_inputs(host: str, records: Iterable[Any], refused: Mapping[str, str], config: ConfigSpec,
                passwords: Mapping[str, str] | None = None) -> BirdInputs | None:
    """None while this host has no Host record, or is refused for a conflict: no BGP then.
    passwords: password file -> password, as the agent read them (see ``password_files``); the
    Config's bgp_secrets are added here."""
    kinds: dict[str, list[Any]] = {}
    for r in records:
        kinds.setdefault(getattr(r, "kind", "Affinity"), []).append(r)
    hosts = [h for h in kinds.get("Host", []) if h.metadata.name not in refused]
    me = next((h for h in hosts if h.metadata.name == host), None)
    if me is None:
        return None
    pools = tuple(kinds.get("IPPool", []))
    # only blocks inside a pool: each becomes a blackhole and an announcement, and whoever can write
    # this host's affinities (its CNI plugin) must not blackhole or announce any prefix it likes
    nets = [p.spec.cidr for p in pools]
    blocks = tuple(a.cidr for a in kinds.get("Affinity", []) if a.host == host and a.state == "confirmed"
                   and any(_inside(a.cidr, n) for n in nets))
    return BirdInputs(host=me, hosts=tuple(hosts), peers=tuple(kinds.get("BGPPeer", [])),
                      pools=pools, blocks=blocks, mesh=bool(config.node_to_node_mesh),
                      default_asn=config.default_asn or DEFAULT_ASN, mesh_bfd=bool(config.mesh_bfd),
                      mesh_password=password_key(config.mesh_password_file, config.mesh_password_secret),
                      passwords={**(passwords or {}), **{f"secret:{k}": v.get_secret_value()
                                                         for k, v in (config.bgp_secrets or {}).items()}})


def host_links(host: str, records: Iterable[Any], addresses: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """This host's own links, sorted: lo, those holding its fabric addresses, and those its BGP
    peers are on (named by the BGPPeer, or the link whose subnet holds the peer's address);
    addresses: (link, "address/prefixlen") as the kernel has them. The policy never drops them as
    unknown workloads, so no Config prefix can cut a host off the Store or its peers. (A multihop
    peer's link is not found this way: its Host address or an ``interface`` names it.)"""
    mine = {"lo"}
    fabric: set[str] = set()
    peers: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for r in records:
        kind = getattr(r, "kind", None)
        if kind == "Host" and r.metadata.name == host:
            fabric |= {str(a) for a in (r.spec.ipv6_address, r.spec.ipv4_address) if a is not None}
        elif kind == "BGPPeer" and r.spec.host in (None, host):
            if r.spec.interface is not None:
                mine.add(r.spec.interface)
            elif r.spec.peer_ip is not None:
                peers.append(ipaddress.ip_address(r.spec.peer_ip))
    for link, text in addresses:
        held = ipaddress.ip_interface(text)
        if str(held.ip) in fabric or any(p.version == held.version and p in held.network for p in peers):
            mine.add(link)
    return tuple(sorted(mine))


def _inside(block: str, pool: ipaddress.IPv6Network | ipaddress.IPv4Network) -> bool:
    net = ipaddress.ip_network(block)
    return net.version == pool.version and net.subnet_of(pool)  # type: ignore[arg-type]


def endpoint_status(*, conflict: str | None, interface: str, present: bool, policy_error: str | None,
                    policy_covers: bool, failures: list[str], corrupt: str | None, pending: bool,
                    link_down: bool = False) -> tuple[str, str]:
    """(state, reason): conflict > down (no interface, set down, or waiting for policy) > error >
    down (programming) > up. link_down: the interface is administratively down (the kernel has
    dropped its IPv4 routes; they are put back when it comes up)."""
    if conflict:
        return "conflict", conflict
    if not present:
        return "down", f"interface {interface} not present"
    if link_down:
        return "down", f"interface {interface} is down"
    if policy_error and not policy_covers:
        return "down", f"waiting for policy (no route until it is in the kernel): {policy_error}"
    reasons = list(failures)
    if corrupt:
        reasons.append(f"newest record is corrupt, last good version kept: {corrupt}")
    if policy_error:
        reasons.append(f"policy not programmed: {policy_error}")
    if reasons:
        return "error", "; ".join(reasons)
    if pending:
        return "down", "programming"
    return "up", ""


def bfd_actions(targets: Mapping[str, tuple[str, ...]], states: Mapping[str, str], was_up: set[str],
                disabled: set[str]) -> tuple[set[str], set[str]]:
    """(protocols to disable, protocols to enable) for BFD's current view, and updates was_up.

    A session is disabled (its routes withdrawn at once) when BFD to its peer has been Up and is not
    any more; enabled again when BFD is back Up. A BFD session that never came up (the peer runs no
    BFD, or not yet) disables nothing: BFD can only take away what it once vouched for."""
    want_off: set[str] = set()
    for peer, protos in targets.items():
        state = states.get(peer)
        if state == "Up":
            was_up.add(peer)
        elif peer in was_up:
            want_off.update(protos)
    for gone in set(was_up) - set(targets):
        was_up.discard(gone)
    return want_off - disabled, disabled - want_off


def password_why(sessions: list[dict[str, Any]], with_password: frozenset[str], md5_rising: bool) -> None:
    """Add a "why" to each session that carries a TCP MD5 password and is not Established: a wrong
    or missing password is never answered, so BIRD itself shows only a session that does not come
    up. md5_rising: the kernel's MD5 drop counters went up since the last look."""
    for s in sessions:
        name = str(s.get("name", ""))
        base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
        if (name in with_password or base in with_password) and s.get("state") != "Established":
            s["why"] = ("TCP MD5: the kernel drops this host's segments for a wrong signature: the password "
                        "differs from the peer's" if md5_rising else
                        "TCP MD5 password set: a peer with another password, or none, never answers")

