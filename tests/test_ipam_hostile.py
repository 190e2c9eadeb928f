"""IPAM among hostile records, on both backends: corrupt or conflicting bytes written straight into
the Store between valid records never stop assign / release / gc / check / show for the valid
ones, never make them raise anything but typed errors, never get an allocated address handed out
again, and are never modified. Also: the strict-affinity loop, and the cross-check with Endpoints.

This module has an etcd of its own (not the session's), so that it may empty the key space
before each test: IPAM's keys are global, and check/gc look at all of them."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tabby.client import ResourceClient
from tabby.ipam import IPAM, AddressInUse, Contention, CorruptRecord, IpamError, PoolExhausted
from tabby.ipam.allocator import fits
from tabby.ipam.blocks import address, block_of, key_network
from tabby.ipam.gc import collect
from tabby.lab.etcd import EtcdServer
from tabby.model import validate
from tabby.model.codec import _printable
from tabby.model.ipam import Block, decode_ipam
from tabby.model.keys import (
    IPAM_GC_KEY,
    PREFIX,
    endpoint_key,
    ipam_affinity_key,
    ipam_block_key,
    ipam_handle_key,
)
from tabby.store import Store

V6 = ipaddress.ip_network("fd00:e::/116")  # 64 blocks of /122
V4 = ipaddress.ip_network("10.65.0.0/22")  # 16 blocks of /26
HOSTS = ["h1", "h2", "h3", "h4"]


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer(name=f"tbyh-{uuid.uuid4().hex[:6]}") as server:
        yield server


@pytest.fixture(autouse=True)
def _empty(store: Store) -> None:
    for kv in store.list(PREFIX)[0]:
        store.delete(kv.key)


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


def pools(store: Store) -> None:
    client = ResourceClient(store)
    client.apply(validate({"kind": "IPPool", "metadata": {"name": "v6"}, "spec": {"cidr": str(V6)}}))
    client.apply(validate({"kind": "IPPool", "metadata": {"name": "v4"}, "spec": {"cidr": str(V4)}}))


def endpoint(store: Store, name: str, host: str, ips: list[str]) -> None:
    ResourceClient(store).apply(validate({
        "kind": "Endpoint", "metadata": {"name": name},
        "spec": {"host": host, "orchestrator": "container", "workload_id": name, "interface": "tby0",
                 "mac": "ee:ee:ee:ee:ee:ee", "ipv6_addresses": [i for i in ips if ":" in i],
                 "ipv4_addresses": [i for i in ips if ":" not in i]}}))


def blocks_of(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str]:
    return [str(b) for b in net.subnets(new_prefix=122 if net.version == 6 else 26)]


# -- the generator -------------------------------------------------------------------------------

def _valid_block(cidr: str, host: str | None, rng: random.Random) -> dict[str, Any]:
    size = ipaddress.ip_network(cidr).num_addresses
    ordinals = list(range(size))
    rng.shuffle(ordinals)
    k = rng.randrange(0, 5)
    allocations = {str(o): {"handle": f"evil.{o}", "seq": i + 1} for i, o in enumerate(ordinals[:k])}
    return {"cidr": cidr, "host": host, "seq": k, "allocations": allocations, "free": sorted(ordinals[k:]),
            "reserved": []}


def _mangle(doc: dict[str, Any], rng: random.Random) -> tuple[str, bytes]:
    """One way to turn a valid record document into bytes the decoder must refuse."""
    text = json.dumps(doc)
    field = rng.choice(sorted(doc))
    choices: list[tuple[str, Any]] = [
        ("not UTF-8", lambda: b"\xff\xfe" + text.encode()[: rng.randrange(0, 40)] + b"\x80"),
        ("truncated JSON", lambda: text.encode()[: rng.randrange(1, max(2, len(text) - 1))]),
        ("deep nesting", lambda: (b"[" * 100_000) + (b"]" * 100_000)),
        ("deep objects", lambda: (b'{"a":' * 200) + b"1" + (b"}" * 200)),
        ("NaN", lambda: text.replace(f'"{field}": ', f'"{field}": NaN, "x{field}": ', 1).encode()),
        ("infinity", lambda: json.dumps({**doc, field: 1e999}).replace("Infinity", "1e999").encode()),
        ("huge integer", lambda: json.dumps({**doc, field: 0}).replace(": 0", ": " + "9" * 5000, 1).encode()),
        ("duplicate key", lambda: ("{" + f'"{field}": null, ' + text[1:]).encode()),
        ("wrong type", lambda: json.dumps({**doc, field: rng.choice([[], {}, "x", 3.5, True, None, [[1]]])})
         .encode()),
        ("missing field", lambda: json.dumps({k: v for k, v in doc.items() if k != field}).encode()),
        ("extra field", lambda: json.dumps({**doc, "evil": 1}).encode()),
        ("control character", lambda: json.dumps({**doc, field: "h1\n[evil] forged log line"}).encode()),
        ("lone surrogate", lambda: json.dumps({**doc, field: "h\ud800"}).encode()),
        ("not an object", lambda: rng.choice([b"[]", b'"block"', b"1", b"null", b""])),
        ("too large", lambda: json.dumps({**doc, "pad": "x" * (1024 * 1024 + 10)}).encode()),
    ]
    if "cidr" in doc and "free" in doc:  # blocks
        size = ipaddress.ip_network(doc["cidr"]).num_addresses
        choices += [
            ("ordinal outside the block", lambda: json.dumps({**doc, "free": [*doc["free"], size + 5]}).encode()),
            ("negative ordinal", lambda: json.dumps({**doc, "free": [-1, *doc["free"]]}).encode()),
            ("duplicated ordinal", lambda: json.dumps({**doc, "free": [*doc["free"], doc["free"][0]]}).encode()
             if doc["free"] else b"{}"),
            ("allocated and free", lambda: json.dumps(
                {**doc, "allocations": {**doc["allocations"], str(doc["free"][0]): {"handle": "x", "seq": 0}}}
            ).encode() if doc["free"] else b"{}"),
            ("allocation newer than the block", lambda: json.dumps(
                {**doc, "seq": 0, "allocations": {"1": {"handle": "x", "seq": 9}},
                 "free": [o for o in doc["free"] if o != 1]}).encode()),
            ("cidr not canonical", lambda: json.dumps({**doc, "cidr": doc["cidr"].replace("::", ":0::")}).encode()),
            ("host not a name", lambda: json.dumps({**doc, "host": "h1; rm -rf /"}).encode()),
        ]
    kind, make = rng.choice(choices)
    return kind, make()


def hostile_records(rng: random.Random, free_v6: list[str], n: int) -> list[tuple[str, bytes, str]]:
    """(key, value, what) for n hostile records, in keys that hold no valid record: blocks at the
    given unclaimed cidrs (and outside the pools), affinities, handles and IPAM keys of no kind."""
    out: list[tuple[str, bytes, str]] = []
    spare = list(free_v6)
    for i in range(n):
        kind = rng.choice(["block", "block", "moved block", "affinity", "handle", "handle outside", "foreign"])
        if kind in ("block", "moved block") and len(spare) >= 2:
            cidr = spare.pop(rng.randrange(len(spare)))
            if kind == "moved block":  # a valid block record, under another block's key
                other = spare[rng.randrange(len(spare))]
                out.append((ipam_block_key(cidr), json.dumps(_valid_block(other, "h9", rng)).encode(),
                            "block record under another block's key"))
            else:
                what, value = _mangle(_valid_block(cidr, rng.choice(HOSTS), rng), rng)
                out.append((ipam_block_key(cidr), value, f"block: {what}"))
        elif kind == "affinity":
            cidr = rng.choice(free_v6)
            host = rng.choice(HOSTS)
            doc = {"host": host, "cidr": cidr, "state": "confirmed", "since": 1.0}
            if rng.random() < 0.3:  # valid, but under another host's key
                value, what = json.dumps({**doc, "host": "h9"}).encode(), "affinity under another host's key"
            else:
                what, value = _mangle(doc, rng)
                what = f"affinity: {what}"
            out.append((ipam_affinity_key(host, cidr), value, what))
        elif kind in ("handle", "handle outside"):
            name = f"hostile.{i}"
            doc = {"handle": name, "addresses": [{"ip": "fd00:e::5", "block": "fd00:e::/122", "seq": 1}],
                   "endpoint": None}
            if kind == "handle outside":
                doc["addresses"] = [{"ip": "fd00:e::99", "block": "fd00:e::/122", "seq": 1}]
                value, what = json.dumps(doc).encode(), "handle naming an address outside its block"
            else:
                what, value = _mangle(doc, rng)
                what = f"handle: {what}"
            out.append((ipam_handle_key(name), value, what))
        else:
            key = rng.choice([f"{PREFIX}ipam/blocks/garbage{i}", f"{PREFIX}ipam/whatever/{i}",
                              ipam_block_key("fd99::/122")])
            out.append((key, rng.choice([b"{}", b"\x00\x01", json.dumps(_valid_block("fd99::/122", None, rng))
                                         .encode()]), "foreign key"))
    seen: set[str] = set()
    return [r for r in out if not (r[0] in seen or seen.add(r[0]))]  # one record per key


def _refused(key: str, value: bytes) -> bool:
    try:
        decode_ipam(key, value)
    except ValueError:
        return True
    return False


# -- the invariants ------------------------------------------------------------------------------

class Model:
    """What the test has been given, checked against the Store."""

    def __init__(self, store: Store, hostile: dict[str, bytes]) -> None:
        self.store = store
        self.hostile = hostile  # key -> bytes, every corrupt record written
        self.owned: dict[str, str] = {}  # ip -> handle
        self.handles: dict[str, list[str]] = {}
        self.live: set[str] = set()  # handles with an Endpoint
        self.corrupt_nets: list[Any] = []

    def corrupt_blocks(self) -> None:
        """The networks corrupt block records cover: nothing in them may be handed out."""
        self.corrupt_nets = [n for k in self.hostile if k.startswith(f"{PREFIX}ipam/blocks/")
                             and (n := key_network(k)) is not None]

    def allocated_elsewhere(self) -> set[str]:
        """Addresses a block record that decodes has allocated to a handle that is not ours."""
        out = set()
        for kv in self.store.list(f"{PREFIX}ipam/blocks/")[0]:
            try:
                b = decode_ipam(kv.key, kv.value)
            except ValueError:
                continue
            out |= {str(address(b, o)) for o, a in b.allocations.items() if a.handle not in self.handles}
        return out

    def took(self, handle: str, ips: list[str], before: set[str]) -> None:
        for ip in ips:
            assert ip not in self.owned, f"{ip} handed out twice ({self.owned[ip]}, {handle})"
            assert ip not in before, f"{ip} was allocated in a valid block already"
            assert not any(ipaddress.ip_address(ip) in n for n in self.corrupt_nets), f"{ip} is in a corrupt block"
            self.owned[ip] = handle
        self.handles.setdefault(handle, []).extend(ips)

    def dropped(self, handle: str) -> None:
        for ip in self.handles.pop(handle, []):
            self.owned.pop(ip, None)
        self.live.discard(handle)

    def verify(self, pools_: list[Any]) -> None:
        for key, value in self.hostile.items():
            kv = self.store.get(key)
            assert kv is not None and kv.value == value, f"corrupt record {key} was modified"
        by_cidr: dict[str, Block] = {}
        for kv in self.store.list(f"{PREFIX}ipam/blocks/")[0]:
            if kv.key not in self.hostile:
                b = decode_ipam(kv.key, kv.value)
                by_cidr[b.cidr] = b
        for ip, handle in self.owned.items():
            addr = ipaddress.ip_address(ip)
            b = by_cidr[str(block_of(addr, 122 if addr.version == 6 else 26))]
            assert fits(b.network, pools_)
            alloc = b.allocations.get(int(addr) - int(b.network.network_address))
            assert alloc is not None and alloc.handle == handle, f"{ip} of {handle} is not allocated to it"


def _typed(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run fn; IpamError is an answer, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except IpamError as e:
        return e


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hostile_records_between_valid_ones(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    pools(store)
    clock = Clock()
    ipam = IPAM(store, clock=clock)
    model = Model(store, {})
    # some valid state first: a block per host, each address on an Endpoint
    for i, host in enumerate(HOSTS[:3]):
        before = model.allocated_elsewhere()
        got = ipam.assign(f"net.c{i}", host, ipv6=1, ipv4=1)
        model.took(f"net.c{i}", [str(a.ip) for a in got], before)
        endpoint(store, f"c{i}", host, [str(a.ip) for a in got])
        model.live.add(f"net.c{i}")
    claimed = {b for kv in store.list(f"{PREFIX}ipam/blocks/")[0] if (b := str(key_network(kv.key)))}
    free_v6 = [c for c in blocks_of(V6) if c not in claimed]
    hostile = hostile_records(rng, free_v6, 60)
    for key, value, _ in hostile:
        store.create(key, value)
    model.hostile = {k: v for k, v, _ in hostile if _refused(k, v)}
    model.corrupt_blocks()
    assert len(model.hostile) >= 45  # most of them are refused; the rest are valid records to live with
    pool_records = ipam.pools()

    n = 0
    done: dict[str, int] = {}
    for step in range(150):
        op = rng.choice(["assign", "assign", "assign", "address", "release", "release hostile", "release address",
                         "gc", "check"])
        host = rng.choice(HOSTS)
        if op == "assign":
            n += 1
            handle = f"net.x{n}"
            before = model.allocated_elsewhere()
            got = _typed(ipam.assign, handle, host, ipv6=rng.randrange(0, 3) or 1, ipv4=rng.randrange(0, 2))
            done[f"assign {type(got).__name__}"] = done.get(f"assign {type(got).__name__}", 0) + 1
            if not isinstance(got, IpamError):
                ips = [str(a.ip) for a in got]
                model.took(handle, ips, before)
                if rng.random() < 0.8:
                    endpoint(store, f"x{n}", host, ips)
                    model.live.add(handle)
            else:
                assert isinstance(got, PoolExhausted), got
        elif op == "address":
            n += 1
            handle = f"port.{n}"
            ip = str(V6[rng.randrange(1, V6.num_addresses)])
            before = model.allocated_elsewhere()
            got = _typed(ipam.assign_address, handle, host, ip)
            done[f"address {type(got).__name__}"] = done.get(f"address {type(got).__name__}", 0) + 1
            if not isinstance(got, IpamError):
                model.took(handle, [str(got.ip)], before)
                endpoint(store, f"p{n}", host, [str(got.ip)])
                model.live.add(handle)
            elif isinstance(got, CorruptRecord):  # its block, or this host's affinity for it
                assert got.key in model.hostile, got
            else:
                assert isinstance(got, AddressInUse), got
        elif op == "release" and model.handles:
            handle = rng.choice(sorted(model.handles))
            freed = ipam.release_handle(handle)
            assert sorted(map(str, freed)) == sorted(model.handles[handle])
            model.dropped(handle)
        elif op == "release hostile":
            keys = [k for k in model.hostile if k.startswith(f"{PREFIX}ipam/handles/")]
            if keys:
                name = keys[rng.randrange(len(keys))].rsplit("/", 1)[1]
                with pytest.raises(CorruptRecord) as e:
                    ipam.release_handle(name)
                assert e.value.key.endswith(name) and e.value.field
        elif op == "release address" and model.owned:
            ip = rng.choice(sorted(model.owned))
            handle = model.owned[ip]
            assert ipam.release_address(ip) == handle
            model.owned.pop(ip)
            model.handles[handle].remove(ip)
            if not model.handles[handle]:
                model.dropped(handle)
        elif op == "gc":
            clock.now += 400
            report = collect(ipam, grace_s=300)
            assert not set(report.released) & model.live, "gc freed a handle whose Endpoint exists"
            for handle in report.released:
                model.dropped(handle)
            assert {c.split(" ", 1)[0] for c in report.corrupt} >= set(model.hostile)
        elif op == "check":
            snap = ipam.snapshot()
            assert {c.key for c in snap.corrupt} == set(model.hostile)
            problems = ipam.check(snap)
            assert not [p for p in problems if {t.strip(",:") for t in p.split()} & set(model.handles)], problems
            rows = ipam.usage(snap)
            assert {r["block"] for r in rows} == {b.cidr for b, _ in snap.blocks}
        else:
            continue
        done[op] = done.get(op, 0) + 1
        if step % 20 == 0:
            model.verify(pool_records)
    print(seed, sorted(done.items()))
    assert done.get("assign list", 0) > 20 and done.get("release", 0) and done.get("gc", 0) and done.get("check", 0)
    model.verify(pool_records)
    for handle in sorted(model.handles):  # everything valid can still be given back
        assert sorted(map(str, ipam.release_handle(handle))) == sorted(model.handles[handle])
        model.dropped(handle)
    model.verify(pool_records)


def test_a_host_whose_only_block_is_corrupt_claims_another(store: Store) -> None:
    pools(store)
    ipam = IPAM(store)
    first = ipam.assign("net.a", "h1", ipv6=1)[0]
    key = ipam_block_key(first.block)
    bad = store.get(key).value.replace(b'"free":[', b'"free":[9999,')
    store.update(key, bad, store.get(key).mod_revision)
    for i in range(5):  # a fresh allocator (no hint) and the same one: both move on
        for allocator in (ipam, IPAM(store)):
            got = allocator.assign(f"net.b{i}{id(allocator)}", "h1", ipv6=1)[0]
            assert got.block != first.block
    assert store.get(key).value == bad  # never written
    assert len(ipam.claims("h1")) == 2
    with pytest.raises(CorruptRecord, match="ordinal 9999"):
        ipam.assign_address("port.x", "h1", str(ipaddress.ip_address(first.ip) + 1))
    with pytest.raises(CorruptRecord):  # its address cannot be freed while the block is corrupt
        ipam.release_address(first.ip)
    assert ipam.release_handle("net.a") == []  # the handle goes; the allocation stays as the block has it
    assert store.get(key).value == bad


def test_a_corrupt_affinity_is_skipped(store: Store) -> None:
    pools(store)
    ipam = IPAM(store)
    first = ipam.assign("net.a", "h1", ipv6=1)[0]
    aff = ipam_affinity_key("h1", first.block)
    store.update(aff, b'{"host": "h1", "cidr": 5}', store.get(aff).mod_revision)
    assert ipam.claims("h1") == []
    got = IPAM(store).assign("net.b", "h1", ipv6=1)[0]
    assert got.block != first.block  # its block is not in use through a record nobody can read
    assert store.get(aff).value == b'{"host": "h1", "cidr": 5}'
    assert not [p for p in ipam.check() if first.block in p]  # a reference to a corrupt record is not a problem


def test_a_corrupt_handle_refuses_release_and_assign_and_is_kept(store: Store) -> None:
    pools(store)
    ipam = IPAM(store)
    key = ipam_handle_key("net.bad")
    store.create(key, b'{"handle": "net.bad", "addresses": "all of them"}')
    with pytest.raises(CorruptRecord) as e:
        ipam.release_handle("net.bad")
    assert e.value.key == key and e.value.field == "addresses" and key in str(e.value)
    used = sum(int(r["used"]) for r in ipam.usage())  # type: ignore[call-overload]
    with pytest.raises(CorruptRecord):
        ipam.assign("net.bad", "h1", ipv6=2)  # the addresses taken are given back
    assert sum(int(r["used"]) for r in ipam.usage()) == used  # type: ignore[call-overload]
    with pytest.raises(CorruptRecord):
        ipam.handle("net.bad")
    assert store.get(key).value == b'{"handle": "net.bad", "addresses": "all of them"}'
    assert ipam.check() == []


def test_a_valid_handle_naming_someone_elses_address_frees_nothing_of_theirs(store: Store) -> None:
    pools(store)
    ipam = IPAM(store)
    mine = ipam.assign("net.mine", "h1", ipv6=1, endpoint="ep-mine")[0]
    evil = {"handle": "evil", "addresses": [{"ip": str(mine.ip), "block": mine.block, "seq": mine.seq}]}
    store.create(ipam_handle_key("evil"), json.dumps(evil).encode())
    assert ipam.release_handle("evil") == []
    assert ipam.handle("net.mine") is not None
    assert not any(str(a.ip) == str(mine.ip) for a in ipam.assign("net.other", "h1", ipv6=5, endpoint="ep-mine"))
    # gc: "net.mine" lives by its Endpoint's name (which holds another address); "evil" names its
    # address, which no Endpoint holds: leaked, and released, but that must not free mine
    endpoint(store, "ep-mine", "h1", ["10.65.0.9"])
    store.create(ipam_handle_key("evil"), json.dumps(evil).encode())
    clock = Clock()
    gc = IPAM(store, clock=clock)
    collect(gc, grace_s=10)
    clock.now += 11
    assert "evil" in collect(gc, grace_s=10).released
    assert ipam.handle("net.mine") is not None and ipam.handle("evil") is None
    block = decode_ipam(ipam_block_key(mine.block), store.get(ipam_block_key(mine.block)).value)
    assert block.allocations[int(mine.ip) - int(block.network.network_address)].handle == "net.mine"


def test_gc_frees_nothing_on_the_basis_of_a_corrupt_record(store: Store) -> None:
    pools(store)
    clock = Clock()
    ipam = IPAM(store, clock=clock)
    corrupt_handle = ipam.assign("net.h", "h1", ipv6=1)[0]  # its handle record will be corrupt
    in_corrupt_block = ipam.assign("net.b", "h2", ipv6=1)[0]  # its block will be corrupt
    on_corrupt_ep = ipam.assign("net.e", "h3", ipv6=1, endpoint="ep-e")[0]  # its Endpoint will be corrupt
    leak = ipam.assign("net.leak", "h1", ipv6=1)[0]  # a real leak: freed
    for k, v in ((ipam_handle_key("net.h"), b"\xff"),
                 (ipam_block_key(in_corrupt_block.block), b'{"cidr": "fd00:e::40/122"}')):
        store.update(k, v, store.get(k).mod_revision)
    endpoint(store, "ep-e", "h3", [str(on_corrupt_ep.ip)])
    ep_key = endpoint_key("h3", "ep-e")
    store.update(ep_key, b'{"kind": "Endpoint", "metadata": {"name": "ep-e"}, "spec": {"ipv6_addresses": ["'
                 + str(on_corrupt_ep.ip).encode() + b'"]}}', store.get(ep_key).mod_revision)
    for _ in range(3):
        report = collect(ipam, grace_s=60)
        clock.now += 61
    assert set(report.kept_unknown) == {"net.h", "net.b"}
    assert ipam.handle("net.leak") is None and ipam.handle("net.e") is not None
    assert ipam.handle("net.b") is not None
    snap = ipam.snapshot()
    allocated = {str(address(b, o)) for b, _ in snap.blocks for o in b.allocations}
    assert str(corrupt_handle.ip) in allocated and str(leak.ip) not in allocated
    assert store.get(ipam_handle_key("net.h")).value == b"\xff"


def test_gc_with_a_corrupt_record_of_its_own_frees_nothing_and_leaves_it(store: Store) -> None:
    pools(store)
    clock = Clock()
    ipam = IPAM(store, clock=clock)
    ipam.assign("net.leak", "h1", ipv6=1)
    store.create(IPAM_GC_KEY, b'{"leaked_handles": {"net.leak": NaN}}')
    for _ in range(3):
        report = collect(ipam, grace_s=60)
        clock.now += 61
        assert report.state_corrupt and report.released == {}
    assert ipam.handle("net.leak") is not None
    assert store.get(IPAM_GC_KEY).value == b'{"leaked_handles": {"net.leak": NaN}}'
    store.delete(IPAM_GC_KEY)  # what the operator is told to do
    collect(ipam, grace_s=60)
    clock.now += 61
    assert "net.leak" in collect(ipam, grace_s=60).released


def test_a_block_of_another_size_over_claimed_blocks_is_never_used(store: Store) -> None:
    pools(store)
    ipam = IPAM(store)
    a = ipam.assign("net.a", "h1", ipv6=1)[0]  # fd00:e::/122
    big = _valid_block("fd00:e::/120", "h1", random.Random(0))  # covers fd00:e::/122 .. fd00:e::c0/122
    store.create(ipam_block_key("fd00:e::/120"), json.dumps(big).encode())
    store.create(ipam_affinity_key("h1", "fd00:e::/120"),
                 json.dumps({"host": "h1", "cidr": "fd00:e::/120", "state": "confirmed", "since": 1.0}).encode())
    before = store.get(ipam_block_key("fd00:e::/120")).value
    got = [ipam.assign(f"net.b{i}", h, ipv6=30) for i, h in enumerate(["h1", "h2", "h1"])]
    new_blocks = {x.block for g in got for x in g}
    assert "fd00:e::/120" not in new_blocks
    # the first holder (fd00:e::/122) is used; no new block is claimed inside the /120
    assert all(b == a.block or not ipaddress.ip_network(b).subnet_of(ipaddress.ip_network("fd00:e::/120"))
               for b in new_blocks)
    assert store.get(ipam_block_key("fd00:e::/120")).value == before
    assert any("fd00:e::/120" in p and "overlap" in p for p in ipam.check())


# -- strict affinity: bounded, whatever races it meets -----------------------------------------------

class ReleasingStore:
    """A Store in which every block record is deleted again right after it is created (a collector
    or another host releasing it in a race, every time)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def create(self, key: str, value: bytes) -> int:
        rev = self.inner.create(key, value)
        if "/ipam/blocks/" in key:
            self.inner.delete(key)
        return rev

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.timeout(10)
def test_strict_affinity_assign_address_in_an_unclaimed_block_ends(store: Store) -> None:
    pools(store)
    strict = IPAM(store, strict_affinity=True)
    got = strict.assign_address("port.a", "h1", "fd00:e::45")  # strict forbids borrowing, not claiming
    assert got.block == "fd00:e::40/122"
    assert [a.cidr for a in strict.claims("h1")] == ["fd00:e::40/122"]
    with pytest.raises(AddressInUse, match="strict affinity"):
        IPAM(store, strict_affinity=True).assign_address("port.b", "h2", "fd00:e::46")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("strict", [True, False])
