"""The allocator: block-affinity assignment and release, written with compare-and-swap.

Concurrency model: any number of processes on any number of hosts may call this at once.
Every change is a compare-and-swap of one record (a block, an affinity or a handle); a lost
race re-reads and retries, so two callers never get the same address. The order of writes is
block first, handle second; a failure in between is rolled back, and a crash in between leaves
an allocation whose handle lacks it, which ``check`` reports and the leak collector frees.

Block claims are two-phase: (1) create this host's affinity record as ``pending``; (2) create
the block record naming the host (create-if-absent: only one host can win it); (3) confirm the
affinity. A host that loses step 2 deletes its pending affinity and tries the next block.

Corrupt records (bytes under an IPAM key that ``decode_ipam`` refuses): every read goes through
the strict decoder, and what fails is a ``CorruptRecord`` (an ``IpamError`` naming the key and
field), logged once per call. A corrupt block is never allocated from and never written: its key
still counts as taken, so no claim overlaps it, and assignment moves on to other blocks or claims
a new one. A corrupt affinity is skipped (so a host whose only block's affinity is corrupt claims
another). A corrupt handle is never rewritten: assigning to it or releasing it fails with
``CorruptRecord``. Reports (``snapshot``, ``usage``, ``check``) list the good records and the
corrupt ones apart.

Geometry: a block is allocated from only if it is a block of an enabled pool (inside the pool, of
the pool's block size); claims never overlap any block key of any size. A record of another size
(a pool whose block size changed, a hostile record) is kept and drained by releases, not used.

Bounded: every loop that retries without progress (a block claimed or released under us) gives
up after a few rounds with ``Contention`` or ``PoolExhausted``; only compare-and-swap retries,
where a lost race means somebody else's write succeeded, repeat until they win.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from tabby.ipam import blocks as B
from tabby.ipam.blocks import (
    AddressInUse,
    Contention,
    CorruptRecord,
    IpamError,
    NoPool,
    NotAllocated,
    PoolExhausted,
    StaleRelease,
)
from tabby.model import light
from tabby.model.ipam import (
    MAX_HANDLE_CHARS,
    Affinity,
    Block,
    GcState,
    Handle,
    HandleAddress,
    IPNetwork,
    decode_ipam,
    encode_ipam,
    good_handle,
)
from tabby.model.jsontext import InvalidResource
from tabby.model.keys import (
    IPAM_BLOCKS_PREFIX,
    IPAM_HANDLES_PREFIX,
    IPAM_PREFIX,
    ipam_affinity_key,
    ipam_affinity_prefix,
    ipam_block_key,
    ipam_handle_key,
    kind_prefix,
)
from tabby.model.names import check_name
from tabby.model.plain import Frozen, Plain, replace
from tabby.store import KV, AlreadyExists, NotFound, RevisionMismatch, Store

if TYPE_CHECKING:  # pools are read by tabby.model.light: a light Pool or, off its fast path, the model's
    from tabby.model import IPPool

log = logging.getLogger(__name__)

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
P = ParamSpec("P")
R = TypeVar("R")

# A Handle record holds at most this many addresses (the model's limit): asked for more, assign
# refuses up front rather than after taking them.
MAX_ADDRESSES_PER_HANDLE = 128
# Rounds without progress before giving up: a block that vanished after we claimed it, or a claimed
# block another host took before we could allocate from it. Races, not contention: a handful is plenty.
MAX_FRUITLESS_ROUNDS = 8

_calls = threading.local()  # per thread: the keys of corrupt records already logged in this call


def check_owner(handle: str, host: str) -> None:
    """A handle and host as the records will hold them, checked before anything is claimed: a bad
    handle used to fail only at its own record, after a block had been claimed for it."""
    if not isinstance(handle, str) or not good_handle(handle):
        raise ValueError(f"handle {str(handle)[:80]!r}: must be 1..{MAX_HANDLE_CHARS} printable ASCII characters "
                         "without spaces")
    try:
        check_name(host)
    except (ValueError, TypeError):
        raise ValueError(f"host {str(host)[:80]!r}: not a host name") from None


def plain_address(ip: str | IPAddr) -> IPAddr:
    """An address as the IPAM holds it. ipaddress keeps a "%zone" in the text it was given, and the
    IPAM would store that text ("fd00::99%eth0;x") where the block holds the bare address."""
    addr = ipaddress.ip_address(ip)
    if "%" in str(addr):
        raise ValueError(f"{addr}: a scoped address (%zone) is no IPAM address")
    return addr


def one_call(fn: Callable[P, R]) -> Callable[P, R]:
    """Mark a public entry point: a corrupt record is logged once per (outermost) call, however
    many times the call reads it."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        outer = getattr(_calls, "logged", None) is None
        if outer:
            _calls.logged = set()
        try:
            return fn(*args, **kwargs)
        finally:
            if outer:
                _calls.logged = None

    return wrapper


