"""The routed fabric (``lab up --tors 2 --unnumbered``): hosts on a GoBGP and a BIRD ToR over IPv6
link-local only, IPv4 carried over the IPv6 sessions, ECMP over both ToRs. One lab for the module."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lablib import all_ok, birdc, kernel_routes, lab

from tabby.client import ResourceClient
from tabby.dataplane import bird_config
from tabby.lab import failover, gobgp, netns, tor
from tabby.lab import lab as L
from tabby.lab.netns import wait_for
from tabby.lab.topology import OUTSIDE_V6
from tabby.model import validate
from tabby.store import open_store


@pytest.fixture(scope="module")
def the_lab() -> Iterator[L.Lab]:
    with lab(2, 1, tors=2) as built:
        assert L.wait_until(lambda: all_ok(built), 60), [r for r in built.matrix() if not r["ok"]]
        # traffic flows over the first ToR up; ECMP once the second one's session is up too
        assert L.wait_until(lambda: ecmp_everywhere(built), 30), [kernel_routes(h.ns) for h in built.topo.hosts]
        # and ToR 1's kernel has what its gobgpd told the hosts (its FIB syncer polls)
        state = built.wait_routed(30, interval=0.2)
        assert state["ok"], state
        yield built


def ecmp_everywhere(the_lab: L.Lab) -> bool:
    for h in the_lab.topo.hosts:
        for fam in ("-6", "-4"):
            learnt = [r for r in kernel_routes(h.ns, fam)
                      if r.get("protocol") == "bird" and r.get("type") != "blackhole"
                      and not str(r["dst"]).startswith(("fd00:99:", "10.99."))]  # the outside: ToR 2 only
            if not learnt or any(len(r.get("nexthops", [])) != 2 for r in learnt):  # type: ignore[arg-type]
                return False
    return True


def blocks(the_lab: L.Lab) -> set[str]:
    """Every host's blocks, as its kernel's blackholes say."""
    out = set()
    for h in the_lab.topo.hosts:
        for fam in ("-6", "-4"):
            out |= {str(r["dst"]) for r in kernel_routes(h.ns, fam) if r.get("type") == "blackhole"}
    return out


def test_links_carry_no_ipv4_and_no_global_ipv6(the_lab: L.Lab) -> None:
    for h in the_lab.topo.hosts:
        links = [(h.ns, up) for up in tor.UPLINKS] + [(tor.tor_ns(the_lab.topo.prefix, i), tor.downlink(h))
                                                       for i in (1, 2)]
        for ns, dev in links:
            addrs = json.loads(netns.ip("-j", "addr", "show", "dev", dev, ns=ns))[0]["addr_info"]
            assert addrs and all(a["family"] == "inet6" and a["scope"] == "link" for a in addrs), (ns, dev, addrs)


def fabric_trace(the_lab: L.Lab) -> str:
    """What the fabric did, for a failure's message: the GoBGP ToR's FIB changes, the agents'
    BFD and BGP lines, and each host's learnt IPv4 routes (a failed row names only its symptom)."""
    out = []
    fib = the_lab.dir / "gobgp-fib.log"
    if fib.exists():
        out += ["ToR 1 FIB changes:", *fib.read_text().splitlines()[-20:]]
    for h in the_lab.topo.hosts:
        log = the_lab.dir / f"agent-{h.name}.log"
        if log.exists():
            out += [f"{h.name} agent:", *[line for line in log.read_text().splitlines()
                                          if "BFD" in line or "BGP" in line or "bird" in line][-10:]]
        out += [f"{h.name} IPv4 routes:", netns.ip("-4", "route", "show", "proto", "bird", ns=h.ns)]
    return "\n".join(out)


def test_full_matrix_dual_stack_and_ipv4_via_ipv6_next_hops(the_lab: L.Lab) -> None:
    rows = the_lab.matrix(("v6", "v4"))
    # the failed rows whole, as text (pytest shortens a list's repr, and the detail says why)
    assert {r["family"] for r in rows} == {"v6", "v4"} and all(r["ok"] for r in rows), \
        "\n".join(str(r) for r in rows if not r["ok"]) + "\n" + fabric_trace(the_lab)
    h2 = the_lab.topo.hosts[1]
    v4 = [r for r in kernel_routes(h2.ns, "-4") if r.get("protocol") == "bird" and r.get("type") != "blackhole"
          and ipaddress.ip_network(str(r["dst"])).subnet_of(ipaddress.ip_network("10.65.0.0/16"))]
    assert v4, kernel_routes(h2.ns, "-4")
    for r in v4:  # ECMP: one next hop per ToR, each an IPv6 link-local
        hops = r["nexthops"]  # type: ignore[index]
        assert sorted(n["dev"] for n in hops) == ["up1", "up2"], r
        assert all(n["via"]["family"] == "inet6" and n["via"]["host"].startswith("fe80:") for n in hops), r


