"""Pure: the lab's outside router's BIRD config (eBGP to every host, its loopback announced).

The hosts' own configs come from ``tabby.dataplane.bird_config``; this router is not a tabby
host (no pools, no blocks, an AS of its own), so it gets this small renderer, in one place and
tested, instead of strings built inside the lab's set-up code.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from tabby.model.resources import DEFAULT_ASN


@dataclass(frozen=True)
class Neighbour:
    index: int  # the host's number: protocol names h<index>v<family>
    v6: str
    v4: str | None


def render(router_id: str, asn: int, local_v6: str, local_v4: str | None, hosts: Sequence[Neighbour],
           host_asn: int = DEFAULT_ASN) -> str:
    """local_v4 None: an IPv6-only fabric (no IPv4 sessions at all)."""
    for addr in (router_id, local_v6, local_v4, *(a for h in hosts for a in (h.v6, h.v4))):
        if addr is not None and (ipaddress.ip_address(addr) is None or "%" in addr):
            raise ValueError(f"{addr!r}: a scoped address cannot be rendered")  # only plain addresses
    fams = [(6, local_v6)] + ([] if local_v4 is None else [(4, local_v4)])
    conf = [f"router id {router_id};", "protocol device {}"]
    for f, _ in fams:
        conf += [f'protocol direct lo{f} {{ ipv{f}; interface "lo"; }}',
                 f"protocol kernel k{f} {{ ipv{f} {{ import none; export where source = RTS_BGP; }}; }}"]
    for h in hosts:
        for f, local in fams:
            peer = h.v6 if f == 6 else h.v4
            if peer is None:
                continue
            conf.append(f"protocol bgp h{h.index}v{f} {{ local {local} as {int(asn)}; "
                        f"neighbor {peer} as {int(host_asn)}; connect delay time 1; "
                        f'ipv{f} {{ import all; export where proto = "lo{f}"; }}; }}')
    return "\n".join(conf) + "\n"
