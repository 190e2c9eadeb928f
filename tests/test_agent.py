"""The agent in a real network namespace with real veths, on a real Store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import AgentProc, apply, endpoint, namespace, neighbours, proxies, routes, status, sysctl

from tabby.client import ResourceClient
from tabby.lab import netns
from tabby.lab.netns import wait_for
from tabby.store import Store, open_store


@pytest.fixture
def host_ns() -> Iterator[str]:
    with namespace("h") as ns:
        yield ns


@pytest.fixture
def sq(tmp_path: Path) -> Store:
    return open_store(f"sqlite://{tmp_path}/store.db")


@pytest.fixture
def agent(host_ns: str, sq: Store, tmp_path: Path) -> Iterator[AgentProc]:
    a = AgentProc(host_ns, f"sqlite://{tmp_path}/store.db", "h1", tmp_path / "agent.log").start()
    try:
        wait_for(a.healthy, 15, 0.1, "agent healthy")
        yield a
    finally:
        a.stop()
        print(a.output()[-5000:])


def test_three_endpoints_exact_state_and_precise_removal(host_ns: str, sq: Store, agent: AgentProc) -> None:
    for i in ("6", "d", "4"):
        netns.add_veth(host_ns, f"tap{i}", f"vm{i}")
    # foreign state on the same devices must survive everything below
    netns.ip("route", "add", "fd00:99::1/128", "dev", "tap6", "proto", "static", ns=host_ns)
    netns.ip("neigh", "add", "fd00:99::1", "lladdr", "52:54:00:99:99:99", "dev", "tap6", "nud", "permanent", ns=host_ns)
    apply(sq,
          endpoint("v6only", "h1", "tap6", v6=["fd00:e::6"], gw6="fd00:f::1", mac="52:54:00:00:00:06"),
          endpoint("dual", "h1", "tapd", v6=["fd00:e::d"], v4=["10.65.0.13"], mac="52:54:00:00:00:0d"),
          endpoint("v4only", "h1", "tap4", v4=["10.65.0.4"], mac="52:54:00:00:00:04"),
          endpoint("remote", "h2", "tapx", v6=["fd00:e::99"]))
    want = {"fd00:e::6/128": "tap6", "fd00:e::d/128": "tapd", "10.65.0.13/32": "tapd", "10.65.0.4/32": "tap4"}
    wait_for(lambda: routes(host_ns) == want, 10, what="routes")
    nb = neighbours(host_ns)
    for dev, ip_, mac in (("tap6", "fd00:e::6", "52:54:00:00:00:06"), ("tapd", "fd00:e::d", "52:54:00:00:00:0d"),
                          ("tapd", "10.65.0.13", "52:54:00:00:00:0d"), ("tap4", "10.65.0.4", "52:54:00:00:00:04")):
        n = nb[(dev, ip_)]
        assert n["lladdr"] == mac and "PERMANENT" in n["state"] and n.get("protocol") in (77, "77"), n
    assert proxies(host_ns) == {("tap6", "fd00:f::1")}
    assert [sysctl(host_ns, f"ipv6/conf/tap6/{k}") for k in ("accept_ra", "forwarding", "proxy_ndp")] == ["0", "1", "1"]
    assert sysctl(host_ns, "ipv6/neigh/tap6/proxy_delay") == "0"
    assert [sysctl(host_ns, f"ipv4/conf/tap4/{k}") for k in ("proxy_arp", "rp_filter")] == ["1", "1"]
    assert sysctl(host_ns, "ipv6/conf/tapd/proxy_ndp") == "0"
    assert sysctl(host_ns, "ipv6/conf/all/forwarding") == "1" and sysctl(host_ns, "ipv4/ip_forward") == "1"
    wait_for(lambda: all((status(sq, "h1", n) or {}).get("state") == "up" for n in ("v6only", "dual", "v4only")),
             10, what="status up")
    assert status(sq, "h1", "remote") is None
    code, body = agent.http("/metrics")
    assert code == 200 and 'tabby_endpoints{state="up"} 3.0' in body

    ResourceClient(sq).delete("Endpoint", "dual")
    want.pop("fd00:e::d/128")
    want.pop("10.65.0.13/32")
    wait_for(lambda: routes(host_ns) == want, 10, what="routes after delete")
    wait_for(lambda: ("tapd", "fd00:e::d") not in neighbours(host_ns), 10, what="neighbour removed")
    nb = neighbours(host_ns)
    assert ("tapd", "10.65.0.13") not in nb and ("tap6", "fd00:e::6") in nb
    assert ("tap6", "fd00:99::1") in nb  # foreign neighbour survives
    assert "fd00:99::1" in netns.ip("-6", "route", "show", "dev", "tap6", ns=host_ns)  # foreign route survives
    wait_for(lambda: status(sq, "h1", "dual") is None, 10, what="status removed")


def test_interface_before_or_after_the_record_and_coming_back(host_ns: str, sq: Store, agent: AgentProc) -> None:
    apply(sq, endpoint("late", "h1", "taplate", v6=["fd00:e::1"], v4=["10.65.0.1"]))
    wait_for(lambda: (status(sq, "h1", "late") or {}).get("state") == "down", 10, what="down status")
    assert "not present" in status(sq, "h1", "late")["reason"]
    netns.add_veth(host_ns, "taplate", "vmlate")
    wait_for(lambda: routes(host_ns) == {"fd00:e::1/128": "taplate", "10.65.0.1/32": "taplate"}, 5, what="routes")
    wait_for(lambda: sysctl(host_ns, "ipv6/conf/taplate/accept_ra") == "0", 5, what="sysctl")
    netns.ip("link", "del", "taplate", ns=host_ns)
    wait_for(lambda: (status(sq, "h1", "late") or {}).get("state") == "down", 10, what="down again")
    netns.add_veth(host_ns, "taplate", "vmlate")
    wait_for(lambda: routes(host_ns) == {"fd00:e::1/128": "taplate", "10.65.0.1/32": "taplate"}, 5, what="back")
    wait_for(lambda: sysctl(host_ns, "ipv6/conf/taplate/accept_ra") == "0", 5, what="sysctl again")
    wait_for(lambda: (status(sq, "h1", "late") or {}).get("state") == "up", 10, what="up again")


def test_drift_repaired_on_the_kernel_s_own_news(host_ns: str, sq: Store, agent: AgentProc) -> None:
    """Repaired from the netlink monitor's events, long before the next full check (resync 90 s).
    How fast is bench/'s to say; the time is printed for the reader."""
    netns.add_veth(host_ns, "tapdr", "vmdr")
    apply(sq, endpoint("drift", "h1", "tapdr", v6=["fd00:e::7"], v4=["10.65.0.7"]))
    wait_for(lambda: len(routes(host_ns)) == 2 and ("tapdr", "fd00:e::7") in neighbours(host_ns), 10)
    t0 = time.monotonic()
    netns.ip("-6", "route", "del", "fd00:e::7/128", "dev", "tapdr", ns=host_ns)
    netns.ip("neigh", "del", "10.65.0.7", "dev", "tapdr", ns=host_ns)
    wait_for(lambda: "fd00:e::7/128" in routes(host_ns) and ("tapdr", "10.65.0.7") in neighbours(host_ns),
             15, 0.01, "drift repaired")
    print(f"repaired in {(time.monotonic() - t0) * 1000:.0f} ms")
    netns.ip("neigh", "replace", "fd00:e::7", "lladdr", "52:54:00:66:66:66", "dev", "tapdr", "nud", "permanent",
             ns=host_ns)
    wait_for(lambda: neighbours(host_ns)[("tapdr", "fd00:e::7")]["lladdr"] == "52:54:00:00:00:01", 15, 0.01,
             "changed MAC put back")