def test_routing_state_waits_for_tor_1s_kernel(the_lab: L.Lab) -> None:
    """A block gobgpd knows but ToR 1's kernel lacks (its FIB syncer held) is missing, and the
    syncer puts it back."""
    t1 = tor.tor_ns(the_lab.topo.prefix, 1)
    pids = subprocess.run(["ip", "netns", "pids", t1], capture_output=True, text=True).stdout.split()
    syncer = next(int(p) for p in pids if b"tabby.lab.gobgp" in Path(f"/proc/{p}/cmdline").read_bytes())
    h1 = the_lab.topo.hosts[0]
    block = next(str(r["dst"]) for r in kernel_routes(h1.ns, "-4") if r.get("type") == "blackhole")
    os.kill(syncer, signal.SIGSTOP)
    try:
        netns.ip("-4", "route", "del", block, "proto", str(gobgp.FIB_PROTO), ns=t1)
        state = the_lab.routing_state()
        assert t1 in state["missing"] and state["missing"][t1], state
    finally:
        os.kill(syncer, signal.SIGCONT)
    assert the_lab.wait_routed(10, interval=0.2)["ok"]


def test_dual_homed_block_has_two_equal_next_hops(the_lab: L.Lab) -> None:
    h1, h2 = the_lab.topo.hosts
    theirs = {str(r["dst"]) for r in kernel_routes(h1.ns) if r.get("type") == "blackhole"}
    for r in kernel_routes(h2.ns):
        if r["dst"] in theirs:
            assert sorted(n["dev"] for n in r["nexthops"]) == ["up1", "up2"], r  # type: ignore[index]
            break
    else:
        raise AssertionError(f"h1's blocks {theirs} not on h2: {kernel_routes(h2.ns)}")


def test_each_tor_learns_exactly_the_hosts_aggregates(the_lab: L.Lab) -> None:
    want = blocks(the_lab)
    assert len(want) == 4  # a /122 and a /26 per host
    t1 = tor.tor_ns(the_lab.topo.prefix, 1)
    learnt = set()
    for fam in ("ipv6", "ipv4"):
        out = netns.nsexec(t1, ["gobgp", "-j", "global", "rib", "-a", fam]).stdout
        learnt |= set(json.loads(out or "{}"))
    assert learnt == want
    # ToR 1's FIB syncer says what it programmed (what a failure's trace shows)
    fib = (the_lab.dir / "gobgp-fib.log").read_text()
    assert all(f"route replace {p} via inet6 fe80:" in fib for p in want), fib
    assert "ToR 1 FIB changes:" in fabric_trace(the_lab)
    sock = str(the_lab.run_dir / "tors" / "bird.ctl")
    out = subprocess.run(["birdc", "-s", sock, "show", "route", "where", "source = RTS_BGP"], capture_output=True,
                         text=True).stdout
    bird = {line.split()[0] for line in out.splitlines() if line[:1] not in ("", " ", "\t")
            and not line.startswith(("BIRD", "Table"))}
    assert bird == want, out


def test_host_sessions_both_tors_established_bfd_up_with_the_bird_tor(the_lab: L.Lab) -> None:
    for h in the_lab.topo.hosts:
        protos = birdc(the_lab, h.name, "show", "protocols")
        est = [line.split()[0] for line in protos.splitlines() if "Established" in line]
        assert any(n.startswith("peer_tor1") for n in est) and any(n.startswith("peer_tor2") for n in est), protos
        bfd = birdc(the_lab, f"{h.name}/bfd", "show", "bfd", "sessions")  # the liveness BIRD's
        assert "fe80::2" in bfd and " Up " in bfd, bfd


