"""The allocator: block-affinity assignment and release, written with compare-and-swap.

Concurrency model: any number of processes on any number of hosts may call this at once.
Every change is a compare-and-swap of one record (a block, an affinity or a handle); a lost
race re-reads and retries, so two callers never get the same address. The order of writes is
block first, handle second; a failure in between is rolled back, and a crash in between leaves
an allocation whose handle lacks it, which ``check`` reports and the leak collector frees.

Block claims are two-phase: (1) create this host's affinity record as ``pending``; (2) create
the block record naming the host (create-if-absent: only one host can win it); (3) confirm the
affinity. A host that loses step 2 deletes its pending affinity and tries the next block.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tabby.ipam import blocks as B
from tabby.ipam.blocks import AddressInUse, IpamError, NoPool, NotAllocated, PoolExhausted, StaleRelease
from tabby.model import IPPool, decode
from tabby.model.ipam import Affinity, Block, Handle, HandleAddress, IPNetwork
from tabby.model.keys import (
    IPAM_BLOCKS_PREFIX,
    IPAM_HANDLES_PREFIX,
    ipam_affinity_key,
    ipam_affinity_prefix,
    ipam_block_key,
    ipam_handle_key,
    kind_prefix,
)
from tabby.store import KV, AlreadyExists, NotFound, RevisionMismatch, Store

log = logging.getLogger(__name__)

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Assigned:
    ip: IPAddr
    block: str
    seq: int


class IPAM:
    def __init__(self, store: Store, *, strict_affinity: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.strict_affinity = strict_affinity
        self.clock = clock
        self._hint: dict[tuple[str, int], str] = {}  # (host, IP version) -> block that last had room
        self._pools: tuple[float, list[IPPool]] | None = None

    # -- pools ---------------------------------------------------------------------------

    # Pools change rarely and are read on every assign: a short cache saves a round trip to etcd.
    # A pool disabled this instant may still serve for POOL_CACHE_S; nothing is ever allocated
    # outside a pool that existed.
    POOL_CACHE_S = 1.0

    def pools(self) -> list[IPPool]:
        now = time.monotonic()
        if self._pools is not None and now - self._pools[0] < self.POOL_CACHE_S:
            return self._pools[1]
        self._pools = (now, self._read_pools())
        return self._pools[1]

    def _read_pools(self) -> list[IPPool]:
        kvs, _ = self.store.list(kind_prefix("IPPool"))
        out = []
        for kv in kvs:
            try:
                out.append(decode(kv.key, kv.value))
            except ValueError as e:
                log.error("IPAM ignores corrupt pool record %s: %s", kv.key, e)
        return out

    def _select_pools(self, family: int, pool: str | None) -> list[IPPool]:
        pools = [p for p in self.pools() if p.spec.cidr.version == family]
        if pool is not None:
            pools = [p for p in pools if p.metadata.name == pool or str(p.spec.cidr) == pool]
            if not pools:
                raise NoPool(f"no IPv{family} pool named {pool}")
            if pools[0].spec.disabled:
                raise NoPool(f"pool {pool} is disabled")
            return pools
        pools = [p for p in pools if not p.spec.disabled]
        if not pools:
            raise NoPool(f"no enabled IPv{family} pool")
        return sorted(pools, key=lambda p: (p.spec.cidr.network_address, p.spec.cidr.prefixlen))

    def _pool_of(self, ip: IPAddr) -> IPPool:
        for p in self.pools():
            if ip in p.spec.cidr:
                return p
        raise NoPool(f"{ip} is in no pool")

    # -- record helpers ------------------------------------------------------------------

    def _get_block(self, cidr: str) -> tuple[Block, int] | None:
        kv = self.store.get(ipam_block_key(cidr))
        return (Block.model_validate_json(kv.value), kv.mod_revision) if kv else None

    def _put_block(self, block: Block, rev: int) -> None:
        self.store.update(ipam_block_key(block.cidr), block.model_dump_json().encode(), rev)

    def _all_blocks(self) -> list[tuple[Block, KV]]:
        kvs, _ = self.store.list(IPAM_BLOCKS_PREFIX)
        out = []
        for kv in kvs:
            try:
                out.append((Block.model_validate_json(kv.value), kv))
            except ValueError as e:
                log.error("IPAM skips corrupt block record %s: %s", kv.key, e)
        return out

    def claims(self, host: str) -> list[Affinity]:
        kvs, _ = self.store.list(ipam_affinity_prefix(host))
        return [Affinity.model_validate_json(kv.value) for kv in kvs]

    # -- assignment ----------------------------------------------------------------------

    def assign(self, handle: str, host: str, *, ipv6: int = 0, ipv4: int = 0,
               pool: str | None = None, endpoint: str | None = None) -> list[Assigned]:
        """ipv6/ipv4 addresses for handle on host, all or nothing (dual-stack in one call)."""
        if ipv6 < 0 or ipv4 < 0 or ipv6 + ipv4 == 0:
            raise ValueError("ask for at least one address (ipv6 and/or ipv4 count)")
        got: list[Assigned] = []
        pool_family = self._pool_family(pool) if pool is not None else None
        try:
            for family, n in ((6, ipv6), (4, ipv4)):
                if n:
                    pools = self._select_pools(family, pool if pool_family == family else None)
                    self._assign_family(handle, host, pools, n, got)
            self._record_handle(handle, got, endpoint)
            return got
        except BaseException:
            self._rollback(got)
            raise

    def _pool_family(self, pool: str) -> int:
        for p in self.pools():
            if p.metadata.name == pool or str(p.spec.cidr) == pool:
                return p.spec.cidr.version
        raise NoPool(f"no pool named {pool}")

    def assign_address(self, handle: str, host: str, ip: str | IPAddr, endpoint: str | None = None) -> Assigned:
        """One specific address (e.g. a Neutron fixed IP); claims its block for host if free."""
        addr = ipaddress.ip_address(ip)
        pool = self._pool_of(addr)
        assert pool.spec.block_size is not None
        cidr = B.block_of(addr, pool.spec.block_size)
        while True:
            cur = self._get_block(str(cidr))
            if cur is None:
                if self.strict_affinity or not self._claim(host, cidr, pool.spec.cidr):
                    cur = self._get_block(str(cidr))
                    if cur is None:
                        continue
                else:
                    continue
            block, rev = cur
            if block.host != host and self.strict_affinity:
                raise AddressInUse(f"{addr}: its block {cidr} belongs to {block.host} and strict affinity is on")
            new, seq = B.take_specific(block, B.ordinal(block, addr), handle)
            try:
                self._put_block(new, rev)
            except RevisionMismatch:
                continue
            got = [Assigned(addr, block.cidr, seq)]
            try:
                self._record_handle(handle, got, endpoint)
            except BaseException:
                self._rollback(got)
                raise
            return got[0]

    def _assign_family(self, handle: str, host: str, pools: list[IPPool], n: int, into: list[Assigned]) -> None:
        """Append n addresses to ``into`` as they are taken, so that the caller can roll back a partial
        result if this raises."""
        got: list[Assigned] = []
        pool_nets = [p.spec.cidr for p in pools]

        def add(taken: list[Assigned]) -> None:
            got.extend(taken)
            into.extend(taken)

        # 1. blocks this host already holds, the last one that had room first
        for cidr in self._own_blocks(host, pool_nets):
            add(self._take(cidr, n - len(got), handle, host))
            if len(got) == n:
                return
        # 2. claim fresh blocks
        while len(got) < n:
            cidr = self._claim_next(host, pools)
            if cidr is None:
                break
            add(self._take(str(cidr), n - len(got), handle, host))
        # 3. borrow single addresses from other hosts' blocks
        if len(got) < n and not self.strict_affinity:
            for block, _ in self._all_blocks():
                if block.free and any(block.network.subnet_of(net) for net in pool_nets  # type: ignore[arg-type]
                                      if net.version == block.network.version):
                    add(self._take(block.cidr, n - len(got), handle, None))
                    if len(got) == n:
                        break
        if len(got) < n:
            nets = ", ".join(str(p) for p in pool_nets)
            raise PoolExhausted(f"pool exhausted: {n} IPv{pool_nets[0].version} address(es) wanted for {handle} "
                                f"on {host}, only {len(got)} free in {nets}")

    def _own_blocks(self, host: str, pool_nets: list[IPNetwork]) -> Iterable[str]:
        def in_pools(cidr: str) -> bool:
            net = ipaddress.ip_network(cidr)
            return any(net.version == p.version and net.subnet_of(p) for p in pool_nets)  # type: ignore[arg-type]

        hint = self._hint.get((host, pool_nets[0].version))
        if hint is not None and in_pools(hint):
            yield hint
        for aff in self.claims(host):
            if aff.cidr != hint and in_pools(aff.cidr):
                yield aff.cidr

    def _take(self, cidr: str, n: int, handle: str, host: str | None) -> list[Assigned]:
        """Up to n addresses from one block; host, when given, must still hold the block."""
        while True:
            cur = self._get_block(cidr)
            if cur is None:
                return []
            block, rev = cur
            if host is not None and block.host != host:
                return []
            new, picked = B.take(block, n, handle)
            if not picked:
                return []
            try:
                self._put_block(new, rev)
            except RevisionMismatch:
                continue
            if host is not None:
                hint = (host, block.network.version)
                if new.free:
                    self._hint[hint] = cidr
                elif self._hint.get(hint) == cidr:
                    del self._hint[hint]
            return [Assigned(B.address(block, o), cidr, seq) for o, seq in picked]

    def _claim_next(self, host: str, pools: list[IPPool]) -> IPNetwork | None:
        taken = {b.cidr for b, _ in self._all_blocks()}
        for pool in pools:
            assert pool.spec.block_size is not None
            for cidr in B.candidate_blocks(pool.spec.cidr, pool.spec.block_size, taken):
                if self._claim(host, cidr, pool.spec.cidr):
                    return cidr
                taken.add(str(cidr))
        return None

    def _claim(self, host: str, cidr: IPNetwork, pool: IPNetwork) -> bool:
        """Two-phase claim of one block for host; False if another host holds it."""
        aff_key = ipam_affinity_key(host, cidr)
        pending = Affinity(host=host, cidr=str(cidr), state="pending", since=self.clock())
        try:
            aff_rev = self.store.create(aff_key, pending.model_dump_json().encode())
        except AlreadyExists:
            kv = self.store.get(aff_key)
            if kv is None:
                return False
            aff_rev = kv.mod_revision
        try:
            self.store.create(ipam_block_key(cidr), B.new_block(cidr, host, pool).model_dump_json().encode())
        except AlreadyExists:
            cur = self._get_block(str(cidr))
            if cur is None or cur[0].host != host:
                with contextlib.suppress(NotFound, RevisionMismatch):
                    self.store.delete(aff_key, expected_revision=aff_rev)
                return False
        confirmed = pending.model_copy(update={"state": "confirmed"})
        # someone else may have confirmed or removed it meanwhile: the block record is what counts
        with contextlib.suppress(RevisionMismatch, NotFound):
            self.store.update(aff_key, confirmed.model_dump_json().encode(), aff_rev)
        log.info("host %s claimed block %s", host, cidr)
        return True

    # -- handles -------------------------------------------------------------------------

    def _record_handle(self, handle: str, got: list[Assigned], endpoint: str | None) -> None:
        key = ipam_handle_key(handle)
        add = [HandleAddress(ip=str(a.ip), block=a.block, seq=a.seq) for a in got]
        try:  # the common case, a new handle, in one write
            self.store.create(key, Handle(handle=handle, addresses=add, endpoint=endpoint).model_dump_json().encode())
            return
        except AlreadyExists:
            pass
        while True:
            kv = self.store.get(key)
            try:
                if kv is None:
                    rec = Handle(handle=handle, addresses=add, endpoint=endpoint)
                    self.store.create(key, rec.model_dump_json().encode())
                else:
                    rec = Handle.model_validate_json(kv.value)
                    rec = rec.model_copy(update={"addresses": [*rec.addresses, *add],
                                                 "endpoint": endpoint or rec.endpoint})
                    self.store.update(key, rec.model_dump_json().encode(), kv.mod_revision)
                return
            except (AlreadyExists, RevisionMismatch, NotFound):
                continue

    def handle(self, handle: str) -> Handle | None:
        kv = self.store.get(ipam_handle_key(handle))
        return Handle.model_validate_json(kv.value) if kv else None

    def handles(self) -> list[Handle]:
        kvs, _ = self.store.list(IPAM_HANDLES_PREFIX)
        out = []
        for kv in kvs:
            try:
                out.append(Handle.model_validate_json(kv.value))
            except ValueError as e:
                log.error("IPAM skips corrupt handle record %s: %s", kv.key, e)
        return out

    # -- release -------------------------------------------------------------------------

    def _free_in_block(self, cidr: str, ip: IPAddr, seq: int | None) -> str:
        """Free one address in its block; returns the handle it belonged to."""
        while True:
            cur = self._get_block(cidr)
            if cur is None:
                raise NotAllocated(f"{ip}: block {cidr} does not exist")
            block, rev = cur
            new, alloc = B.give_back(block, B.ordinal(block, ip), seq)
            try:
                self._put_block(new, rev)
                return alloc.handle
            except RevisionMismatch:
                continue

    def _rollback(self, got: list[Assigned]) -> None:
        for a in got:
            try:
                self._free_in_block(a.block, a.ip, a.seq)
            except IpamError as e:
                log.error("rollback of %s failed: %s", a.ip, e)

    def release_handle(self, handle: str) -> list[IPAddr]:
        """Free every address of the handle and drop it. Idempotent: an unknown handle frees nothing."""
        key = ipam_handle_key(handle)
        while True:
            kv = self.store.get(key)
            if kv is None:
                return []
            rec = Handle.model_validate_json(kv.value)
            freed: list[IPAddr] = []
            for a in rec.addresses:
                ip = ipaddress.ip_address(a.ip)
                try:
                    self._free_in_block(a.block, ip, a.seq)
                    freed.append(ip)
                except (StaleRelease, NotAllocated) as e:
                    log.warning("release of handle %s: %s", handle, e)
            try:
                self.store.delete(key, expected_revision=kv.mod_revision)
                return freed
            except NotFound:
                return freed
            except RevisionMismatch:
                continue  # addresses were added meanwhile: free those too

    def release_address(self, ip: str | IPAddr, seq: int | None = None) -> str:
        """Free one address (only if it still carries seq, when given); returns its handle."""
        addr = ipaddress.ip_address(ip)
        pool = self._pool_of(addr)
        assert pool.spec.block_size is not None
        cidr = str(B.block_of(addr, pool.spec.block_size))
        handle = self._free_in_block(cidr, addr, seq)
        key = ipam_handle_key(handle)
        while True:
            kv = self.store.get(key)
            if kv is None:
                return handle
            rec = Handle.model_validate_json(kv.value)
            rest = [a for a in rec.addresses if a.ip != str(addr)]
            try:
                if rest:
                    self.store.update(key, rec.model_copy(update={"addresses": rest}).model_dump_json().encode(),
                                      kv.mod_revision)
                else:
                    self.store.delete(key, expected_revision=kv.mod_revision)
                return handle
            except (RevisionMismatch, NotFound):
                continue

    # -- reports -------------------------------------------------------------------------

    def usage(self) -> list[dict[str, object]]:
        """One row per block: cidr, host, used, size."""
        return [{"block": b.cidr, "host": b.host, "used": len(b.allocations),
                 "size": len(b.allocations) + len(b.free)} for b, _ in self._all_blocks()]  # size: assignable

    def check(self) -> list[str]:
        """Every allocation has its handle and every handle its allocations; blocks are whole."""
        problems: list[str] = []
        blocks = {b.cidr: b for b, _ in self._all_blocks()}
        handles = {h.handle: h for h in self.handles()}
        for cidr, b in blocks.items():
            size = b.network.num_addresses
            if sorted([*b.free, *b.allocations, *b.reserved]) != list(range(size)):
                problems.append(f"block {cidr}: free, allocated and reserved ordinals do not partition the block")
            for o, alloc in b.allocations.items():
                ip = str(B.address(b, o))
                h = handles.get(alloc.handle)
                if h is None:
                    problems.append(f"{ip} in {cidr} is allocated to handle {alloc.handle}, which does not exist")
                elif not any(a.ip == ip and a.seq == alloc.seq for a in h.addresses):
                    problems.append(f"{ip} in {cidr} is allocated to {alloc.handle}, whose record lacks it")
            if b.host is not None and not any(a.cidr == cidr for a in self.claims(b.host)):
                problems.append(f"block {cidr} names host {b.host}, which has no affinity record for it")
        for h in handles.values():
            for a in h.addresses:
                b = blocks.get(a.block)
                if b is None:
                    problems.append(f"handle {h.handle}: {a.ip} points at missing block {a.block}")
                    continue
                alloc = b.allocations.get(B.ordinal(b, ipaddress.ip_address(a.ip)))
                if alloc is None or alloc.handle != h.handle or alloc.seq != a.seq:
                    problems.append(f"handle {h.handle}: {a.ip} is not allocated to it in {a.block}")
        return problems

    # -- CNI attachments -----------------------------------------------------------------

    def assign_attachment(self, handle: str, host: str, attachment: str, *, ipv6: int = 0, ipv4: int = 0,
                          addresses: Iterable[str | IPAddr] = (), pool: str | None = None,
                          endpoint: str | None = None) -> list[Assigned]:
        """Addresses for a handle that must not exist yet (the CNI plugin's ADD): the handle
        record, naming its attachment, is created first, so a second caller for the same handle
        gets ``HandleExists`` before anything is allocated; then the specific ``addresses`` and
        ipv6/ipv4 more from the pools; then the record is filled in. All or nothing: on any
        failure what this call took is freed and its record removed. A crash in between leaves a
        record with fewer addresses than its blocks give it, which ``check`` reports and
        ``release_strays`` (or the leak collector) frees."""
        key = ipam_handle_key(handle)
        try:
            rev = self.store.create(key, Handle(handle=handle, endpoint=endpoint,
                                                attachment=attachment).model_dump_json().encode())
        except AlreadyExists:
            raise HandleExists(f"handle {handle} exists already") from None
        got: list[Assigned] = []
        try:
            for ip in addresses:
                got.append(self._take_specific(handle, host, ipaddress.ip_address(ip)))
            pool_family = self._pool_family(pool) if pool is not None else None
            for family, n in ((6, ipv6), (4, ipv4)):
                if n:
                    pools = self._select_pools(family, pool if pool_family == family else None)
                    self._assign_family(handle, host, pools, n, got)
            if not got:
                raise ValueError("ask for at least one address (ipv6 and/or ipv4 count, or addresses)")
            rec = Handle(handle=handle, endpoint=endpoint, attachment=attachment,
                         addresses=[HandleAddress(ip=str(a.ip), block=a.block, seq=a.seq) for a in got])
            self.store.update(key, rec.model_dump_json().encode(), rev)
            return got
        except BaseException:
            self._rollback(got)
            with contextlib.suppress(NotFound, RevisionMismatch):
                self.store.delete(key, expected_revision=rev)
            raise

    def _take_specific(self, handle: str, host: str, addr: IPAddr) -> Assigned:
        """One specific address into handle's blocks (no handle record written); as assign_address."""
        pool = self._pool_of(addr)
        assert pool.spec.block_size is not None
        cidr = B.block_of(addr, pool.spec.block_size)
        while True:
            cur = self._get_block(str(cidr))
            if cur is None:
                if not self.strict_affinity:
                    self._claim(host, cidr, pool.spec.cidr)
                cur = self._get_block(str(cidr))
                if cur is None:
                    if self.strict_affinity:
                        raise AddressInUse(f"{addr}: its block {cidr} is unclaimed and strict affinity is on")
                    continue
            block, rev = cur
            if block.host != host and self.strict_affinity:
                raise AddressInUse(f"{addr}: its block {cidr} belongs to {block.host} and strict affinity is on")
            new, seq = B.take_specific(block, B.ordinal(block, addr), handle)
            try:
                self._put_block(new, rev)
            except RevisionMismatch:
                continue
            return Assigned(addr, block.cidr, seq)

    def release_strays(self, handle: str, cidrs: Iterable[str]) -> list[IPAddr]:
        """Free allocations in the given blocks that carry handle but that its record lacks (or
        all of them, once the record is gone): what an allocation left when its process died
        between writing a block and writing the handle record."""
        rec = self.handle(handle)
        listed = {(a.ip, a.seq) for a in rec.addresses} if rec else set()
        freed: list[IPAddr] = []
        for cidr in cidrs:
            cur = self._get_block(cidr)
            if cur is None:
                continue
            for o, alloc in cur[0].allocations.items():
                ip = B.address(cur[0], o)
                if alloc.handle == handle and (str(ip), alloc.seq) not in listed:
                    with contextlib.suppress(StaleRelease, NotAllocated):
                        self._free_in_block(cidr, ip, alloc.seq)
                        freed.append(ip)
        return freed


class HandleExists(IpamError):
    """``assign_attachment``: the handle exists already; nothing was allocated."""
