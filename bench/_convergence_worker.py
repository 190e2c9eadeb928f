"""Runs inside a remote host's namespace: writes endpoints of another host to the Store and times
each until its route, learned over BGP, is in this namespace's kernel."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _route_timer import RouteTimer

from tabby.model import encode, key_of, validate
from tabby.store import open_store

RTPROT_BIRD = 12


def main(url: str, host: str, count: int) -> None:
    store = open_store(url)
    timer = RouteTimer(proto=RTPROT_BIRD)
    lat = []
    for i in range(count):
        dst = f"fd00:e::f{i:03x}"
        ep = validate({"kind": "Endpoint", "metadata": {"name": f"conv{i}"},
                       "spec": {"host": host, "orchestrator": "container", "workload_id": f"conv{i}",
                                "interface": f"tbe{i}", "mac": "ee:ee:ee:ee:ee:ee", "ipv6_addresses": [dst]}})
        lat.append(timer.time(lambda ep=ep: store.put(key_of(ep), encode(ep)), f"{dst}/128"))
        time.sleep(0.02)
    print(json.dumps({"latencies_ms": lat}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
