"""The pure cross-check of IPAM against Endpoints: records in, findings out."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

from tabby.ipam.blocks import new_block, take
from tabby.ipam.crosscheck import cross_check
from tabby.model import validate
from tabby.model.ipam import Block, Handle, HandleAddress

POOL = ipaddress.ip_network("fd00:e::/112")
NOW = 10_000.0


def block(cidr: str, handles: list[str]) -> Block:
    b = new_block(ipaddress.ip_network(cidr), "h1", POOL)
    for h in handles:
        b, _ = take(b, 1, h)
    return b


def ep(name: str, *ips: str) -> Any:
    return validate({"kind": "Endpoint", "metadata": {"name": name},
                     "spec": {"host": "h1", "orchestrator": "container", "workload_id": name, "interface": "tby0",
                              "mac": "ee:ee:ee:ee:ee:ee", "ipv6_addresses": [i for i in ips if ":" in i],
                              "ipv4_addresses": [i for i in ips if ":" not in i]}})


def handle(name: str, ips: list[str], endpoint: str | None = None, created: float | None = NOW - 1000,
           block_: str = "fd00:e::/122") -> Handle:
    return Handle(handle=name, addresses=[HandleAddress(ip=i, block=block_, seq=1) for i in ips],
                  endpoint=endpoint, created=created)


def kinds(findings: list[Any]) -> list[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    return [(f.kind, f.addresses, f.endpoints, f.handles) for f in findings]


def test_a_consistent_fabric_has_no_findings() -> None:
    b = block("fd00:e::/122", ["a", "b"])  # fd00:e::1, ::2 (::0 reserved)
    findings = cross_check([b], [handle("a", ["fd00:e::1"], "ep-a"), handle("b", ["fd00:e::2"])],
                           [ep("ep-a", "fd00:e::1"), ep("ep-b", "fd00:e::2", "192.0.2.7")], now=NOW, grace_s=300)
    assert findings == []  # 192.0.2.7 is in no block: not IPAM's to judge


def test_an_endpoint_on_a_free_or_reserved_address() -> None:
    b = block("fd00:e::/122", ["a"])
    findings = cross_check([b], [handle("a", ["fd00:e::1"])], [ep("ep-a", "fd00:e::1"), ep("x", "fd00:e::9"),
                                                               ep("y", "fd00:e::")], now=NOW, grace_s=300)
    assert kinds(findings) == [("free-in-use", ("fd00:e::",), ("y",), ()),
                               ("free-in-use", ("fd00:e::9",), ("x",), ())]
    assert "reserved in block fd00:e::/122" in findings[0].message
    assert "free in block fd00:e::/122" in findings[1].message


def test_two_endpoints_on_one_address() -> None:
    b = block("fd00:e::/122", ["a"])
    findings = cross_check([b], [handle("a", ["fd00:e::1"])], [ep("one", "fd00:e::1"), ep("two", "fd00:e::1")],
                           now=NOW, grace_s=300)
    assert kinds(findings) == [("two-endpoints", ("fd00:e::1",), ("one", "two"), ())]
    assert "one, two" in findings[0].message


def test_handles_without_an_endpoint_after_the_grace_period() -> None:
    b = block("fd00:e::/122", ["gone", "none", "young", "old", "bad", "fine"])
    handles = [
        handle("gone", ["fd00:e::1"], "ep-gone"),  # names an Endpoint that does not exist
        handle("none", ["fd00:e::2"]),  # no Endpoint holds its address
        handle("young", ["fd00:e::3"], created=NOW - 10),  # within the grace period: a CNI ADD still at work
        handle("old", ["fd00:e::4"], created=None),  # written before handles had a creation time: old
        handle("bad", ["fd00:e::5"], "ep-corrupt"),  # its Endpoint's record is corrupt: unknown, not reported
        handle("fine", ["fd00:e::6"], "ep-fine"),
        handle("empty", []),
    ]
    findings = cross_check([b], handles, [ep("ep-fine", "fd00:e::6")], now=NOW, grace_s=300,
                           unknown_endpoints={"ep-corrupt"})
    assert kinds(findings) == [
        ("orphan-handle", (), (), ("empty",)),
        ("orphan-handle", ("fd00:e::1",), ("ep-gone",), ("gone",)),
        ("orphan-handle", ("fd00:e::2",), (), ("none",)),
        ("orphan-handle", ("fd00:e::4",), (), ("old",)),
    ]
    assert "ep-gone, which does not exist" in findings[1].message
    assert "no creation time" in findings[3].message and "1000s old" in findings[2].message


def test_the_findings_depend_only_on_the_records_not_their_order() -> None:
    rng = random.Random(7)
    blocks = [block("fd00:e::/122", [f"h{i}" for i in range(10)]), block("fd00:e::40/122", ["z"])]
    handles = [handle(f"h{i}", [f"fd00:e::{i + 1:x}"], f"ep{i}" if i % 2 else None) for i in range(10)]
    eps = [ep(f"ep{i}", f"fd00:e::{i + 1:x}") for i in range(0, 10, 3)] + [ep("dup", "fd00:e::1"),
                                                                         ep("free", "fd00:e::30")]
    want = cross_check(blocks, handles, eps, now=NOW, grace_s=300)
    assert {f.kind for f in want} == {"free-in-use", "two-endpoints", "orphan-handle"}
    for _ in range(20):
        for xs in (blocks, handles, eps):
            rng.shuffle(xs)
        assert cross_check(blocks, handles, eps, now=NOW, grace_s=300) == want
