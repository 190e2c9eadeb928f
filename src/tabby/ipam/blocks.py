"""Pure block arithmetic: which blocks a pool has, and taking or returning addresses in one.

Nothing here does I/O; the allocator reads a block, calls these, and writes the result back
with compare-and-swap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

from tabby.model.ipam import MAX_BLOCK_ADDRESSES, Allocation, Block, IPNetwork
from tabby.model.jsontext import InvalidResource
from tabby.model.plain import replace

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


class IpamError(Exception):
    pass


class PoolExhausted(IpamError):
    pass


class NoPool(IpamError):
    pass


class StaleRelease(IpamError):
    """The address was released and handed out again since the caller's allocation."""


class NotAllocated(IpamError):
    pass


class AddressInUse(IpamError):
    pass


class Contention(IpamError):
    """A bounded number of attempts all lost a race (a block claimed or released under us): try again."""


class CorruptRecord(IpamError):
    """An IPAM record that does not decode (or does not belong under its key). It is never allocated
    from and never overwritten; ``key`` and ``field`` name it, ``errors`` says what is wrong."""

    def __init__(self, key: str, field: str, errors: list[str]) -> None:
        self.key = key
        self.field = field
        self.errors = errors
        super().__init__(f"corrupt IPAM record {key} (field {field}): {'; '.join(errors)}")

    @classmethod
    def of(cls, e: InvalidResource) -> CorruptRecord:
        return cls(e.where, e.field, e.errors)


def reserves_first(cidr: IPNetwork, pool: IPNetwork | None) -> bool:
    """The pool's first address, and in IPv6 every /64's first (its subnet-router anycast address,
    RFC 4291 2.6.1, which no interface may take): a host puts the first address of each /64 of a
    stateful pool that its VMs use on dnsmasq's anchor (dnsmasq serves a /64 only through an address
    of its own in it), so it must never be a workload's. In IPv4, the pool's network address. A
    pool of one or two addresses (/32, /31, /128, /127: point-to-point, RFC 3021 and 6164) has no
    network address to keep: reserving it left a /32 pool nothing to give."""
    if pool is not None and cidr.network_address == pool.network_address and pool.num_addresses > 2:
        return True
    return starts_a_64(cidr)


def starts_a_64(cidr: IPNetwork) -> bool:
    return cidr.version == 6 and int(cidr.network_address) & ((1 << 64) - 1) == 0


def reserves_last(cidr: IPNetwork, pool: IPNetwork | None) -> bool:
    """An IPv4 pool's last address (of more than two): its broadcast address. A host serving VMs of
    the pool holds the pool's first address with the pool's length (dnsmasq's anchor), and the
    kernel then makes the last one a broadcast route in its local table: a workload given it was
    unreachable through that host."""
    return pool is not None and cidr.version == 4 and pool.num_addresses > 2 \
        and cidr.broadcast_address == pool.broadcast_address


def _reserve_late(block: Block, pool: IPNetwork | None = None) -> Block:
    """A block made before every /64's first address (or its IPv4 pool's last, with pool given)
    was reserved (2026-12-04): that address, if still free, becomes reserved now, in the record
    the allocation that is being made writes."""
    late = {o for o, due in ((0, starts_a_64(block.network)),
                             (block.network.num_addresses - 1, reserves_last(block.network, pool)))
            if due and o in block.free}
    if late:
        return replace(block, free=[o for o in block.free if o not in late], reserved=sorted({*block.reserved, *late}))
    return block


def new_block(cidr: IPNetwork, host: str | None, pool: IPNetwork | None = None) -> Block:
    """A fresh block, its reserved addresses (``reserves_first``, ``reserves_last``) never handed out."""
    reserved = [0] if reserves_first(cidr, pool) else []
    if reserves_last(cidr, pool):
        reserved.append(cidr.num_addresses - 1)
    return Block(cidr=str(cidr), host=host, free=[o for o in range(cidr.num_addresses) if o not in reserved],
                 reserved=reserved)


def block_of(ip: IPAddr, block_size: int) -> IPNetwork:
    return ipaddress.ip_network(f"{ip}/{block_size}", strict=False)


def key_network(key: str) -> IPNetwork | None:
    """The network a block key names ("…/blocks/fd00:e::-122" -> fd00:e::/122), whatever its record
    holds; None when the key names no network. Read leniently (host bits allowed): a record under
    a key is taken to cover what its key says, corrupt or not; but not one larger than any block
    can be (``::-0`` would have held every address: one write stopped every claim in the fabric).
    Such a record is corrupt all the same (``snapshot().corrupt``, ``tabby ipam check``)."""
    segment = key.rsplit("/", 1)[-1]
    text, sep, length = segment.rpartition("-")
    if not sep or not length.isdigit() or len(length) > 3:
        return None
    try:
        net = ipaddress.ip_network(f"{text}/{length}", strict=False)
    except ValueError:
        return None
    return net if net.num_addresses <= MAX_BLOCK_ADDRESSES else None


