"""Issue 21: `tabby lab up --ipv6-only --nat64`. IPv6-only containers and VMs (dhclient and dhcpcd)
reach an IPv4-only service outside by its name, through their own host's tayga and unbound (real
daemons, real traffic); a policy blocks one of them; a killed translator is started again; a hung
one stops only its own host's workloads; a pool without nat64 stops it all."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabby.client import ResourceClient
from tabby.lab import lab as L
from tabby.lab import probe
from tabby.lab.topology import NAT64_PORT, NAT64_PREFIX, OUTSIDE_NAME, OUTSIDE_SERVICE_V4
from tabby.model import validate
from tabby.store import open_store

SERVICE6 = "fd00:64::a63:50"  # NAT64_PREFIX + OUTSIDE_SERVICE_V4


def tabby(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "tabby.cli", *args], capture_output=True, text=True, timeout=300)
    assert not check or r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def lab() -> Iterator[L.Lab]:
    prefix = "n" + uuid.uuid4().hex[:5]
    try:
        up = tabby("lab", "up", "--hosts", "2", "--containers", "2", "--vms", "2", "--ipv6-only", "--nat64",
                   "--prefix", prefix, check=False)
        assert up.returncode == 0 and "checks failed" not in up.stderr and "not routed" not in up.stderr, \
            up.stdout + up.stderr
        yield L.load(prefix)
    finally:
        d = L.lab_dir(prefix)
        for name in ("agent-h1.log", "agent-h2.log"):
            if (d / name).exists():
                print(f"--- {name} (tail)\n" + (d / name).read_text()[-4000:])
        tabby("lab", "down", "--prefix", prefix, check=False)
        assert not any(n.startswith(prefix + "-") for n in os.listdir("/run/netns"))


def nat64_rows(lab: L.Lab) -> list[dict[str, object]]:
    return [r for r in lab.matrix(("nat64",)) if r["family"] == "nat64"]


def tayga_pid(lab: L.Lab, host: str) -> int:
    return int((lab.run_dir / host / "nat64" / "tayga.pid").read_text())


def test_every_ipv6_only_workload_reaches_the_ipv4_only_service_by_name(lab: L.Lab) -> None:
    check = tabby("lab", "check", "--prefix", lab.topo.prefix, "-o", "json")
    rows = json.loads(check.stdout)
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    members = [m for m, _ in lab.members()]
    assert len(members) == 8  # 4 containers, 4 VMs (dhclient and dhcpcd)
    for name, addrs in lab.addresses().items():
        assert addrs["v6"] and not addrs["v4"], (name, addrs)  # IPv6-only workloads
    blocked = lab.topo.nat64_blocked
    assert blocked is not None
    nat = {(r["src"], r["check"]): r for r in rows if r["family"] == "nat64"}
    assert {src for src, _ in nat} == set(members)
    host_v4 = {**{w.name: w.host.v4 for w in lab.topo.workloads}, **{v.name: v.host.v4 for v in lab.topo.vms}}
    for src in members:
        # its own resolver (CNI result / DHCPv6 option 23 / RDNSS) synthesized the AAAA in the prefix
        dns = nat[(src, "dns")]
        assert dns["reached"] and SERVICE6 in str(dns["detail"]), dns
        assert lab.resolv_conf(src).read_text().split()[:2] == ["nameserver", "fd00:53::1"]
        for kind in ("ping", "tcp"):
            r = nat[(src, kind)]
            if src == blocked:
                assert r["expect"] == "blocked" and not r["reached"], r
            else:
                assert r["reached"], r
        if src != blocked:  # the outside saw the host's IPv4 address (masqueraded), not the pool's
            assert nat[(src, "tcp")]["detail"] == host_v4[src]
    assert str(ipaddress.IPv6Network(NAT64_PREFIX)[int(ipaddress.IPv4Address(OUTSIDE_SERVICE_V4))]) == SERVICE6
    # VMs were given the resolver both ways: DHCPv6 option 23 (dhclient's lease) and the RAs' RDNSS
    v1 = next(v for v in lab.topo.vms if v.client == "dhclient")
    assert "dhcp6.name-servers fd00:53::1;" in (lab.dir / f"guest-{v1.name}" / "lease6").read_text()
    ra = subprocess.run(["ip", "netns", "exec", v1.ns, "rdisc6", "-1", "eth0"], capture_output=True, text=True)
    assert "Recursive DNS server     : fd00:53::1" in ra.stdout, ra.stdout + ra.stderr
    # the table shows the nat64 column, the blocked workload as blocked
    table = tabby("lab", "check", "--prefix", lab.topo.prefix).stdout
    assert "nat64" in table and "blocked (policy)" in table
    # the blocked workload's traffic was dropped by its egress policy, as IPv6, before translation
    assert lab.policy_drops(next(w.host.ns for w in lab.topo.workloads if w.name == blocked),
                            L.NAT64_BLOCK_POLICY, "eg") > 0


def test_lab_check_refuses_a_seed_it_would_not_use_and_repeats_a_sample_with_one(lab: L.Lab) -> None:
    """A small lab is checked in full: a --seed alone would change nothing, so it is refused (exit 2)."""
    r = tabby("lab", "check", "--prefix", lab.topo.prefix, "--seed", "7", check=False)
    assert r.returncode == 2 and "--seed" in r.stderr and "--sample" in r.stderr, r.stderr
    runs = [json.loads(tabby("lab", "check", "--prefix", lab.topo.prefix, "--sample", "2", "--seed", "7",
                             "-o", "json").stdout) for _ in range(2)]
    pairs = [sorted({(r["src"], r["dst"], r["family"]) for r in rows}) for rows in runs]
    assert pairs[0] and pairs[0] == pairs[1]


def test_a_killed_translator_is_started_again_and_a_hung_one_stops_only_its_host(lab: L.Lab) -> None:
    old = tayga_pid(lab, "h1")
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            new = tayga_pid(lab, "h1")
            if new != old and Path(f"/proc/{new}").exists():
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    else:
        pytest.fail("tayga on h1 was not started again within 10 s")
    assert all(r["ok"] for r in nat64_rows(lab))
    health = probe.NsProbe(lab.topo.hosts[0].ns)
    try:
        assert health.healthz()["nat64"]["restarts"] >= 1  # type: ignore[index]
    finally:
        health.close()

    def h1_status() -> dict[str, object]:
        doc = json.loads(tabby("--store", lab.store_url, "status", "-o", "json").stdout)
        assert not doc["corrupt"], doc["corrupt"]
        return next(h for h in doc["hosts"] if h["host"] == "h1")

    # the host status says so too (written at the next heartbeat)
    assert L.wait_until(lambda: (h1_status()["nat64"] or {}).get("restarts", 0) >= 1, 20, 1.0), h1_status()
    assert h1_status()["nat64"]["tayga"] == "up"  # type: ignore[index]
    # h2's translator hangs (stopped, not dead: the agent sees a live process): only h2's workloads
    # lose the IPv4 world; h1's go on through their own host's translator
    hung = tayga_pid(lab, "h2")
    os.kill(hung, signal.SIGSTOP)
    try:
        rows = [r for r in nat64_rows(lab) if r["check"] == "ping" and r["expect"] == "reach"]
        by_host = {w.name: w.host.name for w in lab.topo.workloads} | {v.name: v.host.name for v in lab.topo.vms}
        assert all(r["reached"] for r in rows if by_host[str(r["src"])] == "h1"), rows
        assert not any(r["reached"] for r in rows if by_host[str(r["src"])] == "h2"), rows
    finally:
        os.kill(hung, signal.SIGCONT)
    assert all(r["ok"] for r in nat64_rows(lab))


def test_a_pool_without_nat64_stops_the_translator_and_turning_it_on_brings_it_back(lab: L.Lab) -> None:
    client = ResourceClient(open_store(lab.store_url))

    def running(host: str) -> bool:
        try:
            return Path(f"/proc/{tayga_pid(lab, host)}").exists()
        except (OSError, ValueError):
            return False

    def has_tun(ns: str) -> bool:
        return "tabby64" in subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout

    def resolver_up(h: object) -> bool:
        pidfile = lab.run_dir / h.name / "nat64" / "unbound.pid"  # type: ignore[attr-defined]
        try:
            alive = Path(f"/proc/{int(pidfile.read_text())}").exists()
        except (OSError, ValueError):
            alive = False
        on_lo = "fd00:53::1" in subprocess.run(["ip", "-n", h.ns, "-6", "addr", "show", "dev", "lo"],  # type: ignore[attr-defined]
                                               capture_output=True, text=True).stdout
        return alive or on_lo

    pool = client.get("IPPool", "lab-v6")
    assert pool is not None
    client.apply(validate({"kind": "IPPool", "metadata": {"name": "lab-v6"},
                           "spec": {**pool.spec.model_dump(mode="json"), "nat64": False}}))
    try:
        assert L.wait_until(lambda: not any(running(h.name) or has_tun(h.ns) or resolver_up(h)
                                            for h in lab.topo.hosts), 15)
        r = probe.in_ns(lab.topo.workloads[0].ns, lambda: probe.tcp(SERVICE6, NAT64_PORT, timeout=1.0))
        assert not r[0], r
    finally:
        pool = client.get("IPPool", "lab-v6")
        assert pool is not None
        client.apply(validate({"kind": "IPPool", "metadata": {"name": "lab-v6"},
                               "spec": {**pool.spec.model_dump(mode="json"), "nat64": True}}))
    assert L.wait_until(lambda: all(running(h.name) and has_tun(h.ns) for h in lab.topo.hosts), 15)
    assert L.wait_until(lambda: all(r["ok"] for r in nat64_rows(lab)), 20, 1.0)
    ok, got = probe.in_ns(lab.topo.workloads[0].ns, lambda: probe.resolve(OUTSIDE_NAME, "fd00:53::1"))
    assert ok and got == [SERVICE6]


def test_a_live_prefix_change_moves_the_translator_and_the_resolver_with_it(lab: L.Lab) -> None:
    client = ResourceClient(open_store(lab.store_url))
    cfg = client.get("Config", "global")
    assert cfg is not None
    spec = cfg.spec.model_dump(mode="json", exclude_none=True)
    new6 = "fd00:65::a63:50"

    def tun_routes(ns: str) -> set[str]:
        out = json.loads(subprocess.run(["ip", "-j", "-n", ns, "-6", "route", "show", "dev", "tabby64"],
                                        capture_output=True, text=True).stdout or "[]")
        return {r["dst"] for r in out if r.get("protocol") == "static"}

    def moved() -> bool:
        ok, got = probe.in_ns(lab.topo.workloads[0].ns, lambda: probe.resolve(OUTSIDE_NAME, "fd00:53::1"))
        return ok and got == [new6] and all(tun_routes(h.ns) == {"fd00:65::/96"} for h in lab.topo.hosts)

    client.apply(validate({"kind": "Config", "metadata": {"name": "global"},
                           "spec": {**spec, "nat64_prefix": "fd00:65::/96"}}))
    try:
        assert L.wait_until(moved, 20, 0.5), {h.ns: tun_routes(h.ns) for h in lab.topo.hosts}
        assert probe.in_ns(lab.topo.workloads[0].ns, lambda: probe.ping(new6))[0]
        ok, seen = probe.in_ns(lab.topo.workloads[0].ns, lambda: probe.tcp(new6, NAT64_PORT))
        assert ok and seen == lab.topo.workloads[0].host.v4
    finally:
        client.apply(validate({"kind": "Config", "metadata": {"name": "global"}, "spec": spec}))
    assert L.wait_until(lambda: all(r["ok"] for r in nat64_rows(lab)), 30, 1.0)


def test_the_translator_is_its_hosts_nat64_workloads_alone(lab: L.Lab) -> None:
    """A sender on the fabric (the outside router, routed at h1 for the prefix) does not get
    through h1's translator: counted and dropped before it."""
    h1, out = lab.topo.hosts[0], lab.topo.outside_ns

    def dropped() -> int:
        chain = json.loads(subprocess.run(["ip", "netns", "exec", h1.ns, "nft", "-j", "list", "chain", "inet",
                                           "tabby", "forward"], capture_output=True, text=True).stdout)
        return sum(e["counter"]["packets"] for item in chain["nftables"] if "rule" in item
                   and "NAT64 from outside" in item["rule"].get("comment", "")
                   for e in item["rule"]["expr"] if "counter" in e)

    before = dropped()
    subprocess.run(["ip", "-n", out, "route", "add", NAT64_PREFIX, "via", h1.v6], check=True)
    try:
        reached, why = probe.in_ns(out, lambda: probe.ping(SERVICE6, timeout=1.0))
    finally:
        subprocess.run(["ip", "-n", out, "route", "del", NAT64_PREFIX, "via", h1.v6], check=True)
    assert not reached, why
    assert dropped() > before


def test_the_prefix_learnt_from_a_peer_does_not_take_the_hosts_translator_away(lab: L.Lab) -> None:
    """A ToR announcing the NAT64 prefix (an upstream NAT64; BIRD puts it in with metric 32) won
    over the tun's route (IPv6's default metric, 1024): workloads' NAT64 traffic left through the
    ToR. As BIRD would have it, then where the kernel sends a packet for the prefix."""
    h1 = lab.topo.hosts[0]
    learnt = ["ip", "-n", h1.ns, "-6", "route", "add", NAT64_PREFIX, "dev", "lo", "proto", "bird", "metric", "32"]
    subprocess.run(learnt, check=True)
    try:
        got = json.loads(subprocess.run(["ip", "-j", "-n", h1.ns, "-6", "route", "get", SERVICE6],
                                        capture_output=True, text=True, check=True).stdout)
        assert got[0]["dev"] == "tabby64", got
    finally:
        subprocess.run(["ip", "-n", h1.ns, "-6", "route", "del", NAT64_PREFIX, "dev", "lo", "proto", "bird",
                        "metric", "32"], check=True)