def corrupt(e: InvalidResource) -> CorruptRecord:
    """The CorruptRecord for a decoding failure, logged (once per call) with its key and field."""
    logged = getattr(_calls, "logged", None)
    if logged is None or e.where not in logged:
        if logged is not None:
            logged.add(e.where)
        log.error("IPAM skips corrupt record %s (field %s): %s", e.where, e.field, "; ".join(e.errors))
    return CorruptRecord.of(e)


def fits(net: IPNetwork, pools: Iterable[IPPool]) -> bool:
    """Is net a block of one of the pools (inside it, of its block size)?"""
    return any(p.spec.cidr.version == net.version and p.spec.block_size == net.prefixlen
               and net.subnet_of(p.spec.cidr) for p in pools)  # type: ignore[arg-type]


class Assigned(Frozen):
    __slots__ = ("block", "ip", "seq")
    ip: IPAddr
    block: str
    seq: int

    def __init__(self, ip: IPAddr, block: str, seq: int) -> None:
        self._set(ip=ip, block=block, seq=seq)


class Snapshot(Plain):
    """Every IPAM record at one revision, decoded; what does not decode is in ``corrupt``."""

    __slots__ = ("affinities", "blocks", "corrupt", "gc", "handles", "revision")

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.blocks: list[tuple[Block, KV]] = []
        self.affinities: list[tuple[Affinity, KV]] = []
        self.handles: list[tuple[Handle, KV]] = []
        self.gc: tuple[GcState, KV] | None = None
        self.corrupt: list[CorruptRecord] = []

    @property
    def corrupt_keys(self) -> set[str]:
        return {c.key for c in self.corrupt}


