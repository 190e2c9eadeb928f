"""``tabby diagnose SRC DST``: why one workload can or cannot reach another, step by step.

Each step reads one layer (the Store records, agent status, host liveness, IPAM, the kernel
routes on both hosts, the BGP session, the policy's verdict) and is ``ok``, ``failed``, or
``not checked`` with the reason (never green for what it did not look at); the first failed step
is named. Kernel state is read through a ``RouteReader`` (in the lab: ``ip`` inside the host's
namespace), so the steps themselves are plain functions of what they are given. Every record
is decoded strictly: a corrupt one fails its step with its key and field, never a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tabby.agent.policy_verdict import Packet, verdict
from tabby.client import ResourceClient
from tabby.ipam import IPAM
from tabby.model.codec import InvalidResource
from tabby.model.keys import bgp_status_key, endpoint_status_key, host_status_key
from tabby.model.status import decode_status
from tabby.store import Store

RouteReader = Callable[[str, int], list[dict[str, Any]]]  # (host, family) -> `ip -j route` rows


@dataclass(frozen=True)
class Step:
    name: str
    state: Literal["ok", "failed", "not checked"]
    detail: str

    @property
    def ok(self) -> bool:
        return self.state == "ok"


# the first of Linux's ephemeral ports (net.ipv4.ip_local_port_range 32768-60999): a TCP connect's
# source port. Without one, every rule naming source ports read as not matching (a deny of
# "src_ports 1024:65535" was never seen, and diagnose said allowed where the kernel dropped)
EPHEMERAL_PORT = 32768


def _step(name: str, ok: bool, detail: str) -> Step:
    return Step(name, "ok" if ok else "failed", detail)


def _status(store: Store, key: str) -> tuple[Any | None, str]:
    """(record, "") or (None, why): absent, or corrupt with its key and field."""
    kv = store.get(key)
    if kv is None:
        return None, "no record"
    try:
        return decode_status(kv.key, kv.value), ""
    except InvalidResource as e:
        return None, f"corrupt record: {e}"


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
    """The policy's verdict on a ping (or a TCP connection to tcp_port), per family both endpoints have.
    A corrupt Policy or Profile fails the step: the agents run its last good version, which this
    cannot know (left out, a deny the kernel enforces read as allowed)."""
    (policies, bad_pol), (profiles, bad_prof) = client.list("Policy"), client.list("Profile")
    if bad_pol or bad_prof:
        bad = [key for key, _ in (*bad_pol, *bad_prof)]
        return [Step("policy verdict", "not checked", f"{len(bad)} corrupt Policy/Profile record(s), whose last "
                     f"good version the agents enforce: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")]
    endpoints = client.list("Endpoint")[0]
    steps = []
    for fam, s_addrs, d_addrs in ((6, s_ep.spec.ipv6_addresses, d_ep.spec.ipv6_addresses),
                                  (4, s_ep.spec.ipv4_addresses, d_ep.spec.ipv4_addresses)):
        if not s_addrs or not d_addrs:
            continue
        if tcp_port is not None:  # from a port a connection would have: rules may name source ports
            pkt = Packet(str(s_addrs[0].ip), str(d_addrs[0].ip), 6, dst_port=tcp_port, src_port=EPHEMERAL_PORT)
            what = f"TCP {tcp_port} from port {EPHEMERAL_PORT}"
        else:
            pkt = Packet(str(s_addrs[0].ip), str(d_addrs[0].ip), 58 if fam == 6 else 1,
                         icmp_type=128 if fam == 6 else 8, icmp_code=0)
            what = "ping"
        v = verdict(s_ep, d_ep, pkt, policies, profiles, endpoints)
        steps.append(_step(f"policy verdict (IPv{fam} {what})", v.allowed, v.reason))
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
            steps.append(_step(f"{role} endpoint record", False, f"{name}: corrupt: {e}"))
            return steps
        if ep is None:
            steps.append(_step(f"{role} endpoint record", False, f"no Endpoint named {name}"))
            return steps
        eps[role] = ep
        addrs = ", ".join(str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses))
        steps.append(_step(f"{role} endpoint record", True, f"{name} on {ep.spec.host} {ep.spec.interface}: {addrs}"))
    s_ep, d_ep = eps["source"], eps["destination"]
    now = time.time()
    alive_hosts: set[str] = set()
    for role, ep in (("source", s_ep), ("destination", d_ep)):
        hb, why = _status(store, host_status_key(ep.spec.host))
        alive = hb is not None and hb.alive(now)
        if alive:
            alive_hosts.add(ep.spec.host)
        seen = (f"heartbeat: {why}" if hb is None else "kept alive by a store lease" if hb.expires is None
                else f"heartbeat {now - hb.heartbeat:.0f}s ago")
        steps.append(_step(f"{role} host agent alive", alive, f"{ep.spec.host}: {seen}"))
        st, why = _status(store, endpoint_status_key(ep.spec.host, ep.metadata.name))
        name = f"{role} endpoint programmed"
        if ep.spec.host not in alive_hosts:
            steps.append(Step(name, "not checked", f"the agent of {ep.spec.host} is not alive: its status is stale"
                              + (f" (it said {st.state})" if st else "")))
        else:
            steps.append(_step(name, st is not None and st.state == "up",
                               f"{st.state}{': ' + st.reason if st.reason else ''}" if st
                               else f"no status from the agent ({why})"))
    ipam = IPAM(store)
    owners = {a.ip: h.handle for h in ipam.handles() for a in h.addresses}
    d_addrs = [str(a.ip) for a in (*d_ep.spec.ipv6_addresses, *d_ep.spec.ipv4_addresses)]
    unallocated = [a for a in d_addrs if a not in owners]
    steps.append(_step("destination addresses allocated (IPAM)", not unallocated,
                      "all allocated: " + ", ".join(f"{a} ({owners[a]})" for a in d_addrs) if not unallocated
                      else f"not allocated in IPAM: {', '.join(unallocated)} (written without IPAM, or leaked)"))
    if routes is None:
        steps.append(Step("kernel routes", "not checked", "give --lab PREFIX to read the hosts' kernels"))
        steps.append(Step("BGP sessions", "not checked", "judged with the kernel routes (--lab PREFIX)"))
        return steps + _policy_steps(client, s_ep, d_ep, tcp_port)
    hosts = {h.metadata.name: h for h in client.list("Host")[0]}
    for a in d_addrs:
        fam = ipaddress.ip_address(a).version
        try:
            local = _covering(routes(d_ep.spec.host, fam), a)
        except (RuntimeError, ValueError) as e:
            steps.append(Step(f"route to {a} on {d_ep.spec.host} (destination host)", "not checked",
                              f"cannot read its kernel: {e}"))
            continue
        ok = local is not None and local.get("dev") == d_ep.spec.interface and local.get("protocol") in (77, "77")
        steps.append(_step(f"route to {a} on {d_ep.spec.host} (destination host)", ok,
                           f"{local}" if local else "no route"))
        if s_ep.spec.host == d_ep.spec.host:
            continue
        dh = hosts.get(d_ep.spec.host)
        via = str(dh.spec.ipv6_address if fam == 6 else dh.spec.ipv4_address) if dh else "?"
        bgp, why = _status(store, bgp_status_key(s_ep.spec.host))
        name = f"BGP {s_ep.spec.host} <-> {d_ep.spec.host} (IPv{fam})"
        direct = [x for x in bgp.sessions if x.description == f"host {d_ep.spec.host} v{fam}"] if bgp else []
        if bgp is None:
            steps.append(Step(name, "not checked", f"no BGP status from {s_ep.spec.host}'s agent ({why})"))
        elif s_ep.spec.host not in alive_hosts:
            steps.append(Step(name, "not checked",
                              f"the agent of {s_ep.spec.host} is not alive: its BGP status is stale"))
        elif not direct:
            steps.append(Step(name, "not checked", "no direct session (a route reflector carries the routes): "
                              "judged by the source host's route below"))
        else:
            up = [x for x in direct if x.state == "Established"]
            steps.append(_step(name, bool(up), "Established" if up else f"not Established: {direct[0].state}"))
        try:
            remote = _covering(routes(s_ep.spec.host, fam), a)
        except (RuntimeError, ValueError) as e:
            steps.append(Step(f"route to {a} on {s_ep.spec.host} (source host)", "not checked",
                              f"cannot read its kernel: {e}"))
            continue
        ok = remote is not None and remote.get("gateway") == via
        steps.append(_step(f"route to {a} on {s_ep.spec.host} (source host)", ok,
                          (f"{remote['dst']} via {remote.get('gateway', remote.get('dev'))} "
                           f"({remote.get('protocol')})" if remote else "no route") +
                          ("" if ok else f"; expected via {d_ep.spec.host}'s fabric address {via}")))
    return steps + _policy_steps(client, s_ep, d_ep, tcp_port)
