"""Pure block arithmetic: which blocks a pool has, and taking or returning addresses in one.

Nothing here does I/O; the allocator reads a block, calls these, and writes the result back
with compare-and-swap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from tabby.model.ipam import Allocation, Block, IPNetwork

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


def new_block(cidr: IPNetwork, host: str | None, pool: IPNetwork | None = None) -> Block:
    """A fresh block. The pool's first address is reserved: in IPv6 it is the subnet-router anycast
    address (RFC 4291), in IPv4 the network address, and every host uses it as the local anchor
    that lets dnsmasq serve the pool on VM taps."""
    reserved = [0] if pool is not None and cidr.network_address == pool.network_address else []
    return Block(cidr=str(cidr), host=host, free=[o for o in range(cidr.num_addresses) if o not in reserved],
                 reserved=reserved)


def block_of(ip: IPAddr, block_size: int) -> IPNetwork:
    return ipaddress.ip_network(f"{ip}/{block_size}", strict=False)


def candidate_blocks(pool: IPNetwork, block_size: int, taken: set[str]) -> Iterator[IPNetwork]:
    """Blocks of the pool nobody holds, in address order; lazy, since a /64 has 2**58 of them."""
    step = 1 << (pool.max_prefixlen - block_size)
    base = int(pool.network_address)
    cls = type(pool)
    for i in range(pool.num_addresses // step):
        net = cls((base + i * step, block_size))
        if str(net) not in taken:
            yield net


def ordinal(block: Block, ip: IPAddr) -> int:
    net = block.network
    if ip not in net:
        raise NotAllocated(f"{ip} is not in block {block.cidr}")
    return int(ip) - int(net.network_address)


def address(block: Block, ordinal_: int) -> IPAddr:
    net = block.network
    return ipaddress.ip_address(int(net.network_address) + ordinal_)


def take(block: Block, n: int, handle: str) -> tuple[Block, list[tuple[int, int]]]:
    """Up to n free addresses from the head of the queue: (new block, [(ordinal, seq)])."""
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
    return block.model_copy(update={"free": block.free[k:], "allocations": allocations, "seq": seq}), out


def take_specific(block: Block, o: int, handle: str) -> tuple[Block, int]:
    if o in block.reserved:
        raise AddressInUse(f"{address(block, o)} is reserved (the pool's first address)")
    if o in block.allocations:
        raise AddressInUse(f"{address(block, o)} is already allocated (handle {block.allocations[o].handle})")
    seq = block.seq + 1
    free = [x for x in block.free if x != o]
    allocations = {**block.allocations, o: Allocation(handle=handle, seq=seq)}
    return block.model_copy(update={"free": free, "allocations": allocations, "seq": seq}), seq


def give_back(block: Block, o: int, seq: int | None) -> tuple[Block, Allocation]:
    """Release ordinal o (only if it still carries seq, when given); freed addresses queue last."""
    alloc = block.allocations.get(o)
    if alloc is None:
        raise NotAllocated(f"{address(block, o)} is not allocated")
    if seq is not None and alloc.seq != seq:
        raise StaleRelease(
            f"{address(block, o)} was reassigned (sequence {alloc.seq}, release named {seq}): not released"
        )
    allocations = {k: v for k, v in block.allocations.items() if k != o}
    return block.model_copy(update={"free": [*block.free, o], "allocations": allocations}), alloc
