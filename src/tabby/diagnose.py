"""``tabby diagnose SRC DST``: why one workload can or cannot reach another, step by step.

Each step reads one layer (the Store records, agent status, host liveness, IPAM, the kernel
routes on both hosts, the BGP session, the policy's verdict) and is green or red with what it saw; the first red step
is named. Kernel state is read through ``HostAccess`` (in the lab: ``ip`` inside the host's
namespace), so the steps themselves are plain functions of what they are given.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tabby.agent.policy_verdict import Packet, verdict
from tabby.client import ResourceClient
from tabby.ipam import IPAM
from tabby.model.keys import bgp_status_key, endpoint_status_key, host_status_key
from tabby.store import Store

RouteReader = Callable[[str, int], list[dict[str, Any]]]  # (host, family) -> `ip -j route` rows


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str


def lab_route_reader(prefix: str) -> RouteReader:
    """Routes of a lab's host namespaces. The prefix is checked like every lab command's
    (``topology.check_prefix``); a refused one makes each read fail with the reason (so
    ``diagnose`` names it in a failing step) and no namespace name is built from it."""
    from tabby.lab.topology import check_prefix

    try:
        check_prefix(prefix)
    except ValueError as e:
        reason = str(e)

        def refuse(host: str, family: int) -> list[dict[str, Any]]:
            raise RuntimeError(reason)

        return refuse

    def read(host: str, family: int) -> list[dict[str, Any]]:
        r = subprocess.run(["ip", "-n", f"{prefix}-{host}", "-j", f"-{family}", "route", "show"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.strip() or f"cannot read routes of host {host}")
        return json.loads(r.stdout or "[]")

    return read


def _covering(routes: list[dict[str, Any]], addr: str) -> dict[str, Any] | None:
    """The route the kernel would use for addr: longest prefix, then lowest metric (main table)."""
    ip = ipaddress.ip_address(addr)
    best: tuple[int, int, dict[str, Any]] | None = None
    for r in routes:
        dst = r["dst"]
        if dst == "default":
            net = ipaddress.ip_network("::/0" if ip.version == 6 else "0.0.0.0/0")
        else:
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/{ip.max_prefixlen}", strict=False)
        if ip in net:
            key = (net.prefixlen, -int(r.get("metric", 0)))
            if best is None or key > best[:2]:
                best = (*key, r)
    return best[2] if best else None


def _policy_steps(client: ResourceClient, s_ep: Any, d_ep: Any, tcp_port: int | None) -> list[Step]:
    """The policy's verdict on a ping (or a TCP connection to tcp_port), per family both endpoints have."""
    policies, profiles, endpoints = client.list("Policy")[0], client.list("Profile")[0], client.list("Endpoint")[0]
    steps = []
    for fam, s_addrs, d_addrs in ((6, s_ep.spec.ipv6_addresses, d_ep.spec.ipv6_addresses),
                                  (4, s_ep.spec.ipv4_addresses, d_ep.spec.ipv4_addresses)):
        if not s_addrs or not d_addrs:
            continue
        if tcp_port is not None:
            pkt, what = Packet(str(s_addrs[0].ip), str(d_addrs[0].ip), 6, dst_port=tcp_port), f"TCP {tcp_port}"
        else:
            pkt = Packet(str(s_addrs[0].ip), str(d_addrs[0].ip), 58 if fam == 6 else 1,
                         icmp_type=128 if fam == 6 else 8, icmp_code=0)
            what = "ping"
        v = verdict(s_ep, d_ep, pkt, policies, profiles, endpoints)
        steps.append(Step(f"policy verdict (IPv{fam} {what})", v.allowed, v.reason))
    return steps


