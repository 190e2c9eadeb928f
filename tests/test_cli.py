"""The tabby CLI as an operator runs it: a real process on a real Store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tabby.store import open_store

GOOD = [
    {"kind": "Host", "metadata": {"name": "h1"}, "spec": {"ipv6_address": "fd00:f::1"}},
    {"kind": "Endpoint", "metadata": {"name": "vm1", "labels": {"role": "db"}},
     "spec": {"host": "h1", "orchestrator": "vm", "workload_id": "w1", "interface": "tap1",
              "mac": "52:54:00:00:00:01", "ipv6_addresses": ["fd00:e::10"], "ipv4_addresses": ["10.1.0.10"]}},
]


def tabby(store_url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TABBY_STORE": store_url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tabby.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=60)


def test_apply_get_delete(store_url: str, tmp_path: Path) -> None:
    # a private host/endpoint name per run: tests share one etcd
    suffix = tmp_path.name[-8:].replace("_", "-").strip("-")
    docs = json.loads(json.dumps(GOOD).replace('"h1"', f'"h1-{suffix}"').replace('"vm1"', f'"vm1-{suffix}"'))
    f = tmp_path / "in.yaml"
    f.write_text(yaml.safe_dump_all(docs))
    r = tabby(store_url, "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert f"endpoint/vm1-{suffix} created" in r.stdout
    assert "unchanged" in tabby(store_url, "apply", "-f", str(f)).stdout
    r = tabby(store_url, "get", "endpoint", f"vm1-{suffix}", "-o", "json")
    assert json.loads(r.stdout)["spec"]["ipv6_addresses"] == ["fd00:e::10/128"]
    table = tabby(store_url, "get", "eps").stdout
    assert f"vm1-{suffix}" in table and "fd00:e::10" in table
    assert yaml.safe_load(tabby(store_url, "get", "host", f"h1-{suffix}", "-o", "yaml").stdout)["kind"] == "Host"
    assert tabby(store_url, "delete", "endpoint", f"vm1-{suffix}").returncode == 0
    r = tabby(store_url, "delete", "endpoint", f"vm1-{suffix}")
    assert r.returncode == 1 and "not found" in r.stderr


@pytest.mark.parametrize(("change", "field"), [
    ({"ipv6_addresses": ["fd00::1/64"]}, "spec.ipv6_addresses.0"),
    ({"interface": "tap;rm -rf /"}, "spec.interface"),
])
def test_apply_rejects_bad_endpoint_and_writes_nothing(tmp_path: Path, change: dict[str, object], field: str) -> None:
    url = f"sqlite://{tmp_path}/s.db"
    bad = json.loads(json.dumps(GOOD))
    bad[1]["spec"].update(change)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))  # the good Host comes first and must not be written either
    r = tabby(url, "apply", "-f", str(f))
    assert r.returncode != 0
    assert field in r.stderr and "nothing written" in r.stderr
    store = open_store(url)
    assert store.list("/")[0] == [] and store.revision() == 0


def test_apply_from_stdin_and_unknown_kind(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/s.db"
    assert tabby(url, "apply", "-f", "-", stdin=yaml.safe_dump(GOOD[0])).returncode == 0
    r = tabby(url, "get", "gadgets")
    assert r.returncode == 1 and "unknown kind" in r.stderr


def test_bad_store_url_is_a_clear_error(tmp_path: Path) -> None:
    r = tabby("redis://x", "get", "hosts")
    assert r.returncode == 1 and "scheme must be sqlite:// or etcd://" in r.stderr


def test_an_endpoint_that_changes_host_moves_and_is_never_absent(store_url: str, tmp_path: Path) -> None:
    """An Endpoint's key names its host (agents watch their own host's range), so a new
    spec.host is a move: created under the new host first, then deleted under the old, which
    agents take as one endpoint (agent.py ``_endpoint_record``). Found, shown and deleted by name."""
    from tabby.client import ResourceClient
    from tabby.model import validate
    from tabby.model.keys import ENDPOINTS_PREFIX, endpoint_key
    from tabby.store import NotFound

    suffix = tmp_path.name[-8:].replace("_", "-").strip("-")
    name, h1, h2 = f"mover-{suffix}", f"ha-{suffix}", f"hb-{suffix}"
    doc = json.loads(json.dumps(GOOD[1]))
    doc["metadata"]["name"], doc["spec"]["host"] = name, h1
    store = open_store(store_url)
    try:
        client = ResourceClient(store)
        assert client.apply(validate(doc))[0] == "created"
        before = store.revision()
        doc["spec"]["host"] = h2
        assert client.apply(validate(doc))[0] == "updated"
        assert [kv.key for kv in store.list(ENDPOINTS_PREFIX)[0] if kv.key.endswith(f"/{name}")] == \
            [endpoint_key(h2, name)]
        watch = store.watch(ENDPOINTS_PREFIX, before)
        events = []
        for ev in watch:
            events.append((ev.type, ev.key))
            if len(events) == 2:
                break
        watch.close()
        assert events == [("put", endpoint_key(h2, name)), ("delete", endpoint_key(h1, name))]
        assert client.get("Endpoint", name).spec.host == h2
        assert client.apply(validate(doc))[0] == "unchanged"
        r = tabby(store_url, "get", "endpoint", name, "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout)["spec"]["host"] == h2, r.stderr
        client.delete("Endpoint", name)
        assert client.get("Endpoint", name) is None
        with pytest.raises(NotFound):
            client.delete("Endpoint", name)
    finally:
        store.close()


def test_apply_reads_regular_files_only_and_errors_forge_no_line(tmp_path: Path) -> None:
    """A FIFO hung the command, /dev/zero ended in a MemoryError traceback, and a name with a
    newline or an escape sequence was echoed raw into the error (a forged line, a restyled terminal)."""
    url = f"sqlite://{tmp_path}/s.db"
    open_store(url).close()  # there, so that get reaches the name
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, says in ((str(fifo), "not a regular file"), ("/dev/zero", "not a regular file"), ("", "is empty")):
        r = tabby(url, "apply", "-f", path)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    for args in (("apply", "-f", "nofile\nhost/evil created (revision 9)"), ("get", "host", "x\nok: forged\x1b[31m")):
        r = tabby(url, *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "\x1b" not in r.stderr and "\\x0a" in r.stderr, \
            r.stderr


def test_agent_refuses_a_directory_or_metrics_address_it_cannot_use_before_touching_anything(tmp_path: Path) -> None:
    """--run-dir goes into dnsmasq's, tayga's and unbound's configs unquoted: a space or a newline
    broke (or added) their lines."""
    url = f"sqlite://{tmp_path}/s.db"
    for args, says in ((("--run-dir", f"{tmp_path}/a b"), "--run-dir"),
                       (("--run-dir", f"{tmp_path}/a\nlog-facility=/etc/x"), "--run-dir"),
                       (("--run-dir", "relative/dir"), "--run-dir"),
                       (("--run-dir", f"{tmp_path}/../x"), "--run-dir"),
                       (("--run-dir", "/run/" + "d" * 90), "at most 94"),
                       (("--bgp-password-dir", "etc/pw"), "--bgp-password-dir"),
                       (("--bgp-password-dir", "/etc/../root"), "--bgp-password-dir"),
                       (("--metrics-addr", "not-an-address"), "--metrics-addr")):
        r = tabby(url, "agent", "--host", "h1", *args)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "s.db").exists()  # refused before the store was opened


def test_apply_refuses_what_no_reader_would_take_and_readers_refuse_a_store_that_is_not_there(tmp_path: Path) -> None:
    """From a review: YAML's duplicate keys were taken (the last won: kind Host then kind IPPool made
    an IPPool), a Profile over the 1 MiB a record may hold was written (corrupt for every reader),
    an empty file was success, a mistyped path made a new empty store that get/status showed as
    all well, and sqlite://tabby.db made /tabby.db."""
    url = f"sqlite://{tmp_path}/s.db"
    dup = "kind: Host\nkind: IPPool\nmetadata: {name: x}\nspec: {cidr: 'fd00:e::/64'}\n"
    r = tabby(url, "apply", "-f", "-", stdin=dup)
    assert r.returncode == 1 and "duplicate key 'kind'" in r.stderr, r.stderr
    big = json.dumps({"kind": "Profile", "metadata": {"name": "huge"},
                      "spec": {"ingress": [{"action": "allow"}] * 6000}})
    r = tabby(url, "apply", "-f", "-", stdin=big)
    assert r.returncode == 1 and "a Store record may hold" in r.stderr and "nothing written" in r.stderr, r.stderr
    for empty in ("", "---\n# only a comment\n---\n"):
        r = tabby(url, "apply", "-f", "-", stdin=empty)
        assert r.returncode == 1 and "no documents" in r.stderr, r.stderr
    r = tabby(url, "apply", "-f", "-", stdin="x: [" + ",".join(["0"] * (2 << 20)) + "]\n")
    assert r.returncode == 1 and "give it as JSON" in r.stderr, r.stderr
    assert not (tmp_path / "s.db").exists()  # nothing of the above made a store
    for args in (("get", "hosts"), ("status",), ("ipam", "show")):
        r = tabby(f"sqlite://{tmp_path}/typo.db", *args)
        assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "typo.db").exists()
    r = tabby("sqlite://tabby-test-relative.db", "get", "hosts")
    assert r.returncode == 1 and "three slashes" in r.stderr, r.stderr
    assert tabby(url, "apply", "-f", "-", stdin="kind: Host\nmetadata: {name: h1}\nspec: {ipv6_address: 'fd00::1'}\n"
                 ).returncode == 0
    assert tabby(url, "get", "hosts").returncode == 0


