"""A cold agent, in-process in a real namespace: every route and permanent neighbour of a few
hundred dual-stack endpoints goes in, the policy table is there, and the garbage collector the cold
start held back runs again afterwards. The ctypes ``if_nameindex`` the link index reads agrees
with ``socket.if_nameindex``."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from agentlib import namespace, neighbours, routes

from tabby.cni.nl import in_netns
from tabby.dataplane.links import LinkIndex, _if_nameindex
from tabby.lab import netns
from tabby.model import encode, key_of, validate
from tabby.store import open_store

N = 500

WORKER = """
import gc, json, sys, threading, time
from pathlib import Path
from tabby.agent.agent import Agent
from tabby.store import open_store
agent = Agent(open_store(sys.argv[1]), "hc", metrics_port=None, bgp=False, run_dir=Path(sys.argv[2]))
t = threading.Thread(target=agent.run, daemon=True)
t.start()
deadline = time.monotonic() + 60
while agent.routes_programmed_at is None and time.monotonic() < deadline:
    time.sleep(0.01)
while not gc.isenabled() and time.monotonic() < deadline:  # the first turn (sysctls too) ends
    time.sleep(0.01)
print(json.dumps({"programmed": agent.routes_programmed_at is not None, "gc": gc.isenabled(),
                  "pending": agent.routes.waiting(), "policy_ok": agent.policy_ok}))
agent.stop()
t.join(10)
"""


def _addrs(i: int) -> tuple[str, str]:
    return f"2001:db8:c::{i + 1:x}", f"198.51.100.{i % 250}" if i < 250 else f"203.0.113.{i % 250}"


def test_cold_start_programs_everything_and_collects_garbage_again(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/store.db"
    store = open_store(url)
    store.put(*_kv(validate({"kind": "Profile", "metadata": {"name": "open"},
                             "spec": {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]}})))
    want_routes, want_neigh = {}, {}
    for i in range(N):
        v6, v4 = _addrs(i)
        mac = f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}"
        store.put(*_kv(validate({"kind": "Endpoint", "metadata": {"name": f"e{i}"},
                                 "spec": {"host": "hc", "orchestrator": "container", "workload_id": f"w{i}",
                                          "interface": f"tbc{i}", "mac": mac, "ipv6_addresses": [v6],
                                          "ipv4_addresses": [v4], "profiles": ["open"]}})))
        want_routes[f"{v6}/128"] = want_routes[f"{v4}/32"] = f"tbc{i}"
        want_neigh[(f"tbc{i}", v6)] = want_neigh[(f"tbc{i}", v4)] = mac
    store.close()
    with namespace("cold") as ns:
        lines = [f"link add tbc{i} type veth peer name tbd{i}" for i in range(len(want_routes) // 2)]
        lines += [f"link set tbc{i} up" for i in range(len(want_routes) // 2)]
        netns.ip("-batch", "-", ns=ns, input="\n".join(lines) + "\n")
        src = str(Path(__file__).resolve().parents[1] / "src")
        r = netns.nsexec(ns, [sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r})\n" + WORKER,
                              url, str(tmp_path / "run")], timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got == {"programmed": True, "gc": True, "pending": 0, "policy_ok": True}, r.stderr[-3000:]
        assert routes(ns) == want_routes
        got_neigh = neighbours(ns)
        assert {k: got_neigh[k].get("lladdr") for k in want_neigh if k in got_neigh} == want_neigh
        assert all("PERMANENT" in got_neigh[k]["state"] for k in want_neigh)
        assert "table inet tabby" in netns.nsexec(ns, ["nft", "list", "tables"]).stdout


def _kv(res: object) -> tuple[str, bytes]:
    return key_of(res), encode(res)


def test_link_index_matches_socket_if_nameindex() -> None:
    with namespace("lidx") as ns:
        netns.ip("-batch", "-", ns=ns, input="link add tbw0 type veth peer name tbw1\nlink set tbw0 up\n")
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            got = in_netns(fd, lambda: (sorted(_if_nameindex()), sorted(socket.if_nameindex())))
            links = LinkIndex()
            in_netns(fd, links.refresh)
        finally:
            os.close(fd)
    assert got[0] == got[1] and len(got[0]) == 3, got  # lo, tbw0, tbw1
    assert set(links.by_name) == {"lo", "tbw0", "tbw1"}
    assert links.by_index == {i: n for n, i in links.by_name.items()}