def test_an_interface_set_down_and_up_or_renamed_gets_its_routes_back_at_once(host_ns: str, sq: Store,
                                                                            agent: AgentProc) -> None:
    """Down, the kernel drops an interface's IPv4 routes and says nothing (IPv6 does say): back up,
    they came back only at the full check (90 s here). And a rename left the routes on the renamed
    device while the tracker had them on the old name: a new device of that name got none."""
    netns.add_veth(host_ns, "tapud", "vmud")
    apply(sq, endpoint("updown", "h1", "tapud", v6=["fd00:e::21"], v4=["10.65.0.21"]))
    want = {"fd00:e::21/128": "tapud", "10.65.0.21/32": "tapud"}
    wait_for(lambda: routes(host_ns) == want, 10, what="programmed")
    netns.ip("link", "set", "tapud", "down", ns=host_ns)
    wait_for(lambda: "10.65.0.21/32" not in routes(host_ns), 10, what="the kernel took the IPv4 route")
    # and the status says so (it said up, with no IPv4 route, until the link came back)
    wait_for(lambda: (status(sq, "h1", "updown") or {}).get("reason") == "interface tapud is down", 10,
             what="status down")
    netns.ip("link", "set", "tapud", "up", ns=host_ns)
    wait_for(lambda: routes(host_ns) == want, 15, what="both routes back, long before the full check")
    wait_for(lambda: (status(sq, "h1", "updown") or {}).get("state") == "up", 10, what="status up again")
    netns.ip("link", "set", "tapud", "down", ns=host_ns)
    netns.ip("link", "set", "tapud", "name", "tapux", ns=host_ns)
    netns.ip("link", "set", "tapux", "up", ns=host_ns)
    # nothing of tabby's stays on the renamed device, which no endpoint (nor policy chain) names:
    # it stayed until the full check, after its endpoint was deleted too
    wait_for(lambda: "tapux" not in routes(host_ns).values() and all(i != "tapux" for i, _ in neighbours(host_ns)),
             15, what="the routes and neighbours gone from the renamed device")
    netns.add_veth(host_ns, "tapud", "vmud2")  # a new device under the endpoint's interface name
    wait_for(lambda: routes(host_ns) == want, 15, what="the routes on the new tapud")


