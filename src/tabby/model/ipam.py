"""IPAM's own records in the Store: blocks, block affinities, handles, and GC observations.

A block is a power-of-two slice of an IPPool (IPv6 /122 and IPv4 /26 by default) that one host
claims, so that the host can advertise one route for it. Addresses inside a block are ordinals
0..size-1. ``free`` is a queue: allocation takes from its head, release appends to its tail,
so a freed address is reused last (oldest-freed first), which keeps a just-released address
from going straight to a new workload while stale state about it may still exist.
``seq`` grows with every allocation in the block; each allocation remembers the ``seq`` it got,
so a release that names an old ``seq`` (the address was freed and handed out again meanwhile)
fails instead of freeing someone else's address.

Why plain classes (``plain.Plain``) and a hand-written decoder, not pydantic like the resources: these records
are read and written several times by every CNI ADD and DEL, and a plugin process started per
call cannot afford pydantic's import (~140 ms here). Only tabby writes them, so the decoder is
strict (JSON types as written: an integer field takes no "5", 5.0 or true) and total: any bytes
become a record or ``InvalidResource`` naming the key and the field. ``encode_ipam`` runs the
same checks before writing, so nothing is written that would not decode.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from tabby.model.jsontext import InvalidResource, load_json
from tabby.model.keys import (
    IPAM_AFFINITIES_PREFIX,
    IPAM_BLOCKS_PREFIX,
    IPAM_GC_KEY,
    IPAM_HANDLES_PREFIX,
    ipam_affinity_key,
    ipam_block_key,
)
from tabby.model.names import check_name
from tabby.model.plain import Plain

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Handles are "<network>.<container id>/<ifname>" (CNI) or a Neutron port id: printable ASCII, no spaces.
MAX_HANDLE_CHARS = 512
# The smallest block the model allows is /116 (IPv6) or /20 (IPv4): 4,096 ordinals.
MAX_BLOCK_ADDRESSES = 4096
MAX_HANDLE_ADDRESSES = 128


# -- field checks: each returns the value or raises ValueError saying what is wrong ---------------

def _integer(v: Any) -> int:
    if type(v) is not int:  # bool is an int to Python, not to a record
        raise ValueError(f"must be an integer, not {_kind(v)}")
    if v < 0:
        raise ValueError(f"must be 0 or more, not {v}")
    if v >= 1 << 63:  # a seq of 4,300 digits decoded, and the next allocation's write raised
        raise ValueError("must be below 2**63")
    return v


def _number(v: Any) -> float:
    if type(v) not in (int, float):
        raise ValueError(f"must be a number, not {_kind(v)}")
    try:
        n = float(v)
    except OverflowError:
        n = math.inf
    if not math.isfinite(n):
        raise ValueError(f"{str(v)[:40]} is out of range")
    return n


def _seconds(v: Any) -> float:
    n = _number(v)
    if n < 0:
        raise ValueError(f"must be 0 or more, not {v}")
    return n


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, not {_kind(v)}")
    return v


def good_handle(s: str) -> bool:
    return 0 < len(s) <= MAX_HANDLE_CHARS and s.isascii() and s.isprintable() and " " not in s


def _handle(v: Any) -> str:
    s = _text(v)
    if not good_handle(s):
        raise ValueError(f"must be 1..{MAX_HANDLE_CHARS} printable ASCII characters without spaces")
    return s


def _name(v: Any) -> str:
    return check_name(_text(v))


def _cidr(v: Any) -> str:
    s = _text(v)
    if "%" in s:  # ipaddress takes a zone of any text; an affinity's cidr goes into BIRD's config
        raise ValueError(f"{s!r}: a block has no %zone")
    try:
        net = ipaddress.ip_network(s, strict=True)
    except ValueError as e:
        raise ValueError(f"{s!r} is not a network address with prefix length ({e})") from None
    if net.num_addresses > MAX_BLOCK_ADDRESSES:
        raise ValueError(f"{s} is larger than any block ({MAX_BLOCK_ADDRESSES} addresses at most)")
    if str(net) != s:
        raise ValueError(f"{s!r} is not written canonically ({net})")
    return s


def _ip(v: Any) -> str:
    s = _text(v)
    if "%" in s:
        raise ValueError(f"{s!r}: an IPAM address has no %zone")
    try:
        ip = ipaddress.ip_address(s)
    except ValueError as e:
        raise ValueError(str(e)) from None
    if str(ip) != s:
        raise ValueError(f"{s!r} is not written canonically ({ip})")
    return s


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


class _Reader:
    """One record's fields, read in their order with every error collected as "field: why" (the
    first one names the record's bad field, as ``InvalidResource.field``)."""

    def __init__(self, doc: Any, loc: str, errors: list[str]) -> None:
        self.doc = doc if isinstance(doc, dict) else {}
        self.loc = loc
        self.errors = errors
        self.ok = isinstance(doc, dict)
        if not self.ok:
            self.fail("", f"must be an object, not {_kind(doc)}")

    def where(self, name: str) -> str:
        return f"{self.loc}.{name}" if self.loc and name else (self.loc or name or "(document)")

    def fail(self, name: str, why: str) -> None:
        self.errors.append(f"{self.where(name)}: {why}")
        self.ok = False

    def get(self, name: str, check: Callable[[Any], Any], default: Any = ..., factory: Any = None) -> Any:
        if name not in self.doc:
            if factory is not None:
                return factory()
            if default is ...:
                self.fail(name, "required")
                return None
            return default
        try:
            return check(self.doc[name])
        except ValueError as e:
            self.fail(name, str(e))
            return None

    def items(self, name: str, check: Callable[[Any, str], Any], container: type = list,
              required: bool = False) -> Any:
        """A list (or object) field whose every item is checked by check(item, its location)."""
        if name not in self.doc:
            if required:
                self.fail(name, "required")
            return container()
        value = self.doc[name]
        if not isinstance(value, container):
            self.fail(name, f"must be {'a list' if container is list else 'an object'}, not {_kind(value)}")
            return container()
        if container is list:
            return [check(item, self.where(f"{name}.{i}")) for i, item in enumerate(value)]
        return {k: check(item, self.where(f"{name}.{k}")) for k, item in value.items()}

    def done(self, names: tuple[str, ...]) -> bool:
        for k in self.doc:
            if k not in names:
                self.fail(k, "not a field of this record")
        return self.ok


