"""IPAM on a real Store: allocation, release, exhaustion, claims, leak GC."""

from __future__ import annotations

import ipaddress
import multiprocessing as mp
import threading
from typing import Any

import pytest

from tabby.client import ResourceClient
from tabby.ipam import IPAM, AddressInUse, NoPool, PoolExhausted, StaleRelease
from tabby.ipam.gc import collect
from tabby.model import validate
from tabby.store import Store, open_store


def pool(store: Store, name: str, cidr: str, **spec: Any) -> None:
    ResourceClient(store).apply(validate({"kind": "IPPool", "metadata": {"name": name},
                                          "spec": {"cidr": cidr, **spec}}))


def endpoint(store: Store, name: str, host: str, ips: list[str]) -> None:
    v6 = [i for i in ips if ":" in i]
    v4 = [i for i in ips if ":" not in i]
    ResourceClient(store).apply(validate({
        "kind": "Endpoint", "metadata": {"name": name},
        "spec": {"host": host, "orchestrator": "container", "workload_id": name, "interface": "tby0",
                 "mac": "ee:ee:ee:ee:ee:ee", "ipv6_addresses": v6, "ipv4_addresses": v4}}))


@pytest.fixture
def sq(tmp_path: Any) -> Store:
    return open_store(f"sqlite://{tmp_path}/ipam.db")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_dual_stack_in_one_call_and_release_by_handle(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/112")
    pool(sq, "v4", "10.65.0.0/16")
    ipam = IPAM(sq)
    got = ipam.assign("net.c1", "h1", ipv6=1, ipv4=1)
    assert [a.ip.version for a in got] == [6, 4]
    assert ipaddress.ip_address(got[0].ip) in ipaddress.ip_network("fd00:e::/122")
    assert str(got[0].ip) == "fd00:e::1" and str(got[1].ip) == "10.65.0.1"  # the pools' first address is reserved
    assert ipaddress.ip_address(got[1].ip) in ipaddress.ip_network("10.65.0.0/26")
    assert {a.cidr for a in ipam.claims("h1")} == {"fd00:e::/122", "10.65.0.0/26"}
    assert ipam.check() == []
    assert sorted(map(str, ipam.release_handle("net.c1"))) == sorted(str(a.ip) for a in got)
    assert ipam.release_handle("net.c1") == []  # idempotent
    assert ipam.check() == []


def test_hosts_get_their_own_blocks(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/112")
    ipam = IPAM(sq)
    a = ipam.assign("a", "h1", ipv6=3)
    b = ipam.assign("b", "h2", ipv6=1)
    assert {x.block for x in a} == {"fd00:e::/122"}
    assert b[0].block == "fd00:e::40/122"


def test_freed_addresses_are_reused_oldest_first(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/120")
    ipam = IPAM(sq)
    first = [ipam.assign(f"h{i}", "h1", ipv6=1)[0].ip for i in range(63)]  # fill the block (::0 reserved)
    ipam.release_handle("h5")
    ipam.release_handle("h2")
    ipam.release_handle("h9")
    # the block is full but for those three; they come back in the order they were freed
    again = [ipam.assign(f"n{i}", "h1", ipv6=1)[0].ip for i in range(3)]
    assert again == [first[5], first[2], first[9]]


def test_stale_release_fails_and_frees_nothing(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/120")
    ipam = IPAM(sq)
    ipam2 = IPAM(sq)
    old = ipam.assign("old", "h1", ipv6=1)[0]
    ipam.release_handle("old")
    # drain the queue so that the same address is handed out again
    for i in range(62):
        ipam.assign(f"fill{i}", "h1", ipv6=1)
    new = ipam2.assign("new", "h1", ipv6=1)[0]
    assert new.ip == old.ip and new.seq != old.seq
    with pytest.raises(StaleRelease):
        ipam.release_address(old.ip, old.seq)
    assert ipam.handle("new") is not None
    assert ipam.check() == []


def test_specific_address_and_in_use(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/112")
    ipam = IPAM(sq)
    a = ipam.assign_address("port-1", "h1", "fd00:e::110")
    assert a.block == "fd00:e::100/122"
    with pytest.raises(AddressInUse):
        ipam.assign_address("port-2", "h2", "fd00:e::110")
    assert ipam.handle("port-2") is None
    with pytest.raises(NoPool):
        ipam.assign_address("port-3", "h1", "fd99::1")
    # a %zone is refused, not stored as the handle's text beside the block's bare address
    for call in (lambda: ipam.assign_address("port-4", "h1", "fd00:e::111%eth0;x"),
                 lambda: ipam.assign_attachment("port-5", "h1", "a5", addresses=["fd00:e::112%x"]),
                 lambda: ipam.release_address("fd00:e::110%x")):
        with pytest.raises(ValueError, match="scoped"):
            call()
    assert ipam.handle("port-4") is None and ipam.handle("port-5") is None
    assert ipam.check() == []


def test_small_pool_exhausted_at_once_without_partial_allocation(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/120")  # four /122 blocks
    ipam = IPAM(sq)
    hosts = ["h1", "h2", "h3", "h4", "h5"]
    for i in range(254):  # 256 addresses, the pool's first reserved
        ipam.assign(f"c{i}", hosts[i % 5], ipv6=1)
    assert sum(r["used"] for r in ipam.usage()) == 254
    with pytest.raises(PoolExhausted, match="pool exhausted"):
        ipam.assign("two", "h1", ipv6=2)  # one address is left: all or nothing
    assert ipam.handle("two") is None
    assert sum(r["used"] for r in ipam.usage()) == 254
    ipam.assign("last", "h5", ipv6=1)
    with pytest.raises(PoolExhausted):
        ipam.assign("more", "h5", ipv6=1)
    assert ipam.check() == []


def test_dual_stack_rolls_back_ipv6_when_ipv4_is_exhausted(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/112")
    pool(sq, "v4", "10.65.0.0/30", block_size=30)
    ipam = IPAM(sq)
    for i in range(2):  # a /30: four addresses, the first and the last (broadcast) reserved
        ipam.assign(f"c{i}", "h1", ipv6=1, ipv4=1)
    before = sum(r["used"] for r in ipam.usage())
    with pytest.raises(PoolExhausted):
        ipam.assign("c4", "h1", ipv6=1, ipv4=1)
    assert sum(r["used"] for r in ipam.usage()) == before
    assert ipam.check() == []


def test_borrowing_and_strict_affinity(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/121")  # two blocks
    ipam = IPAM(sq)
    ipam.assign("a", "h1", ipv6=1)
    ipam.assign("b", "h2", ipv6=1)
    with pytest.raises(PoolExhausted):
        IPAM(sq, strict_affinity=True).assign("c", "h3", ipv6=1)
    borrowed = ipam.assign("c", "h3", ipv6=1)[0]
    assert borrowed.block in ("fd00:e::/122", "fd00:e::40/122")
    assert ipam.claims("h3") == []


def test_two_hosts_racing_for_blocks_resolve_cleanly(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/116")
    errors: list[BaseException] = []

    def run(host: str) -> None:
        try:
            ipam = IPAM(sq)
            for i in range(100):
                ipam.assign(f"{host}-{i}", host, ipv6=1)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(h,)) for h in ("h1", "h2", "h3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ipam = IPAM(sq)
    assert ipam.check() == []
    owners: dict[str, str] = {}
    for host in ("h1", "h2", "h3"):
        for aff in ipam.claims(host):
            assert aff.state == "confirmed"
            assert owners.setdefault(aff.cidr, host) == host
    assert sum(r["used"] for r in ipam.usage()) == 300


def test_gc_frees_a_leak_only_when_seen_twice_across_the_grace_period(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/112")
    pool(sq, "v4", "10.65.0.0/16")
    clock = Clock()
    ipam = IPAM(sq, clock=clock)
    live = ipam.assign("net.live", "h1", ipv6=1, ipv4=1)
    endpoint(sq, "live", "h1", [str(a.ip) for a in live])
    half = ipam.assign("net.half", "h1", ipv6=1, ipv4=1)
    endpoint(sq, "half", "h1", [str(half[0].ip)])  # one address still in use keeps the whole handle
    leak = ipam.assign("net.leak", "h1", ipv6=1, ipv4=1)

    r1 = collect(ipam, grace_s=60)
    assert set(r1.leaked) == {"net.leak"} and r1.released == {}
    clock.now += 30
    assert collect(ipam, grace_s=60).released == {}
    clock.now += 31
    assert collect(ipam, grace_s=60, dry_run=True).released == {"net.leak": sorted(str(a.ip) for a in leak)}
    assert ipam.handle("net.leak") is not None  # dry run changed nothing
    r3 = collect(ipam, grace_s=60)
    assert set(r3.released) == {"net.leak"}
    assert ipam.handle("net.leak") is None and ipam.handle("net.half") is not None
    assert ipam.check() == []


def test_gc_a_handle_that_comes_back_to_life_is_forgotten(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/112")
    clock = Clock()
    ipam = IPAM(sq, clock=clock)
    got = ipam.assign("net.slow", "h1", ipv6=1)
    assert "net.slow" in collect(ipam, grace_s=60).leaked
    endpoint(sq, "slow", "h1", [str(got[0].ip)])  # the CNI ADD finished writing its Endpoint
    clock.now += 120
    assert collect(ipam, grace_s=60).released == {}
    assert ipam.handle("net.slow") is not None


def test_gc_empty_blocks_lose_affinity_but_a_host_keeps_its_last(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/120")
    clock = Clock()
    ipam = IPAM(sq, clock=clock)
    for i in range(70):  # two blocks for h1
        ipam.assign(f"c{i}", "h1", ipv6=1)
        endpoint(sq, f"c{i}", "h1", [str(ipam.handle(f"c{i}").addresses[0].ip)])
    assert len(ipam.claims("h1")) == 2
    for i in range(70):
        ipam.release_handle(f"c{i}")
        ResourceClient(sq).delete("Endpoint", f"c{i}")
    collect(ipam, grace_s=60)
    clock.now += 61
    report = collect(ipam, grace_s=60)
    assert len(report.released_blocks) == 1
    assert len(ipam.claims("h1")) == 1 and len(ipam.usage()) == 1
    clock.now += 600
    collect(ipam, grace_s=60)
    assert len(ipam.claims("h1")) == 1  # the last block stays
    assert ipam.check() == []


def test_check_reports_a_crash_between_block_and_handle(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/112")
    ipam = IPAM(sq)
    ipam.assign("net.x", "h1", ipv6=1)
    sq.delete("/tabby/v1/ipam/handles/net.x")
    problems = ipam.check()
    assert len(problems) == 1 and "net.x" in problems[0] and "does not exist" in problems[0]
    clock = Clock()
    gc_ipam = IPAM(sq, clock=clock)
    collect(gc_ipam, grace_s=1)
    clock.now += 2
    assert "net.x" in collect(gc_ipam, grace_s=1).released
    assert ipam.check() == []


def test_eight_processes_assign_ten_thousand_distinct_addresses(store_url: str, store: Store, prefix: str) -> None:
    # tests share one etcd: a pool of this test's own, picked by name
    name = "p" + prefix.strip("/").split("/")[-1]
    third = int(name[1:5], 16) % 60000 + 1
    pool(store, name, f"fd00:{third:x}::/112")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_assign_many_in_pool, args=(store_url, name, f"h{w % 4}", w, 1250, q))
             for w in range(8)]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    ips = [ip for r in results for ip in r]
    assert len(ips) == 10_000 and len(set(ips)) == 10_000
    ipam = IPAM(store)
    used = [r for r in ipam.usage() if ipaddress.ip_network(str(r["block"])).subnet_of(
        ipaddress.ip_network(f"fd00:{third:x}::/112"))]
    assert sum(int(r["used"]) for r in used) == 10_000  # type: ignore[arg-type]
    assert ipam.check() == []


def _assign_many_in_pool(url: str, pool_name: str, host: str, writer: int, n: int,
                         out: mp.Queue) -> None:  # type: ignore[type-arg]
    ipam = IPAM(open_store(url))
    ips = [str(ipam.assign(f"{pool_name}.w{writer}-{i}", host, ipv6=1, pool=pool_name)[0].ip) for i in range(n)]
    out.put(ips)


def test_strict_affinity_from_config_refuses_to_borrow(sq: Store) -> None:
    pool(sq, "v6", "fd00:e::/121")  # two blocks
    ipam = IPAM(sq)  # no override: the Store's Config decides
    ipam.assign("a", "h1", ipv6=1)
    ipam.assign("b", "h2", ipv6=1)
    client = ResourceClient(sq)
    client.apply(validate({"kind": "Config", "metadata": {"name": "global"}, "spec": {"strict_affinity": True}}))
    strict = IPAM(sq)
    with pytest.raises(PoolExhausted):
        strict.assign("c", "h3", ipv6=1)
    # one host may be let off: host.<name> over global
    client.apply(validate({"kind": "Config", "metadata": {"name": "host.h4"}, "spec": {"strict_affinity": False}}))
    assert IPAM(sq).assign("d", "h4", ipv6=1)[0].block in ("fd00:e::/122", "fd00:e::40/122")
    with pytest.raises(PoolExhausted):
        IPAM(sq).assign("e", "h3", ipv6=1)
    assert IPAM(sq, strict_affinity=False).assign("e", "h3", ipv6=1)  # an explicit caller choice wins


def test_a_bad_handle_or_host_claims_nothing(sq: Store) -> None:
    """`ipam assign --handle 'a b'` failed only at the handle's record, after it had claimed a
    block and its affinity for the host."""
    from tabby.model.keys import IPAM_PREFIX

    pool(sq, "v6", "fd00:e::/112")
    ipam = IPAM(sq)
    for call in (lambda: ipam.assign("a b", "h1", ipv6=1), lambda: ipam.assign("", "h1", ipv6=1),
                 lambda: ipam.assign("ok", "h/x", ipv6=1), lambda: ipam.assign_address("a b", "h1", "fd00:e::5"),
                 lambda: ipam.assign_attachment("a b", "h1", "att", ipv6=1)):
        with pytest.raises(ValueError, match=r"^(handle|host) "):
            call()
    assert sq.list(IPAM_PREFIX)[0] == []


def test_every_64s_first_address_of_a_wide_pool_is_reserved(sq: Store) -> None:
    """A host anchors dnsmasq on the first address of each /64 of a wide stateful pool its VMs use:
    no workload may hold one (in IPv6 each is the /64's subnet-router anycast address anyway)."""
    pool(sq, "wide", "fd00:48::/48")
    ipam = IPAM(sq)
    with pytest.raises(AddressInUse, match="reserved"):
        ipam.assign_address("a", "h1", "fd00:48:0:5::")
    got = ipam.assign_address("b", "h1", "fd00:48:0:5::1")  # the rest of that /64 is handed out
    assert str(got.ip) == "fd00:48:0:5::1"
    with pytest.raises(AddressInUse, match="reserved"):
        ipam.assign_address("c", "h2", "fd00:48:0:ffff::")
    assert ipam.check() == []


def test_a_block_made_before_the_64_rule_reserves_its_first_address_at_its_next_use(sq: Store) -> None:
    """Blocks claimed before every /64's first address was reserved have it free (or handed out):
    the next allocation from one reserves it, and ``check`` names one that a workload holds."""
    from tabby.model.ipam import decode_ipam, encode_ipam
    from tabby.model.keys import ipam_block_key
    from tabby.model.plain import replace

    pool(sq, "wide", "fd00:48::/48")
    ipam = IPAM(sq)
    ipam.assign_address("a", "h1", "fd00:48:0:5::2")
    key = ipam_block_key("fd00:48:0:5::/122")

    def rewrite(**fields: Any) -> None:
        kv = sq.get(key)
        assert kv is not None
        sq.update(key, encode_ipam(replace(decode_ipam(key, kv.value), **fields)), kv.mod_revision)

    rewrite(reserved=[], free=[0, *decode_ipam(key, sq.get(key).value).free])  # as an old block had it
    got = ipam.assign("b", "h1", ipv6=1)[0]
    assert str(got.ip) != "fd00:48:0:5::" and got.block == "fd00:48:0:5::/122"
    block = decode_ipam(key, sq.get(key).value)
    assert block.reserved == [0] and 0 not in block.free and ipam.check() == []
    with pytest.raises(AddressInUse, match="reserved"):
        ipam.assign_address("c", "h1", "fd00:48:0:5::")
    # one handed out back then: check says so
    rewrite(reserved=[], allocations={**block.allocations, 0: block.allocations[2]})
    assert any("a /64's first address" in p for p in ipam.check()), ipam.check()
