"""IPAM against the Endpoints that use its addresses: pure, records in, findings out.

``cross_check`` is what ``tabby ipam check`` adds to the consistency of IPAM's own records:

- ``free-in-use``: an Endpoint holds an address that lies inside a block but is not allocated there
  (free, or reserved): the next assignment may hand it to a second workload.
- ``two-endpoints``: two Endpoints hold one address (routing would follow whichever the agent
  saw last; the agent refuses the later one, but the conflict is real).
- ``orphan-handle``: a handle whose Endpoint is gone: it names an Endpoint that does not exist,
  or no Endpoint holds any of its addresses. Reported only once the handle is older than the
  grace period (a CNI ADD writes its Endpoint after it assigned), a handle without ``created``
  (written before the field existed) counting as old. This is wider than the leak collector's
  rule (it keeps a handle while any of its addresses is in use): check reports, gc frees.

Only records that decoded are given here. What is unknown stays unreported: an address in a block
whose record is corrupt is not "free", and a handle that names a corrupt Endpoint record
(``unknown_endpoints``) is not an orphan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from tabby.model import Endpoint
from tabby.model.ipam import Block, Handle, IPNetwork


@dataclass(frozen=True)
class Finding:
    kind: str  # "free-in-use" | "two-endpoints" | "orphan-handle"
    message: str
    addresses: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    handles: tuple[str, ...] = ()


def _addresses(ep: Endpoint) -> list[str]:
    return [str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses)]


def cross_check(blocks: Iterable[Block], handles: Iterable[Handle], endpoints: Iterable[Endpoint], *,
                now: float, grace_s: float, unknown_endpoints: Collection[str] = ()) -> list[Finding]:
    """Findings, in a stable order: free-in-use, then two-endpoints, then orphan-handle."""
    blocks = list(blocks)
    endpoints = sorted(endpoints, key=lambda e: e.metadata.name)
    users: dict[str, list[str]] = {}  # address -> the Endpoints that hold it
    for ep in endpoints:
        for a in _addresses(ep):
            users.setdefault(a, []).append(ep.metadata.name)

    # the blocks by network, and the prefix lengths in use, to find an address's blocks directly
    by_net: dict[IPNetwork, list[Block]] = {}
    lengths: dict[int, set[int]] = {4: set(), 6: set()}
    for b in blocks:
        by_net.setdefault(b.network, []).append(b)
        lengths[b.network.version].add(b.network.prefixlen)

    out: list[Finding] = []
    for a, names in sorted(users.items(), key=lambda kv: ipaddress.ip_address(kv[0]).packed):
        ip = ipaddress.ip_address(a)
        inside = [b for n in sorted(lengths[ip.version])
                  for b in by_net.get(ipaddress.ip_network((ip, n), strict=False), ())]
        ordinals = [(b, int(ip) - int(b.network.network_address)) for b in inside]
        if inside and not any(o in b.allocations for b, o in ordinals):
            state = "reserved" if any(o in b.reserved for b, o in ordinals) else "free"
            where = ", ".join(b.cidr for b in inside)
            out.append(Finding("free-in-use", f"{a} is on Endpoint {', '.join(names)} but {state} in block {where}",
                               (a,), tuple(names)))
    for a, names in sorted(users.items(), key=lambda kv: ipaddress.ip_address(kv[0]).packed):
        if len(names) > 1:
            out.append(Finding("two-endpoints", f"{a} is on {len(names)} Endpoints: {', '.join(names)}",
                               (a,), tuple(names)))

    names_known = {ep.metadata.name for ep in endpoints}
    for h in sorted(handles, key=lambda h: h.handle):
        if h.created is not None and now - h.created < grace_s:
            continue
        ips = tuple(a.ip for a in h.addresses)
        age = "no creation time" if h.created is None else f"{now - h.created:.0f}s old"
        if h.endpoint is not None and h.endpoint in unknown_endpoints:
            continue
        if h.endpoint is not None and h.endpoint not in names_known:
            out.append(Finding("orphan-handle", f"handle {h.handle} ({', '.join(ips) or 'no addresses'}; {age}) "
                               f"names Endpoint {h.endpoint}, which does not exist", ips, (h.endpoint,), (h.handle,)))
        elif not any(ip in users for ip in ips):
            out.append(Finding("orphan-handle", f"handle {h.handle} ({age}): no Endpoint holds any of its addresses "
                               f"({', '.join(ips) or 'none'})", ips, (), (h.handle,)))
    return out