def _ordinals(v: Any) -> bool:
    """Is v a list of integers 0 or more (the common case, checked in one pass)?"""
    return type(v) is list and all(type(o) is int and o >= 0 for o in v)


def _each(check: Callable[[Any], Any], errors: list[str]) -> Callable[[Any, str], Any]:
    """An item check for ``_Reader.items`` that reports under the item's location."""
    def one(v: Any, where: str) -> Any:
        try:
            return check(v)
        except ValueError as e:
            errors.append(f"{where}: {e}")
            return None
    return one


# -- the records -----------------------------------------------------------------------------------

class Allocation(Plain):
    __slots__ = ("handle", "seq")

    def __init__(self, *, handle: str, seq: int) -> None:
        self.handle, self.seq = handle, seq

    @classmethod
    def read(cls, doc: Any, loc: str, errors: list[str]) -> Allocation:
        r = _Reader(doc, loc, errors)
        rec = cls(handle=r.get("handle", _handle), seq=r.get("seq", _integer))
        r.done(("handle", "seq"))
        return rec

    def doc(self) -> dict[str, Any]:
        return {"handle": self.handle, "seq": self.seq}


class Block(Plain):
    __slots__ = FIELDS = ("cidr", "host", "seq", "allocations", "free", "reserved")

    def __init__(self, *, cidr: str, host: str | None, free: list[int], seq: int = 0,
                 allocations: dict[int, Allocation] | None = None, reserved: list[int] | None = None) -> None:
        self.cidr = cidr
        self.host = host  # the affine host; None once it has lost its affinity
        self.seq = seq
        self.allocations = {} if allocations is None else allocations
        self.free = free
        self.reserved = [] if reserved is None else reserved  # never handed out (blocks.reserves_first)

    @classmethod
    def read(cls, doc: Any, errors: list[str]) -> Block:
        r = _Reader(doc, "", errors)
        n = len(errors)
        cidr = r.get("cidr", _cidr)
        host = r.get("host", _optional(_name))
        seq = r.get("seq", _integer, 0)
        raw = r.doc.get("allocations", {})
        if not isinstance(raw, dict):
            r.fail("allocations", f"must be an object, not {_kind(raw)}")
            raw = {}
        allocations: dict[int, Allocation] = {}
        new = object.__new__
        for k, v in raw.items():
            # what tabby wrote, in one test (a block holds up to 4,096): every other case below
            if type(v) is dict and len(v) == 2 and len(k) <= 4 and k.isdigit() and k.isascii() \
                    and (k[0] != "0" or k == "0"):
                handle, s = v.get("handle"), v.get("seq")
                if type(s) is int and s >= 0 and type(handle) is str and good_handle(handle):
                    a = allocations[int(k)] = new(Allocation)
                    a.handle, a.seq = handle, s
                    continue
            # JSON keys are text: "1" and "01" would both become ordinal 1, one allocation lost
            if not (k.isascii() and k.isdigit() and (k == "0" or k[0] != "0")):
                r.fail("allocations", f"key {k!r} is not a canonical ordinal")
                continue
            if len(k) > 6:  # past any block (and int() of thousands of digits is refused)
                r.fail("allocations", f"ordinal {k[:20]}... is outside any block")
                continue
            allocations[int(k)] = Allocation.read(v, f"allocations.{k}", errors)
        free, reserved = r.doc.get("free"), r.doc.get("reserved", [])
        if not _ordinals(free):
            free = r.items("free", _each(_integer, errors), required=True)
        if not _ordinals(reserved):
            reserved = r.items("reserved", _each(_integer, errors))
        rec = cls(cidr=cidr, host=host, seq=seq, allocations=allocations, free=free, reserved=reserved)
        if r.done(cls.FIELDS) and len(errors) == n:
            rec._check_ordinals(errors)
        return rec

    def _check_ordinals(self, errors: list[str]) -> None:
        size = ipaddress.ip_network(self.cidr).num_addresses
        seen: set[int] = set()
        for name, ordinals in (("allocations", list(self.allocations)), ("free", self.free),
                               ("reserved", self.reserved)):
            for o in ordinals:
                if not 0 <= o < size:
                    errors.append(f"{name}: ordinal {o} is outside the block (0..{size - 1})")
                    return
                if o in seen:
                    errors.append(f"{name}: ordinal {o} appears twice among allocations, free and reserved")
                    return
                seen.add(o)
        for o, a in self.allocations.items():
            if a.seq > self.seq:
                errors.append(f"allocations.{o}.seq: {a.seq} is newer than the block's seq {self.seq}")
                return

    def doc(self) -> dict[str, Any]:
        return {"cidr": self.cidr, "host": self.host, "seq": self.seq,
                "allocations": {str(o): a.doc() for o, a in self.allocations.items()},
                "free": self.free, "reserved": self.reserved}

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)


