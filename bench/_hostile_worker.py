"""Runs inside the bench's namespace: bursts of hostile records, then one valid Endpoint, timed
from its write to its route in this kernel. Prints the times (ms) as one JSON list."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _route_timer import RouteTimer

from tabby.client import ResourceClient
from tabby.lab.hostile import hostile_records
from tabby.model import validate
from tabby.store import open_store


def main() -> None:
    store = open_store(sys.argv[1])
    rounds, burst = int(sys.argv[2]), int(sys.argv[3])
    client = ResourceClient(store)
    timer = RouteTimer(77)
    records = hostile_records(rounds * burst, seed=3, stem="w")
    times = []
    for i in range(rounds):
        for r in records[i * burst:(i + 1) * burst]:
            store.put(r.key, r.value)
        addr = f"fd00:77::{i + 1:x}"
        ep = validate({"kind": "Endpoint", "metadata": {"name": f"w{i:04d}v"},
                       "spec": {"host": "h1", "orchestrator": "container", "workload_id": f"w{i}",
                                "interface": f"tbyv{i}", "mac": "52:54:00:00:00:01", "ipv6_addresses": [addr]}})
        times.append(timer.time(lambda ep=ep: client.apply(ep), f"{addr}/128"))
    print(json.dumps(times))


if __name__ == "__main__":
    main()
