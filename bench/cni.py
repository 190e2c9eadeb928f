"""CNI plugin latency, as a runtime sees it: one `tabby-cni` process per call, run in a host
namespace for a fresh container namespace each time.

    python bench/cni.py [--quick]

Prints add_p50_ms, add_p99_ms, del_p50_ms, del_p99_ms with labels parallel (1, 8) and mode
("server": the shim hands the call to a warm `tabby cni-server`; "in-process": no server, the
plugin process does everything itself), then checks
that all those ADDs and DELs left no veth, no allocation and no record (metric leaked_objects).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.client import ResourceClient  # noqa: E402
from tabby.ipam import IPAM  # noqa: E402
from tabby.lab import netns  # noqa: E402
from tabby.model import validate  # noqa: E402
from tabby.store import open_store  # noqa: E402

METRICS = ("add_p50_ms", "add_p99_ms", "del_p50_ms", "del_p99_ms", "leaked_objects")

# the plugin executable installed beside the interpreter running this bench (the venv's)
CNI = str(Path(sys.executable).parent / "tabby-cni")


def call(host_ns: str, command: str, conf: str, cid: str, container: str, server: bool) -> float:
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
           "CNI_NETNS": f"/run/netns/{container}", "CNI_PATH": "/opt/cni/bin"}
    if not server:
        env["TABBY_CNI_NO_SERVER"] = "1"
    t0 = time.perf_counter()
    r = subprocess.run(["ip", "netns", "exec", host_ns, CNI], input=conf, capture_output=True, text=True, env=env)
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"{command} {cid}: {r.stdout} {r.stderr}")
    return dt


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 12 if args.quick else 250  # per mode and parallelism level: 1,000 ADDs and DELs in all (48 quick)
    tag = uuid.uuid4().hex[:4]
    host_ns = f"tbyc{tag}"
    with tempfile.TemporaryDirectory(prefix="tabby-bench-cni-") as d:
        url = f"sqlite://{d}/store.db"
        store = open_store(url)
        client = ResourceClient(store)
        client.apply(validate({"kind": "IPPool", "metadata": {"name": "v6"}, "spec": {"cidr": "fd00:e::/104"}}))
        client.apply(validate({"kind": "IPPool", "metadata": {"name": "v4"}, "spec": {"cidr": "10.64.0.0/14"}}))
        sock = f"{d}/cni.sock"
        conf = json.dumps({"cniVersion": "1.1.0", "name": "bench", "type": "tabby-cni", "store": url, "host": "hb",
                           "server_socket": sock})
        containers: list[str] = []
        server = None
        try:
            netns.add_netns(host_ns)
            server = netns.spawn(host_ns, [sys.executable, "-m", "tabby.cli", "cni-server", "--host", "hb",
                                           "--socket", sock, "--log-level", "warning"], Path(d) / "server.log")
            netns.wait_for(lambda: os.path.exists(sock), 20, 0.05, "cni-server")
            for mode in ("server", "in-process"):
                for parallel in (1, 8):
                    names = [f"tbyc{tag}{mode[0]}{parallel}x{i}" for i in range(n)]
                    for c in names:
                        netns.add_netns(c)
                    containers += names
                    warm = mode == "server"
                    with ThreadPoolExecutor(parallel) as pool:
                        adds = list(pool.map(lambda c, w=warm: call(host_ns, "ADD", conf, c, c, w), names))
                        dels = list(pool.map(lambda c, w=warm: call(host_ns, "DEL", conf, c, c, w), names))
                    for metric, xs in (("add", adds), ("del", dels)):
                        for q, label in ((0.5, "p50"), (0.99, "p99")):
                            print(json.dumps({"bench": "cni", "metric": f"{metric}_{label}_ms",
                                              "value": round(statistics.median(xs) if q == 0.5 else pct(xs, q), 1),
                                              "unit": "ms", "parallel": parallel, "mode": mode, "calls": len(xs)}),
                                  flush=True)
            veths = [line for line in netns.ip("-o", "link", "show", ns=host_ns).splitlines() if " tby" in line]
            leaked = len(veths) + len(IPAM(store).handles()) + len(store.list("/tabby/v1/endpoints/")[0])
            print(json.dumps({"bench": "cni", "metric": "leaked_objects", "value": leaked, "unit": "objects",
                              "adds_and_dels": 2 * len(containers)}), flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
            for c in containers:
                netns.del_netns(c)
            netns.del_netns(host_ns)


if __name__ == "__main__":
    main()