class Affinity(Plain):
    __slots__ = FIELDS = ("host", "cidr", "state", "since")

    def __init__(self, *, host: str, cidr: str, state: str, since: float) -> None:
        self.host, self.cidr, self.since = host, cidr, since
        self.state = state  # "pending" or "confirmed"

    @classmethod
    def read(cls, doc: Any, errors: list[str]) -> Affinity:
        r = _Reader(doc, "", errors)
        rec = cls(host=r.get("host", _name), cidr=r.get("cidr", _cidr), state=r.get("state", _state),
                  since=r.get("since", _seconds))
        r.done(cls.FIELDS)
        return rec

    def doc(self) -> dict[str, Any]:
        return {"host": self.host, "cidr": self.cidr, "state": self.state, "since": self.since}


def _state(v: Any) -> str:
    if not isinstance(v, str) or v not in ("pending", "confirmed"):
        raise ValueError("must be 'pending' or 'confirmed'")
    return v


class HandleAddress(Plain):
    __slots__ = FIELDS = ("ip", "block", "seq")

    def __init__(self, *, ip: str, block: str, seq: int) -> None:
        self.ip, self.block, self.seq = ip, block, seq

    @classmethod
    def read(cls, doc: Any, loc: str, errors: list[str]) -> HandleAddress:
        r = _Reader(doc, loc, errors)
        n = len(errors)
        rec = cls(ip=r.get("ip", _ip), block=r.get("block", _cidr), seq=r.get("seq", _integer))
        if r.done(cls.FIELDS) and len(errors) == n \
                and ipaddress.ip_address(rec.ip) not in ipaddress.ip_network(rec.block):
            r.fail("ip", f"{rec.ip} is not inside its block {rec.block}")
        return rec

    def doc(self) -> dict[str, Any]:
        return {"ip": self.ip, "block": self.block, "seq": self.seq}


