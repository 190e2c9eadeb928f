"""Fabric convergence: from a Store write on one host's endpoint to the route in a remote host's
kernel, through the agent, BIRD's kernel learn, iBGP and the remote BIRD.

    python bench/convergence.py [--quick]

A 3-host IPv6-only lab (its own prefix, torn down at the end); endpoints on h1 with addresses
outside h1's IPAM blocks, so each is advertised as its own /128; timed in h2's kernel.
Prints p50_ms and p99_ms with label n (endpoints). It starts timing once h2's BGP session to h1
(the one the routes come over) is Established, found by the protocol name tabby gives it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

METRICS = ("p50_ms", "p99_ms")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.dataplane import bird_config  # noqa: E402
from tabby.lab import lab as L  # noqa: E402
from tabby.lab import netns  # noqa: E402
from tabby.lab.topology import topology  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 50 if args.quick else 200
    prefix = "b" + uuid.uuid4().hex[:5]
    the_lab = L.Lab(topology(3, 0, True, prefix), L.default_store(prefix))
    try:
        the_lab.up()
        h1, h2 = the_lab.topo.hosts[0], the_lab.topo.hosts[1]
        lines = [f"link add tbe{i} type veth peer name tbp{i}" for i in range(n)]
        lines += [f"link set tbe{i} up" for i in range(n)]
        netns.ip("-batch", "-", ns=h1.ns, input="\n".join(lines) + "\n")
        sock = str(the_lab.run_dir / h2.name / "bird.ctl")
        # the session on h2 that carries h1's routes (the outside router's session is not needed)
        needed = [bird_config._ident(f"host {h1.name} v6")]

        def established() -> bool:
            for name in needed:
                out = subprocess.run(["birdc", "-s", sock, "show", "protocols", name], capture_output=True,
                                     text=True).stdout
                if not any(line.split()[:1] == [name] and "Established" in line for line in out.splitlines()):
                    return False
            return True

        if not L.wait_until(established, 30):
            out = subprocess.run(["birdc", "-s", sock, "show", "protocols"], capture_output=True, text=True).stdout
            raise RuntimeError(f"BGP session(s) {needed} on {h2.name} did not come up:\n{out}")
        r = netns.nsexec(h2.ns, [sys.executable, str(ROOT / "bench" / "_convergence_worker.py"),
                                 the_lab.store_url, h1.name, str(n)], timeout=600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        lat = sorted(json.loads(r.stdout.strip().splitlines()[-1])["latencies_ms"])
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        for metric, value in (("p50_ms", statistics.median(lat)), ("p99_ms", p99)):
            print(json.dumps({"bench": "convergence", "metric": metric, "value": round(value, 2), "unit": "ms",
                              "n": len(lat), "backend": "sqlite", "hosts": 3}), flush=True)
    finally:
        L.down(prefix)


if __name__ == "__main__":
    main()
