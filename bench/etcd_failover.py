"""What killing the etcd leader costs the fabric: a 3-member TLS cluster and a real agent in a
scratch namespace, a writer and a watcher running, then the leader killed with SIGKILL (and
restarted).

    python bench/etcd_failover.py [--quick]

- leader_kill_write_gap_s: the longest time with no successful write (one put every 10 ms), from
  the kill on: the survivors' election plus the store noticing (a write to a follower whose
  leader died waits for WRITE_TIMEOUT_S, then goes to the next member).
- leader_kill_watch_gap_s: the longest time between two events seen by a watch on those keys.
- leader_kill_program_s: an Endpoint written right after the kill (retried until the cluster takes
  it) -> its route in the kernel, counted from the kill (so from the new leader's election it is
  at most this, less election_s).
- routes_withdrawn: routes of tabby's (proto 77) deleted meanwhile, as `ip monitor route` saw
  them, plus any missing at the end (must be 0).

Labels: election_s (kill -> a new leader, seen by polling every member: an upper bound), runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.lab import netns  # noqa: E402
from tabby.lab.etcd import EtcdCluster  # noqa: E402

METRICS = ("leader_kill_write_gap_s", "leader_kill_watch_gap_s", "leader_kill_program_s", "routes_withdrawn")
WORKER = str(ROOT / "bench" / "_failover_worker.py")
ENDPOINTS = 4
HOST = "hfo"


def emit(metric: str, value: float, unit: str, **labels: object) -> None:
    print(json.dumps({"bench": "etcd_failover", "metric": metric, "value": round(value, 3), "unit": unit,
                      **labels}), flush=True)


def one_run(cluster: EtcdCluster, ns: str, tmp: Path) -> dict[str, object]:
    """Kill the leader once under load; the worker's figures, with the election time."""
    worker = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, WORKER, cluster.url(), HOST,
                               str(ENDPOINTS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              stderr=open(tmp / "worker.log", "a"))  # noqa: SIM115 - the child's
    try:
        assert worker.stdin is not None and worker.stdout is not None
        line = worker.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"worker: {line!r}; see {tmp}/worker.log")
        time.sleep(1.0)
        leader = cluster.leader()
        t_kill = time.monotonic()
        leader.kill()
        worker.stdin.write(f"kill {t_kill}\n")
        worker.stdin.flush()
        new = cluster.leader()
        t_elected = time.monotonic()  # an upper bound: members are polled one by one
        assert new is not leader
        result = json.loads(worker.stdout.readline())
        leader.start()
        return {**result, "election_s": t_elected - t_kill}
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs = 1 if args.quick else 5
    ns = f"tbybF{uuid.uuid4().hex[:6]}"
    agent = None
    cluster = None
    with tempfile.TemporaryDirectory(prefix="tabby-bench-failover-") as d:
        tmp = Path(d)
        try:
            netns.add_netns(ns)
            for i in range(ENDPOINTS + 1):
                netns.add_veth(ns, f"tbf{i}", f"tbq{i}")
            cluster = EtcdCluster.create(3, tls=True, name="tbyb-fo", directory=tmp / "cluster",
                                         hosts=[(ns, "127.0.0.1")] * 3).start()
            agent = netns.spawn(ns, [sys.executable, "-m", "tabby.cli", "--store", cluster.url(), "agent", "--host",
                                     HOST, "--metrics-port", "0", "--run-dir", str(tmp / "run")], tmp / "agent.log")
            results = [one_run(cluster, ns, tmp) for _ in range(runs)]
        finally:
            if agent is not None:
                netns.stop(agent)
            if cluster is not None:
                cluster.stop()
            netns.sweep(ns)  # and what the agent started there (its BIRD), by pid: a deleted namespace keeps them

    def med(name: str) -> float:
        vals = [float(r[name]) for r in results]  # type: ignore[arg-type]
        return math.nan if any(math.isnan(v) for v in vals) else statistics.median(vals)

    labels = {"runs": runs, "members": 3, "tls": True, "election_s": round(med("election_s"), 3)}
    emit("leader_kill_write_gap_s", med("write_gap_s"), "s", **labels)
    emit("leader_kill_watch_gap_s", med("watch_gap_s"), "s", **labels)
    emit("leader_kill_program_s", med("program_s"), "s", **labels)
    withdrawn = sum(len(r["withdrawn"]) + len(r["lost"]) for r in results)  # type: ignore[arg-type]
    emit("routes_withdrawn", withdrawn, "routes", runs=runs, endpoints=ENDPOINTS)


if __name__ == "__main__":
    main()
