"""The policy table's replacement as nf_tables netlink messages: libnftables JSON commands (the
shapes ``nft_rules`` renders) -> the messages nft 1.0.6 itself sends for them. Pure, no I/O.

Why not hand the JSON to libnftables: at 10,000 endpoints x 1,000 rules (bench/policy.py) the
libnftables commit took 0.6-0.9 s, 0.4-0.5 s of it in userspace (parsing 4.3 MB of JSON,
evaluating 4,327 rules, building 70,000 elements), and the kernel's part of the same batch,
replayed from a capture, 0.22-0.31 s. Encoding it here takes ~0.1 s, so a cold start's
replace fell from ~0.8 s to ~0.4 s (numbers in docs/architecture.md).

Fidelity: the bytecode is nft's own, registers, anonymous sets, set userdata and the comment TLV
included, so ``nft list`` and the drift check read the table exactly as if libnftables had written
it (tests/test_nft_encode.py compares both ways in two namespaces). Scope: only what the renderer
produces. Any other shape raises ``Unsupported`` and the reconciler falls back to libnftables, so a
new rule shape is slower until taught here, never wrong.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from tabby.dataplane.nft_netlink import NLA_F_NESTED, NftError, nla

# nf_tables message types (linux/netfilter/nf_tables.h) and the flags nft sends with each
NEWTABLE, DELTABLE, NEWCHAIN, NEWRULE, NEWSET, NEWSETELEM = 0, 2, 3, 6, 9, 12
F_REQUEST, F_CREATE, F_APPEND = 0x1, 0x400, 0x800

# attributes
TABLE_NAME, TABLE_FLAGS = 1, 2
CHAIN_TABLE, CHAIN_NAME, CHAIN_HOOK, CHAIN_POLICY, CHAIN_TYPE = 1, 3, 4, 5, 7
HOOK_NUM, HOOK_PRIORITY = 1, 2
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS, RULE_USERDATA = 1, 2, 4, 7
SET_TABLE, SET_NAME, SET_FLAGS, SET_KEY_TYPE, SET_KEY_LEN, SET_DESC, SET_ID, SET_USERDATA = 1, 2, 3, 4, 5, 9, 10, 13
SET_DESC_SIZE = 1
ELEM_LIST_TABLE, ELEM_LIST_SET, ELEM_LIST_ELEMENTS, ELEM_LIST_SET_ID = 1, 2, 3, 4
LIST_ELEM, ELEM_KEY, ELEM_FLAGS, DATA_VALUE, DATA_VERDICT = 1, 1, 3, 1, 2
EXPR_NAME, EXPR_DATA = 1, 2
SET_ANONYMOUS, SET_CONSTANT, SET_INTERVAL = 0x1, 0x2, 0x4
ELEM_INTERVAL_END = 0x1
ELEMENTS_PER_MESSAGE = 800  # an attribute's length is 16 bits: keep each nest well under 64 KiB

_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_VERDICTS = {"drop": 0, "accept": 1, "return": -5}
NFT_JUMP = -3
NF_ACCEPT, NF_DROP = 1, 0

Message = tuple[int, int, bytes]  # (nf_tables message type, netlink flags, attributes)


class Unsupported(Exception):
    """A command or expression this encoder does not know: write through libnftables instead."""


def _str(kind: int, s: str) -> bytes:
    return nla(kind, s.encode() + b"\0")


def _u32(kind: int, v: int) -> bytes:
    return nla(kind, struct.pack("!I", v & 0xFFFFFFFF))


def _nest(kind: int, payload: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, payload)


def _data(kind: int, value: bytes) -> bytes:
    return _nest(kind, nla(DATA_VALUE, value))


def _expr(name: str, body: bytes) -> bytes:
    return _nest(LIST_ELEM, _str(EXPR_NAME, name) + _nest(EXPR_DATA, body))


def _udata(*tlvs: tuple[int, bytes]) -> bytes:
    """libnftnl's userdata: type byte, length byte, value."""
    return b"".join(bytes((t, len(v))) + v for t, v in tlvs)


# -- expressions ---------------------------------------------------------------------------

REG_VERDICT, REG_1, REG_2 = 0, 1, 2
META_KEYS = {"mark": 3, "iifname": 6, "oifname": 7, "iiftype": 8, "nfproto": 15, "l4proto": 16, "pkttype": 19}
CMP_OPS = {"==": 0, "!=": 1, "<": 2, "<=": 3, ">": 4, ">=": 5}
BASE_LL, BASE_NETWORK, BASE_TRANSPORT = 0, 1, 2


