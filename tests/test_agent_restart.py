"""The agent killed mid-programming, and the Store gone for a minute: nothing programmed is lost."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from agentlib import AgentProc, endpoint, namespace, neighbours, routes, status, sysctl

from tabby.lab import netns
from tabby.lab.etcd import EtcdServer
from tabby.lab.netns import wait_for
from tabby.model import encode, key_of, to_plain
from tabby.store import open_store

N = 2000


def make_veths(ns: str, n: int) -> None:
    lines = [f"link add tbe{i} type veth peer name tbp{i}" for i in range(n)]
    lines += [f"link set tbe{i} up" for i in range(n)]
    netns.ip("-batch", "-", ns=ns, input="\n".join(lines) + "\n")


def desired(i: int) -> tuple[str, str]:
    return str(ipaddress.ip_address(f"fd00:e::{i:x}")), f"10.65.{i >> 8}.{i & 255}"


def test_sigkill_while_programming_then_restart_converges_without_withdrawing(tmp_path: Path) -> None:
    with namespace("k") as ns:
        make_veths(ns, N)
        url = f"sqlite://{tmp_path}/store.db"
        store = open_store(url)
        for i in range(N):
            v6, v4 = desired(i)
            ep = endpoint(f"ep{i}", "h1", f"tbe{i}", v6=[v6], v4=[v4], mac=f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}")
            store.put(key_of(ep), encode(ep))
        mon = subprocess.Popen(["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE, text=True)
        events: list[str] = []
        killed_at: list[int] = []
        agent = AgentProc(ns, url, "h1", tmp_path / "agent.log")

        def watch() -> None:
            assert mon.stdout is not None
            for line in mon.stdout:
                events.append(line)
                if not killed_at and agent.proc is not None and "proto 77" in line:
                    os.kill(agent.proc.pid, signal.SIGKILL)  # the first of our routes is in: kill now
                    killed_at.append(len(events))

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            agent.start()
            wait_for(lambda: killed_at, 30, 0.005, "first route")
            agent.proc.wait(10)
            agent.proc = None
            programmed = routes(ns)
            sysctls_done = sum(sysctl(ns, f"ipv6/conf/tbe{i}/accept_ra") == "0" for i in range(0, N, 100))
            print(f"killed with {len(programmed)} of {2 * N} routes and ~{sysctls_done * 100} of {N} "
                  "interfaces' sysctls in place")
            assert len(programmed) > 0
            assert len(programmed) < 2 * N or sysctls_done < N // 100, "the kill came after programming ended"
            before_restart = len(events)
            agent.start()
            want = {f"{a}/128": f"tbe{i}" for i, (a, _) in enumerate(map(desired, range(N)))}
            want |= {f"{b}/32": f"tbe{i}" for i, (_, b) in enumerate(map(desired, range(N)))}
            wait_for(lambda: routes(ns) == want, 60, 0.2, "all routes after restart")
            wait_for(lambda: all(sysctl(ns, f"ipv6/conf/tbe{i}/accept_ra") == "0" for i in range(0, N, 50)),
                     30, 0.2, "sysctls")
            nb = neighbours(ns)
            for i in range(N):
                v6, v4 = desired(i)
                assert nb[(f"tbe{i}", v6)]["lladdr"] == f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}"
                assert (f"tbe{i}", v4) in nb
            wait_for(lambda: agent.healthy(), 10, 0.1, "healthy")
            time.sleep(0.5)
            deleted = [e for e in events[before_restart:] if e.startswith("Deleted")]
            assert deleted == [], f"routes withdrawn during the restart: {deleted[:5]}"
            wait_for(lambda: (status(store, "h1", f"ep{N - 1}") or {}).get("state") == "up", 30, 0.2, "status")
        finally:
            agent.stop()
            mon.terminate()
            mon.wait(5)
            print(agent.output()[-3000:])


OUTAGE_S = float(os.environ.get("TABBY_TEST_OUTAGE_S", "60"))


def cli(ns: str, store_url: str, *args: str, stdin: str | None = None) -> str:
    """The tabby CLI run inside the namespace where etcd listens."""
    r = netns.nsexec(ns, [sys.executable, "-m", "tabby.cli", "--store", store_url, *args], input=stdin)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ep_yaml(i: int) -> str:
    ep = endpoint(f"o{i}", "hout", f"tapo{i}", v6=[f"fd00:e::{i + 1}"], v4=[f"10.65.0.{i + 1}"])
    return yaml.safe_dump(to_plain(ep))


def test_store_unreachable_dataplane_unchanged_then_resync(tmp_path: Path) -> None:
    with namespace("e") as ns:
        server = EtcdServer(name="tbyt-outage", netns=ns).start()
        agent = None
        try:
            for i in range(3):
                netns.add_veth(ns, f"tapo{i}", f"vmo{i}")
            cli(ns, server.url, "apply", "-f", "-", stdin=ep_yaml(0) + "---\n" + ep_yaml(1))
            agent = AgentProc(ns, server.url, "hout", tmp_path / "agent.log").start()
            wait_for(lambda: len(routes(ns)) == 4, 20, 0.1, "programmed")
            before = (routes(ns), {k: v["lladdr"] for k, v in neighbours(ns).items()})
            server.stop(keep_data=True)
            t_end = time.monotonic() + OUTAGE_S
            while time.monotonic() < t_end:
                assert (routes(ns), {k: v["lladdr"] for k, v in neighbours(ns).items()}) == before
                assert agent.proc is not None and agent.proc.poll() is None, "agent exited during the outage"
                time.sleep(2)
            server.start()
            cli(ns, server.url, "apply", "-f", "-", stdin=ep_yaml(2))
            wait_for(lambda: len(routes(ns)) == 6, 30, 0.1, "new endpoint after the outage")
            wait_for(lambda: {"endpoint": "o2", "host": "hout", "state": "up", "reason": "", "host_alive": True} in
                     json.loads(cli(ns, server.url, "status", "-o", "json"))["endpoints"], 10, 0.2, "status up")
            assert "store unavailable" in agent.output()
        finally:
            if agent is not None:
                agent.stop()
                print(agent.output()[-3000:])
            server.stop()