def test_ipam_assign_for_a_host_without_its_record_claims_nothing(tmp_path: Path) -> None:
    """It claimed a whole block for a host no agent serves (announced by nobody)."""
    url = f"sqlite://{tmp_path}/s.db"
    assert tabby(url, "apply", "-f", "-", stdin="kind: IPPool\nmetadata: {name: p}\nspec: {cidr: 'fd00:e::/112'}\n"
                 ).returncode == 0
    r = tabby(url, "ipam", "assign", "--handle", "h2", "--host", "nohost")
    assert r.returncode == 1 and "no Host record" in r.stderr, r.stderr
    assert "fd00:e::" not in tabby(url, "ipam", "show").stdout
    host = "kind: Host\nmetadata: {name: nohost}\nspec: {ipv6_address: 'fd00::1'}\n"
    assert tabby(url, "apply", "-f", "-", stdin=host).returncode == 0
    r = tabby(url, "ipam", "assign", "--handle", "h2", "--host", "nohost")
    assert r.returncode == 0 and "fd00:e::" in r.stdout, r.stderr


def test_status_lists_every_host_and_marks_what_a_dead_host_last_said(tmp_path: Path) -> None:
    """It listed only hosts with a heartbeat record (on etcd that goes with the lease: a crashed
    host vanished), and showed a dead host's endpoints as up."""
    url = f"sqlite://{tmp_path}/s.db"
    hosts = "".join(f"---\nkind: Host\nmetadata: {{name: {n}}}\nspec: {{ipv6_address: 'fd00::{i + 1}'}}\n"
                    for i, n in enumerate(("host-a", "host-b")))
    assert tabby(url, "apply", "-f", "-", stdin=hosts).returncode == 0
    store = open_store(url)
    beat = {"host": "host-a", "heartbeat": 1.0, "expires": 2.0}  # expired long ago
    store.put("/tabby/status/hosts/host-a", json.dumps(beat).encode())
    store.put("/tabby/status/endpoints/host-a/web", json.dumps({"host": "host-a", "state": "up", "reason": "",
                                                                   "at": 1.0}).encode())
    store.close()
    r = tabby(url, "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {h["host"]: (h["alive"], h["heartbeat"]) for h in doc["hosts"]} == {"host-a": (False, "record"),
                                                                              "host-b": (False, "none")}
    assert doc["endpoints"] == [{"endpoint": "web", "host": "host-a", "state": "up", "reason": "", "host_alive": False}]
    table = tabby(url, "status").stdout
    assert "host-b" in table and "as last reported" in table


def test_a_key_outside_the_layout_neither_hides_an_endpoint_nor_is_deleted_by_its_apply(tmp_path: Path) -> None:
    """endpoints/junk/x/e1 made get of e1 fail (not a resource key), and an apply of e1 deleted it."""
    from tabby.client import ResourceClient
    from tabby.model import validate

    store = open_store(f"sqlite://{tmp_path}/s.db")
    client = ResourceClient(store)
    ep = validate({"kind": "Endpoint", "metadata": {"name": "e1"}, "spec": {
        "host": "h1", "orchestrator": "vm", "workload_id": "w", "interface": "tap1", "mac": "52:54:00:00:00:01",
        "ipv6_addresses": ["fd00::5"]}})
    client.apply(ep)
    store.put("/tabby/v1/endpoints/junk/x/e1", b"whatever")
    assert client.get("Endpoint", "e1").spec.host == "h1"
    assert client.apply(ep)[0] == "unchanged"
    assert store.get("/tabby/v1/endpoints/junk/x/e1") is not None
    store.close()