def diagnose(store: Store, src: str, dst: str, routes: RouteReader | None, tcp_port: int | None = None
             ) -> list[Step]:
    steps: list[Step] = []
    client = ResourceClient(store)
    eps = {}
    for role, name in (("source", src), ("destination", dst)):
        try:
            ep = client.get("Endpoint", name)
        except ValueError as e:
            steps.append(Step(f"{role} endpoint record", False, f"{name}: corrupt: {e}"))
            return steps
        if ep is None:
            steps.append(Step(f"{role} endpoint record", False, f"no Endpoint named {name}"))
            return steps
        eps[role] = ep
        addrs = ", ".join(str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses))
        steps.append(Step(f"{role} endpoint record", True, f"{name} on {ep.spec.host} {ep.spec.interface}: {addrs}"))
    s_ep, d_ep = eps["source"], eps["destination"]
    now = time.time()
    for role, ep in (("source", s_ep), ("destination", d_ep)):
        kv = store.get(host_status_key(ep.spec.host))
        hb = json.loads(kv.value) if kv else None
        alive = hb is not None and hb.get("expires", 0) > now
        steps.append(Step(f"{role} host agent alive", alive,
                          f"{ep.spec.host}: " + ("heartbeat " + f"{now - hb['heartbeat']:.0f}s ago" if hb
                                                 else "no heartbeat record")))
        kv = store.get(endpoint_status_key(ep.spec.host, ep.metadata.name))
        st = json.loads(kv.value) if kv else None
        steps.append(Step(f"{role} endpoint programmed", bool(st and st.get("state") == "up"),
                          f"{st['state']}{': ' + st['reason'] if st.get('reason') else ''}" if st
                          else "no status from the agent"))
    ipam = IPAM(store)
    owners = {a.ip: h.handle for h in ipam.handles() for a in h.addresses}
    d_addrs = [str(a.ip) for a in (*d_ep.spec.ipv6_addresses, *d_ep.spec.ipv4_addresses)]
    unallocated = [a for a in d_addrs if a not in owners]
    steps.append(Step("destination addresses allocated (IPAM)", not unallocated,
                      "all allocated: " + ", ".join(f"{a} ({owners[a]})" for a in d_addrs) if not unallocated
                      else f"not allocated in IPAM: {', '.join(unallocated)} (written without IPAM, or leaked)"))
    if routes is None:
        steps.append(Step("kernel routes", True, "not checked: give --lab PREFIX to read the hosts' kernels"))
        return steps + _policy_steps(client, s_ep, d_ep, tcp_port)
    hosts = {h.metadata.name: h for h in client.list("Host")[0]}
    for a in d_addrs:
        fam = ipaddress.ip_address(a).version
        try:
            local = _covering(routes(d_ep.spec.host, fam), a)
        except RuntimeError as e:
            steps.append(Step(f"route to {a} on {d_ep.spec.host} (destination host)", False, str(e)))
            continue
        ok = local is not None and local.get("dev") == d_ep.spec.interface and local.get("protocol") in (77, "77")
        steps.append(Step(f"route to {a} on {d_ep.spec.host} (destination host)", ok,
                          f"{local}" if local else "no route"))
        if s_ep.spec.host == d_ep.spec.host:
            continue
        dh = hosts.get(d_ep.spec.host)
        via = str(dh.spec.ipv6_address if fam == 6 else dh.spec.ipv4_address) if dh else "?"
        kv = store.get(bgp_status_key(s_ep.spec.host))
        sessions = json.loads(kv.value).get("sessions", []) if kv else []
        up = [x for x in sessions if x.get("description") == f"host {d_ep.spec.host} v{fam}"
              and x.get("state") == "Established"]
        steps.append(Step(f"BGP {s_ep.spec.host} <-> {d_ep.spec.host} (IPv{fam})", bool(up) or not sessions,
                          "Established" if up else ("no session status" if not sessions else
                                                    "not Established (or a reflector carries the routes)")))
        try:
            remote = _covering(routes(s_ep.spec.host, fam), a)
        except RuntimeError as e:
            steps.append(Step(f"route to {a} on {s_ep.spec.host} (source host)", False, str(e)))
            continue
        ok = remote is not None and remote.get("gateway") == via
        steps.append(Step(f"route to {a} on {s_ep.spec.host} (source host)", ok,
                          (f"{remote['dst']} via {remote.get('gateway', remote.get('dev'))} "
                           f"({remote.get('protocol')})" if remote else "no route") +
                          ("" if ok else f"; expected via {d_ep.spec.host}'s fabric address {via}")))
    return steps + _policy_steps(client, s_ep, d_ep, tcp_port)
