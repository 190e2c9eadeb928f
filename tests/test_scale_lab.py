"""Issue 16 item 3: the lab at scale.

The pair sampling and the route coverage behind `lab up`'s wait are pure and tested first; then a
100-host lab (one container per host, no VMs, a route reflector) must come up routed, pass a
sampled matrix of at least 1,000 pairs in each family, and leave nothing behind at `down`: no
namespace, no process, no file, and the machine's neighbour thresholds as they were.

Measured here (2026-12-01): ~26 min end to end with agents that polled SQLite every 2 ms; 19 min
and unfinished with the first change feed (it watched the Store's directory, so every -wal write
woke all ~200 processes, and every heartbeat was a commit every agent woke for); 4 min 42 s with
the feed on the signal files and status commits on a quiet signal, while two other engineers'
labs and qemu guests ran on the same two cores.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import pytest

from tabby.dataplane.links import read_neigh_thresholds
from tabby.lab import lab as L
from tabby.lab import netns, probe
from tabby.lab.topology import topology

HOSTS = 100
SAMPLE = 1000


def test_pick_pairs_covers_every_member_both_ways() -> None:
    members = [f"m{i}" for i in range(30)]
    for seed in range(20):
        pairs = probe.pick_pairs(members, 50, random.Random(seed), always=[("m0", "m29")])
        assert len(pairs) == len(set(pairs)) >= 50 + len(members)
        assert all(a != b for a, b in pairs)
        assert {a for a, _ in pairs} == set(members) == {b for _, b in pairs}
        assert ("m0", "m29") in pairs
    assert len(probe.pick_pairs(members, None, random.Random(0))) == 30 * 29
    assert len(probe.pick_pairs(members[:3], 1000, random.Random(0))) == 6  # never more than exist
    assert probe.pick_pairs(members[:1], 5, random.Random(0)) == []


def test_missing_routes_wants_every_other_hosts_addresses() -> None:
    routes = {"a": ["fd00:e::40/122", "10.65.0.64/26", "::/0"], "b": ["fd00:e::/122", "0.0.0.0/0"],
              "out": ["fd00:e::/122", "fd00:e::40/122", "10.65.0.0/26", "10.65.0.64/26"]}
    owned = {"a": ["fd00:e::1", "10.65.0.1"], "b": ["fd00:e::41", "10.65.0.65", "fd00:e::f001"], "out": []}
    missing = probe.missing_routes(routes, owned)
    # a default route proves nothing; a /128 outside any block needs its own route
    assert missing == {"a": ["fd00:e::f001"], "b": ["10.65.0.1"], "out": ["fd00:e::f001"]}
    routes["a"].append("fd00:e::f001/128")
    routes["b"].append("10.65.0.0/26")
    routes["out"].append("fd00:e::f000/116")
    assert probe.missing_routes(routes, owned) == {}


def _leftover_processes(prefix: str) -> list[str]:
    """Processes whose command line names this lab (its namespaces, directories or prefix)."""
    marks = (f"/lab/{prefix}/".encode(), f"{prefix}-".encode())
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if any(m in cmd for m in marks):
            shown = cmd.replace(b"\0", b" ")[:200].decode(errors="replace")
            found.append(f"{p.name}: {shown}")
    return found


@pytest.mark.timeout(1200)
def test_a_100_host_lab_routes_and_leaves_nothing() -> None:
    # the machine's values before any lab raised them (other labs may be up: they share the record)
    record = L._read_record()
    before = record["original"] if record and record["labs"] else read_neigh_thresholds()
    prefix = "ts" + uuid.uuid4().hex[:5]
    topo = topology(HOSTS, 1, False, prefix, (1,), 0)
    the_lab = L.Lab(topo, L.default_store(prefix))
    try:
        t0 = time.monotonic()
        the_lab.up()
        state = the_lab.wait_routed(900, 1.0)
        assert state["ok"], {k: state[k] for k in ("not_in_sync", "missing")}
        print(f"{HOSTS} hosts up and routed in {time.monotonic() - t0:.0f} s")
        t1 = time.monotonic()
        rows = the_lab.matrix(("v6", "v4"), sample=SAMPLE, seed=16)
        print(f"{len(rows)} checks in {time.monotonic() - t1:.0f} s")
        for fam in ("v6", "v4"):
            mine = [r for r in rows if r["family"] == fam]
            assert len({(r["src"], r["dst"]) for r in mine}) >= SAMPLE
            assert {r["src"] for r in mine} >= {w.name for w in topo.workloads}
            assert {r["dst"] for r in mine} >= {w.name for w in topo.workloads}
        bad = [r for r in rows if not r["ok"]]
        assert not bad, f"{len(bad)} of {len(rows)} checks failed, e.g. {bad[:5]}"
    finally:
        L.down(prefix)
    assert not [n for n in (netns.NETNS_DIR.iterdir() if netns.NETNS_DIR.exists() else [])
                if n.name.startswith(prefix + "-")]
    assert _leftover_processes(prefix) == []
    assert not L.lab_dir(prefix).exists() and not L.run_dir(prefix).exists()
    record = L._read_record()
    if record and record["labs"]:  # labs of others still up keep what they need; this one's share is gone
        assert prefix not in record["labs"] and read_neigh_thresholds() == record["set"]
    else:
        assert read_neigh_thresholds() == before
