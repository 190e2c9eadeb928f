"""IPAM assignment throughput on SQLite and a real etcd, one writer and eight.

    python bench/ipam.py [--quick] [--backend sqlite|etcd]

Prints assigns_per_s with labels backend and writers. Eight writers are eight processes on four
hosts (two per host, so both block contention and claim races are in the figure), one IPv6
address per assign from one /104 pool.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tabby.client import ResourceClient
from tabby.ipam import IPAM
from tabby.lab.etcd import EtcdServer
from tabby.model import validate
from tabby.store import open_store

METRICS = ("assigns_per_s",)


def _writer(url: str, pool: str, host: str, w: int, n: int, ready: Any, out: mp.Queue) -> None:  # type: ignore[type-arg]
    ipam = IPAM(open_store(url))
    ready.wait(timeout=300)  # every writer imported and connected: they all start together
    t0 = time.perf_counter()
    for i in range(n):
        ipam.assign(f"{pool}.w{w}-{i}", host, ipv6=1, pool=pool)
    out.put((t0, time.perf_counter()))


def run(url: str, backend: str, writers: int, n: int, run_id: int) -> None:
    pool = f"bench{run_id}"
    ResourceClient(open_store(url)).apply(validate(
        {"kind": "IPPool", "metadata": {"name": pool}, "spec": {"cidr": f"fd00:{run_id:x}::/104"}}))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ready = ctx.Barrier(writers)
    procs = [ctx.Process(target=_writer, args=(url, pool, f"h{w // 2}", w, n, ready, q)) for w in range(writers)]
    for p in procs:
        p.start()
    spans = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    elapsed = max(e for _, e in spans) - min(s for s, _ in spans)
    print(json.dumps({"bench": "ipam", "metric": "assigns_per_s", "value": round(writers * n / elapsed, 1),
                      "unit": "assigns/s", "backend": backend, "writers": writers, "assigns": writers * n}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", choices=["sqlite", "etcd"], action="append")
    args = ap.parse_args()
    total = 2000 if args.quick else 10_000
    run_id = 1
    for backend in args.backend or ["sqlite", "etcd"]:
        with ExitStack() as stack:
            if backend == "sqlite":
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tabby-bench-"))
                url = f"sqlite://{tmp}/ipam.db"
            else:
                url = stack.enter_context(EtcdServer(name="tby-bench-ipam")).url
            for writers in (1, 8):
                n = total // writers if backend == "sqlite" else total // writers // 4
                run(url, backend, writers, n, run_id)
                run_id += 1


if __name__ == "__main__":
    main()