def ping_loss(src_ns: str, dst: str, cut: list[str], restore: list[str], count: int = 60) -> tuple[int, int]:
    p = subprocess.Popen(["ip", "netns", "exec", src_ns, "ping", "-c", str(count), "-i", "0.1", "-W", "1", dst],
                         stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        subprocess.run(cut, check=True)
        out, _ = p.communicate(timeout=count * 0.1 + 15)
    finally:
        subprocess.run(restore, check=True)
        if p.poll() is None:
            p.kill()
            p.wait()
    line = next(x for x in out.splitlines() if "packets transmitted" in x)
    return int(line.split()[0]), int(line.split()[3])


def test_uplink_cut_keeps_traffic_flowing(the_lab: L.Lab) -> None:
    # The cut is of the uplink to the BIRD ToR: it drops a session whose link went down at once, and
    # has BFD. GoBGP 3.10 has no BFD and does not follow link state: a cut towards it is noticed by
    # the other hosts only after its hold time (9 s here; measured 40 of 60 pings lost).
    h1, h2 = the_lab.topo.hosts
    w1 = next(w for w in the_lab.topo.workloads if w.host == h1)
    w2 = next(w for w in the_lab.topo.workloads if w.host == h2)
    for fam in ("v4", "v6"):
        dst = the_lab.addresses()[w1.name][fam][0]
        sent, got = ping_loss(w2.ns, dst, ["ip", "-n", h1.ns, "link", "set", "up2", "down"],
                              ["ip", "-n", h1.ns, "link", "set", "up2", "up"])
        print(f"{fam}: {sent - got} of {sent} pings lost at 10/s")
        # far fewer than a hold time's worth (9 s: 90 pings): link state and BFD withdrew the path, not
        # BGP's timers (how fast is bench/bfd.py's figure)
        assert sent - got <= 40, (fam, sent, got)
        # back as it was: both next hops again (the BIRD ToR session re-established)
        wait_for(lambda: any(len(r.get("nexthops", [])) == 2 for r in kernel_routes(h2.ns)), 30, 0.2,
                 "ECMP back after the uplink is up again")


def test_multihop_peer_one_hop_away(the_lab: L.Lab) -> None:
    # ToR 2 listens on its loopback (fd00:99::1) for multihop sessions from the hosts' fabric
    # addresses: h1 reaches it over up2, one hop away, its next hop resolved recursively
    h1 = the_lab.topo.hosts[0]
    client = ResourceClient(open_store(the_lab.store_url))
    client.apply(validate({"kind": "BGPPeer", "metadata": {"name": "mh-tor2"}, "spec": {
        "peer_ip": OUTSIDE_V6, "asn": tor.TOR_ASNS[1], "multihop": 2, "host": h1.name}}))
    name = bird_config._ident("peer mh-tor2")
    try:
        wait_for(lambda: any(line.startswith(name) and "Established" in line
                             for line in birdc(the_lab, h1.name, "show", "protocols").splitlines()), 30, 0.2,
                 "h1's multihop session to ToR 2's loopback")
        sock = str(the_lab.run_dir / "tors" / "bird.ctl")
        block = next(str(r["dst"]) for r in kernel_routes(h1.ns) if r.get("type") == "blackhole")
        wait_for(lambda: block in subprocess.run(["birdc", "-s", sock, "show", "route", "protocol", "mh_1"],
                                                 capture_output=True, text=True).stdout, 10, 0.2,
                 "ToR 2 learns h1's block over the multihop session")
        conf = (the_lab.run_dir / h1.name / "bird.conf").read_text()
        assert "multihop 2;" in conf and f"local {h1.v6} as" in conf
    finally:
        client.delete("BGPPeer", "mh-tor2")
        wait_for(lambda: name not in birdc(the_lab, h1.name, "show", "protocols"), 30, 0.2, "session removed")

def test_bird_kill_on_a_host_changes_no_route_elsewhere(the_lab: L.Lab) -> None:
    # graceful restart at both ToRs: GoBGP as helper, and BIRD's BFD to the host is its liveness
    # BIRD's, which the kill leaves running
    h1, h2 = the_lab.topo.hosts
    block = next(str(r["dst"]) for r in kernel_routes(h1.ns) if r.get("type") == "blackhole")
    pidfile = the_lab.run_dir / h1.name / "bird.pid"
    old = int(pidfile.read_text())
    watch = failover.RouteWatch(h2.ns)
    try:
        time.sleep(0.1)
        netns.kill_pid(old, 9)
        wait_for(lambda: pidfile.exists() and int(pidfile.read_text() or 0) != old, 20, 0.1, "BIRD restarted")
        wait_for(lambda: birdc(the_lab, h1.name, "show", "protocols").count("Established") == 2, 30, 0.2,
                 "h1's sessions to both ToRs back")
        time.sleep(2)
    finally:
        watch.close()
    changes = [line for _, line in watch.lines if block in line]
    assert changes == [], changes
    assert ecmp_everywhere(the_lab)