class IPAM:
    def __init__(self, store: Store, *, strict_affinity: bool | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """strict_affinity: None follows the fabric's Config (``global``, then ``host.<name>``
        of the host asking); True or False overrides it for this caller."""
        self.store = store
        self._strict = strict_affinity
        self.clock = clock
        self._hint: dict[tuple[str, int], str] = {}  # (host, IP version) -> block that last had room
        self._pools: tuple[float, list[IPPool]] | None = None
        self._configs: tuple[float, dict[str, Any]] | None = None

    def strict_for(self, host: str) -> bool:
        """Whether host may not borrow from other hosts' blocks (read like the pools: cached 1 s)."""
        if self._strict is not None:
            return self._strict
        return bool(self.config_value(host, "strict_affinity", False))

    def config_value(self, host: str, name: str, default: Any = None) -> Any:
        """One Config field as it applies to host: the host's record, then global, then default
        (read like the pools: cached 1 s)."""
        now = time.monotonic()
        if self._configs is None or now - self._configs[0] >= self.POOL_CACHE_S:
            self._configs = (now, self._read_configs())
        specs = self._configs[1]
        for scope in (f"host.{host}", "global"):  # field by field, the host's over global over the default
            value = getattr(specs.get(scope), name, None)
            if value is not None:
                return value
        return default

    def _read_configs(self) -> dict[str, Any]:
        kvs, _ = self.store.list(kind_prefix("Config"))
        out = {}
        for kv in kvs:
            try:
                cfg = light.read(kv.key, kv.value, "Config")
            except InvalidResource as e:
                log.error("IPAM ignores corrupt config record %s (field %s): %s", kv.key, e.field, e)
                continue
            out[cfg.metadata.name] = cfg.spec
        return out

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
                out.append(light.read(kv.key, kv.value, "IPPool"))
            except InvalidResource as e:
                log.error("IPAM ignores corrupt pool record %s (field %s): %s", kv.key, e.field, e)
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

    def _pool_net(self, block: IPNetwork) -> IPNetwork | None:
        """The network of the pool a block is in (None if in none now)."""
        return next((p.spec.cidr for p in self.pools() if block.version == p.spec.cidr.version
                     and block.subnet_of(p.spec.cidr)), None)  # type: ignore[arg-type]

    def _pool_of(self, ip: IPAddr) -> IPPool:
        for p in self.pools():
            if ip in p.spec.cidr:
                return p
        raise NoPool(f"{ip} is in no pool")

    # -- record helpers ------------------------------------------------------------------

    def _get_block(self, cidr: str) -> tuple[Block, int] | None:
        """The block and its revision; None if absent; CorruptRecord if it does not decode."""
        key = ipam_block_key(cidr)
        kv = self.store.get(key)
        if kv is None:
            return None
        try:
            return decode_ipam(key, kv.value), kv.mod_revision
        except InvalidResource as e:
            raise corrupt(e) from None

    def _put_block(self, block: Block, rev: int) -> None:
        self.store.update(ipam_block_key(block.cidr), encode_ipam(block), rev)

    def _all_blocks(self) -> list[tuple[Block, KV]]:
        """Every block that decodes (corrupt ones are logged and left out)."""
        kvs, _ = self.store.list(IPAM_BLOCKS_PREFIX)
        out = []
        for kv in kvs:
            try:
                out.append((decode_ipam(kv.key, kv.value), kv))
            except InvalidResource as e:
                corrupt(e)
        return out

    def _held(self) -> list[IPNetwork]:
        """The networks every block key names, good or corrupt: what a claim must not overlap."""
        kvs, _ = self.store.list(IPAM_BLOCKS_PREFIX)
        return [n for kv in kvs if (n := B.key_network(kv.key)) is not None]

    @one_call
    def snapshot(self) -> Snapshot:
        """Every IPAM record in one listing (one revision), decoded, the corrupt ones apart."""
        kvs, rev = self.store.list(IPAM_PREFIX)
        snap = Snapshot(rev)
        for kv in kvs:
            try:
                rec = decode_ipam(kv.key, kv.value)
            except InvalidResource as e:
                snap.corrupt.append(corrupt(e))
                continue
            if isinstance(rec, Block):
                snap.blocks.append((rec, kv))
            elif isinstance(rec, Affinity):
                snap.affinities.append((rec, kv))
            elif isinstance(rec, Handle):
                snap.handles.append((rec, kv))
            else:
                snap.gc = (rec, kv)
        return snap

    @one_call
    def claims(self, host: str) -> list[Affinity]:
        """The host's affinities that decode (corrupt ones are logged and left out)."""
        kvs, _ = self.store.list(ipam_affinity_prefix(host))
        out = []
        for kv in kvs:
            try:
                out.append(decode_ipam(kv.key, kv.value))
            except InvalidResource as e:
                corrupt(e)
        return out

    # -- assignment ----------------------------------------------------------------------

    @one_call
    def assign(self, handle: str, host: str, *, ipv6: int = 0, ipv4: int = 0,
               pool: str | None = None, endpoint: str | None = None) -> list[Assigned]:
        """ipv6/ipv4 addresses for handle on host, all or nothing (dual-stack in one call)."""
        check_owner(handle, host)
        if ipv6 < 0 or ipv4 < 0 or ipv6 + ipv4 == 0:
            raise ValueError("ask for at least one address (ipv6 and/or ipv4 count)")
        if ipv6 + ipv4 > MAX_ADDRESSES_PER_HANDLE:
            raise ValueError(f"at most {MAX_ADDRESSES_PER_HANDLE} addresses per handle")
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
            self._rollback(got, handle)
            raise

    def _pool_family(self, pool: str) -> int:
        for p in self.pools():
            if p.metadata.name == pool or str(p.spec.cidr) == pool:
                return p.spec.cidr.version
        raise NoPool(f"no pool named {pool}")

    @one_call
    def assign_address(self, handle: str, host: str, ip: str | IPAddr, endpoint: str | None = None) -> Assigned:
        """One specific address (e.g. a Neutron fixed IP); claims its block for host if free.

        Strict affinity forbids borrowing from another host's block, not claiming a free one. A
        block that vanishes again after each claim (released in a race) ends in ``Contention``
        after MAX_FRUITLESS_ROUNDS; a corrupt block, or a corrupt affinity of this host for it, in
        ``CorruptRecord``."""
        check_owner(handle, host)
        got = [self._take_specific(handle, host, plain_address(ip))]
        try:
            self._record_handle(handle, got, endpoint)
        except BaseException:
            self._rollback(got, handle)
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
        for cidr in self._own_blocks(host, pools):
            add(self._take(cidr, n - len(got), handle, host))
            if len(got) == n:
                return
        # 2. claim fresh blocks; a claimed block that yields nothing (taken away, or all reserved)
        # counts against a small budget, so that a race can never keep this going
        fruitless = 0
        while len(got) < n and fruitless < MAX_FRUITLESS_ROUNDS:
            cidr = self._claim_next(host, pools)
            if cidr is None:
                break
            taken = self._take(str(cidr), n - len(got), handle, host)
            fruitless += not taken
            add(taken)
        # 3. borrow single addresses from other hosts' blocks
        if len(got) < n and not self.strict_for(host):
            for block, _ in self._all_blocks():
                if block.free and fits(block.network, pools):
                    add(self._take(block.cidr, n - len(got), handle, None))
                    if len(got) == n:
                        break
        if len(got) < n:
            nets = ", ".join(str(p) for p in pool_nets)
            raise PoolExhausted(f"pool exhausted: {n} IPv{pool_nets[0].version} address(es) wanted for {handle} "
                                f"on {host}, only {len(got)} free in {nets}")

    def _own_blocks(self, host: str, pools: list[IPPool]) -> Iterator[str]:
        def usable(cidr: str) -> bool:
            return fits(ipaddress.ip_network(cidr), pools)

        hint = self._hint.get((host, pools[0].spec.cidr.version))
        if hint is not None and usable(hint):
            yield hint
        for aff in self.claims(host):
            if aff.cidr != hint and usable(aff.cidr):
                yield aff.cidr

    def _take(self, cidr: str, n: int, handle: str, host: str | None) -> list[Assigned]:
        """Up to n addresses from one block; host, when given, must still hold the block. A corrupt
        block yields nothing (and is not written)."""
        while True:
            try:
                cur = self._get_block(cidr)
            except CorruptRecord:
                return []
            if cur is None:
                return []
            block, rev = cur
            if host is not None and block.host != host:
                return []
            new, picked = B.take(block, n, handle, self._pool_net(block.network))
            if not picked:
                return []
            try:
                self._put_block(new, rev)
            except (RevisionMismatch, NotFound):  # changed or gone meanwhile: read it again
                continue
            if host is not None:
                hint = (host, block.network.version)
                if new.free:
                    self._hint[hint] = cidr
                elif self._hint.get(hint) == cidr:
                    del self._hint[hint]
            return [Assigned(B.address(block, o), cidr, seq) for o, seq in picked]

    def _claim_next(self, host: str, pools: list[IPPool]) -> IPNetwork | None:
        held = self._held()
        for pool in pools:
            assert pool.spec.block_size is not None
            for cidr in B.candidate_blocks(pool.spec.cidr, pool.spec.block_size, held):
                with contextlib.suppress(CorruptRecord):  # this host's affinity for it is corrupt: the next
                    if self._claim(host, cidr, pool.spec.cidr):
                        return cidr
                held.append(cidr)
        return None

    def _claim(self, host: str, cidr: IPNetwork, pool: IPNetwork) -> bool:
        """Two-phase claim of one block for host; False if another host holds it (or its block record
        is corrupt). CorruptRecord if this host's affinity record for it is corrupt (left as it is:
        the block cannot be claimed without rewriting it)."""
        aff_key = ipam_affinity_key(host, cidr)
        usable = True
        pending = Affinity(host=host, cidr=str(cidr), state="pending", since=self.clock())
        try:
            aff_rev = self.store.create(aff_key, encode_ipam(pending))
        except AlreadyExists:
            kv = self.store.get(aff_key)
            if kv is None:
                return False
            try:
                decode_ipam(aff_key, kv.value)
            except InvalidResource as e:
                raise corrupt(e) from None
            aff_rev = kv.mod_revision
        try:
            block_rev = self.store.create(ipam_block_key(cidr), encode_ipam(B.new_block(cidr, host, pool)))
        except AlreadyExists:
            try:
                cur = self._get_block(str(cidr))
            except CorruptRecord:
                cur = None
            if cur is None or cur[0].host != host:
                with contextlib.suppress(NotFound, RevisionMismatch):
                    self.store.delete(aff_key, expected_revision=aff_rev)
                return False
        else:
            overlap = self._yields_to_overlap(cidr, block_rev)
            if overlap == "gone":
                with contextlib.suppress(NotFound, RevisionMismatch):
                    self.store.delete(aff_key, expected_revision=aff_rev)
                return False
            usable = overlap is None  # "kept": in use already, so its affinity is confirmed; this claim moves on
        confirmed = replace(pending, state="confirmed")
        # someone else may have confirmed it meanwhile: the block record is what counts. Gone (the
        # collector dropped it with the empty block this claim has just made again): made anew,
        # or the block would be in use with no affinity, and its host would never announce it
        try:
            self.store.update(aff_key, encode_ipam(confirmed), aff_rev)
        except RevisionMismatch:
            pass
        except NotFound:
            with contextlib.suppress(AlreadyExists):
                self.store.create(aff_key, encode_ipam(confirmed))
        log.info("host %s claimed block %s", host, cidr)
        return usable

    def _yields_to_overlap(self, cidr: IPNetwork, rev: int) -> str | None:
        """Just created block cidr at rev: "gone" (the block deleted again) if a block record of
        another size overlapping it was created before it, "kept" if so but an allocation went into
        it meanwhile (it cannot just go), None if no other overlaps it. Two claims that listed the blocks
        before either was created (a pool whose block size changed while another host still had
        the old one cached, overlapping pools) each made theirs; the one created later always sees
        the earlier one here and gives way, so no address is in two blocks."""
        kvs, _ = self.store.list(IPAM_BLOCKS_PREFIX)
        first = [kv.key for kv in kvs if kv.create_revision < rev and (n := B.key_network(kv.key)) is not None
                 and n != cidr and n.version == cidr.version
                 and (n.subnet_of(cidr) or cidr.subnet_of(n))]  # type: ignore[arg-type]
        if not first:
            return None
        key = ipam_block_key(cidr)
        try:
            self.store.delete(key, expected_revision=rev)
            log.warning("block %s overlaps %s, created just before it: given up", cidr, first[0])
        except NotFound:
            pass
        except RevisionMismatch:  # an allocation went into it meanwhile: it stays, and so does its
            # affinity (in use without one, it would never be announced); `ipam check` names the overlap
            log.error("block %s overlaps %s, created just before it, and is in use already: kept, with its "
                      "affinity (`tabby ipam check` names the overlap)", cidr, first[0])
            return "kept"
        return "gone"

    # -- handles -------------------------------------------------------------------------

    def _record_handle(self, handle: str, got: list[Assigned], endpoint: str | None) -> None:
        """Add got to the handle's record (made, with ``created`` now, if new). A corrupt record
        is not overwritten: CorruptRecord, and the caller rolls the addresses back."""
        key = ipam_handle_key(handle)
        add = [HandleAddress(ip=str(a.ip), block=a.block, seq=a.seq) for a in got]

        def fresh() -> bytes:
            return encode_ipam(Handle(handle=handle, addresses=add, endpoint=endpoint, created=self.clock()))

        try:  # the common case, a new handle, in one write
            self.store.create(key, fresh())
            return
        except AlreadyExists:
            pass
        while True:
            kv = self.store.get(key)
            try:
                if kv is None:
                    self.store.create(key, fresh())
                else:
                    try:
                        rec = decode_ipam(key, kv.value)
                    except InvalidResource as e:
                        raise corrupt(e) from None
                    rec = replace(rec, addresses=[*rec.addresses, *add], endpoint=endpoint or rec.endpoint)
                    # encode_ipam checks the record again: the address limit still holds
                    self.store.update(key, encode_ipam(rec), kv.mod_revision)
                return
            except (AlreadyExists, RevisionMismatch, NotFound):
                continue

    @one_call
    def handle(self, handle: str) -> Handle | None:
        """The handle's record; None if there is none; CorruptRecord if it does not decode."""
        key = ipam_handle_key(handle)
        kv = self.store.get(key)
        if kv is None:
            return None
        try:
            return decode_ipam(key, kv.value)
        except InvalidResource as e:
            raise corrupt(e) from None

    @one_call
    def handles(self) -> list[Handle]:
        """Every handle record that decodes (corrupt ones are logged and left out)."""
        kvs, _ = self.store.list(IPAM_HANDLES_PREFIX)
        out = []
        for kv in kvs:
            try:
                out.append(decode_ipam(kv.key, kv.value))
            except InvalidResource as e:
                corrupt(e)
        return out

    # -- release -------------------------------------------------------------------------

    def _free_in_block(self, cidr: str, ip: IPAddr, seq: int | None, handle: str | None = None) -> str:
        """Free one address in its block (only if it still carries seq, and belongs to handle,
        when given); returns the handle it belonged to. CorruptRecord if the block is corrupt."""
        while True:
            cur = self._get_block(cidr)
            if cur is None:
                raise NotAllocated(f"{ip}: block {cidr} does not exist")
            block, rev = cur
            new, alloc = B.give_back(block, B.ordinal(block, ip), seq, handle)
            try:
                self._put_block(new, rev)
                return alloc.handle
            except (RevisionMismatch, NotFound):  # changed or gone meanwhile: read it again
                continue

    def _rollback(self, got: list[Assigned], handle: str) -> None:
        for a in got:
            try:
                self._free_in_block(a.block, a.ip, a.seq, handle)
            except IpamError as e:
                log.error("rollback of %s failed: %s", a.ip, e)

    @one_call
    def release_handle(self, handle: str) -> list[IPAddr]:
        """Free every address of the handle and drop it. Idempotent: an unknown handle frees nothing.

        Only allocations that carry this handle are freed. An address whose block is corrupt stays as
        the block has it (logged; ``check`` reports the block). A corrupt handle record frees nothing
        and is left as it is: CorruptRecord, naming its key and field."""
        key = ipam_handle_key(handle)
        while True:
            kv = self.store.get(key)
            if kv is None:
                return []
            try:
                rec = decode_ipam(key, kv.value)
            except InvalidResource as e:
                raise corrupt(e) from None
            freed: list[IPAddr] = []
            for a in rec.addresses:
                ip = ipaddress.ip_address(a.ip)
                try:
                    self._free_in_block(a.block, ip, a.seq, handle)
                    freed.append(ip)
                except (StaleRelease, NotAllocated, CorruptRecord) as e:
                    log.warning("release of handle %s: %s", handle, e)
            try:
                self.store.delete(key, expected_revision=kv.mod_revision)
                return freed
            except NotFound:
                return freed
            except RevisionMismatch:
                continue  # addresses were added meanwhile: free those too

    @one_call
    def release_address(self, ip: str | IPAddr, seq: int | None = None) -> str:
        """Free one address (only if it still carries seq, when given); returns its handle. A corrupt
        handle record is left as it is (the address is free all the same)."""
        addr = plain_address(ip)
        # the block that holds it, not the one the pool's block size would make now: a pool whose
        # block size changed, or that was deleted, still has its old blocks to drain
        holding = sorted((n for n in self._held() if addr in n), key=lambda n: n.num_addresses)
        if not holding:
            raise NotAllocated(f"{addr}: no block holds it")
        errors: list[IpamError] = []
        for net in holding:  # a stray or corrupt key may cover it too: the block that has it decides
            try:
                handle = self._free_in_block(str(net), addr, seq)
                break
            except (CorruptRecord, NotAllocated) as e:
                errors.append(e)
        else:
            raise errors[0]
        key = ipam_handle_key(handle)
        while True:
            kv = self.store.get(key)
            if kv is None:
                return handle
            try:
                rec = decode_ipam(key, kv.value)
            except InvalidResource as e:
                corrupt(e)
                return handle
            rest = [a for a in rec.addresses if a.ip != str(addr)]
            try:
                if rest:
                    self.store.update(key, encode_ipam(replace(rec, addresses=rest)),
                                      kv.mod_revision)
                else:
                    self.store.delete(key, expected_revision=kv.mod_revision)
                return handle
            except (RevisionMismatch, NotFound):
                continue

    # -- reports -------------------------------------------------------------------------

    @one_call
    def usage(self, snapshot: Snapshot | None = None) -> list[dict[str, object]]:
        """One row per block that decodes: cidr, host, used, size (assignable addresses)."""
        snap = snapshot or self.snapshot()
        return [{"block": b.cidr, "host": b.host, "used": len(b.allocations),
                 "size": len(b.allocations) + len(b.free)} for b, _ in snap.blocks]

    @one_call
    def check(self, snapshot: Snapshot | None = None) -> list[str]:
        """Inconsistencies among the records that decode: every allocation has its handle and every
        handle its allocations, blocks are whole and do not overlap, a block's host has its affinity.
        Corrupt records are not inconsistencies (they are in ``snapshot().corrupt``); a reference to
        one is not reported either, since what it holds is unknown."""
        snap = snapshot or self.snapshot()
        bad = snap.corrupt_keys
        problems: list[str] = []
        blocks = {b.cidr: b for b, _ in snap.blocks}
        handles = {h.handle: h for h, _ in snap.handles}
        affinities = {(a.host, a.cidr) for a, _ in snap.affinities}
        for cidr, b in blocks.items():
            size = b.network.num_addresses
            if sorted([*b.free, *b.allocations, *b.reserved]) != list(range(size)):
                problems.append(f"block {cidr}: free, allocated and reserved ordinals do not partition the block")
            for o, alloc in sorted(b.allocations.items()):
                ip = str(B.address(b, o))
                h = handles.get(alloc.handle)
                if h is None:
                    if ipam_handle_key(alloc.handle) not in bad:
                        problems.append(f"{ip} in {cidr} is allocated to handle {alloc.handle}, which does not exist")
                elif not any(a.ip == ip and a.seq == alloc.seq for a in h.addresses):
                    problems.append(f"{ip} in {cidr} is allocated to {alloc.handle}, whose record lacks it")
            if 0 in b.allocations and B.starts_a_64(b.network):  # (handed out before it was reserved)
                problems.append(f"{B.address(b, 0)} in {cidr} is allocated to {b.allocations[0].handle}, but it is "
                                "a /64's first address, which a host's dnsmasq anchor takes for VMs in that /64: "
                                "give that workload another address")
            last = b.network.num_addresses - 1
            if last in b.allocations and B.reserves_last(b.network, self._pool_net(b.network)):
                problems.append(f"{B.address(b, last)} in {cidr} is allocated to {b.allocations[last].handle}, but it "
                                "is its IPv4 pool's broadcast address, which a host serving the pool's VMs makes a "
                                "broadcast route: give that workload another address")
            if b.host is not None and (b.host, cidr) not in affinities \
                    and ipam_affinity_key(b.host, cidr) not in bad:
                problems.append(f"block {cidr} names host {b.host}, which has no affinity record for it")
        problems += _overlaps([b.network for b in blocks.values()])
        for h in handles.values():
            for a in h.addresses:
                b = blocks.get(a.block)
                if b is None:
                    if ipam_block_key(a.block) not in bad:
                        problems.append(f"handle {h.handle}: {a.ip} points at missing block {a.block}")
                    continue
                alloc = b.allocations.get(B.ordinal(b, ipaddress.ip_address(a.ip)))
                if alloc is None or alloc.handle != h.handle or alloc.seq != a.seq:
                    problems.append(f"handle {h.handle}: {a.ip} is not allocated to it in {a.block}")
        return problems

    # -- CNI attachments -----------------------------------------------------------------

    @one_call
    def assign_attachment(self, handle: str, host: str, attachment: str, *, ipv6: int = 0, ipv4: int = 0,
                          addresses: Iterable[str | IPAddr] = (), pool: str | None = None,
                          endpoint: str | None = None, pools: Mapping[int, str | None] | None = None
                          ) -> list[Assigned]:
        """Addresses for a handle that must not exist yet (the CNI plugin's ADD): the handle
        record, naming its attachment, is created first (with ``created`` now), so a second
        caller for the same handle gets ``HandleExists`` before anything is allocated; then the
        specific ``addresses`` and ipv6/ipv4 more from the pools; then the record is filled in.
        All or nothing: on any failure what this call took is freed and its record removed. A
        crash in between leaves a record with fewer addresses than its blocks give it, which
        ``check`` reports and ``release_strays`` (or the leak collector) frees."""
        check_owner(handle, host)
        wanted = [plain_address(ip) for ip in addresses]
        if ipv6 < 0 or ipv4 < 0 or ipv6 + ipv4 + len(wanted) == 0:
            raise ValueError("ask for at least one address (ipv6 and/or ipv4 count, or addresses)")
        if ipv6 + ipv4 + len(wanted) > MAX_ADDRESSES_PER_HANDLE:
            raise ValueError(f"at most {MAX_ADDRESSES_PER_HANDLE} addresses per handle")
        key = ipam_handle_key(handle)
        created = self.clock()
        try:
            rev = self.store.create(key, encode_ipam(Handle(handle=handle, endpoint=endpoint, attachment=attachment,
                                                            created=created)))
        except AlreadyExists:
            raise HandleExists(f"handle {handle} exists already") from None
        got: list[Assigned] = []
        try:
            for ip in wanted:
                got.append(self._take_specific(handle, host, ip))
            pool_family = self._pool_family(pool) if pool is not None else None
            for family, n in ((6, ipv6), (4, ipv4)):
                if n:
                    # pools: a pool per family (the CNI config's ipv6_pool / ipv4_pool), over pool
                    chosen = (pools or {}).get(family) or (pool if pool_family == family else None)
                    self._assign_family(handle, host, self._select_pools(family, chosen), n, got)
            rec = Handle(handle=handle, endpoint=endpoint, attachment=attachment, created=created,
                         addresses=[HandleAddress(ip=str(a.ip), block=a.block, seq=a.seq) for a in got])
            self.store.update(key, encode_ipam(rec), rev)
            return got
        except BaseException:
            self._rollback(got, handle)
            self._drop_own_record(key, rev, created)
            raise

    def _drop_own_record(self, key: str, rev: int, created: float) -> None:
        """Delete the handle record this call made (at rev, or later if our own last update was
        applied after all: an etcd write whose answer was lost, OutcomeUnknown). Left, it named
        the addresses the rollback had just freed, and a retry rebuilt on them while they went
        to the next workload too."""
        try:
            self.store.delete(key, expected_revision=rev)
            return
        except NotFound:
            return
        except RevisionMismatch:
            pass
        kv = self.store.get(key)
        if kv is None:
            return
        try:
            mine = decode_ipam(key, kv.value).created == created
        except InvalidResource:
            mine = False
        if mine:  # (another ADD of this handle gets HandleExists: only ours has our created)
            with contextlib.suppress(NotFound, RevisionMismatch):
                self.store.delete(key, expected_revision=kv.mod_revision)

    def _take_specific(self, handle: str, host: str, addr: IPAddr) -> Assigned:
        """One specific address into its block for handle (no handle record written): the block
        part of ``assign_address``, with its rules (claims a free block, strict affinity, bounded).
        Never in a disabled pool: its addresses are another allocator's (Neutron's subnets)."""
        pool = self._pool_of(addr)
        if pool.spec.disabled:
            raise NoPool(f"{addr} is in pool {pool.metadata.name} ({pool.spec.cidr}), which is disabled: "
                         "its addresses are not tabby's IPAM's to hand out")
        assert pool.spec.block_size is not None
        cidr = B.block_of(addr, pool.spec.block_size)
        fruitless = 0
        while True:
            cur = self._get_block(str(cidr))
            if cur is None:
                if fruitless >= MAX_FRUITLESS_ROUNDS:
                    raise Contention(f"{addr}: block {cidr} was released {fruitless} times while it was being "
                                     "claimed; try again")
                fruitless += 1
                clash = [str(n) for n in self._held() if n != cidr and n.version == cidr.version
                         and (n.subnet_of(cidr) or cidr.subnet_of(n))]  # type: ignore[arg-type]
                if clash:
                    raise AddressInUse(f"{addr}: its block {cidr} overlaps block record(s) {', '.join(clash)}")
                self._claim(host, cidr, pool.spec.cidr)
                continue
            block, rev = cur
            if block.host != host and self.strict_for(host):
                raise AddressInUse(f"{addr}: its block {cidr} belongs to {block.host} and strict affinity is on")
            new, seq = B.take_specific(block, B.ordinal(block, addr), handle, pool.spec.cidr)
            try:
                self._put_block(new, rev)
            except (RevisionMismatch, NotFound):  # changed or gone meanwhile: read it again
                continue
            return Assigned(addr, block.cidr, seq)

    @one_call
    def release_strays(self, handle: str, cidrs: Iterable[str]) -> list[IPAddr]:
        """Free allocations in the given blocks that carry handle but that its record lacks (or
        all of them, once the record is gone): what an allocation left when its process died
        between writing a block and writing the handle record. Corrupt blocks are skipped."""
        rec = self.handle(handle)
        listed = {(a.ip, a.seq) for a in rec.addresses} if rec else set()
        freed: list[IPAddr] = []
        for cidr in cidrs:
            try:
                cur = self._get_block(cidr)
            except CorruptRecord:
                continue
            if cur is None:
                continue
            for o, alloc in cur[0].allocations.items():
                ip = B.address(cur[0], o)
                if alloc.handle == handle and (str(ip), alloc.seq) not in listed:
                    with contextlib.suppress(StaleRelease, NotAllocated, CorruptRecord):
                        self._free_in_block(cidr, ip, alloc.seq, handle)
                        freed.append(ip)
        return freed


class HandleExists(IpamError):
    """``assign_attachment``: the handle exists already; nothing was allocated."""

def _overlaps(nets: list[IPNetwork]) -> list[str]:
    """'blocks A and B overlap' for every pair of overlapping networks (blocks nest or are apart)."""
    out = []
    for version in (4, 6):
        ordered: list[Any] = sorted((n for n in nets if n.version == version),
                                    key=lambda n: (n.network_address, n.prefixlen))
        open_: list[Any] = []  # enclosing networks still open at this point
        for n in ordered:
            while open_ and n.network_address > open_[-1].broadcast_address:
                open_.pop()
            out += [f"blocks {o} and {n} overlap" for o in open_]
            open_.append(n)
    return out