def test_assignment_ends_when_every_claimed_block_is_released_in_a_race(store: Store, strict: bool) -> None:
    client = ResourceClient(store)
    client.apply(validate({"kind": "IPPool", "metadata": {"name": "big"}, "spec": {"cidr": "fd00:e::/64"}}))
    racing = IPAM(ReleasingStore(store), strict_affinity=strict)  # type: ignore[arg-type]
    with pytest.raises(Contention):
        racing.assign_address("port.a", "h1", "fd00:e::45")
    with pytest.raises(PoolExhausted):
        racing.assign("net.a", "h1", ipv6=1)
    assert store.list(f"{PREFIX}ipam/handles/")[0] == []


@pytest.mark.timeout(10)
def test_strict_affinity_full_blocks_and_nothing_to_claim_is_exhausted(store: Store) -> None:
    ResourceClient(store).apply(validate({"kind": "IPPool", "metadata": {"name": "v6"},
                                          "spec": {"cidr": "fd00:e::/121"}}))  # two blocks
    strict = IPAM(store, strict_affinity=True)
    for i in range(63):
        strict.assign(f"a{i}", "h1", ipv6=1)
    strict.assign("b", "h2", ipv6=1)
    with pytest.raises(PoolExhausted):
        strict.assign("c", "h1", ipv6=1)
    # h1's block unclaimed under it (host gone) in a race: still a clean end
    key = ipam_block_key("fd00:e::/122")
    doc = json.loads(store.get(key).value)
    store.update(key, json.dumps({**doc, "host": None}).encode(), store.get(key).mod_revision)
    with pytest.raises(PoolExhausted):
        IPAM(store, strict_affinity=True).assign("d", "h1", ipv6=1)
    with pytest.raises(AddressInUse):
        strict.assign_address("e", "h1", "fd00:e::41")


