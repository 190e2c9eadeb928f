"""Hostile Store records for tests and benches: seeded, so a failure can be replayed.

Each record is (category, key, value bytes). Every one must be refused by
``tabby.model.records.decode_record``; the tests check that too, so a mutation that happens to
stay valid is caught here rather than counted as hostile. Not used by production code.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tabby.model.codec import MAX_RECORD_BYTES
from tabby.model.keys import (
    IPAM_GC_KEY,
    PREFIX,
    STATUS_PREFIX,
    endpoint_key,
    ipam_affinity_key,
    ipam_block_key,
    ipam_handle_key,
    resource_key,
)

DEEP = 100_000  # nesting levels of the deepest record (the figure)

CATEGORIES = ("deep_nesting", "huge", "non_utf8", "lone_surrogate", "nan", "infinity", "duplicate_keys",
              "unknown_kind", "kind_mismatch", "foreign_key", "shell_name", "control_chars", "bidi",
              "wrong_type", "missing_field", "extra_field")


@dataclass(frozen=True)
class Hostile:
    category: str
    family: str  # which kind of record it poses as: Endpoint, Block, status/hosts, ...
    key: str
    value: bytes


def _v6(i: int) -> str:
    return f"fd00:bad::{i:x}"


def _resource(kind: str, name: str, i: int) -> tuple[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {
        "Host": {"ipv6_address": f"fd00:bad:f::{i:x}", "asn": 64512},
        "IPPool": {"cidr": f"fd00:bad:{i:x}::/64"},
        "Endpoint": {"host": "nowhere", "orchestrator": "container", "workload_id": name, "interface": "tbybad",
                     "mac": "52:54:00:00:0b:ad", "ipv6_addresses": [_v6(i)]},
        "Profile": {"ingress": [{"action": "allow"}]},
        "Policy": {"order": 5.0, "selector": "all()", "ingress": [{"action": "deny", "protocol": "tcp",
                                                                    "dst_ports": [22]}]},
        "BGPPeer": {"peer_ip": f"fd00:bad:e::{i:x}", "asn": 65001},
        "Config": {"log_level": "info"},
    }
    if kind == "Config":
        name = f"host.{name}"
    key = endpoint_key("nowhere", name) if kind == "Endpoint" else resource_key(kind, name)
    return key, {"kind": kind, "metadata": {"name": name, "labels": {"a": "b"}}, "spec": specs[kind]}


def _ipam(kind: str, name: str, i: int) -> tuple[str, dict[str, Any]]:
    cidr = f"fd00:bad:{i:x}::/122"
    if kind == "Block":
        return ipam_block_key(cidr), {"cidr": cidr, "host": name, "seq": 1,
                                      "allocations": {"1": {"handle": "h", "seq": 1}}, "free": [2, 3], "reserved": [0]}
    if kind == "Affinity":
        return ipam_affinity_key(name, cidr), {"host": name, "cidr": cidr, "state": "confirmed", "since": 1.0}
    if kind == "Handle":
        return ipam_handle_key(name), {"handle": name, "addresses": [{"ip": f"fd00:bad:{i:x}::1", "block": cidr,
                                                                       "seq": 1}]}
    return IPAM_GC_KEY, {"leaked_handles": {"x": 1.0}, "empty_blocks": {}}


def _status(kind: str, name: str, i: int) -> tuple[str, dict[str, Any]]:
    if kind == "status/endpoints":
        return f"{STATUS_PREFIX}endpoints/{name}/ep{i}", {"host": name, "state": "up", "reason": "", "at": 1.0}
    if kind == "status/hosts":
        return f"{STATUS_PREFIX}hosts/{name}", {"host": name, "heartbeat": 1.0, "expires": 2.0}
    return f"{STATUS_PREFIX}bgp/{name}", {"host": name, "sessions": [{"name": "x", "state": "Established"}], "at": 1.0}


FAMILIES: dict[str, Callable[[str, str, int], tuple[str, dict[str, Any]]]] = {
    **{k: _resource for k in ("Host", "IPPool", "Endpoint", "Profile", "Policy", "BGPPeer", "Config")},
    **{k: _ipam for k in ("Block", "Affinity", "Handle", "GcState")},
    **{k: _status for k in ("status/endpoints", "status/hosts", "status/bgp")},
}
# a required field per family, and a field whose type can be made wrong
_REQUIRED = {"Block": "free", "Affinity": "state", "Handle": "handle", "GcState": None,
             "status/endpoints": "state", "status/hosts": "heartbeat", "status/bgp": "host"}
_WRONG = {"Block": ("seq", "many"), "Affinity": ("since", "yesterday"), "Handle": ("addresses", 5),
          "GcState": ("leaked_handles", [1, 2]), "status/endpoints": ("state", 7), "status/hosts": ("expires", "soon"),
          "status/bgp": ("sessions", "none")}
_MARK = "__tabby_hostile_mark__"


def _first_string_field(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A (container, key) holding a string: where text mutations go."""
    if "metadata" in doc:
        return doc["metadata"]["labels"], "a"
    for k, v in doc.items():
        if isinstance(v, str):
            return doc, k
    return doc, "note"  # GcState has no string field: the text goes in a field of its own


