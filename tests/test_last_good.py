"""The last good versions of corrupt records, kept on disk across restarts: every syncer's thread
writes them (a review found two at once broke json.dump's iteration and tore the file)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tabby.agent.last_good import LastGood
from tabby.model import validate


def endpoint(name: str) -> object:
    return validate({"kind": "Endpoint", "metadata": {"name": name}, "spec": {
        "host": "h1", "orchestrator": "vm", "workload_id": name, "interface": "tap1", "mac": "52:54:00:00:00:01",
        "ipv4_addresses": ["10.0.0.1"]}})


def test_syncer_threads_at_once_leave_a_whole_file_with_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "last-good.json"
    keeper = LastGood(path)
    records = {f"/tabby/v1/endpoints/h1/e{t}-{i}": endpoint(f"e{t}-{i}") for t in range(4) for i in range(60)}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def syncer(t: int) -> None:  # each sets its own range's records, and forgets every other one again
        start.wait()
        try:
            for i in range(60):
                key = f"/tabby/v1/endpoints/h1/e{t}-{i}"
                keeper.set(key, i + 1, records[key])
                if i % 2:
                    keeper.forget(key)
        except BaseException as e:  # what the thread met is the result
            errors.append(e)
    threads = [threading.Thread(target=syncer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    kept = {k for k in records if int(k.rsplit("-", 1)[1]) % 2 == 0}
    assert set(json.loads(path.read_text())) == kept
    assert set(LastGood(path).load(lambda k, v: v)) == kept


def test_a_file_of_big_records_is_not_refused_by_one_records_bound(tmp_path: Path) -> None:
    """The per-record bound (100,000 values) was applied to the whole file: two good Policies of
    60,000 networks each, both corrupt later, were lost at the next start."""
    path = tmp_path / "last-good.json"
    keeper = LastGood(path)
    for name in ("a", "b"):
        nets = [f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}/32" for i in range(60_000)]
        keeper.set(f"/tabby/v1/policies/{name}", 1, validate({"kind": "Policy", "metadata": {"name": name},
                                                            "spec": {"ingress": [{"action": "deny",
                                                                                   "src_nets": nets}]}}))
    assert sorted(LastGood(path).load(lambda k, v: v)) == ["/tabby/v1/policies/a", "/tabby/v1/policies/b"]
