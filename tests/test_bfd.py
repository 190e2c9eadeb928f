"""BFD on the host mesh: a host cut off (link down; an nft drop of all its traffic) is withdrawn by
every other host by BFD, well before BGP's hold time (bench/bfd.py measures how fast), and a
BIRD killed and restarted by the agent withdraws nothing (graceful restart still covers it: BFD
runs in the liveness BIRD, apart from the BGP speaker)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
from lablib import all_ok, lab

from tabby.client import ResourceClient
from tabby.lab import failover, netns
from tabby.lab import lab as L
from tabby.model import validate
from tabby.store import open_store


def bfd_up(the_lab: L.Lab) -> bool:
    for h in the_lab.topo.hosts:
        out = subprocess.run(["birdc", "-s", str(the_lab.run_dir / h.name / "bfd" / "bird.ctl"), "show", "bfd",
                              "sessions"], capture_output=True, text=True).stdout
        if out.count(" Up ") != len(the_lab.topo.hosts) - 1:
            return False
    return True


@pytest.fixture(scope="module")
def the_lab() -> Iterator[L.Lab]:
    with lab(3, 1, ipv6_only=True) as built:
        ResourceClient(open_store(built.store_url)).apply(validate(
            {"kind": "Config", "metadata": {"name": "global"}, "spec": {"mesh_bfd": True}}))
        assert L.wait_until(lambda: bfd_up(built), 30), "BFD sessions up on every host"
        assert L.wait_until(lambda: all_ok(built), 60), [r for r in built.matrix(("v6",)) if not r["ok"]]
        yield built


@pytest.mark.parametrize("cause", failover.CAUSES)
def test_cut_host_is_withdrawn_everywhere_by_bfd_others_unaffected(the_lab: L.Lab, cause: str) -> None:
    h1, h2, h3 = the_lab.topo.hosts
    w2 = next(w for w in the_lab.topo.workloads if w.host == h2)
    w3 = next(w for w in the_lab.topo.workloads if w.host == h3)
    dst = the_lab.addresses()[w3.name]["v6"][0]
    ping = subprocess.Popen(["ip", "netns", "exec", w2.ns, "ping", "-6", "-i", "0.1", "-W", "1", dst],
                            stdout=subprocess.PIPE, text=True)
    try:
        ms = failover.failover_ms(the_lab, h1, cause, cuts=5)
    finally:
        ping.send_signal(2)
        out, _ = ping.communicate(timeout=10)
    st = failover.stats(ms)
    print(f"{cause}: withdrawn in {[round(x) for x in ms]} ms; p50 {st['p50']:.0f} p99 {st['p99']:.0f}")
    # every cut withdrawn well before BGP's hold time (9 s): BFD did it (how fast is bench/bfd.py's)
    assert max(ms) < 4500, ms
    summary = next(line for line in out.splitlines() if "packets transmitted" in line)
    sent, got = int(summary.split()[0]), int(summary.split()[3])
    print(f"h2 -> h3 meanwhile: {summary}")
    assert sent > 50 and sent - got <= 1, summary  # traffic among the others unaffected


def test_bird_killed_and_restarted_withdraws_nothing(the_lab: L.Lab) -> None:
    h1 = the_lab.topo.hosts[0]
    pidfile = the_lab.run_dir / h1.name / "bird.pid"
    netns.wait_for(lambda: bfd_up(the_lab), 30, 0.2, "BFD up everywhere before the kill")
    old = int(pidfile.read_text())

    def kill_and_restart() -> None:
        netns.kill_pid(old, 9)  # no NOTIFICATION: the peers keep h1's routes as stale (graceful restart)
        netns.wait_for(lambda: pidfile.exists() and int(pidfile.read_text() or 0) != old, 20, 0.1,
                       "BIRD restarted by the agent")
        deadline = time.monotonic() + 20  # and until its sessions are back
        while time.monotonic() < deadline:
            out = subprocess.run(["birdc", "-s", str(the_lab.run_dir / h1.name / "bird.ctl"), "show", "protocols"],
                                 capture_output=True, text=True).stdout
            bgp = [line for line in out.splitlines() if " BGP " in line]
            if bgp and all("Established" in line for line in bgp):  # the mesh and the outside peer
                return
            time.sleep(0.2)
        raise AssertionError("h1's sessions not back after its BIRD restart")

    deleted = failover.withdrawals(the_lab, h1, kill_and_restart, watch_s=2.0)  # watched throughout
    assert deleted == [], deleted
    assert bfd_up(the_lab)  # BFD never noticed: the liveness BIRD kept running