# -- the command line ------------------------------------------------------------------------------

def tabby(store_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TABBY_STORE": store_url, "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "tabby.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_cli_show_check_release_gc_among_corrupt_records(store_url: str, store: Store) -> None:
    pools(store)
    ipam = IPAM(store)
    a = ipam.assign("net.a", "h1", ipv6=1, endpoint="ep-a")[0]
    b = ipam.assign("net.b", "h2", ipv6=1, ipv4=1)
    endpoint(store, "ep-a", "h1", [str(a.ip)])
    endpoint(store, "ep-b", "h2", [str(x.ip) for x in b])
    ipam.assign("net.bad", "h1", ipv6=1)  # its record is made corrupt below
    bad = {ipam_block_key("fd00:e::400/122"): b'{"cidr": "fd00:e::400/122", "host": "h3", "free": "[evil]"}',
           ipam_handle_key("net.bad"): b'{"handle": "net.bad", "addresses": [], "endpoint": null, "x": 1}',
           ipam_affinity_key("h1", "fd00:e::80/122"): b"\xff\xfe",
           endpoint_key("h1", "ep-bad"): b'{"kind": "Endpoint", "metadata": {"name": "ep-bad"}}',
           f"{PREFIX}ipam/handles/x\n[red]forged": b"{}"}
    for k, v in bad.items():
        kv = store.get(k)
        store.update(k, v, kv.mod_revision) if kv else store.create(k, v)

    r = tabby(store_url, "ipam", "show")
    assert r.returncode == 0, r.stderr
    assert a.block in r.stdout and b[0].block in r.stdout and b[1].block in r.stdout
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4 and len(r.stderr.splitlines()) == 4, r.stderr  # one line each, nothing else
    assert any(ipam_block_key("fd00:e::400/122") in w and "(field free)" in w for w in warnings)
    assert any(ipam_handle_key("net.bad") in w and "(field x)" in w for w in warnings)
    assert any(ipam_affinity_key("h1", "fd00:e::80/122") in w and "(field (document))" in w for w in warnings)
    assert "/x\\x0a[red]forged (field handle)" in r.stderr  # a newline in a key is escaped, markup not obeyed
    rows = json.loads(tabby(store_url, "ipam", "show", "-o", "json").stdout)
    assert {row["block"] for row in rows} == {a.block, b[0].block, b[1].block}
    assert tabby(store_url, "ipam", "show", "--strict").returncode == 1

    r = tabby(store_url, "ipam", "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ipam consistent (5 corrupt record(s) skipped)" in r.stdout
    assert len([line for line in r.stderr.splitlines() if line.startswith("warning:")]) == 5
    assert tabby(store_url, "ipam", "check", "--strict").returncode == 1

    r = tabby(store_url, "ipam", "release", "--handle", "net.bad")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert ipam_handle_key("net.bad") in r.stderr and "field x" in r.stderr
    assert store.get(ipam_handle_key("net.bad")).value == bad[ipam_handle_key("net.bad")]

    r = tabby(store_url, "ipam", "gc", "--dry-run")
    assert r.returncode == 0 and "net.bad" in r.stdout and "kept" in r.stdout, r.stdout + r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("warning:")]) == 5

    # real inconsistencies: exit 1, each named
    endpoint(store, "ep-free", "h1", ["fd00:e::30"])  # free in h1's block
    endpoint(store, "ep-twin", "h1", [str(a.ip)])  # a second Endpoint on net.a's address
    ipam.assign("net.orphan", "h3", ipv6=1)  # no Endpoint; young
    r = tabby(store_url, "ipam", "check")
    assert r.returncode == 1
    assert "free-in-use: fd00:e::30 is on Endpoint ep-free but free in block fd00:e::/122" in r.stdout
    assert f"two-endpoints: {a.ip} is on 2 Endpoints: ep-a, ep-twin" in r.stdout
    assert "net.orphan" not in r.stdout  # within --grace-s
    doc = json.loads(tabby(store_url, "ipam", "check", "--grace-s", "0", "-o", "json").stdout)
    assert not doc["consistent"] and doc["problems"] == []
    assert {(f["kind"], tuple(f["handles"])) for f in doc["findings"]} >= {("orphan-handle", ("net.orphan",))}
    # keys are named as printable text: a newline in one is shown escaped, never written raw
    assert {c["key"] for c in doc["corrupt"]} == {_printable(k, 1000) for k in bad}


