"""The agent's pure calculation: states in, desired state out, whatever the order of updates."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tabby.agent.calc import HostIndex, host_state, plan_endpoint
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


def test_conflicts_fail_closed_to_the_first_claimant() -> None:
    st_ = host_state([
        ep("a", iface="tap1", v6=("fd00::1",)),
        ep("b", iface="tap1", v6=("fd00::2",)),  # same interface as a
        ep("c", iface="tap3", v6=("fd00::1", "fd00::3")),  # same address as a
    ], "h1")
    # c is refused whole: not even its own fd00::3 is routed to it
    assert st_.routes == {"fd00::1/128": "tap1"}
    assert st_.errors["b"] == "conflict: interface tap1 held by a"
    assert st_.errors["c"] == "conflict: fd00::1 held by a"
    assert "a" not in st_.errors


def test_the_older_record_keeps_its_address_whatever_the_names() -> None:
    eps = [ep("zz-old", iface="tap1", v6=("fd00::1",)), ep("aa-new", iface="tap2", v6=("fd00::1",))]
    st_ = host_state(eps, "h1", {"zz-old": 5, "aa-new": 9})
    assert st_.routes == {"fd00::1/128": "tap1"}
    assert st_.errors == {"aa-new": "conflict: fd00::1 held by zz-old"}


def test_an_older_claim_on_another_host_refuses_the_local_one() -> None:
    index = HostIndex("h1")
    index.update("local", ep("local", iface="tap1", v6=("fd00::1",), v4=("10.0.0.1",)), created=20)
    assert index.state.routes == {"fd00::1/128": "tap1", "10.0.0.1/32": "tap1"}
    t = index.update("remote", ep("remote", host="h2", iface="tap9", v6=("fd00::1",)), created=10)
    assert index.state.routes == {} and index.state.neighbours == {}
    assert {"fd00::1/128", "10.0.0.1/32"} <= t.routes and "local" in t.endpoints
    assert index.state.errors["local"] == "conflict: fd00::1 held by remote"
    assert index.refused("remote") is None and index.refused("local") is not None
    index.update("remote", None)
    assert index.state.routes == {"fd00::1/128": "tap1", "10.0.0.1/32": "tap1"}
    assert index.state.errors == {}


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

# (endpoint, create revision) or a name to delete; create revisions collide on purpose (ties -> name)
steps = st.lists(st.one_of(st.tuples(endpoint_versions, st.integers(0, 3)), st.sampled_from(NAMES)), max_size=25)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_incremental_equals_from_scratch_in_any_order(seq: list[Any]) -> None:
    index = HostIndex("h1")
    current: dict[str, Any] = {}
    created: dict[str, int] = {}
    for item in seq:
        if isinstance(item, str):
            current.pop(item, None)
            created.pop(item, None)
            index.update(item, None)
        else:
            e, rev = item
            current[e.metadata.name] = e
            created[e.metadata.name] = rev
            index.update(e.metadata.name, e, rev)
        assert index.state == host_state(current.values(), "h1", created)
    # the same final state, reached from any reordering of the same final endpoints
    assert host_state(reversed(list(current.values())), "h1", created) == index.state


@given(steps)
def test_touched_covers_every_change(seq: list[Any]) -> None:
    index = HostIndex("h1")
    for item in seq:
        before = (dict(index.state.routes), dict(index.state.neighbours), set(index.state.proxies),
                  {k: dict(v) for k, v in index.state.sysctls.items()})
        name = item if isinstance(item, str) else item[0].metadata.name
        t = index.update(name, None) if isinstance(item, str) else index.update(name, item[0], item[1])
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


class _General(HostIndex):
    """The index without its shortcut for an endpoint that shares nothing: the reference for it."""

    def _alone(self, plan: Any) -> bool:
        return False


@settings(max_examples=300, deadline=None)
@given(steps)
def test_the_shortcut_for_an_endpoint_alone_is_the_general_path(seq: list[Any]) -> None:
    fast, general = HostIndex("h1"), _General("h1")
    for item in seq:
        name = item if isinstance(item, str) else item[0].metadata.name
        args = (name, None) if isinstance(item, str) else (name, item[0], item[1])
        assert fast.update(*args) == general.update(*args)
        assert fast.state == general.state
        assert (fast.plans, fast.if_owners, fast.addr_owners, fast.remote, fast.created) == \
            (general.plans, general.if_owners, general.addr_owners, general.remote, general.created)


def test_a_cold_start_takes_the_shortcut_and_a_clash_does_not() -> None:
    index = HostIndex("h1")
    first = index.update("a", ep("a", iface="tap1", v6=("fd00::1",), gw6="fd00:f::1"), 1)
    assert first.routes == {"fd00::1/128"} and first.proxies == {("tap1", "fd00:f::1")}
    assert index.state.routes == {"fd00::1/128": "tap1"} and ("tap1", "fd00:f::1") in index.state.proxies
    # b wants a's address: not alone, so the general path refuses it
    assert not index._alone(plan_endpoint(ep("b", iface="tap2", v6=("fd00::1",))))
    index.update("b", ep("b", iface="tap2", v6=("fd00::1",)), 2)
    assert index.state.errors["b"] == "conflict: fd00::1 held by a"
    assert index.state.routes == {"fd00::1/128": "tap1"}
