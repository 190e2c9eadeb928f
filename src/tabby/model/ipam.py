"""IPAM's own records in the Store: blocks, block affinities, handles, and GC observations.

A block is a power-of-two slice of an IPPool (IPv6 /122 and IPv4 /26 by default) that one host
claims, so that the host can advertise one route for it. Addresses inside a block are ordinals
0..size-1. ``free`` is a queue: allocation takes from its head, release appends to its tail,
so a freed address is reused last (oldest-freed first), which keeps a just-released address
from going straight to a new workload while stale state about it may still exist.
``seq`` grows with every allocation in the block; each allocation remembers the ``seq`` it got,
so a release that names an old ``seq`` (the address was freed and handed out again meanwhile)
fails instead of freeing someone else's address.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, Field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Allocation(BaseModel):
    handle: str
    seq: int


class Block(BaseModel):
    cidr: str
    host: str | None  # the affine host; None once it has lost its affinity
    seq: int = 0
    allocations: dict[int, Allocation] = Field(default_factory=dict)
    free: list[int]
    reserved: list[int] = Field(default_factory=list)  # never handed out (the pool's first address)

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)


class Affinity(BaseModel):
    host: str
    cidr: str
    state: Literal["pending", "confirmed"]
    since: float


class HandleAddress(BaseModel):
    ip: str
    block: str
    seq: int


class Handle(BaseModel):
    handle: str
    addresses: list[HandleAddress] = Field(default_factory=list)
    endpoint: str | None = None  # the Endpoint these addresses are for, when the writer knows it


class GcState(BaseModel):
    """What the leak collector saw last time: handles seen leaked and blocks seen empty, with
    when each was first seen, so that nothing is freed on a single sighting."""

    leaked_handles: dict[str, float] = Field(default_factory=dict)
    empty_blocks: dict[str, float] = Field(default_factory=dict)