def _meta(key: str, dreg: int = REG_1) -> bytes:
    return _expr("meta", _u32(2, META_KEYS[key]) + _u32(1, dreg))


def _meta_set(key: str, sreg: int = REG_1) -> bytes:
    return _expr("meta", _u32(2, META_KEYS[key]) + _u32(3, sreg))


def _payload(base: int, offset: int, length: int, dreg: int = REG_1) -> bytes:
    return _expr("payload", _u32(1, dreg) + _u32(2, base) + _u32(3, offset) + _u32(4, length))


def _cmp(op: str, data: bytes, sreg: int = REG_1) -> bytes:
    return _expr("cmp", _u32(1, sreg) + _u32(2, CMP_OPS[op]) + _data(3, data))


def _bitwise(length: int, mask: bytes, xor: bytes, with_op: bool = True) -> bytes:
    """nft names the operation (NFT_BITWISE_BOOL) except for a flag test (ct state in ...)."""
    op = _u32(6, 0) if with_op else b""
    return _expr("bitwise", _u32(1, REG_1) + _u32(2, REG_1) + op + _u32(3, length) + _data(4, mask) + _data(5, xor))


def _lookup(set_name: str, set_id: int, invert: bool, sreg: int = REG_1) -> bytes:
    body = _u32(2, sreg) + _str(1, set_name) + _u32(4, set_id)
    return _expr("lookup", body + (_u32(5, 1) if invert else b""))


def _immediate(code: int, chain: str | None = None) -> bytes:
    verdict = _u32(1, code) + (_str(2, chain) if chain is not None else b"")
    return _expr("immediate", _u32(1, REG_VERDICT) + _nest(2, _nest(DATA_VERDICT, verdict)))


_COUNTER = _expr("counter", b"")
_MASQ = _expr("masq", b"")
_CT_STATE = _expr("ct", _u32(2, 0) + _u32(1, REG_1))  # NFT_CT_STATE
_CT_BITS = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}


class _Field:
    """One thing a match can load: how to load it, its size and how nft types it."""

    def __init__(self, load: Any, size: int, dtype: int, byteorder: int, typeof: bytes,
                 enc: Any, base: int | None = None, offset: int = 0, needs: str | None = None) -> None:
        self.load, self.size, self.dtype, self.byteorder, self.typeof = load, size, dtype, byteorder, typeof
        self.enc, self.base, self.offset, self.needs = enc, base, offset, needs


def _b1(v: Any) -> bytes:
    return bytes((int(v),))


def _port(v: Any) -> bytes:
    return struct.pack("!H", int(v))


def _ifname(v: Any) -> bytes:
    raw = str(v).encode()
    if len(raw) > 15:
        raise Unsupported(f"interface name {v!r} is longer than 15 bytes")
    return raw.ljust(16, b"\0")


def _nfproto(v: Any) -> bytes:
    try:
        return _b1({"ipv4": 2, "ipv6": 10}[v] if isinstance(v, str) else v)
    except KeyError:
        raise Unsupported(f"nfproto {v!r}") from None


def _typeof_meta(key: str) -> bytes:
    return _udata((0, struct.pack("=I", 9)), (1, _udata((0, struct.pack("=I", META_KEYS[key])))))


def _typeof_payload(desc: int, field: int) -> bytes:
    return _udata((0, struct.pack("=I", 7)), (1, _udata((0, struct.pack("=I", desc)), (1, struct.pack("=I", field)))))


def _meta_field(key: str, size: int, dtype: int, byteorder: int, enc: Any) -> _Field:
    return _Field(lambda reg, k=key: _meta(k, reg), size, dtype, byteorder, _typeof_meta(key), enc)


def _pl_field(base: int, offset: int, size: int, dtype: int, desc: int, field: int, enc: Any, needs: str) -> _Field:
    return _Field(lambda reg: _payload(base, offset, size, reg), size, dtype, 2, _typeof_payload(desc, field), enc,
                  base, offset, needs)


def _addr(family: int) -> Any:
    af = socket.AF_INET if family == 4 else socket.AF_INET6

    def enc(v: Any) -> bytes:
        try:
            return socket.inet_pton(af, v)
        except (OSError, TypeError):
            raise Unsupported(f"IPv{family} address {v!r}") from None
    return enc