def test_cni_del_with_a_corrupt_handle_record_is_a_clear_error_and_keeps_it(store_url: str, store: Store) -> None:
    from tabby.cni.main import run

    key = ipam_handle_key("net1.dead0001")
    store.create(key, b'{"handle": "net1.dead0001", "addresses": [], "seq": NaN}')
    conf = json.dumps({"cniVersion": "1.1.0", "name": "net1", "type": "tabby-cni", "store": store_url, "host": "h1"})
    environ = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "dead0001", "CNI_IFNAME": "eth0", "CNI_NETNS": ""}
    code, out = run(environ, conf.encode())
    doc = json.loads(out)
    assert code == 1 and doc["code"] == 5 and doc["msg"] == "address release failed"
    assert key in doc["details"] and "NaN" in doc["details"]
    assert store.get(key).value == b'{"handle": "net1.dead0001", "addresses": [], "seq": NaN}'


def test_allocation_keys_that_alias_one_ordinal_are_refused() -> None:
    from tabby.model.codec import InvalidResource
    from tabby.model.ipam import decode_ipam

    raw = (b'{"cidr": "fd00:e::/122", "host": "h1", "seq": 2, "allocations": {"1": {"handle": "a", "seq": 1},'
           b' "01": {"handle": "b", "seq": 2}}, "free": [2, 3], "reserved": []}')
    with pytest.raises(InvalidResource, match="canonical ordinal"):
        decode_ipam("/tabby/v1/ipam/blocks/fd00:e::-122", raw)


