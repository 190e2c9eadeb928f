"""Policy programming cost: 10,000 endpoints x 1,000 rules in one nftables table.

    python bench/policy.py [--quick]

Runs in a network namespace of its own. The shape: 100 policies of 10 rules each (1,000 rules),
each selecting the endpoints of one "app" label and allowing TCP ports from the endpoints of the
next app (a label selector, compiled to address sets); every endpoint local and dual-stack (the
largest sets a host can have). Metrics:

- calc_s: the pure calculation for all endpoints, as a cold agent does it before writing: the
  Policies and Endpoints fed to the index, the structure built and every endpoint's set
  membership computed (the rebuild ``take_delta()`` runs), so the desired state is ready
- full_apply_s: the kernel write that follows: one replacement transaction of the whole table
  (rendered, encoded to nf_tables messages, and committed over nfnetlink)
- total_s: calc_s + full_apply_s, timed as one interval (cold start to the table in the kernel)
- incremental_ms p50/p99: one endpoint added, or removed, and the kernel patched (calculation
  included), at 1,000 and at 10,000 endpoints (label ``endpoints``) to show it does not grow
- check_ms: a full drift comparison (list the table, compare with the desired state)

Before each cold run the garbage of the previous one is collected, so it is not billed to the
next; full (generation 2) collector passes inside an interval are part of the figure, and their
number and time are in the labels ``gc2_passes`` and ``gc2_s``.

Goals (the policy issue): total_s under 1 s; incremental under 10 ms, independent of the total.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.agent.policy_calc import PolicyIndex  # noqa: E402
from tabby.model import validate  # noqa: E402

METRICS = ("calc_s", "full_apply_s", "total_s", "incremental_ms", "incremental_add_ms", "incremental_del_ms",
           "check_ms")

APPS = 100
RULES_PER_POLICY = 10


def emit(metric: str, value: float, unit: str, **labels: Any) -> None:
    print(json.dumps({"bench": "policy", "metric": metric, "value": round(value, 4), "unit": unit,
                      "rules": APPS * RULES_PER_POLICY, **labels}), flush=True)


def endpoint(i: int) -> Any:
    return validate({"kind": "Endpoint", "metadata": {"name": f"e{i}", "labels": {"app": f"a{i % APPS}"}},
                     "spec": {"host": "h1", "orchestrator": "container", "workload_id": f"w{i}",
                              "interface": f"tby{i:011x}", "mac": f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                                                                 f"{i & 255:02x}",
                              "ipv6_addresses": [f"fd00:e::{i:x}"],
                              "ipv4_addresses": [f"10.{64 + (i >> 16)}.{i >> 8 & 255}.{i & 255}"]}})


def policies() -> list[Any]:
    out = []
    for a in range(APPS):
        rules = [{"action": "allow", "protocol": "tcp", "dst_ports": [8000 + k, f"{9000 + k * 10}:{9005 + k * 10}"],
                  "src_selector": f'app == "a{(a + 1) % APPS}"'} for k in range(RULES_PER_POLICY - 1)]
        rules.append({"action": "deny", "src_nets": ["fd00:99::/64", "10.99.0.0/16"]})
        out.append(validate({"kind": "Policy", "metadata": {"name": f"p{a}"},
                             "spec": {"order": a, "selector": f'app == "a{a}"', "ingress": rules,
                                      "egress": [{"action": "allow"}]}}))
    return out


class FullGcClock:
    """Counts full (generation 2) garbage-collector passes, and their time, while registered."""

    def __init__(self) -> None:
        self.passes, self.s, self._t0 = 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.passes += 1
            self.s += time.perf_counter() - self._t0

    def labels(self) -> dict[str, float]:
        return {"gc2_passes": self.passes, "gc2_s": round(self.s, 4)}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def worker(sizes: list[int], samples: int) -> None:
    from tabby.dataplane.policy import PolicyReconciler

    pols = policies()
    eps = [endpoint(i) for i in range(max(sizes) + samples)]
    for n in sizes:
        idx = PolicyIndex()
        rec = PolicyReconciler()
        gc.collect()
        calc_gc, apply_gc = FullGcClock(), FullGcClock()
        gc.callbacks.append(calc_gc)
        t0 = time.perf_counter()
        for p in pols:
            idx.set_policy(p.metadata.name, p)
        for e in eps[:n]:
            idx.set_endpoint(e.metadata.name, e, True)
        idx.structure()
        idx.take_delta()  # the rebuild: every endpoint's set membership
        t1 = time.perf_counter()
        gc.callbacks.remove(calc_gc)
        gc.callbacks.append(apply_gc)
        ok = rec.apply(idx)
        t2 = time.perf_counter()
        gc.callbacks.remove(apply_gc)
        calc, full, total = t1 - t0, t2 - t1, t2 - t0
        if not ok:
            raise SystemExit(f"full apply failed: {rec.last_error}")
        elements = sum(len(v) for v in idx.desired_elements().values())
        emit("calc_s", calc, "s", endpoints=n, **calc_gc.labels())
        emit("full_apply_s", full, "s", endpoints=n, elements=elements, **apply_gc.labels())
        emit("total_s", total, "s", endpoints=n, elements=elements, gc2_passes=calc_gc.passes + apply_gc.passes,
             gc2_s=round(calc_gc.s + apply_gc.s, 4))
        adds, dels = [], []
        for e in eps[n:n + samples]:
            t0 = time.perf_counter()
            idx.set_endpoint(e.metadata.name, e, True)
            ok = rec.apply(idx)
            adds.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            idx.set_endpoint(e.metadata.name, None)
            ok = ok and rec.apply(idx)
            dels.append((time.perf_counter() - t0) * 1000)
            if not ok:
                raise SystemExit(f"incremental apply failed: {rec.last_error}")
        if rec.replaces != 1:
            raise SystemExit(f"expected element patches only, saw {rec.replaces - 1} extra replaces")
        both = adds + dels
        emit("incremental_ms", statistics.median(both), "ms", endpoints=n, stat="p50")
        emit("incremental_ms", pct(both, 0.99), "ms", endpoints=n, stat="p99")
        emit("incremental_add_ms", statistics.median(adds), "ms", endpoints=n, stat="p50")
        emit("incremental_del_ms", statistics.median(dels), "ms", endpoints=n, stat="p50")
        t0 = time.perf_counter()
        why = rec.differences(idx)
        emit("check_ms", (time.perf_counter() - t0) * 1000, "ms", endpoints=n)
        if why is not None:
            raise SystemExit(f"kernel differs from the desired table after the run: {why}")
        rec.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    samples = args.samples or (50 if args.quick else 300)
    if args.worker:
        worker([1000, 10000], samples)
        return
    ns = f"tbyp{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--worker", "--samples",
                            str(samples)], timeout=600)
        if r.returncode != 0:
            raise SystemExit(r.returncode)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
