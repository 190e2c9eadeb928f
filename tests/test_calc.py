"""The agent's pure calculation: states in, desired state out, whatever the order of updates."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tabby.agent.calc import HostIndex, host_state
from tabby.model import validate


def ep(name: str, host: str = "h1", iface: str = "tap1", v6: tuple[str, ...] = (), v4: tuple[str, ...] = (),
       mac: str = "52:54:00:00:00:01", gw6: str | None = None) -> Any:
    spec: dict[str, Any] = {"host": host, "orchestrator": "vm", "workload_id": name, "interface": iface,
                            "mac": mac, "ipv6_addresses": list(v6), "ipv4_addresses": list(v4)}
    if gw6:
        spec["ipv6_gateway"] = gw6
    return validate({"kind": "Endpoint", "metadata": {"name": name}, "spec": spec})


def test_three_kinds_of_endpoint() -> None:
    st_ = host_state([
        ep("v6only", iface="tap6", v6=("fd00:e::6",), gw6="fd00:f::1"),
        ep("dual", iface="tapd", v6=("fd00:e::d",), v4=("10.65.0.13",), mac="52:54:00:00:00:0d"),
        ep("v4only", iface="tap4", v4=("10.65.0.4",)),
        ep("elsewhere", host="h2", iface="tapx", v6=("fd00:e::99",)),
    ], "h1")
    assert st_.routes == {"fd00:e::6/128": "tap6", "fd00:e::d/128": "tapd", "10.65.0.13/32": "tapd",
                          "10.65.0.4/32": "tap4"}
    assert st_.neighbours[("tapd", "10.65.0.13")] == "52:54:00:00:00:0d"
    assert len(st_.neighbours) == 4
    assert st_.proxies == {("tap6", "fd00:f::1")}
    assert st_.sysctls["tap6"]["ipv6/conf/tap6/proxy_ndp"] == "1"
    assert "ipv4/conf/tap6/proxy_arp" not in st_.sysctls["tap6"]
    assert st_.sysctls["tap4"] == {"ipv4/conf/tap4/proxy_arp": "1", "ipv4/conf/tap4/rp_filter": "1",
                                   "ipv4/neigh/tap4/proxy_delay": "0"}
    assert "ipv6/conf/tapd/proxy_ndp" not in st_.sysctls["tapd"]
    assert st_.errors == {}


def test_conflicts_fail_closed_to_the_first_name() -> None:
    st_ = host_state([
        ep("a", iface="tap1", v6=("fd00::1",)),
        ep("b", iface="tap1", v6=("fd00::2",)),  # same interface as a
        ep("c", iface="tap3", v6=("fd00::1", "fd00::3")),  # same address as a
    ], "h1")
    assert st_.routes == {"fd00::1/128": "tap1", "fd00::3/128": "tap3"}
    assert "interface tap1" in st_.errors["b"] and "address fd00::1" in st_.errors["c"]
    assert "a" not in st_.errors


NAMES = ["a", "b", "c", "d"]
endpoint_versions = st.builds(
    ep,
    name=st.sampled_from(NAMES),
    host=st.sampled_from(["h1", "h1", "h2"]),
    iface=st.sampled_from(["tap1", "tap2", "tap3"]),
    v6=st.lists(st.sampled_from(["fd00::1", "fd00::2", "fd00::3"]), min_size=1, max_size=2, unique=True).map(tuple),
    v4=st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2"]), max_size=1, unique=True).map(tuple),
    mac=st.sampled_from(["52:54:00:00:00:01", "52:54:00:00:00:02"]),
    gw6=st.sampled_from([None, "fd00:f::1"]),
)

steps = st.lists(st.one_of(endpoint_versions, st.sampled_from(NAMES)), max_size=25)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_incremental_equals_from_scratch_in_any_order(seq: list[Any]) -> None:
    index = HostIndex("h1")
    current: dict[str, Any] = {}
    for item in seq:
        if isinstance(item, str):
            current.pop(item, None)
            index.update(item, None)
        else:
            current[item.metadata.name] = item
            index.update(item.metadata.name, item)
        assert index.state == host_state(current.values(), "h1")
    # the same final state, reached from any reordering of the same final endpoints
    assert host_state(reversed(list(current.values())), "h1") == index.state


@given(steps)
def test_touched_covers_every_change(seq: list[Any]) -> None:
    index = HostIndex("h1")
    for item in seq:
        before = (dict(index.state.routes), dict(index.state.neighbours), set(index.state.proxies),
                  {k: dict(v) for k, v in index.state.sysctls.items()})
        name = item if isinstance(item, str) else item.metadata.name
        t = index.update(name, None if isinstance(item, str) else item)
        routes, neighs, proxies, sysctls = before
        for k in set(routes) | set(index.state.routes):
            if routes.get(k) != index.state.routes.get(k):
                assert k in t.routes
        for k in set(neighs) | set(index.state.neighbours):
            if neighs.get(k) != index.state.neighbours.get(k):
                assert k in t.neighbours
        for k in proxies ^ index.state.proxies:
            assert k in t.proxies
        for k in set(sysctls) | set(index.state.sysctls):
            if sysctls.get(k) != index.state.sysctls.get(k):
                assert k in t.interfaces