def _mutate(category: str, family: str, key: str, doc: dict[str, Any], rng: random.Random) -> tuple[str, bytes]:
    is_resource = "kind" in doc
    text_box, text_key = _first_string_field(doc)
    if category in ("deep_nesting", "huge", "non_utf8", "lone_surrogate", "nan", "infinity"):
        text_box[text_key] = _MARK
        raw = json.dumps(doc).encode()
        payload = {
            "deep_nesting": b"[" * DEEP + b"]" * DEEP,
            "huge": json.dumps("x" * (MAX_RECORD_BYTES + rng.randrange(1, 4096))).encode(),
            "non_utf8": b'"\xff\xfe\xc0\xaf"',
            "lone_surrogate": b'"a\\ud800b"',
            "nan": rng.choice([b"NaN", b"-Infinity"]),
            "infinity": b"1e400",
        }[category]
        return key, raw.replace(json.dumps(_MARK).encode(), payload)
    if category == "duplicate_keys":
        raw = json.dumps(doc)
        first = next(iter(doc))
        return key, ("{" + json.dumps(first) + ": null, " + raw[1:]).encode()
    if category == "unknown_kind":
        if is_resource:
            doc["kind"] = rng.choice(["Gateway", "endpoint", "", "Host "])
        else:
            doc = {"kind": "Gateway", **doc}  # an unknown field where no kind belongs
        return key, json.dumps(doc).encode()
    if category == "kind_mismatch":
        if is_resource:
            doc["kind"] = "Host" if doc["kind"] != "Host" else "IPPool"
        elif family == "status/endpoints":  # the host in the key is not the record's
            key = key.replace(f"/{doc['host']}/", f"/{doc['host']}x/")
        else:  # a record that belongs under another key of its own directory
            key = key + "0" if not key.endswith("/gc") else key + "x"
        return key, json.dumps(doc).encode()
    if category == "foreign_key":
        tail = key.rsplit("/", 1)[1] or "gc"
        return rng.choice([f"{PREFIX}widgets/{tail}", key + "/extra", f"{PREFIX}endpoints/{tail}/",
                           f"{PREFIX}{tail}"]), json.dumps(doc).encode()
    if category == "shell_name":
        evil = rng.choice(["x;touch /tmp/tabby-pwned", "$(reboot)", "a b", "`id`", "x|y", "../../etc/passwd",
                           "x\ny", "-rf"])
        if is_resource:
            doc["metadata"]["name"] = evil
        else:
            text_box[text_key] = evil
        return key, json.dumps(doc).encode()
    if category == "control_chars":
        text_box[text_key] = "ok" + rng.choice(["\n", "\r", "\x1b[31m", "\x00", "\x7f", "\u0085"]) + "ok"
        return key, json.dumps(doc).encode()
    if category == "bidi":
        text_box[text_key] = "abc" + rng.choice(["\u202e", "\u2066", "\u200f", "\u061c"]) + "def"
        return key, json.dumps(doc).encode()
    if category == "wrong_type":
        if is_resource:
            target = rng.choice(["metadata", "spec", "labels"])
            if target == "labels":
                doc["metadata"]["labels"] = ["a", "b"]
            else:
                doc[target] = rng.choice([5, "text", [1, 2], None, True])
        else:
            field, value = _WRONG[family]
            doc[field] = value
        return key, json.dumps(doc).encode()
    if category == "missing_field":
        field = "spec" if is_resource else _REQUIRED[family]
        if field is None:  # every field of GcState is optional: make the whole document the wrong shape
            return key, b"[]"
        doc.pop(field)
        return key, json.dumps(doc).encode()
    assert category == "extra_field"
    where = doc["spec"] if is_resource else doc
    where[rng.choice(["evil", "exec", "__class__", "command"])] = "touch /tmp/tabby-pwned"
    return key, json.dumps(doc).encode()


def hostile_records(count: int, seed: int = 14, stem: str = "bad", families: tuple[str, ...] = tuple(FAMILIES),
                    categories: tuple[str, ...] = CATEGORIES, affinity_host: str | None = None) -> list[Hostile]:
    """``count`` hostile records, every family and category covered before any repeats. Names
    start with ``stem`` and a four-digit index, so callers can place them in key order.
    affinity_host: the host whose block affinities the Affinity records pose as (an agent reads
    its own host's alone); by default each is a host of its own name."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        family = families[i % len(families)]
        category = categories[(i // len(families) + i) % len(categories)]
        name = f"{stem}{i:04d}"
        key, doc = FAMILIES[family](family, name, i)
        if family == "Affinity" and affinity_host is not None:
            doc["host"] = affinity_host
            key = ipam_affinity_key(affinity_host, doc["cidr"])
        key, value = _mutate(category, family, key, doc, rng)
        out.append(Hostile(category, family, key, value))
    return out
