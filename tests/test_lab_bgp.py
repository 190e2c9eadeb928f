"""Route distribution between hosts with a real BIRD in each host namespace, through the lab."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from pathlib import Path

from lablib import all_ok, birdc, kernel_routes, lab

from tabby.client import ResourceClient
from tabby.lab import lab as L
from tabby.lab import netns
from tabby.lab.netns import wait_for
from tabby.model import validate
from tabby.store import open_store


def test_dual_stack_fabric_routes_spread_and_withdraw() -> None:
    with lab(3, 2) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60), the_lab.matrix()
        h1, h2, h3 = the_lab.topo.hosts
        # h1's block is on h2 and h3 as one aggregate via h1's fabric address; a blackhole at home
        # (which block h1 has depends on which host's container asked first: they are built in parallel)
        pool6 = ipaddress.ip_network("fd00:e::/112")
        home = [r["dst"] for r in kernel_routes(h1.ns) if r.get("type") == "blackhole"
                and ipaddress.ip_network(r["dst"]).subnet_of(pool6)]  # type: ignore[arg-type]
        assert len(home) == 1 and home[0].endswith("/122"), home
        for ns in (h2.ns, h3.ns):
            agg = [r for r in kernel_routes(ns) if r.get("protocol") == "bird" and r.get("gateway") == h1.v6]
            assert [r["dst"] for r in agg] == home
        for ns in (h2.ns, h3.ns):
            for r in kernel_routes(ns) + kernel_routes(ns, "-4"):
                assert r["dst"] != "default"
                if r.get("protocol") == "bird" and r.get("type") != "blackhole":
                    net = ipaddress.ip_network(r["dst"])
                    pool = ipaddress.ip_network("fd00:e::/112" if net.version == 6 else "10.65.0.0/16")
                    from_outside = r.get("gateway") in ("fd00:f::fe", "10.255.0.254")
                    # from hosts: only pool prefixes; from the outside router: only what is not ours
                    assert net.subnet_of(pool) != from_outside, r  # type: ignore[arg-type]

        # an endpoint on h1 outside h1's blocks is advertised on its own, and withdrawn on delete
        netns.add_veth(h1.ns, "tbxtra", "tbxtrap")
        store = open_store(the_lab.store_url)
        ep = validate({"kind": "Endpoint", "metadata": {"name": "extra"},
                       "spec": {"host": h1.name, "orchestrator": "vm", "workload_id": "x", "interface": "tbxtra",
                                "mac": "52:54:00:00:00:aa", "ipv6_addresses": ["fd00:e::ff00"],
                                "ipv4_addresses": ["10.65.200.1"]}})
        ResourceClient(store).apply(ep)

        def present(ns: str) -> bool:
            v6 = {r["dst"]: r for r in kernel_routes(ns)}
            v4 = {r["dst"]: r for r in kernel_routes(ns, "-4")}
            return v6.get("fd00:e::ff00", {}).get("gateway") == h1.v6 and \
                v4.get("10.65.200.1", {}).get("gateway") == h1.v4

        t0 = time.monotonic()
        wait_for(lambda: present(h2.ns) and present(h3.ns), 10, 0.01, "route on h2 and h3")
        print(f"advertised in {(time.monotonic() - t0) * 1000:.0f} ms")
        ResourceClient(store).delete("Endpoint", "extra")
        wait_for(lambda: not any(r["dst"] == "fd00:e::ff00" for ns in (h1.ns, h2.ns, h3.ns)
                                 for r in kernel_routes(ns)), 10, 0.01, "withdrawn everywhere")
        wait_for(lambda: not any(r["dst"] == "10.65.200.1" for ns in (h1.ns, h2.ns, h3.ns)
                                 for r in kernel_routes(ns, "-4")), 10, 0.01, "IPv4 withdrawn everywhere")


def test_ipv6_only_fabric_has_no_ipv4_and_works() -> None:
    with lab(3, 2, ipv6_only=True) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60), the_lab.matrix(("v6",))
        rids = set()
        for h in the_lab.topo.hosts:
            v4 = [a for a in netns.ip("-4", "-o", "addr", "show", ns=h.ns).splitlines() if " lo " not in a]
            assert v4 == [], v4
            assert kernel_routes(h.ns, "-4") == []
            conf = (the_lab.run_dir / h.name / "bird.conf").read_text()
            assert "ipv4" not in conf
            rid = ipaddress.IPv4Address(conf.split("router id ")[1].split(";")[0])
            assert rid not in ipaddress.ip_network("224.0.0.0/3") and int(rid) != 0
            rids.add(rid)
        assert len(rids) == 3
        for w in the_lab.topo.workloads:
            assert netns.ip("-4", "-o", "addr", "show", "dev", "eth0", ns=w.ns).strip() == ""


def test_route_reflector_topology_of_four_hosts() -> None:
    with lab(4, 1, ipv6_only=True, route_reflectors=(1,)) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60), the_lab.matrix(("v6",))
        protos = birdc(the_lab, "h2", "show", "protocols")
        sessions = [line for line in protos.splitlines() if line.startswith("host_")]
        assert len(sessions) == 1 and "host_h1" in sessions[0] and "Established" in sessions[0]
        rr = [line for line in birdc(the_lab, "h1", "show", "protocols").splitlines() if line.startswith("host_")]
        assert len(rr) == 3 and all("Established" in line for line in rr)
        # h3's block reaches h2 through the reflector, with h3 (not h1) as next hop
        h3 = the_lab.topo.hosts[2]
        assert any(r.get("gateway") == h3.v6 for r in kernel_routes(the_lab.topo.hosts[1].ns))


def test_external_peer_learns_the_aggregates_and_nothing_else() -> None:
    # the lab's outside router is the external peer: eBGP (AS 65100) with every host
    with lab(2, 2) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60)
        sock = str(the_lab.run_dir / "outside" / "bird.ctl")

        def learned() -> list[str]:
            out = subprocess.run(["birdc", "-s", sock, "show", "route", "protocol", "h1v6"], capture_output=True,
                                 text=True).stdout
            out += subprocess.run(["birdc", "-s", sock, "show", "route", "protocol", "h2v6"], capture_output=True,
                                  text=True).stdout
            return sorted({line.split()[0] for line in out.splitlines()
                           if line and not line[0].isspace() and not line.startswith(("BIRD", "Table"))})

        wait_for(lambda: len(learned()) == 2, 20, 0.2, "the outside router learns both hosts' blocks")
        assert learned() == ["fd00:e::/122", "fd00:e::40/122"]  # aggregates only: no /128, no default
        out = subprocess.run(["birdc", "-s", sock, "show", "route", "table", "master6", "all"], capture_output=True,
                             text=True).stdout
        assert out.count("BGP.as_path: 64512") == 2  # each IPv6 block once, from its owner only
        # and the hosts learned the outside address from it, never anything inside their pools
        h1 = the_lab.topo.hosts[0]
        assert any(r["dst"] == "fd00:99::1" and r.get("protocol") == "bird" for r in kernel_routes(h1.ns))


def test_bird_killed_peers_keep_routes_and_ping_survives() -> None:
    with lab(2, 1, ipv6_only=True) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60)
        h1, h2 = the_lab.topo.hosts
        w1, w2 = the_lab.topo.workloads
        target = the_lab.addresses()[w1.name]["v6"][0]
        ping = subprocess.Popen(["ip", "netns", "exec", w2.ns, "ping", "-6", "-i", "0.1", "-c", "150", "-W", "1",
                                 target], stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        pid = int((the_lab.run_dir / h1.name / "bird.pid").read_text())
        netns.kill_pid(pid, 9)  # no NOTIFICATION: h2 keeps h1's routes as stale (graceful restart)
        time.sleep(1)
        assert any(r["dst"] == "fd00:e::/122" for r in kernel_routes(h2.ns))
        wait_for(lambda: (the_lab.run_dir / h1.name / "bird.pid").exists() and
                 int((the_lab.run_dir / h1.name / "bird.pid").read_text() or 0) != pid, 20, 0.2, "bird restarted")
        out, _ = ping.communicate(timeout=60)
        summary = next(line for line in out.splitlines() if "packets transmitted" in line)
        sent, received = int(summary.split()[0]), int(summary.split()[3])
        print(summary)
        assert sent - received <= 1


def test_lab_down_leaves_nothing() -> None:
    with lab(2, 1, ipv6_only=True) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60)
        prefix = the_lab.topo.prefix
        pids = {int(p) for h in the_lab.topo.hosts for p in
                subprocess.run(["ip", "netns", "pids", h.ns], capture_output=True, text=True).stdout.split()}
        assert len(pids) >= 4  # an agent and a bird per host
        dirs = (the_lab.dir, the_lab.run_dir)
    assert not [n for n in netns.NETNS_DIR.iterdir() if n.name.startswith(prefix + "-")]
    assert not [p for p in pids if _running(p)]  # a zombie waiting for its reaper has ended
    assert not any(d.exists() for d in dirs)


def _running(pid: int) -> bool:
    """Alive, not a zombie waiting for its reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_lab_on_a_real_etcd_works_and_down_leaves_nothing() -> None:
    with lab(2, 1, vms=1, store="etcd") as the_lab:
        assert the_lab.agent_store_url.startswith("etcd://[fd00:f::fd]:")
        assert the_lab.store_url.startswith("etcd://127.0.0.1:")  # the loopback forwarder
        assert L.wait_until(lambda: all_ok(the_lab), 90), [r for r in the_lab.matrix() if not r["ok"]]
        agents = subprocess.run(["ip", "netns", "pids", the_lab.topo.hosts[0].ns], capture_output=True,
                                text=True).stdout.split()
        cmdlines = [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ") for p in agents]
        assert any("agent" in c and the_lab.agent_store_url in c for c in cmdlines)
        # the agents' records went through etcd: the heartbeat is there, read through the forwarder
        r = subprocess.run([sys.executable, "-m", "tabby.cli", "--store", the_lab.store_url, "status", "-o", "json"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "h2" in r.stdout
        forwarder = int((the_lab.dir / "forwarder.pid").read_text())
        assert _running(forwarder)
        prefix = the_lab.topo.prefix
    assert not [n for n in netns.NETNS_DIR.iterdir() if n.name.startswith(prefix + "-")]
    assert L.wait_until(lambda: not _running(forwarder), 5)
