"""Hostile input: what bad records cost a reader, and how fast a good record still gets through.

    python bench/hostile.py [--quick]

decode_us (label category): the time the strict decoder takes to refuse one hostile record of
that category (tabby.lab.hostile's generator; every family of record), in this process.
valid_after_hostile_ms (label stat: p50, p99): a real agent in a namespace on SQLite; each round
writes a burst of hostile records and then one valid Endpoint, timed from that write to its route
in the agent's kernel (policy goes in first, so the route means policy is in too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.lab import netns  # noqa: E402
from tabby.lab.hostile import hostile_records  # noqa: E402
from tabby.model.codec import InvalidResource  # noqa: E402
from tabby.model.records import decode_record  # noqa: E402

METRICS = ("decode_us", "valid_after_hostile_ms")


def emit(metric: str, value: float, unit: str, **labels: object) -> None:
    print(json.dumps({"bench": "hostile", "metric": metric, "value": round(value, 3), "unit": unit, **labels}),
          flush=True)


def decode_costs(count: int, reps: int) -> None:
    by_cat: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for r in hostile_records(count, seed=1):
        by_cat[r.category].append((r.key, r.value))
    for category, recs in sorted(by_cat.items()):
        t0 = time.perf_counter()
        for _ in range(reps):
            for key, value in recs:
                try:
                    decode_record(key, value)
                except InvalidResource:
                    pass
                else:
                    raise AssertionError(f"{key} decoded: not hostile")
        emit("decode_us", (time.perf_counter() - t0) / (reps * len(recs)) * 1e6, "us", category=category)


def valid_after_hostile(rounds: int, burst: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tabby-bench-hostile-"))
    store = f"sqlite://{tmp}/store.db"
    agent = None
    ns = f"tbyb{uuid.uuid4().hex[:6]}"
    try:
        netns.add_netns(ns)
        lines = [f"link add tbyv{i} type veth peer name tbyw{i}" for i in range(rounds)]
        lines += [f"link set tbyv{i} up" for i in range(rounds)]
        netns.ip("-batch", "-", ns=ns, input="\n".join(lines) + "\n")
        agent = netns.spawn(ns, [sys.executable, "-m", "tabby.cli", "--store", store, "agent", "--host", "h1",
                                 "--metrics-port", "0", "--no-bgp", "--run-dir", str(tmp / "run")], tmp / "agent.log")
        netns.wait_for(lambda: "in sync with the store" in (tmp / "agent.log").read_text(), 30, 0.05, "agent in sync")
        r = netns.nsexec(ns, [sys.executable, str(ROOT / "bench" / "_hostile_worker.py"), store, str(rounds),
                              str(burst)])
        if r.returncode != 0:
            raise RuntimeError(f"worker failed: {r.stderr[-2000:]}")
        times = json.loads(r.stdout)
        if any(t == float("inf") or t > 10_000 for t in times):
            raise RuntimeError(f"a valid endpoint was not programmed: {times}")
        q = statistics.quantiles(times, n=100, method="inclusive")
        emit("valid_after_hostile_ms", statistics.median(times), "ms", stat="p50", rounds=rounds, burst=burst)
        emit("valid_after_hostile_ms", q[98], "ms", stat="p99", rounds=rounds, burst=burst)
    finally:
        if agent is not None:
            netns.stop(agent)
        netns.del_netns(ns)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    decode_costs(224 if args.quick else 2240, 3 if args.quick else 10)
    valid_after_hostile(40 if args.quick else 200, 20 if args.quick else 50)


if __name__ == "__main__":
    main()
