"""The lab's GoBGP top-of-rack router: its gobgpd config, and the forwarding table gobgpd lacks.

gobgpd (Debian 3.10) keeps a RIB but programs no kernel routes by itself (that needs zebra from
FRR, not installed here), so the ToR namespace runs ``python -m tabby.lab.gobgp`` beside it: every
``POLL_S`` it reads gobgpd's best paths (``gobgp -j global rib``) and neighbours, and makes the
namespace's kernel routes of protocol ``FIB_PROTO`` match them (replace what changed, delete what
is gone). The calculation (``fib``) is pure; ``run`` is the loop. Facts learnt here about 3.10:
unnumbered peering (``neighbor-interface``) and extended next hop work; an unnumbered neighbour
whose link-local is not yet in the kernel's neighbour table at start makes gobgpd exit ("no ipv6
link-local neighbor found"), so the lab fills the table first; it has no BFD.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tabby.model.names import check_interface_name

FIB_PROTO = 200  # kernel route protocol of the routes this syncer owns (none else uses 200 here)
POLL_S = 0.5  # how stale the ToR's forwarding may be after gobgpd changed its mind
API = ("-u", "127.0.0.1", "-p", "50051")  # gobgpd's API, on the ToR namespace's own loopback


def render(asn: int, router_id: str, downlinks: Sequence[str], hold_s: int = 9) -> str:
    """gobgpd's TOML: one unnumbered neighbour per downlink, both families (IPv4 with IPv6 next
    hops), graceful-restart helper (a host's BIRD restart keeps its routes), short timers."""
    ipaddress.IPv4Address(router_id)
    lines = ["[global.config]", f"  as = {int(asn)}", f'  router-id = "{router_id}"', "  port = 179", ""]
    for d in downlinks:
        check_interface_name(d)
        lines += ["[[neighbors]]",
                  "  [neighbors.config]", f'    neighbor-interface = "{d}"',
                  "  [neighbors.timers.config]", "    connect-retry = 1", f"    hold-time = {int(hold_s)}",
                  f"    keepalive-interval = {max(1, int(hold_s) // 3)}",
                  "  [neighbors.graceful-restart.config]", "    enabled = true"]
        for fam in ("ipv6-unicast", "ipv4-unicast"):
            lines += ["  [[neighbors.afi-safis]]", "    [neighbors.afi-safis.config]",
                      f'      afi-safi-name = "{fam}"',
                      "    [neighbors.afi-safis.mp-graceful-restart.config]", "      enabled = true"]
        lines.append("")
    return "\n".join(lines)


def neighbour_links(neighbours: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """link-local address of each established neighbour -> its interface (from ``gobgp -j neighbor``)."""
    out = {}
    for n in neighbours:
        addr = str(n.get("state", {}).get("neighbor_address", ""))
        ip, _, dev = addr.partition("%")
        if dev and n.get("state", {}).get("session_state") == 6:  # 6: established
            out[str(ipaddress.IPv6Address(ip))] = check_interface_name(dev)
    return out


def fib(rib: Mapping[str, Sequence[Mapping[str, Any]]], links: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """prefix -> (next hop, interface) of each best path learnt from a neighbour on a link. The next
    hop is the neighbour's link-local (what gobgpd shows as "::" is the empty global next hop of an
    unnumbered session)."""
    out = {}
    for prefix, paths in rib.items():
        net = ipaddress.ip_network(prefix)
        for p in paths:
            src = str(p.get("neighbor-ip", ""))
            if p.get("best") and src in links:
                out[str(net)] = (src, links[src])
                break
    return out


def _gobgp(*args: str) -> Any:
    r = subprocess.run(["gobgp", *API, "-j", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"gobgp {' '.join(args)}: {r.stderr.strip()[:200]}")
    return json.loads(r.stdout or "null") or {}


def _kernel() -> dict[str, tuple[str, str]]:
    have = {}
    for fam in ("-6", "-4"):
        r = subprocess.run(["ip", "-j", fam, "route", "show", "proto", str(FIB_PROTO)], capture_output=True, text=True)
        for route in json.loads(r.stdout or "[]"):
            via = route.get("gateway") or route.get("via", {}).get("host", "")
            have[str(ipaddress.ip_network(route["dst"]))] = (via, route.get("dev", ""))
    return have


def sync_once() -> list[str]:
    """One round: read gobgpd, correct the kernel. Returns the changes made (``ip`` commands), each
    with the error ``ip`` gave, if any."""
    links = neighbour_links(_gobgp("neighbor"))
    want: dict[str, tuple[str, str]] = {}
    for fam in ("ipv6", "ipv4"):
        want.update(fib(_gobgp("global", "rib", "-a", fam), links))
    have = _kernel()
    script = []
    for prefix, (via, dev) in sorted(want.items()):
        if have.get(prefix) != (via, dev):
            fam = "-6" if ":" in prefix else "-4"
            script.append(f"{fam} route replace {prefix} via inet6 {via} dev {dev} proto {FIB_PROTO}")
    for prefix in sorted(set(have) - set(want)):
        fam = "-6" if ":" in prefix else "-4"
        script.append(f"{fam} route del {prefix} proto {FIB_PROTO}")
    done = []
    for line in script:  # every word is a checked address, prefix, interface name or constant
        r = subprocess.run(["ip", *line.split()], capture_output=True, text=True)
        done.append(line + (f" (failed: {r.stderr.strip()[:200]})" if r.returncode else ""))
    return done


def run(poll_s: float = POLL_S) -> None:
    """Forever (the lab ends it with its namespace): keep the kernel in line with gobgpd."""
    while True:
        try:
            for line in sync_once():  # every change, so that a gap in the ToR's forwarding can be traced
                print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            print(f"{time.strftime('%H:%M:%S')} {e}", flush=True)
        time.sleep(poll_s)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="program gobgpd's best paths into this namespace's kernel")
    ap.add_argument("--poll", type=float, default=POLL_S)
    run(ap.parse_args().poll)