class Handle(Plain):
    __slots__ = FIELDS = ("handle", "addresses", "endpoint", "created", "attachment")

    def __init__(self, *, handle: str, addresses: list[HandleAddress] | None = None, endpoint: str | None = None,
                 created: float | None = None, attachment: str | None = None) -> None:
        self.handle = handle
        self.addresses = [] if addresses is None else addresses
        self.endpoint = endpoint  # the Endpoint these addresses are for, when the writer knows it
        # when the handle was first written (seconds since the epoch), so that a check can give a CNI
        # ADD time to write its Endpoint; records from before this field have none and count as old
        self.created = created
        # the CNI attachment these addresses are for, "<host>/<container id>/<ifname>" (CNI writes it)
        self.attachment = attachment

    @classmethod
    def read(cls, doc: Any, errors: list[str]) -> Handle:
        r = _Reader(doc, "", errors)
        handle = r.get("handle", _handle)
        addresses = r.items("addresses", lambda v, where: HandleAddress.read(v, where, errors))
        if len(addresses) > MAX_HANDLE_ADDRESSES:
            r.fail("addresses", f"at most {MAX_HANDLE_ADDRESSES} addresses, not {len(addresses)}")
        rec = cls(handle=handle, addresses=addresses, endpoint=r.get("endpoint", _optional(_name), None),
                  created=r.get("created", _optional(_seconds), None),
                  attachment=r.get("attachment", _optional(_handle), None))
        r.done(cls.FIELDS)
        return rec

    def doc(self) -> dict[str, Any]:
        return {"handle": self.handle, "addresses": [a.doc() for a in self.addresses], "endpoint": self.endpoint,
                "created": self.created, "attachment": self.attachment}


class GcState(Plain):
    """What the leak collector saw last time: handles seen leaked and blocks seen empty, with
    when each was first seen, so that nothing is freed on a single sighting."""

    __slots__ = FIELDS = ("leaked_handles", "empty_blocks")

    def __init__(self, *, leaked_handles: dict[str, float] | None = None,
                 empty_blocks: dict[str, float] | None = None) -> None:
        self.leaked_handles = {} if leaked_handles is None else leaked_handles
        self.empty_blocks = {} if empty_blocks is None else empty_blocks

    @classmethod
    def read(cls, doc: Any, errors: list[str]) -> GcState:
        r = _Reader(doc, "", errors)
        out: list[dict[str, float]] = []
        for name, key_check in (("leaked_handles", _handle), ("empty_blocks", _cidr)):
            seen = r.items(name, lambda v, where: (v, where), dict)
            checked = {}
            for k, (v, where) in seen.items():
                try:
                    checked[key_check(k)] = _number(v)
                except ValueError as e:
                    errors.append(f"{where}: {e}")
            out.append(checked)
        r.done(cls.FIELDS)
        return cls(leaked_handles=out[0], empty_blocks=out[1])

    def doc(self) -> dict[str, Any]:
        return {"leaked_handles": self.leaked_handles, "empty_blocks": self.empty_blocks}


Record = Block | Affinity | Handle | GcState


def _expected_key(record: Record) -> str:
    if isinstance(record, Block):
        return ipam_block_key(record.cidr)
    if isinstance(record, Affinity):
        return ipam_affinity_key(record.host, record.cidr)
    if isinstance(record, Handle):
        return f"{IPAM_HANDLES_PREFIX}{quote(record.handle, safe='')}"
    return IPAM_GC_KEY


def _model_for(key: str) -> type[Record] | None:
    if key.startswith(IPAM_BLOCKS_PREFIX):
        return Block
    if key.startswith(IPAM_AFFINITIES_PREFIX):
        return Affinity
    if key.startswith(IPAM_HANDLES_PREFIX):
        return Handle
    return GcState if key == IPAM_GC_KEY else None


def decode_ipam(key: str, value: bytes) -> Any:
    """An IPAM record -> Block, Affinity, Handle or GcState by its key; InvalidResource naming
    the key and field otherwise, including a record that does not belong under its key."""
    model = _model_for(key)
    if model is None:
        raise InvalidResource(key, ["(key): not an IPAM key of tabby's layout"])
    doc = load_json(key, value)
    errors: list[str] = []
    record = model.read(doc, errors)
    if errors:
        raise InvalidResource(key, errors)
    expected = _expected_key(record)
    if expected != key:
        raise InvalidResource(key, [f"(key): this record belongs under {expected}"])
    return record


def encode_ipam(record: Record) -> bytes:
    """The record's bytes, after the decoder's own checks (ValueError naming the field if it
    would not decode): compact JSON, fields in their order."""
    doc = record.doc()
    errors: list[str] = []
    type(record).read(doc, errors)
    if errors:
        raise InvalidResource(f"(new {type(record).__name__})", errors)
    return json.dumps(doc, separators=(",", ":")).encode()
