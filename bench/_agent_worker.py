"""Runs inside a bench namespace (``ip netns exec``): the agent in-process for the cold-start
figure, or a writer timing endpoint add -> route in this namespace's kernel."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _route_timer import RouteTimer

from tabby.agent.agent import Agent
from tabby.model import encode, key_of, validate
from tabby.store import open_store


def _timed(cls: type, name: str, spent: list[float]) -> None:
    """Wrap a method so that the wall time of its calls adds up in spent[0]."""
    inner = getattr(cls, name)

    def timed(*args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    setattr(cls, name, timed)


def cold(url: str, host: str) -> None:
    """Time a cold agent: Store list + decode + calculation + kernel programming of every endpoint.
    Also the wall time of its kernel writes until then (kernel_writes_s): the policy transaction
    (``NftSocket.transaction``: the kernel applies the batch inside its send) and each chunk of
    route and neighbour messages (``Netlink._send_chunk``: its send, in which the kernel handles
    them, and the read of its one ack). Two calls per chunk wrapped: no cost worth naming."""
    from tabby.dataplane.netlink import Netlink
    from tabby.dataplane.nft_netlink import NftSocket

    spent = [0.0]
    _timed(NftSocket, "transaction", spent)
    _timed(Netlink, "_send_chunk", spent)
    store = open_store(url)
    agent = Agent(store, host, metrics_port=None)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 300
    kernel_s = None
    while (agent.routes_programmed_at is None or agent.sysctls_programmed_at is None) and time.monotonic() < deadline:
        if kernel_s is None and agent.routes_programmed_at is not None:
            kernel_s = spent[0]  # (the sysctl writes that follow call neither)
        time.sleep(0.005)
    agent.stop()
    print(json.dumps({"program_s": agent.routes_programmed_at - agent.started_at,
                      "sysctl_s": agent.sysctls_programmed_at - agent.routes_programmed_at,
                      "endpoints": len(agent.index.plans), "pending": agent.routes.waiting(),
                      "kernel_writes_s": spent[0] if kernel_s is None else kernel_s}))


def writer(n: int) -> None:
    """The route/neighbour reconciler alone, all endpoints on one veth (the shape of the trial in
    the issue): desired state in, one apply, timed from the first set_desired."""
    from tabby.dataplane.links import LinkIndex
    from tabby.dataplane.netlink import Netlink
    from tabby.dataplane.routes import RoutesReconciler

    links = LinkIndex()
    links.refresh()
    rec = RoutesReconciler(Netlink(), links)
    t0 = time.perf_counter()
    for i in range(n):
        v6, v4 = f"fd00:e::{i // 65536:x}:{i % 65536:x}", f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        mac = f"52:54:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
        rec.set_route(f"{v6}/128", "tbe0")
        rec.set_route(f"{v4}/32", "tbe0")
        rec.set_neighbour(("tbe0", v6), mac)
        rec.set_neighbour(("tbe0", v4), mac)
    rec.resync()
    applied, failed = rec.apply()
    print(json.dumps({"writer_s": time.perf_counter() - t0, "applied": applied, "failed": failed}))


def adds(url: str, host: str, count: int, first: int) -> None:
    """Write endpoints one by one; time each from Store write to its route in this kernel."""
    store = open_store(url)
    timer = RouteTimer(proto=77)
    lat = []
    for i in range(first, first + count):
        dst = f"fd00:a::{i:x}"
        ep = validate({"kind": "Endpoint", "metadata": {"name": f"add{i}"},
                       "spec": {"host": host, "orchestrator": "container", "workload_id": f"add{i}",
                                "interface": f"tbe{i}", "mac": "ee:ee:ee:ee:ee:ee", "ipv6_addresses": [dst]}})
        lat.append(timer.time(lambda ep=ep: store.put(key_of(ep), encode(ep)), f"{dst}/128"))
        time.sleep(0.01)
    print(json.dumps({"latencies_ms": lat}))


if __name__ == "__main__":
    if sys.argv[1] == "cold":
        cold(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "writer":
        writer(int(sys.argv[2]))
    else:
        adds(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
