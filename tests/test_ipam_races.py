"""IPAM under interleavings and records a review found to break it (each failed on the code before
the fix): overlapping blocks claimed at once, the collector racing a claim, a collector on a
clock behind, a stray record naming everything, disabled pools, a block gone mid-write, pools of
one address, release after a block size change, a dry run's honesty. Real SQLite Store."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from tabby.client import ResourceClient
from tabby.ipam import IPAM, NoPool
from tabby.ipam.gc import collect
from tabby.model import validate
from tabby.model.keys import IPAM_BLOCKS_PREFIX, ipam_affinity_key, ipam_block_key
from tabby.store import Store, open_store


def pool(store: Store, name: str, cidr: str, **spec: Any) -> None:
    ResourceClient(store).apply(validate({"kind": "IPPool", "metadata": {"name": name},
                                          "spec": {"cidr": cidr, **spec}}))


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Hooked:
    """The store, with ``hook(verb, key)`` run once before the first call that matches."""

    def __init__(self, store: Store, verb: str, match: Callable[[str], bool], hook: Callable[[], None]) -> None:
        self._store, self._verb, self._match, self._hook = store, verb, match, hook

    def __getattr__(self, name: str) -> Any:
        inner = getattr(self._store, name)
        if name != self._verb:
            return inner

        def call(key: str, *args: Any, **kwargs: Any) -> Any:
            if self._hook is not None and self._match(key):
                hook, self._hook = self._hook, None  # type: ignore[assignment]
                hook()
            return inner(key, *args, **kwargs)
        return call


@pytest.fixture
def sq(tmp_path: Any) -> Store:
    return open_store(f"sqlite://{tmp_path}/ipam.db")


def test_blocks_of_two_sizes_claimed_at_once_never_share_an_address(sq: Store) -> None:
    """Host a still has the pool's old block size cached when it is changed; b claims with the
    new one between a's listing of the blocks and a's block create."""
    pool(sq, "p", "10.10.0.0/24", block_size=26)
    b = IPAM(sq)
    got_b: list[Any] = []

    def b_claims() -> None:
        pool(sq, "p", "10.10.0.0/24", block_size=28)
        got_b.extend(b.assign("hb.c1", "hb", ipv4=1))
    a = IPAM(Hooked(sq, "create", lambda k: k.startswith(ipam_block_key("10.10.0.0/26")), b_claims))  # type: ignore[arg-type]
    a.pools()  # cached: /26
    got_a = a.assign("ha.c1", "ha", ipv4=1)
    ip_a, ip_b = ipaddress.ip_address(got_a[0].ip), ipaddress.ip_address(got_b[0].ip)
    assert ip_a != ip_b
    assert IPAM(sq).check() == []  # no two blocks overlap
    assert not any(ip_a in ipaddress.ip_network(x.cidr) for x in IPAM(sq).claims("hb"))


def test_a_claim_between_the_collectors_block_delete_and_its_affinity_delete_keeps_its_affinity(sq: Store) -> None:
    pool(sq, "p", "10.3.0.0/24", block_size=26)
    clock = Clock()
    host = IPAM(sq, clock=clock)
    host.assign_address("h.c1", "A", "10.3.0.5")  # claims 10.3.0.0/26
    host.assign_address("h.c2", "A", "10.3.0.70")  # and 10.3.0.64/26, which A keeps
    host.release_handle("h.c1")  # 10.3.0.0/26 is empty: the collector's, after the grace period
    gc_ipam = IPAM(Hooked(sq, "get", lambda k: k == ipam_affinity_key("A", "10.3.0.0/26"),  # type: ignore[arg-type]
                          lambda: IPAM(sq).assign_address("h.c4", "A", "10.3.0.5")), clock=clock)
    collect(gc_ipam, grace_s=60)
    clock.now += 61
    assert collect(gc_ipam, grace_s=60).released_blocks == ["10.3.0.0/26"]  # and A claims it again meanwhile
    assert sq.get(ipam_block_key("10.3.0.0/26")) is not None
    assert IPAM(sq).check() == [], "the block claimed again must keep its host's affinity"


def test_a_collector_on_a_clock_behind_does_not_free_an_allocation_being_set_up(sq: Store) -> None:
    """An ADD has its addresses, its Endpoint not yet written; one collector runs on a clock 600 s
    behind, the next on the right one: the handle is young by its own record, and kept."""
    pool(sq, "p", "10.7.0.0/24")
    clock = Clock()
    IPAM(sq, clock=clock).assign("net.c1/eth0", "h1", ipv4=1)
    collect(IPAM(sq, clock=Clock(clock.now - 600)), grace_s=300)
    assert collect(IPAM(sq, clock=clock), grace_s=300).released == {}
    clock.now += 301  # really leaked: freed once it is as old as the grace period by its own record too
    assert list(collect(IPAM(sq, clock=clock), grace_s=300).released) == ["net.c1/eth0"]


def test_a_stray_block_key_naming_every_address_stops_no_claim(sq: Store) -> None:
    pool(sq, "v4", "10.12.0.0/24")
    pool(sq, "v6", "fd00:12::/64")
    sq.put(IPAM_BLOCKS_PREFIX + "0.0.0.0-0", b"garbage")  # as any host's CNI user may write
    sq.put(IPAM_BLOCKS_PREFIX + "::-0", b"{}")
    got = IPAM(sq).assign("h.c1", "h1", ipv4=1, ipv6=1)
    assert sorted(a.ip.version for a in got) == [4, 6]
    assert len(IPAM(sq).snapshot().corrupt) == 2  # and both are named as corrupt


def test_no_specific_address_from_a_disabled_pool(sq: Store) -> None:
    """A disabled pool's addresses are another allocator's (Neutron's subnets)."""
    pool(sq, "p", "10.9.0.0/24", disabled=True)
    ipam = IPAM(sq)
    with pytest.raises(NoPool, match="disabled"):
        ipam.assign_address("h.c1", "h1", "10.9.0.7")
    with pytest.raises(NoPool, match="disabled"):
        ipam.assign_attachment("h.c2", "h1", "c2/eth0", addresses=["10.9.0.8"])
    assert ipam.claims("h1") == []


def test_a_block_deleted_between_read_and_write_is_read_again(sq: Store) -> None:
    pool(sq, "p", "10.8.0.0/24")
    ipam = IPAM(sq)
    ipam.assign_address("h.c1", "h1", "10.8.0.5")
    ipam.release_handle("h.c1")  # the block is empty; it goes as the next allocation writes to it
    hooked = IPAM(Hooked(sq, "update", lambda k: k == ipam_block_key("10.8.0.0/26"),  # type: ignore[arg-type]
                         lambda: sq.delete(ipam_block_key("10.8.0.0/26"))))
    got = hooked.assign("h.c2", "h1", ipv4=1)
    assert len(got) == 1 and IPAM(sq).check() == []


@pytest.mark.parametrize("cidr", ["10.1.1.1/32", "fd00:1::5/128", "10.1.1.0/31"])
def test_a_pool_of_one_or_two_addresses_gives_them_all(sq: Store, cidr: str) -> None:
    pool(sq, "p", cidr)
    net = ipaddress.ip_network(cidr)
    family = {"ipv4" if net.version == 4 else "ipv6": net.num_addresses}
    got = IPAM(sq).assign("h.c1", "h1", **family)
    assert sorted(a.ip for a in got) == list(net)


def test_release_by_address_finds_its_block_after_the_block_size_changed(sq: Store) -> None:
    pool(sq, "p", "10.6.0.0/24", block_size=26)
    ipam = IPAM(sq)
    got = ipam.assign("h.c1", "h1", ipv4=1)
    pool(sq, "p", "10.6.0.0/24", block_size=28)
    assert IPAM(sq).release_address(got[0].ip) == "h.c1"
    assert [(u["block"], u["used"]) for u in IPAM(sq).usage()] == [("10.6.0.0/26", 0)]


def test_a_dry_run_reports_what_a_real_run_releases(sq: Store) -> None:
    """The collector keeps a host's last block of each family, in a dry run as in a real one."""
    pool(sq, "v4", "10.4.0.0/24")
    pool(sq, "v6", "fd00:4::/64")
    clock = Clock()
    ipam = IPAM(sq, clock=clock)
    for i, ip in enumerate(["10.4.0.5", "10.4.0.70", "fd00:4::5"]):
        ipam.assign_address(f"h.c{i}", "h1", ip)
        ipam.release_handle(f"h.c{i}")
    collect(ipam, grace_s=60)
    clock.now += 61
    dry = collect(ipam, grace_s=60, dry_run=True).released_blocks
    real = collect(ipam, grace_s=60).released_blocks
    assert dry == real and len(real) == 1 and real[0].startswith("10.4.0."), (dry, real)


def test_an_ipv4_pools_broadcast_address_is_never_handed_out(sq: Store) -> None:
    """A host serving the pool's VMs holds its first address with the pool's length (dnsmasq's
    anchor), and the kernel makes the last a broadcast route (seen: ``broadcast 10.1.0.255`` in
    the local table): a workload given it was unreachable through that host."""
    from tabby.ipam import AddressInUse
    from tabby.ipam.blocks import new_block, take_specific
    from tabby.model.ipam import decode_ipam, encode_ipam

    pool(sq, "p", "10.1.0.0/24", block_size=26)
    ipam = IPAM(sq)
    with pytest.raises(AddressInUse, match="reserved"):
        ipam.assign_address("h.c1", "h1", "10.1.0.255")
    ipam.assign_address("h.c2", "h1", "10.1.0.200")
    key = ipam_block_key("10.1.0.192/26")

    def block() -> Any:
        kv = sq.get(key)
        assert kv is not None
        return decode_ipam(key, kv.value), kv.mod_revision
    assert 63 in block()[0].reserved
    # a block made before the reservation: reserved at its next allocation if still free
    sq.update(key, encode_ipam(take_specific(new_block(block()[0].network, "h1"), 8, "h.c2")[0]), block()[1])
    assert 63 not in block()[0].reserved
    ipam.assign_address("h.c3", "h1", "10.1.0.201")
    assert 63 in block()[0].reserved
    # one handed out before: `ipam check` names it
    sq.update(key, encode_ipam(take_specific(new_block(block()[0].network, "h1"), 63, "h.old")[0]), block()[1])
    assert any("10.1.0.255" in p and "broadcast" in p for p in IPAM(sq).check())


def test_a_handle_write_whose_answer_is_lost_leaves_no_record_naming_freed_addresses(sq: Store) -> None:
    """etcd applied the last write of an ADD but its answer was lost (OutcomeUnknown): the rollback
    freed the addresses, and its delete at the old revision failed, so the record stayed, naming
    them; the runtime's retry rebuilt on them while the next workload got them too."""
    from tabby.model.keys import ipam_handle_key
    from tabby.store.base import OutcomeUnknown

    pool(sq, "p", "10.5.0.0/24")
    key = ipam_handle_key("net.c1/eth0")

    class LostAnswer:
        def __getattr__(self, name: str) -> Any:
            return getattr(sq, name)

        def update(self, k: str, value: bytes, rev: int) -> int:
            out = sq.update(k, value, rev)
            if k == key:
                raise OutcomeUnknown(k, "store etcd://x: the answer was lost")
            return out
    with pytest.raises(OutcomeUnknown):
        IPAM(LostAnswer()).assign_attachment("net.c1/eth0", "h1", "c1/eth0", ipv4=1)  # type: ignore[arg-type]
    assert sq.get(key) is None
    assert IPAM(sq).check() == []
    assert all(u["used"] == 0 for u in IPAM(sq).usage())


def test_release_by_address_looks_past_a_stray_smaller_key_that_covers_it(sq: Store) -> None:
    """From the review of the fix above: the smallest key holding the address was taken, and a stray
    or corrupt one inside the real block made the release fail (CorruptRecord)."""
    pool(sq, "p", "10.0.0.0/16", block_size=26)
    got = IPAM(sq).assign("h1", "host-a", ipv4=3)
    sq.put(ipam_block_key("10.0.0.0/30"), b"garbage")
    assert IPAM(sq).release_address(got[1].ip) == "h1"
