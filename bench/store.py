"""Store throughput and watch latency, SQLite and real etcd: one member, three, three over TLS.

    python bench/store.py [--quick] [--backend sqlite|etcd|etcd-cluster|etcd-tls]...

Backends: ``etcd`` one member over plain HTTP; ``etcd-cluster`` three members on loopback, plain
HTTP; ``etcd-tls`` three members with TLS for clients and peers and client certificates (the
production set-up, less auth). One JSON object per line, each labelled with its backend:

- put_per_s: one writer, unconditional puts.
- cas_own_key_per_s: 8 writer processes, each compare-and-swap incrementing a key of its own with
  the revision it cached from its last write: no contention, so no conflict ever happens.
- cas_per_s: 8 writer processes contending on ONE key, each in a read-modify-write loop (read
  the value and revision, write value + 1 by compare-and-swap, on a revision mismatch read again
  and retry): successful updates per second, all writers together. At the end the key must hold
  exactly the number of successful updates (no update lost). Labels writer_updates_min/max show
  how evenly the writers got through.
- cas_conflicts_per_s: the compare-and-swap attempts of that run that lost (revision mismatch),
  per second; label conflict_ratio = lost / all attempts.
- watch_p50_ms / watch_p99_ms: write -> event seen by a watcher in another thread.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tabby.lab.etcd import EtcdCluster, EtcdServer
from tabby.store import RevisionMismatch, open_store

METRICS = ("put_per_s", "cas_own_key_per_s", "cas_per_s", "cas_conflicts_per_s", "watch_p50_ms", "watch_p99_ms")
WRITERS = 8


def emit(metric: str, value: float, unit: str, backend: str, **labels: object) -> None:
    print(json.dumps({"bench": "store", "metric": metric, "value": round(value, 3), "unit": unit,
                      "backend": backend, **labels}), flush=True)


def _own_key_worker(url: str, key: str, n: int, ready: Any, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """n increments of this writer's own key, with the revision cached from its last write."""
    store = open_store(url)
    rev = store.create(key, b"0")
    value = 0
    ready.wait()  # every writer has imported and connected
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


def _contended_worker(url: str, key: str, duration: float, ready: Any, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Read-modify-write of the one shared key for ``duration`` seconds; counts wins and losses."""
    store = open_store(url)
    ready.wait()
    t0 = time.perf_counter()
    wins = losses = 0
    kv = store.get(key)
    while time.perf_counter() - t0 < duration:
        try:
            store.update(key, b"%d" % (int(kv.value) + 1), kv.mod_revision)
            wins += 1
        except RevisionMismatch:
            losses += 1
        kv = store.get(key)  # read again: after a win too, as a writer that does not own the key must
    out.put((t0, time.perf_counter(), wins, losses))
    store.close()


def _run_writers(target: Any, args_for: Any) -> list[Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ready = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=target, args=(*args_for(w), ready, q)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return results


BACKENDS = ("sqlite", "etcd", "etcd-cluster", "etcd-tls")


def bench(url: str, backend: str, quick: bool) -> None:
    store = open_store(url)
    run = f"/bench/{time.time_ns()}/"
    cluster = backend in ("etcd-cluster", "etcd-tls")  # a commit is a quorum's fsync: fewer ops in --quick
    n_put = (150 if cluster else 500) if quick else 5000
    t0 = time.perf_counter()
    for i in range(n_put):
        store.put(f"{run}put/{i % 100}", b"x" * 200)
    emit("put_per_s", n_put / (time.perf_counter() - t0), "ops/s", backend, writers=1)

    n_cas = (25 if cluster else 100) if quick else 1000
    spans = _run_writers(_own_key_worker, lambda w: (url, f"{run}cas-own/{w}", n_cas))
    elapsed = max(e for _, e in spans) - min(s for s, _ in spans)
    emit("cas_own_key_per_s", WRITERS * n_cas / elapsed, "ops/s", backend, writers=WRITERS, keys=WRITERS)

    key = f"{run}cas-shared"
    store.create(key, b"0")
    duration = (1.0 if cluster else 2.0) if quick else 10.0
    res = _run_writers(_contended_worker, lambda w: (url, key, duration))
    elapsed = max(r[1] for r in res) - min(r[0] for r in res)
    wins, losses = sum(r[2] for r in res), sum(r[3] for r in res)
    final = int(store.get(key).value)
    if final != wins:
        raise SystemExit(f"{backend}: {wins} compare-and-swap updates succeeded but the key holds {final}")
    emit("cas_per_s", wins / elapsed, "ops/s", backend, writers=WRITERS, keys=1, updates=wins,
         writer_updates_min=min(r[2] for r in res), writer_updates_max=max(r[2] for r in res))
    emit("cas_conflicts_per_s", losses / elapsed, "conflicts/s", backend, writers=WRITERS, keys=1,
         conflicts=losses, conflict_ratio=round(losses / max(1, wins + losses), 3))

    n_watch = (50 if cluster else 100) if quick else 1000
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
    ap.add_argument("--backend", choices=BACKENDS, action="append")
    args = ap.parse_args()
    for backend in args.backend or BACKENDS:
        with ExitStack() as stack:
            if backend == "sqlite":
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="tabby-bench-"))
                url = f"sqlite://{tmp}/bench.db"
            elif backend == "etcd":
                url = stack.enter_context(EtcdServer(name="tby-bench")).url
            else:
                url = stack.enter_context(EtcdCluster.create(3, tls=backend == "etcd-tls", name="tby-bench")).url()
            bench(url, backend, args.quick)


if __name__ == "__main__":
    main()
