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
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tabby.model.codec import InvalidResource, _describe, load_json
from tabby.model.keys import (
    IPAM_AFFINITIES_PREFIX,
    IPAM_BLOCKS_PREFIX,
    IPAM_GC_KEY,
    IPAM_HANDLES_PREFIX,
    ipam_affinity_key,
    ipam_block_key,
)
from tabby.model.names import check_name

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Handles are "<network>.<container id>" (CNI) or a Neutron port id: printable ASCII, no spaces.
MAX_HANDLE_CHARS = 512
Handle_ = Annotated[str, Field(pattern=r"^[!-~]+$", max_length=MAX_HANDLE_CHARS)]
Seq = Annotated[int, Field(ge=0)]
# The smallest block the model allows is /116 (IPv6) or /20 (IPv4): 4,096 ordinals.
MAX_BLOCK_ADDRESSES = 4096


def _canonical_cidr(v: str) -> str:
    try:
        net = ipaddress.ip_network(v, strict=True)
    except ValueError as e:
        raise ValueError(f"{v!r} is not a network address with prefix length ({e})") from None
    if net.num_addresses > MAX_BLOCK_ADDRESSES:
        raise ValueError(f"{v} is larger than any block ({MAX_BLOCK_ADDRESSES} addresses at most)")
    if str(net) != v:
        raise ValueError(f"{v!r} is not written canonically ({net})")
    return v


def _canonical_ip(v: str) -> str:
    try:
        ip = ipaddress.ip_address(v)
    except ValueError as e:
        raise ValueError(str(e)) from None
    if str(ip) != v:
        raise ValueError(f"{v!r} is not written canonically ({ip})")
    return v


Cidr = Annotated[str, AfterValidator(_canonical_cidr)]
Addr = Annotated[str, AfterValidator(_canonical_ip)]
HostName = Annotated[str, AfterValidator(check_name)]


class _Record(BaseModel):
    # not frozen: the allocator edits blocks in place; extra fields and NaN are refused
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Allocation(_Record):
    handle: Handle_
    seq: Seq


class Block(_Record):
    cidr: Cidr
    host: HostName | None  # the affine host; None once it has lost its affinity
    seq: Seq = 0
    allocations: dict[int, Allocation] = Field(default_factory=dict)
    free: list[int]
    reserved: list[int] = Field(default_factory=list)  # never handed out (the pool's first address)

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, data: Any) -> Any:
        """JSON keys are text: "1" and "01" would both become ordinal 1, one allocation lost."""
        allocs = data.get("allocations") if isinstance(data, dict) else None
        if isinstance(allocs, dict):
            for k in allocs:
                if isinstance(k, str) and not (k.isascii() and k.isdigit() and str(int(k)) == k):
                    raise ValueError(f"allocations: key {k!r} is not a canonical ordinal")
        return data

    @model_validator(mode="after")
    def _ordinals(self) -> Block:
        size = ipaddress.ip_network(self.cidr).num_addresses
        seen: set[int] = set()
        for field, ordinals in (("allocations", list(self.allocations)), ("free", self.free),
                                ("reserved", self.reserved)):
            for o in ordinals:
                if not 0 <= o < size:
                    raise ValueError(f"{field}: ordinal {o} is outside the block (0..{size - 1})")
                if o in seen:
                    raise ValueError(f"{field}: ordinal {o} appears twice among allocations, free and reserved")
                seen.add(o)
        for o, a in self.allocations.items():
            if a.seq > self.seq:
                raise ValueError(f"allocations.{o}.seq: {a.seq} is newer than the block's seq {self.seq}")
        return self

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)


class Affinity(_Record):
    host: HostName
    cidr: Cidr
    state: Literal["pending", "confirmed"]
    since: Annotated[float, Field(ge=0)]


class HandleAddress(_Record):
    ip: Addr
    block: Cidr
    seq: Seq

    @model_validator(mode="after")
    def _inside(self) -> HandleAddress:
        if ipaddress.ip_address(self.ip) not in ipaddress.ip_network(self.block):
            raise ValueError(f"ip: {self.ip} is not inside its block {self.block}")
        return self


class Handle(_Record):
    handle: Handle_
    addresses: Annotated[list[HandleAddress], Field(max_length=128)] = Field(default_factory=list)
    endpoint: HostName | None = None  # the Endpoint these addresses are for, when the writer knows it
    # when the handle was first written (seconds since the epoch), so that a check can give a CNI ADD
    # time to write its Endpoint; records from before this field have none and count as old
    created: Annotated[float, Field(ge=0)] | None = None
    # the CNI attachment these addresses are for, "<host>/<container id>/<ifname>" (CNI writes it)
    attachment: Annotated[str, Field(pattern=r"^[!-~]+$", max_length=MAX_HANDLE_CHARS)] | None = None


class GcState(_Record):
    """What the leak collector saw last time: handles seen leaked and blocks seen empty, with
    when each was first seen, so that nothing is freed on a single sighting."""

    leaked_handles: dict[Handle_, float] = Field(default_factory=dict)
    empty_blocks: dict[Cidr, float] = Field(default_factory=dict)


def _expected_key(record: Any) -> str:
    if isinstance(record, Block):
        return ipam_block_key(record.cidr)
    if isinstance(record, Affinity):
        return ipam_affinity_key(record.host, record.cidr)
    if isinstance(record, Handle):
        return f"{IPAM_HANDLES_PREFIX}{quote(record.handle, safe='')}"
    return IPAM_GC_KEY


def decode_ipam(key: str, value: bytes) -> Any:
    """An IPAM record -> Block, Affinity, Handle or GcState by its key; InvalidResource naming
    the key and field otherwise, including a record that does not belong under its key."""
    if key.startswith(IPAM_BLOCKS_PREFIX):
        model: type[_Record] = Block
    elif key.startswith(IPAM_AFFINITIES_PREFIX):
        model = Affinity
    elif key.startswith(IPAM_HANDLES_PREFIX):
        model = Handle
    elif key == IPAM_GC_KEY:
        model = GcState
    else:
        raise InvalidResource(key, ["(key): not an IPAM key of tabby's layout"])
    doc = load_json(key, value)
    try:
        record = model.model_validate(doc)
    except ValidationError as e:
        raise InvalidResource(key, _describe(e)) from None
    expected = _expected_key(record)
    if expected != key:
        raise InvalidResource(key, [f"(key): this record belongs under {expected}"])
    return record