def test_record_fields_take_only_the_json_type_tabby_writes() -> None:
    from tabby.model.codec import InvalidResource
    from tabby.model.ipam import Affinity, Handle, HandleAddress, decode_ipam, encode_ipam

    key = "/tabby/v1/ipam/blocks/fd00:e::-122"
    good = {"cidr": "fd00:e::/122", "host": "h1", "seq": 1, "allocations": {"1": {"handle": "a", "seq": 1}},
            "free": [2, 3], "reserved": [0]}
    assert decode_ipam(key, json.dumps(good).encode()).allocations[1].handle == "a"
    for field, value, named in (("seq", "1", "seq"), ("seq", True, "seq"), ("seq", 1.0, "seq"),
                                ("free", [2, "3"], "free.1"), ("free", [2, False], "free.1"),
                                ("allocations", {"1": {"handle": "a", "seq": "1"}}, "allocations.1.seq"),
                                ("host", 7, "host")):
        with pytest.raises(InvalidResource) as e:
            decode_ipam(key, json.dumps({**good, field: value}).encode())
        assert e.value.field == named and key in str(e.value), (field, value, e.value)
    # what would not decode is never written
    for record, named in ((Handle(handle="a b"), "handle"),
                          (Handle(handle="a", addresses=[HandleAddress(ip="fd00:e::99", block="fd00:e::/122",
                                                                       seq=1)]), "addresses.0.ip"),
                          (Affinity(host="h1", cidr="fd00:e::/122", state="maybe", since=1.0), "state")):
        with pytest.raises(InvalidResource) as e:
            encode_ipam(record)
        assert e.value.field == named, e.value


def test_a_zone_in_an_ipam_record_is_refused_naming_the_field() -> None:
    """An affinity's cidr goes into BIRD's config: a zone may hold `; } protocol static x {`."""
    from tabby.model.codec import InvalidResource
    from tabby.model.ipam import decode_ipam
    from tabby.model.keys import ipam_affinity_key

    cidr = "fd00::%x; } protocol static evil { ipv6; } #/122"
    with pytest.raises(InvalidResource, match="cidr"):
        decode_ipam(ipam_affinity_key("h1", cidr), json.dumps(
            {"host": "h1", "cidr": cidr, "state": "confirmed", "since": 1.0}).encode())