# nft's datatype ids and proto descriptions (datatype.h, proto.h): they reach the set userdata
_IFNAME, _IPADDR, _IP6ADDR, _ETHER, _INET_PROTO, _INET_SERVICE, _ICMP_TYPE, _ICMP6_TYPE = 41, 7, 8, 9, 12, 13, 14, 29
_INTEGER = 4
_DESC_TH, _DESC_IP, _DESC_IP6, _DESC_ICMP, _DESC_ICMP6, _DESC_UDP, _DESC_TCP, _DESC_SCTP = 11, 12, 13, 4, 14, 6, 8, 10
_PORT_DESC = {"th": _DESC_TH, "udp": _DESC_UDP, "tcp": _DESC_TCP, "sctp": _DESC_SCTP}
_L4 = {"udp": 17, "tcp": 6, "sctp": 132, "icmp": 1, "icmpv6": 58}

FIELDS: dict[tuple[str, str], _Field] = {
    ("meta", "iifname"): _meta_field("iifname", 16, _IFNAME, 1, _ifname),
    ("meta", "oifname"): _meta_field("oifname", 16, _IFNAME, 1, _ifname),
    ("meta", "nfproto"): _meta_field("nfproto", 1, 2, 1, _nfproto),
    ("meta", "l4proto"): _meta_field("l4proto", 1, _INET_PROTO, 1, _b1),
    ("meta", "pkttype"): _meta_field("pkttype", 1, 31, 1, _b1),
    ("ip", "saddr"): _pl_field(BASE_NETWORK, 12, 4, _IPADDR, _DESC_IP, 11, _addr(4), "ipv4"),
    ("ip", "daddr"): _pl_field(BASE_NETWORK, 16, 4, _IPADDR, _DESC_IP, 12, _addr(4), "ipv4"),
    ("ip6", "saddr"): _pl_field(BASE_NETWORK, 8, 16, _IP6ADDR, _DESC_IP6, 8, _addr(6), "ipv6"),
    ("ip6", "daddr"): _pl_field(BASE_NETWORK, 24, 16, _IP6ADDR, _DESC_IP6, 9, _addr(6), "ipv6"),
    ("icmp", "type"): _pl_field(BASE_TRANSPORT, 0, 1, _ICMP_TYPE, _DESC_ICMP, 1, _b1, "icmp"),
    ("icmp", "code"): _pl_field(BASE_TRANSPORT, 1, 1, _INTEGER, _DESC_ICMP, 2, _b1, "icmp"),
    ("icmpv6", "type"): _pl_field(BASE_TRANSPORT, 0, 1, _ICMP6_TYPE, _DESC_ICMP6, 1, _b1, "icmpv6"),
    ("icmpv6", "code"): _pl_field(BASE_TRANSPORT, 1, 1, _INTEGER, _DESC_ICMP6, 2, _b1, "icmpv6"),
    **{(p, f): _pl_field(BASE_TRANSPORT, off, 2, _INET_SERVICE, _PORT_DESC[p], k, _port, p)
       for p in _PORT_DESC for f, off, k in (("sport", 0, 1), ("dport", 2, 2))},
    ("ether", "saddr"): _Field(lambda reg: _payload(BASE_LL, 6, 6, reg), 6, _ETHER, 2, b"", None, BASE_LL, 6, "ether"),
}

# a named set's type -> (key type id, key length, userdata), as nft writes them
_CONCAT_TYPEOF = _udata((0, struct.pack("=I", 0)), (3, _udata((0, struct.pack("=I", 13)), (1, b""))))
_SCALAR_TYPES = {"ifname": (_IFNAME, 16, 1), "ipv6_addr": (_IP6ADDR, 16, 2), "ipv4_addr": (_IPADDR, 4, 2),
                 "ether_addr": (_ETHER, 6, 2)}


def named_set_spec(typ: str | list[str]) -> tuple[int, int, bytes]:
    if isinstance(typ, str):
        dtype, size, order = _SCALAR_TYPES[typ]
        return dtype, size, _udata((0, struct.pack("=I", order)))
    dtype, size = 0, 0
    for t in typ:
        d, n, _ = _SCALAR_TYPES[t]
        dtype, size = (dtype << 6) | d, size + (n + 3) // 4 * 4
    return dtype, size, _CONCAT_TYPEOF


def _can_merge(prev: tuple[int, int, bytes], base: int, off: int, data: bytes) -> bool:
    """nft's payload_can_merge: adjacent, at most a register, and not two loads the kernel's fast
    path would take each (up to 4 bytes above the link layer) turned into one it would not."""
    pbase, poff, pdata = prev
    total = len(pdata) + len(data)
    if pbase != base or poff + len(pdata) != off or total > 16:
        return False
    return total <= 4 or base == BASE_LL or len(pdata) > 4 or len(data) > 4


