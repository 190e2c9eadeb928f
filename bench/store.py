"""Store throughput and watch latency, SQLite and a real etcd.

    python bench/store.py [--quick] [--backend sqlite|etcd]

One JSON object per line: put_per_s (one writer), cas_per_s (8 writer processes, each
compare-and-swap incrementing its own key), watch_p50_ms / watch_p99_ms (write -> event seen
by a watcher in another thread), each labelled with its backend.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tabby.lab.etcd import EtcdServer
from tabby.store import RevisionMismatch, open_store


def emit(metric: str, value: float, unit: str, backend: str, **labels: object) -> None:
    print(json.dumps({"bench": "store", "metric": metric, "value": round(value, 3), "unit": unit,
                      "backend": backend, **labels}), flush=True)


def _cas_worker(url: str, key: str, n: int, start: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    store = open_store(url)
    rev = store.create(key, b"0")
    value = 0
    while time.time() < start:
        time.sleep(0.001)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        try:
            value += 1
            rev = store.update(key, b"%d" % value, rev)
            done += 1
        except RevisionMismatch:
            kv = store.get(key)
            rev, value = kv.mod_revision, int(kv.value)
    out.put((t0, time.perf_counter()))
    store.close()


def bench(url: str, backend: str, quick: bool) -> None:
    store = open_store(url)
    run = f"/bench/{time.time_ns()}/"
    n_put = 500 if quick else 5000
    t0 = time.perf_counter()
    for i in range(n_put):
        store.put(f"{run}put/{i % 100}", b"x" * 200)
    emit("put_per_s", n_put / (time.perf_counter() - t0), "ops/s", backend, writers=1)

    writers, n_cas = 8, (100 if quick else 1000)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = time.time() + (2.0 if quick else 3.0)  # let the spawned interpreters import first
    procs = [ctx.Process(target=_cas_worker, args=(url, f"{run}cas/{w}", n_cas, start, q)) for w in range(writers)]
    for p in procs:
        p.start()
    spans = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    elapsed = max(e for _, e in spans) - min(s for s, _ in spans)
    emit("cas_per_s", writers * n_cas / elapsed, "ops/s", backend, writers=writers)

    n_watch = 100 if quick else 1000
    latencies: list[float] = []
    w = store.watch(run + "watch/", store.revision())
    ready = threading.Event()

    def watcher() -> None:
        ready.set()
        for ev in w:
            latencies.append((time.perf_counter() - float(ev.value or b"0")) * 1000)
            if len(latencies) >= n_watch:
                return

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    ready.wait()
    for i in range(n_watch):
        store.put(f"{run}watch/{i}", b"%.9f" % time.perf_counter())
        time.sleep(0.005)  # paced: latency of a single change, not of a backlog
    t.join(30)
    w.close()
    lat = sorted(latencies)
    emit("watch_p50_ms", statistics.median(lat), "ms", backend, events=len(lat))
    emit("watch_p99_ms", lat[min(len(lat) - 1, int(len(lat) * 0.99))], "ms", backend, events=len(lat))
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backend", choices=["sqlite", "etcd"], action="append")
    args = ap.parse_args()
    for backend in args.backend or ["sqlite", "etcd"]:
        with ExitStack() as stack:
            if backend == "sqlite":
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tabby-bench-"))
                url = f"sqlite://{tmp}/bench.db"
            else:
                url = stack.enter_context(EtcdServer(name="tby-bench")).url
            bench(url, backend, args.quick)


if __name__ == "__main__":
    main()