def candidate_blocks(pool: IPNetwork, block_size: int, held: Iterable[IPNetwork]) -> Iterator[IPNetwork]:
    """Blocks of the pool that overlap no held network, in address order; lazy, since a /64 has
    2**58 of them. ``held`` is every network a block record's key names, of any size: a held
    network smaller than a block takes the whole block that contains it, a larger one every block
    inside it (skipped over, not walked), so a new claim never overlaps a record of another size
    (a pool whose block size changed, a hostile record)."""
    step = 1 << (pool.max_prefixlen - block_size)
    base = int(pool.network_address)
    end = base + pool.num_addresses
    cls = type(pool)
    small: set[int] = set()  # block-aligned start addresses taken
    spans: list[tuple[int, int]] = []  # [first, last] of held networks larger than a block
    for net in held:
        if net.version != pool.version:
            continue
        first, last = int(net.network_address), int(net.broadcast_address)
        if last < base or first >= end:
            continue
        if net.prefixlen >= block_size:
            small.add(first - (first - base) % step)
        else:
            spans.append((first, last))
    spans.sort()
    at, k = base, 0
    while at < end:
        while k < len(spans) and spans[k][1] < at:
            k += 1
        if k < len(spans) and spans[k][0] <= at:
            last = spans[k][1]
            at = last + 1 + (-(last + 1 - base)) % step  # the next block boundary after the span
            continue
        if at not in small:
            yield cls((at, block_size))
        at += step


def ordinal(block: Block, ip: IPAddr) -> int:
    net = block.network
    if ip not in net:
        raise NotAllocated(f"{ip} is not in block {block.cidr}")
    return int(ip) - int(net.network_address)


def address(block: Block, ordinal_: int) -> IPAddr:
    net = block.network
    return ipaddress.ip_address(int(net.network_address) + ordinal_)


def take(block: Block, n: int, handle: str, pool: IPNetwork | None = None) -> tuple[Block, list[tuple[int, int]]]:
    """Up to n free addresses from the head of the queue: (new block, [(ordinal, seq)]); pool: the
    block's, when known (for ``_reserve_late``)."""
    block = _reserve_late(block, pool)
    k = min(n, len(block.free))
    if k == 0:
        return block, []
    picked = block.free[:k]
    allocations = dict(block.allocations)
    seq = block.seq
    out = []
    for o in picked:
        seq += 1
        allocations[o] = Allocation(handle=handle, seq=seq)
        out.append((o, seq))
    return replace(block, free=block.free[k:], allocations=allocations, seq=seq), out


def take_specific(block: Block, o: int, handle: str, pool: IPNetwork | None = None) -> tuple[Block, int]:
    block = _reserve_late(block, pool)
    if o in block.reserved:
        raise AddressInUse(f"{address(block, o)} is reserved (the pool's first address, in IPv6 a /64's first, "
                           "in IPv4 the pool's last)")
    if o in block.allocations:
        raise AddressInUse(f"{address(block, o)} is already allocated (handle {block.allocations[o].handle})")
    seq = block.seq + 1
    free = [x for x in block.free if x != o]
    allocations = {**block.allocations, o: Allocation(handle=handle, seq=seq)}
    return replace(block, free=free, allocations=allocations, seq=seq), seq


def give_back(block: Block, o: int, seq: int | None, handle: str | None = None) -> tuple[Block, Allocation]:
    """Release ordinal o (only if it still carries seq, and belongs to handle, when given); freed
    addresses queue last. The handle check keeps a record that names someone else's address (a
    hostile or stale handle record) from freeing it."""
    alloc = block.allocations.get(o)
    if alloc is None:
        raise NotAllocated(f"{address(block, o)} is not allocated")
    if handle is not None and alloc.handle != handle:
        raise NotAllocated(f"{address(block, o)} is allocated to handle {alloc.handle}, not {handle}: not released")
    if seq is not None and alloc.seq != seq:
        raise StaleRelease(
            f"{address(block, o)} was reassigned (sequence {alloc.seq}, release named {seq}): not released"
        )
    allocations = {k: v for k, v in block.allocations.items() if k != o}
    return replace(block, free=[*block.free, o], allocations=allocations), alloc