class _Rule:
    """One rule being encoded: the protocol context nft's dependencies rest on, and the pending
    payload comparisons nft merges when they are adjacent."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.x = batch.encoded
        self.out: list[bytes] = []
        self.pending: list[tuple[int, int, bytes]] = []  # (base, offset, data) compared for equality
        self.nfproto: bytes | None = None
        self.l4proto: int | None = None

    def flush(self) -> None:
        merged: list[tuple[int, int, bytes]] = []
        for base, off, data in self.pending:
            if merged and _can_merge(merged[-1], base, off, data):
                merged[-1] = (base, merged[-1][1], merged[-1][2] + data)
            else:
                merged.append((base, off, data))
        for base, off, data in merged:
            self.out.append(self.x(_payload, base, off, len(data)))
            self.out.append(self.x(_cmp, "==", data))
        self.pending = []

    def emit(self, *exprs: bytes) -> None:
        self.flush()
        self.out.extend(exprs)

    def field(self, left: Any) -> _Field:
        if "meta" in left:
            key = ("meta", left["meta"]["key"])
        elif "payload" in left:
            key = (left["payload"]["protocol"], left["payload"]["field"])
        else:
            raise Unsupported(f"left side {left!r}")
        f = FIELDS.get(key)
        if f is None:
            raise Unsupported(f"left side {left!r}")
        self.check(f)
        return f

    def check(self, f: _Field) -> None:
        """nft adds a dependency when the context lacks one; the renderer always writes it first,
        and an encoding that silently lacked it would match other protocols' bytes."""
        if f.needs in ("ipv4", "ipv6"):
            if self.nfproto != _nfproto(f.needs):
                raise Unsupported(f"{f.needs} field without a preceding meta nfproto match")
        elif f.needs not in (None, "ether") and (
                self.l4proto is None or (f.needs in _L4 and self.l4proto != _L4[f.needs])):
            raise Unsupported(f"{f.needs} field without a matching meta l4proto")

    def match(self, op: str, left: Any, right: Any) -> None:
        """A match on a plain value (most of a table's) is encoded once per batch and context."""
        if type(right) in (str, int) and len(left) == 1:
            (kind, arg), = left.items()
            if kind == "meta" or kind == "payload":
                key = (op, kind, *arg.values(), right, self.nfproto, self.l4proto)
                hit = self.batch.matches.get(key)
                if hit is None:
                    scratch = _Rule(self.batch)
                    scratch.nfproto, scratch.l4proto = self.nfproto, self.l4proto
                    scratch.encode_match(op, left, right)
                    hit = self.batch.matches[key] = (scratch.out, scratch.pending, scratch.nfproto, scratch.l4proto)
                out, pending, self.nfproto, self.l4proto = hit
                if out:
                    self.emit(*out)
                self.pending.extend(pending)
                return None
        return self.encode_match(op, left, right)

    def encode_match(self, op: str, left: Any, right: Any) -> None:
        if "concat" in left:
            return self.concat(op, left["concat"], right)
        if "ct" in left:
            return self.ct(op, left["ct"], right)
        if "&" in left:
            return self.masked(op, left["&"], right)
        if isinstance(right, dict) and "set" in right and len(right["set"]) == 1:
            return self.match(op, left, right["set"][0])  # nft makes a one-element set a plain match
        f = self.field(left)
        if isinstance(right, str) and right.startswith("@"):
            self.emit(self.x(f.load, REG_1), self.x(_lookup, right[1:], self.batch.set_id(right[1:]), op == "!="))
        elif isinstance(right, dict) and "set" in right:
            name, sid = self.batch.anonymous_set(f, right["set"])
            self.emit(self.x(f.load, REG_1), self.x(_lookup, name, sid, op == "!="))
        elif isinstance(right, dict) and "prefix" in right:
            self.prefix(op, f, right["prefix"])
        elif isinstance(right, dict) and "range" in right:
            lo, hi = right["range"]
            if op != "==":
                raise Unsupported(f"range with {op}")
            self.emit(self.x(f.load, REG_1), self.x(_cmp, ">=", f.enc(lo)), self.x(_cmp, "<=", f.enc(hi)))
        elif f.needs is None and f.size == 16 and isinstance(right, str):  # an interface name
            if op not in ("==", "!=") or len(right.rstrip("*")) > 15:
                raise Unsupported(f"interface name match {right!r}")
            # "tby*": the prefix's bytes; "tabby64": the whole name, zero-padded to IFNAMSIZ (as nft does)
            name = right[:-1].encode() if right.endswith("*") else right.encode().ljust(16, b"\0")
            self.emit(self.x(f.load, REG_1), self.x(_cmp, op, name))
        elif isinstance(right, (int, str)) and not isinstance(right, bool):
            data = f.enc(right)
            if f.base is not None and op == "==":
                self.pending.append((f.base, f.offset, data))
            else:
                self.emit(self.x(f.load, REG_1), self.x(_cmp, op, data))
        else:
            raise Unsupported(f"right side {right!r}")
        if f is FIELDS[("meta", "nfproto")] and op == "==":
            self.nfproto = _nfproto(right)
        elif f is FIELDS[("meta", "l4proto")] and op == "==" and isinstance(right, int):
            self.l4proto = right
        return None

    def prefix(self, op: str, f: _Field, p: dict[str, Any]) -> None:
        if op not in ("==", "!=") or f.base != BASE_NETWORK:
            raise Unsupported(f"prefix with {op} on {f.dtype}")
        addr, plen = f.enc(p["addr"]), int(p["len"])
        if plen and plen % 8 == 0:  # byte-aligned: a shorter load (a /0 is masked whole, as nft does it)
            self.emit(self.x(_payload, f.base, f.offset, plen // 8), self.x(_cmp, op, addr[:plen // 8]))
        else:  # the whole field, masked
            mask = (((1 << plen) - 1) << (f.size * 8 - plen)).to_bytes(f.size, "big")
            value = bytes(a & m for a, m in zip(addr, mask, strict=True))
            self.emit(self.x(f.load, REG_1), self.x(_bitwise, f.size, mask, bytes(f.size), False),
                      self.x(_cmp, op, value))

    def concat(self, op: str, parts: list[Any], right: Any) -> None:
        fields = [self.field(p) for p in parts]
        if not (isinstance(right, str) and right.startswith("@")) or len(fields) != 2 or fields[0].size != 16:
            raise Unsupported(f"concatenation match {parts!r} {right!r}")
        if any(f.needs == "ether" for f in fields):
            # nft's dependency for a link-layer field: meta iiftype ether (ARPHRD_ETHER)
            self.emit(self.x(_meta, "iiftype"), self.x(_cmp, "==", struct.pack("=H", 1)))
        self.emit(self.x(fields[0].load, REG_1), self.x(fields[1].load, REG_2),
                  self.x(_lookup, right[1:], self.batch.set_id(right[1:]), op == "!="))

    def ct(self, op: str, ct: dict[str, Any], right: Any) -> None:
        if ct != {"key": "state"} or op != "in" or not isinstance(right, list):
            raise Unsupported(f"ct match {ct!r} {op} {right!r}")
        bits = 0
        for name in right:
            if name not in _CT_BITS:
                raise Unsupported(f"ct state {name!r}")
            bits |= _CT_BITS[name]
        self.emit(_CT_STATE, self.x(_bitwise, 4, struct.pack("=I", bits), bytes(4), False),
                  self.x(_cmp, "!=", bytes(4)))

    def masked(self, op: str, operands: list[Any], right: Any) -> None:
        left, mask = operands
        if left != {"meta": {"key": "mark"}} or not isinstance(mask, int) or not isinstance(right, int):
            raise Unsupported(f"masked match {operands!r}")
        self.emit(self.x(_meta, "mark"), self.x(_bitwise, 4, struct.pack("=I", mask), bytes(4)),
                  self.x(_cmp, op, struct.pack("=I", right)))

    def statement(self, st: dict[str, Any]) -> None:
        (kind, arg), = st.items()
        if kind == "match":
            self.match(arg["op"], arg["left"], arg["right"])
        elif kind == "counter" and arg is None:
            self.emit(_COUNTER)
        elif kind in _VERDICTS and arg is None:
            self.emit(self.x(_immediate, _VERDICTS[kind]))
        elif kind == "jump":
            self.emit(self.x(_immediate, NFT_JUMP, arg["target"]))
        elif kind == "masquerade" and arg is None:
            self.emit(_MASQ)
        elif kind == "mangle" and arg["key"] == {"meta": {"key": "mark"}}:
            self.mark(arg["value"])
        else:
            raise Unsupported(f"statement {st!r}")

    def mark(self, value: Any) -> None:
        (op, (left, bits)), = value.items()
        if left != {"meta": {"key": "mark"}} or not isinstance(bits, int) or op not in ("|", "&"):
            raise Unsupported(f"mark value {value!r}")
        if op == "|":
            mask, xor = ~bits & 0xFFFFFFFF, bits
        else:
            mask, xor = bits, 0
        self.emit(self.x(_meta, "mark"), self.x(_bitwise, 4, struct.pack("=I", mask), struct.pack("=I", xor)),
                  self.x(_meta_set, "mark"))


# -- anonymous sets ------------------------------------------------------------------------

def _interval(f: _Field, item: Any) -> tuple[int, int] | None:
    """An element as [low, high] integers, or None for a plain value."""
    if isinstance(item, dict) and "prefix" in item:
        addr = int.from_bytes(f.enc(item["prefix"]["addr"]), "big")
        host = f.size * 8 - int(item["prefix"]["len"])
        return addr >> host << host, addr | ((1 << host) - 1)
    if isinstance(item, dict) and "range" in item:
        lo, hi = item["range"]
        return int.from_bytes(f.enc(lo), "big"), int.from_bytes(f.enc(hi), "big")
    return None


def _interval_elements(f: _Field, items: list[Any]) -> tuple[list[bytes], int]:
    """nft's interval encoding: sorted, overlapping and adjacent intervals merged, an end marker
    at zero first, then each interval's start and (unless it reaches the top) end + 1; and the
    size nft declares, which counts the end element a top interval does without."""
    spans = []
    for item in items:
        iv = _interval(f, item)
        if iv is None:
            v = int.from_bytes(f.enc(item), "big")
            iv = (v, v)
        spans.append(iv)
    spans.sort()
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    top = (1 << (f.size * 8)) - 1
    keys: list[tuple[int, bool, bool]] = [] if merged[0][0] == 0 else [(0, True, False)]
    for lo, hi in merged:
        keys.append((lo, False, hi == top))
        if hi != top:
            keys.append((hi + 1, True, False))
    elems = [_elem(k.to_bytes(f.size, "big"), end, i, open_) for i, (k, end, open_) in enumerate(keys, 1)]
    return elems, len(elems) + (merged[-1][1] == top)


_OPEN_INTERVAL = nla(6, _udata((1, struct.pack("=I", 1))))  # NFTNL_SET_ELEM_F_INTERVAL_OPEN, in its userdata


def _elem(key: bytes, end: bool = False, nest_type: int = LIST_ELEM, open_: bool = False) -> bytes:
    """One element; libnftnl numbers the nests of a message 1, 2, 3 (the kernel ignores it). An
    interval that reaches the top has no end element, and its start says so in its userdata."""
    flags = _u32(ELEM_FLAGS, ELEM_INTERVAL_END) if end else b""
    return _nest(nest_type, flags + _data(ELEM_KEY, key) + (_OPEN_INTERVAL if open_ else b""))


NEST_BUDGET = 60_000  # bytes of elements in one message: an attribute's length is 16 bits (64 KiB)


def _chunks(elems: list[bytes]) -> Iterator[list[bytes]]:
    """Elements in runs whose nest stays under NEST_BUDGET (a single run for the usual small set)."""
    run: list[bytes] = []
    size = 0
    for e in elems:
        if run and size + len(e) > NEST_BUDGET:
            yield run
            run, size = [], 0
        run.append(e)
        size += len(e)
    if run:
        yield run


# -- the transaction -----------------------------------------------------------------------

class Batch:
    """The messages of one transaction, with the set ids nft would give them."""

    def __init__(self, table: str) -> None:
        self.msgs: list[Message] = []
        self.table = table
        self._t = _str(1, table)
        self._ids: dict[str, int] = {}
        self._memo: dict[tuple[Any, ...], bytes] = {}
        self._ifnames: dict[str, bytes] = {}
        self.matches: dict[tuple[Any, ...], tuple[list[bytes], list[tuple[int, int, bytes]], Any, Any]] = {}

    def encoded(self, fn: Any, *args: Any) -> bytes:
        """fn(*args), once per batch: a table repeats few distinct expressions thousands of times
        (0.27 -> 0.07 s of encoding at 10,000 endpoints). Per batch, so every replace encodes anew."""
        key = (fn, *args)
        got = self._memo.get(key)
        if got is None:
            got = self._memo[key] = fn(*args)
        return got

    def set_id(self, name: str) -> int:
        try:
            return self._ids[name]
        except KeyError:
            raise Unsupported(f"set {name} used before it is added") from None

    def _new_id(self) -> int:
        return len(self._ids) + 1

    def command(self, cmd: dict[str, Any]) -> None:
        (verb, obj), = cmd.items()
        (kind, spec), = obj.items()
        if spec.get("family", "inet") != "inet" or spec.get("table" if kind != "table" else "name") != self.table:
            raise Unsupported(f"command outside inet {self.table}: {cmd!r}")
        if kind == "table":
            if verb == "add":
                self.msgs.append((NEWTABLE, F_REQUEST, self._t + _u32(TABLE_FLAGS, 0)))
                return
            if verb == "delete":
                self.msgs.append((DELTABLE, F_REQUEST, self._t))
                return
        if verb != "add":
            raise Unsupported(f"command {cmd!r}")
        if kind == "set" and set(spec) <= {"family", "table", "name", "type"}:
            self.named_set(spec["name"], spec["type"])
        elif kind == "chain":
            self.chain(spec)
        elif kind == "rule":
            self.rule(spec)
        else:
            raise Unsupported(f"command {cmd!r}")

    def named_set(self, name: str, typ: str | list[str]) -> None:
        dtype, klen, udata = named_set_spec(typ)
        sid = self._new_id()
        self._ids[name] = sid
        self.msgs.append((NEWSET, F_REQUEST | F_CREATE, self._t + _str(SET_NAME, name) + _u32(SET_FLAGS, 0)
                          + _u32(SET_KEY_TYPE, dtype) + _u32(SET_KEY_LEN, klen) + _u32(SET_ID, sid)
                          + nla(SET_USERDATA, udata)))

    def anonymous_set(self, f: _Field, items: list[Any]) -> tuple[str, int]:
        interval = any(_interval(f, i) is not None for i in items)
        if interval:
            elems, size = _interval_elements(f, items)
        else:
            elems = [_elem(f.enc(v), False, i) for i, v in enumerate(items, 1)]
            size = len(elems)
        sid = self._new_id()
        name = "__set%d"
        self._ids[f"\0anon{sid}"] = sid
        flags = SET_ANONYMOUS | SET_CONSTANT | (SET_INTERVAL if interval else 0)
        udata = _udata((0, struct.pack("=I", f.byteorder)), *([(2, struct.pack("=I", 1))] if interval else []),
                       (3, f.typeof))
        self.msgs.append((NEWSET, F_REQUEST | F_CREATE, self._t + _str(SET_NAME, name) + _u32(SET_FLAGS, flags)
                          + _u32(SET_KEY_TYPE, f.dtype) + _u32(SET_KEY_LEN, f.size) + _u32(SET_ID, sid)
                          + _nest(SET_DESC, _u32(SET_DESC_SIZE, size)) + nla(SET_USERDATA, udata)))
        head = self._t + _str(ELEM_LIST_SET, name) + _u32(ELEM_LIST_SET_ID, sid)
        for chunk in _chunks(elems):  # a rule's big set (thousands of nets or ports) in several messages, as nft
            self.msgs.append((NEWSETELEM, F_REQUEST | F_CREATE, head + _nest(ELEM_LIST_ELEMENTS, b"".join(chunk))))
        return name, sid

    def chain(self, spec: dict[str, Any]) -> None:
        body = self._t + _str(CHAIN_NAME, spec["name"])
        if "hook" in spec:
            if spec.get("policy", "accept") not in ("accept", "drop") or spec["hook"] not in _HOOKS \
                    or not isinstance(spec.get("prio"), int):
                raise Unsupported(f"chain {spec!r}")
            policy = NF_ACCEPT if spec.get("policy", "accept") == "accept" else NF_DROP
            body += _str(CHAIN_TYPE, spec["type"]) + _u32(CHAIN_POLICY, policy) + _nest(
                CHAIN_HOOK, _u32(HOOK_NUM, _HOOKS[spec["hook"]]) + _u32(HOOK_PRIORITY, spec["prio"]))
        elif set(spec) - {"family", "table", "name"}:
            raise Unsupported(f"chain {spec!r}")
        self.msgs.append((NEWCHAIN, F_REQUEST | F_CREATE, body))

    def rule(self, spec: dict[str, Any]) -> None:
        r = _Rule(self)
        for st in spec["expr"]:
            r.statement(st)
        r.flush()
        comment = spec.get("comment")
        udata = b""
        if comment is not None:
            raw = comment.encode() + b"\0"
            if len(raw) > 128:
                raise Unsupported("comment longer than 127 bytes")
            udata = nla(RULE_USERDATA, _udata((0, raw)))
        self.msgs.append((NEWRULE, F_REQUEST | F_CREATE | F_APPEND, self._t + _str(RULE_CHAIN, spec["chain"])
                          + _nest(RULE_EXPRESSIONS, b"".join(r.out)) + udata))

    def elements(self, name: str, typ: str | list[str], elems: Iterable[tuple[str, ...]]) -> None:
        """Elements of a named set added in this batch."""
        sid = self.set_id(name)
        head = self._t + _str(ELEM_LIST_SET, name) + _u32(ELEM_LIST_SET_ID, sid)
        klen, enc = _ELEMENT_KEYS[typ if isinstance(typ, str) else tuple(typ)]
        keys = enc(self, elems)
        if not keys:
            return
        # every element has the same shape: its nests' headers are one constant prefix, so a
        # message's elements are that header joined with their keys
        header = struct.pack("=HHHHHH", 4 + 4 + 4 + klen, LIST_ELEM | NLA_F_NESTED, 4 + 4 + klen,
                             ELEM_KEY | NLA_F_NESTED, 4 + klen, DATA_VALUE)
        for i in range(0, len(keys), ELEMENTS_PER_MESSAGE):
            chunk = keys[i:i + ELEMENTS_PER_MESSAGE]
            nest = header + header.join(chunk)
            if len(nest) != len(chunk) * (len(header) + klen):  # an address that is no address, say
                raise Unsupported(f"an element of set {name} does not encode to {klen} bytes")
            self.msgs.append((NEWSETELEM, F_REQUEST | F_CREATE, head + _nest(ELEM_LIST_ELEMENTS, nest)))

    def ifname(self, n: str) -> bytes:
        """An interface name as a set key, once per batch (each name is in five sets or more)."""
        got = self._ifnames.get(n)
        if got is None:
            raw = n.encode()
            if len(raw) > 15:
                raise Unsupported(f"interface name {n!r} is longer than 15 bytes")
            got = self._ifnames[n] = raw.ljust(16, b"\0")
        return got


def _mac(v: str) -> bytes:
    raw = bytes.fromhex(v.replace(":", ""))
    if len(raw) != 6:
        raise Unsupported(f"MAC address {v!r}")
    return raw + b"\0\0"  # 4-byte aligned in a concatenation


_P6, _P4, _IN6, _IN4 = socket.inet_pton, socket.inet_pton, socket.AF_INET6, socket.AF_INET

# the named sets' element keys (70,000 of them at a cold start: key_bytes' generality cost
# 0.1 s): (key length, [batch, elements] -> each element's key)
_ELEMENT_KEYS: dict[Any, tuple[int, Any]] = {
    "ifname": (16, lambda b, es: [b.ifname(n) for n, in es]),
    "ipv6_addr": (16, lambda b, es: [_P6(_IN6, a) for a, in es]),
    "ipv4_addr": (4, lambda b, es: [_P4(_IN4, a) for a, in es]),
    ("ifname", "ipv6_addr"): (32, lambda b, es: [b.ifname(n) + _P6(_IN6, a) for n, a in es]),
    ("ifname", "ipv4_addr"): (20, lambda b, es: [b.ifname(n) + _P4(_IN4, a) for n, a in es]),
    ("ifname", "ether_addr"): (24, lambda b, es: [b.ifname(n) + _mac(m) for n, m in es]),
}


def replace_messages(table: str, cmds: list[dict[str, Any]], set_types: dict[str, str | list[str]],
                     elements: Mapping[str, AbstractSet[tuple[str, ...]]]) -> list[Message]:
    """The whole replacement: whatever table is there deleted (added first, so the delete cannot
    fail), the new one added with its sets, chains, rules and elements. Raises Unsupported."""
    b = Batch(table)
    try:
        b.command({"add": {"table": {"family": "inet", "name": table}}})
        b.command({"delete": {"table": {"family": "inet", "name": table}}})
        for c in cmds:
            b.command(c)
        for name, elems in elements.items():
            if elems:
                b.elements(name, set_types[name], elems)
    except (KeyError, ValueError, TypeError, AttributeError, OSError, NftError, struct.error,
            OverflowError) as e:  # a shape we misread, or a value too big for its field
        raise Unsupported(f"{type(e).__name__}: {e}") from e
    return b.msgs
