"""Allowed sources (Neutron's allowed address pairs) and port security off, in the pure parts: the
model refuses what it cannot route, the host calculation routes a pair to the port whose guest
answers for it (never refusing anyone), and the policy calculation lets a port send from its
pairs and skips the guards of a port with port security off; incremental equals from scratch."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tabby.agent.calc import HostIndex, host_state
from tabby.agent.policy_calc import WL_MAC, WL_SRC4, WL_SRC6, PolicyIndex
from tabby.dataplane.nft_structure import WL_OPEN
from tabby.model import validate


def ep(name: str, host: str = "h1", iface: str = "tap1", v6: tuple[str, ...] = ("fd00::1",),
       pairs: tuple[tuple[str, str | None], ...] = (), secure: bool = True,
       mac: str = "52:54:00:00:00:01") -> Any:
    spec: dict[str, Any] = {"host": host, "orchestrator": "vm", "workload_id": name, "interface": iface, "mac": mac,
                            "ipv6_addresses": list(v6), "port_security": secure,
                            "allowed_sources": [{"address": a, "mac": m} for a, m in pairs]}
    return validate({"kind": "Endpoint", "metadata": {"name": name}, "spec": spec})


def test_the_model_refuses_what_cannot_be_routed_and_names_the_field() -> None:
    for bad, why in (("fd00::/64", "single address"), ("fe80::1", "cannot be a workload address"),
                     ("ff02::1", "cannot be a workload address"), ("0.0.0.0", "cannot be a workload address")):
        with pytest.raises(ValueError, match=why) as e:
            ep("a", pairs=((bad, None),))
        assert "allowed_sources" in str(e.value)
    with pytest.raises(ValueError, match="duplicate"):
        ep("a", pairs=(("fd00::9", None), ("fd00::9", "52:54:00:00:00:01")))  # None means its own MAC
    with pytest.raises(ValueError, match="mac"):
        ep("a", pairs=(("fd00::9", "not-a-mac"),))
    with pytest.raises(ValueError, match="port_security"):
        validate({"kind": "Endpoint", "metadata": {"name": "a"}, "spec": {
            "host": "h1", "orchestrator": "vm", "workload_id": "a", "interface": "tap1", "mac": "52:54:00:00:00:01",
            "ipv6_addresses": ["fd00::1"], "port_security": "maybe"}})


def test_a_vip_goes_to_the_port_whose_guest_answers_and_never_over_a_workloads_own_address() -> None:
    a = ep("a", iface="tapa", v6=("fd00::a",), pairs=(("fd00::99", None), ("10.0.0.99", "52:54:00:00:00:99")))
    b = ep("b", iface="tapb", v6=("fd00::b",), pairs=(("fd00::99", None), ("10.0.0.99", None)),
           mac="52:54:00:00:00:02")
    index = HostIndex("h1")
    index.update("a", a, 1)
    index.update("b", b, 2)
    assert index.probes() == {("tapa", "fd00::99"), ("tapa", "10.0.0.99"), ("tapb", "fd00::99"), ("tapb", "10.0.0.99")}
    assert "fd00::99/128" not in index.state.routes  # nobody answers yet
    assert index.state.errors == {}  # a shared pair refuses neither port
    t = index.set_answered("tapb", "fd00::99", True)
    assert index.state.routes["fd00::99/128"] == "tapb" and "fd00::99/128" in t.routes
    assert ("tapb", "fd00::99") not in index.state.neighbours  # the kernel's own entry, the one probed
    index.set_answered("tapa", "fd00::99", True)  # both answer (VRRP split brain): the first by rank
    assert index.state.routes["fd00::99/128"] == "tapa"
    index.set_answered("tapa", "fd00::99", False)  # the VIP moved: the route follows
    assert index.state.routes["fd00::99/128"] == "tapb"
    assert index.state.sysctls["tapb"]["ipv6/neigh/tapb/retrans_time_ms"] == "200"
    c = ep("c", iface="tapc", v6=("fd00::99",), mac="52:54:00:00:00:03")
    index.update("c", c, 3)  # someone's own address always wins over a pair
    assert index.state.routes["fd00::99/128"] == "tapc" and index.state.errors == {}
    assert ("tapb", "fd00::99") not in index.probes()


def test_port_security_off_relaxes_reverse_path_filtering() -> None:
    v4 = validate({"kind": "Endpoint", "metadata": {"name": "a"}, "spec": {
        "host": "h1", "orchestrator": "vm", "workload_id": "a", "interface": "tap1", "mac": "52:54:00:00:00:01",
        "ipv4_addresses": ["10.0.0.1"], "port_security": False}})
    assert host_state([v4], "h1").sysctls["tap1"]["ipv4/conf/tap1/rp_filter"] == "0"


NAMES = ["a", "b", "c"]
versions = st.builds(
    ep, name=st.sampled_from(NAMES), host=st.sampled_from(["h1", "h1", "h2"]),
    iface=st.sampled_from(["tap1", "tap2", "tap3"]),
    v6=st.lists(st.sampled_from(["fd00::1", "fd00::2", "fd00::9"]), min_size=1, max_size=2, unique=True).map(tuple),
    pairs=st.lists(st.tuples(st.sampled_from(["fd00::9", "fd00::8", "10.0.0.9"]),
                             st.sampled_from([None, "52:54:00:00:00:09"])),
                   max_size=2, unique_by=lambda p: p[0]).map(tuple),
    secure=st.booleans())
answers = st.tuples(st.sampled_from(["tap1", "tap2"]), st.sampled_from(["fd00::9", "fd00::8", "10.0.0.9"]),
                    st.booleans())
steps = st.lists(st.one_of(st.tuples(versions, st.integers(0, 3)), st.sampled_from(NAMES), answers), max_size=20)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_host_calculation_incremental_equals_from_scratch_and_touched_covers_changes(seq: list[Any]) -> None:
    index = HostIndex("h1")
    current: dict[str, Any] = {}
    created: dict[str, int] = {}
    answered: set[tuple[str, str]] = set()
    for item in seq:
        before = (dict(index.state.routes), dict(index.state.neighbours))
        if isinstance(item, str):
            current.pop(item, None)
            created.pop(item, None)
            t = index.update(item, None)
        elif len(item) == 3:
            iface, addr, yes = item
            (answered.add if yes else answered.discard)((iface, addr))
            t = index.set_answered(iface, addr, yes)
        else:
            e, rev = item
            current[e.metadata.name], created[e.metadata.name] = e, rev
            t = index.update(e.metadata.name, e, rev)
        assert index.state == host_state(current.values(), "h1", created, answered)
        for old, new, touched in ((before[0], index.state.routes, t.routes),
                                  (before[1], index.state.neighbours, t.neighbours)):
            assert all(k in touched for k in set(old) | set(new) if old.get(k) != new.get(k))
    assert host_state(reversed(list(current.values())), "h1", created, answered) == index.state


def test_policy_sets_hold_the_pairs_and_the_open_interfaces() -> None:
    idx = PolicyIndex()
    idx.set_endpoint("a", ep("a", iface="tapa", pairs=(("fd00::99", None), ("10.0.0.99", "52:54:00:00:00:99"))),
                     local=True)
    idx.set_endpoint("o", ep("o", iface="tapo", v6=("fd00::2",), secure=False), local=True)
    want = idx.desired_elements()
    assert ("tapa", "fd00::99") in want[WL_SRC6] and ("tapa", "10.0.0.99") in want[WL_SRC4]
    assert {("tapa", "52:54:00:00:00:01"), ("tapa", "52:54:00:00:00:99")} <= set(want[WL_MAC])
    assert set(want[WL_OPEN]) == {("tapo",)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(versions, st.booleans()) | st.sampled_from(NAMES), min_size=1, max_size=20))
def test_policy_incremental_deltas_equal_a_fresh_calculation(ops: list[Any]) -> None:
    idx = PolicyIndex()
    idx.take_delta()
    kernel: dict[str, set[tuple[str, ...]]] = {k: set(v) for k, v in idx.desired_elements().items()}
    records: dict[str, tuple[Any, bool]] = {}
    for op in ops:
        if isinstance(op, str):
            idx.set_endpoint(op, None)
            records.pop(op, None)
        else:
            rec, local = op
            idx.set_endpoint(rec.metadata.name, rec, local)
            records[rec.metadata.name] = (rec, local)
        for set_name, elems in idx.take_delta().items():
            for e, present in elems.items():
                (kernel.setdefault(set_name, set()).add if present else kernel.setdefault(set_name, set()).discard)(e)
    fresh = PolicyIndex()
    for name, (rec, local) in records.items():
        fresh.set_endpoint(name, rec, local)
    want = fresh.desired_elements()
    assert {k: v for k, v in kernel.items() if v} == {k: v for k, v in want.items() if v}
