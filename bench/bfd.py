"""BFD failover: how long the other hosts' kernels keep a cut-off host's routes, and that a BIRD
restart alone withdraws nothing.

    python bench/bfd.py [--quick]

A 3-host IPv6-only lab, a container each (its own prefix, torn down at the end), BFD on the mesh (Config
mesh_bfd). Host h1 is cut off 10 times per cause (3 with --quick): ``link-down`` (its bridge port
down) and ``blackhole`` (an nft table dropping everything in its namespace); each time, the ms
from the cut until the slowest of h2 and h3 deleted h1's block from its kernel (``ip monitor``).
Prints ``failover_ms`` with labels stat (p50, p99) and cause, and ``gr_withdrawals``: route
deletions of h1's block at h2 and h3 while h1's BIRD is killed (SIGKILL) and restarted by its
agent, until its sessions are back (must be 0: graceful restart).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

METRICS = ("failover_ms", "gr_withdrawals")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.client import ResourceClient  # noqa: E402
from tabby.lab import failover, netns  # noqa: E402
from tabby.lab import lab as L  # noqa: E402
from tabby.lab.topology import topology  # noqa: E402
from tabby.model import validate  # noqa: E402
from tabby.store import open_store  # noqa: E402


def bird_out(sock: Path, *args: str) -> str:
    return subprocess.run(["birdc", "-s", str(sock), *args], capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    cuts = 3 if ap.parse_args().quick else 10
    prefix = "b" + uuid.uuid4().hex[:5]
    the_lab = L.Lab(topology(3, 1, True, prefix), L.default_store(prefix))  # a container: a block
    try:
        the_lab.up()
        ResourceClient(open_store(the_lab.store_url)).apply(validate(
            {"kind": "Config", "metadata": {"name": "global"}, "spec": {"mesh_bfd": True}}))
        hosts = the_lab.topo.hosts
        run = the_lab.run_dir

        def bfd_up() -> bool:
            return all(bird_out(run / h.name / "bfd" / "bird.ctl", "show", "bfd", "sessions").count(" Up ")
                       == len(hosts) - 1 for h in hosts)

        netns.wait_for(bfd_up, 60, 0.2, "BFD up on every host")
        h1 = hosts[0]
        for cause in failover.CAUSES:
            st = failover.stats(failover.failover_ms(the_lab, h1, cause, cuts))
            for stat, value in st.items():
                print(json.dumps({"bench": "bfd", "metric": "failover_ms", "value": round(value, 1), "unit": "ms",
                                  "stat": stat, "cause": cause, "n": cuts, "hosts": len(hosts)}), flush=True)
        netns.wait_for(bfd_up, 60, 0.2, "BFD up again before the BIRD kill")
        pidfile = run / h1.name / "bird.pid"
        old = int(pidfile.read_text())

        def kill_and_restart() -> None:
            netns.kill_pid(old, 9)
            netns.wait_for(lambda: pidfile.exists() and int(pidfile.read_text() or 0) != old, 30, 0.1,
                           "BIRD restarted by the agent")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                bgp = [x for x in bird_out(run / h1.name / "bird.ctl", "show", "protocols").splitlines()
                       if " BGP " in x]
                if bgp and all("Established" in x for x in bgp):
                    return
                time.sleep(0.2)
            raise RuntimeError("h1's sessions not back after its BIRD restart")

        deleted = failover.withdrawals(the_lab, h1, kill_and_restart, watch_s=2.0)
        print(json.dumps({"bench": "bfd", "metric": "gr_withdrawals", "value": len(deleted), "unit": "routes",
                          "hosts": len(hosts)}), flush=True)
    finally:
        L.down(prefix)


if __name__ == "__main__":
    main()