def test_forwarding_turned_off_is_turned_on_again(host_ns: str, tmp_path: Path) -> None:
    """Forwarding was set once at start: a `sysctl --system` that turned it off stopped all routing
    through the host until the agent restarted. The full check puts it back, and says so."""
    a = AgentProc(host_ns, f"sqlite://{tmp_path}/fwd.db", "h1", tmp_path / "fwd.log", resync_s=1.0).start()
    try:
        wait_for(a.healthy, 15, 0.1, "agent healthy")
        assert sysctl(host_ns, "ipv4/ip_forward") == "1"
        netns.nsexec(host_ns, ["sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])
        wait_for(lambda: sysctl(host_ns, "ipv4/ip_forward") == "1" and sysctl(host_ns, "ipv6/conf/all/forwarding")
                 == "1", 15, what="forwarding on again")
        wait_for(lambda: "forwarding was turned off" in a.output(), 5, what="and said so")
    finally:
        a.stop()


def test_corrupt_records_are_skipped_and_the_rest_served(host_ns: str, sq: Store, agent: AgentProc) -> None:
    netns.add_veth(host_ns, "tapok", "vmok")
    netns.add_veth(host_ns, "tapkeep", "vmkeep")
    apply(sq, endpoint("keep", "h1", "tapkeep", v6=["fd00:e::5"]))
    wait_for(lambda: "fd00:e::5/128" in routes(host_ns), 10)
    sq.put("/tabby/v1/endpoints/h1/junk", b"{not json")
    sq.put("/tabby/v1/endpoints/h1/keep", json.dumps({"kind": "Endpoint", "metadata": {"name": "keep"},
                                                    "spec": {"interface": "tap;reboot"}}).encode())
    apply(sq, endpoint("ok", "h1", "tapok", v6=["fd00:e::8"]))
    wait_for(lambda: "fd00:e::8/128" in routes(host_ns), 10, what="good endpoint served")
    assert routes(host_ns)["fd00:e::5/128"] == "tapkeep"  # last good version kept
    wait_for(lambda: (status(sq, "h1", "keep") or {}).get("state") == "error", 10, what="error status")
    assert "corrupt" in status(sq, "h1", "keep")["reason"]
    assert agent.healthy()


def test_one_name_on_two_hosts_is_one_endpoint_and_a_remote_claim_still_wins(host_ns: str, sq: Store,
                                                                             agent: AgentProc) -> None:
    """An Endpoint's key names its host, so a live migration is a create here, then a delete
    there, and the two reach the agent by different watches (its own host's, and the paced one of
    every other host) in either order: one name on two hosts is one endpoint, this host's copy.
    Other hosts' endpoints still claim addresses: a newer local endpoint on an address a remote
    one holds is refused."""
    from tabby.model import encode
    from tabby.model.keys import endpoint_key

    netns.add_veth(host_ns, "tapmv", "vmmv")
    netns.add_veth(host_ns, "tapth", "vmth")
    seen = agent.store_events()
    apply(sq, endpoint("holder", "h2", "tapx", v6=["fd00:e::50"]), endpoint("mover", "h2", "tapy", v6=["fd00:e::51"]))
    # the paced view of other hosts (read every 0.5 s at most) has both
    wait_for(lambda: agent.store_events() >= seen + 2, 10, what="both remote endpoints read")
    # the move as a client cut short leaves it: the copy here, the old one still there
    sq.create(endpoint_key("h1", "mover"), encode(endpoint("mover", "h1", "tapmv", v6=["fd00:e::51"])))
    wait_for(lambda: routes(host_ns).get("fd00:e::51/128") == "tapmv", 10, what="the moved endpoint programmed")
    wait_for(lambda: (status(sq, "h1", "mover") or {}).get("state") == "up", 10, what="mover up, not a conflict")
    seen = agent.store_events()
    sq.delete(endpoint_key("h2", "mover"))
    wait_for(lambda: agent.store_events() > seen, 10, what="the old copy's delete read")
    apply(sq, endpoint("thief", "h1", "tapth", v6=["fd00:e::50"]))
    wait_for(lambda: (status(sq, "h1", "thief") or {}).get("state") == "conflict", 10, what="thief refused")
    # the thief was written after the delete was folded in, and is judged in a later turn: that
    # delete's apply is behind us now
    assert routes(host_ns).get("fd00:e::51/128") == "tapmv"  # the old copy's delete took nothing away
    assert "holder" in status(sq, "h1", "thief")["reason"]
    assert "fd00:e::50/128" not in routes(host_ns)
    ResourceClient(sq).delete("Endpoint", "holder")
    wait_for(lambda: routes(host_ns).get("fd00:e::50/128") == "tapth", 10, what="the address free: thief programmed")


def test_the_status_of_an_endpoint_deleted_while_the_agent_was_down_goes_at_its_next_start(
        host_ns: str, sq: Store, tmp_path: Path) -> None:
    """Only the loop's seeing an endpoint go removed its status: one deleted (or moved away) while
    the agent was down read "up" for ever (after a move: up on two hosts)."""
    url = f"sqlite://{tmp_path}/store.db"
    netns.add_veth(host_ns, "tapgo", "vmgo")
    netns.add_veth(host_ns, "tapst", "vmst")
    apply(sq, endpoint("goes", "h1", "tapgo", v6=["fd00:e::31"]))
    apply(sq, endpoint("stays", "h1", "tapst", v6=["fd00:e::32"]))
    first = AgentProc(host_ns, url, "h1", tmp_path / "first.log").start()
    try:
        wait_for(lambda: all((status(sq, "h1", n) or {}).get("state") == "up" for n in ("goes", "stays")), 15,
                 what="both up")
    finally:
        first.stop()
    ResourceClient(sq).delete("Endpoint", "goes")
    second = AgentProc(host_ns, url, "h1", tmp_path / "second.log").start()
    try:
        wait_for(lambda: status(sq, "h1", "goes") is None, 15, what="the deleted endpoint's status removed")
        assert (status(sq, "h1", "stays") or {}).get("state") == "up"
    finally:
        second.stop()
