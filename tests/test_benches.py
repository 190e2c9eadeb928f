"""Every bench runs: ``bench/NAME.py --quick`` exits 0, prints only JSON objects with bench, metric,
value and unit, and prints every metric it promises in its module-level ``METRICS`` tuple (the one
list of them; README's Benchmarks paragraph follows it). No figure is judged: benches are never
timed tests. The ``_``-prefixed files in bench/ are workers the benches start, not benches."""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
RUN_TIMEOUT_S = 240  # --quick promises 60 s; a loaded CI machine gets four times that
GRACE_S = 60  # after an interrupt, for the bench's own clean-up (namespaces, daemons)


def promised_metrics(path: Path) -> tuple[str, ...]:
    """The bench's ``METRICS = (...)``, read from its source (importing it would start nothing, but
    needs its imports to resolve; the literal is all we want)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "METRICS" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, tuple) and value and all(isinstance(m, str) for m in value), \
                f"{path.name}: METRICS must be a non-empty tuple of metric names"
            return value
    raise AssertionError(f"{path.name} has no module-level METRICS tuple")


def run_quick(path: Path) -> subprocess.CompletedProcess[str]:
    """The bench as a developer runs it, with this checkout's code first on the path for it and
    for every ``python -m tabby...`` it starts. On a timeout it gets SIGINT, so its ``finally``
    blocks remove what it built, before it is killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with subprocess.Popen([sys.executable, str(path), "--quick"], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"{path.name} --quick ran over {RUN_TIMEOUT_S} s\n--- stdout\n{out[-3000:]}"
                        f"\n--- stderr\n{err[-3000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_every_bench_is_found() -> None:
    names = {p.stem for p in BENCHES}
    assert {"agent", "cni", "convergence", "hostile", "ipam", "policy", "store", "vm_boot"} <= names, names


def test_readme_names_every_metric() -> None:
    """README's Benchmarks paragraph names each bench and every metric it promises."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Benchmarks"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    for path in BENCHES:
        assert f"bench/{path.name}" in section, f"README's Benchmarks paragraph does not name {path.name}"
        missing = [m for m in promised_metrics(path) if f"`{m}`" not in section]
        assert not missing, f"README's Benchmarks paragraph does not name {path.name}'s {missing}"


@pytest.mark.skipif(os.geteuid() != 0, reason="the benches build network namespaces: run as root")
@pytest.mark.timeout(RUN_TIMEOUT_S + GRACE_S + 60)
@pytest.mark.parametrize("path", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_quick(path: Path) -> None:
    promised = promised_metrics(path)
    r = run_quick(path)
    assert r.returncode == 0, f"{path.name} --quick exited {r.returncode}\n--- stderr\n{r.stderr[-4000:]}"
    lines = r.stdout.splitlines()
    assert lines, f"{path.name} printed nothing"
    seen: set[str] = set()
    for line in lines:
        obj = json.loads(line)  # every line is JSON ...
        assert isinstance(obj, dict), f"not a JSON object: {line}"  # ... an object
        missing = {"bench", "metric", "value", "unit"} - set(obj)
        assert not missing, f"{missing} missing in {line}"
        assert obj["bench"] == path.stem, line
        assert isinstance(obj["unit"], str) and obj["unit"], line
        value = obj["value"]
        assert isinstance(value, int | float) and not isinstance(value, bool), line
        assert math.isfinite(value), f"not a finite number (a wait that timed out?): {line}"
        assert obj["metric"] in promised, f"{obj['metric']} is not in {path.name}'s METRICS {promised}"
        seen.add(obj["metric"])
    assert set(promised) <= seen, f"{path.name} promised {sorted(set(promised) - seen)} but did not print them"
