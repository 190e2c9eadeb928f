"""Endpoint records in tabby's own bytes -> the full model, without pydantic validating them.

Why: a cold agent decodes every Endpoint of the fabric before it may program anything, and the
full decoder costs ~77 us a record here (best of 5, a typical record: strict JSON, pydantic, and
``ipaddress`` parsing text); this path ~31 us (orjson, the checks, ``ipaddress`` objects from ints;
59 us with the json module, measured 2026-12-03).

How it stays the model (a fast path over a strict subset, like ``light``, not a second
definition): a record is taken only when its bytes are exactly what ``codec.encode`` writes for the
values read (compact JSON, every field, in the model's order: so no whitespace, escape, key order,
duplicate key or lax type can differ) and every constraint the model checks holds; the values are
then put into the model's own classes as ``model_construct`` does. Anything else, including every
corrupt record, gives None, and the full decoder decides and words the error. So a record decodes
to the same value either way; tests/test_canonical.py holds the two equal over generated and
mutated records. Allowed sources take the full path (OpenStack's ports: few, and their rules are
the model's).
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Any

import orjson

from tabby.model.jsontext import MAX_RECORD_BYTES
from tabby.model.keys import endpoint_key, kind_prefix
from tabby.model.names import (
    canonical_mac,
    check_label_key,
    check_label_value,
    check_name,
    check_workload_interface,
)
from tabby.model.resources import _WORKLOAD_ID, MAX_ADDRESSES_PER_FAMILY, Endpoint, EndpointSpec, Metadata

_SPEC_KEYS = ["host", "orchestrator", "workload_id", "interface", "mac", "ipv6_addresses", "ipv4_addresses",
              "ipv6_gateway", "ipv4_gateway", "profiles", "allowed_sources", "port_security"]
# fullmatch, not the pattern's own ^...$: Python's $ also matches before a final newline, pydantic's not
_WORKLOAD_ID_RE = re.compile(_WORKLOAD_ID.removeprefix("^").removesuffix("$"))
_V4_REFUSED = frozenset((127, *range(224, 240)))  # first octets: loopback (127/8), multicast (224/4)
_ENDPOINTS = kind_prefix("Endpoint")
_V6_LOOPBACK = bytes(15) + b"\x01"


class _Slow(Exception):
    """Not in the canonical form: the full model decides."""


def _text(v: Any) -> str:
    if type(v) is not str:
        raise _Slow
    return v


def _packed(text: str, family: int) -> bytes:
    """An address in the kernel's canonical text (which is ipaddress's too, IPv4-mapped ones aside:
    those, with a dot, take the full path) -> its bytes."""
    try:
        packed = inet_pton(family, text)
    except OSError:
        raise _Slow from None
    if (family == AF_INET6 and "." in text) or inet_ntop(family, packed) != text:
        raise _Slow
    return packed


def _v6_host(v: Any) -> IPv6Interface:
    text = _text(v)
    if not text.endswith("/128"):
        raise _Slow
    p = _packed(text[:-4], AF_INET6)
    # the model refuses unspecified, multicast (ff00::/8), loopback and link-local (fe80::/10)
    if p == bytes(16) or p[0] == 0xFF or p == _V6_LOOPBACK or (p[0] == 0xFE and p[1] & 0xC0 == 0x80):
        raise _Slow
    return IPv6Interface(int.from_bytes(p, "big"))


def _v4_host(v: Any) -> IPv4Interface:
    text = _text(v)
    if not text.endswith("/32"):
        raise _Slow
    p = _packed(text[:-3], AF_INET)
    # the model refuses unspecified, loopback, multicast and link-local (169.254/16)
    if p == bytes(4) or p[0] in _V4_REFUSED or p[:2] == b"\xa9\xfe":
        raise _Slow
    return IPv4Interface(int.from_bytes(p, "big"))


def _hosts(v: Any, parse: Any) -> tuple[Any, ...]:
    if type(v) is not list:
        raise _Slow
    if len(v) == 1:  # the usual workload: no duplicate to look for
        return (parse(v[0]),)
    if len(v) > MAX_ADDRESSES_PER_FAMILY or len(set(map(_text, v))) != len(v):
        raise _Slow
    return tuple(parse(a) for a in v)


def _checked(fn: Any, v: Any) -> str:
    try:
        fn(_text(v))
    except ValueError:
        raise _Slow from None
    return v  # type: ignore[no-any-return]


def _mac(v: str) -> str:
    try:
        return canonical_mac(v)
    except ValueError:
        raise _Slow from None


def _endpoint(key: str, doc: Any) -> Endpoint:
    if type(doc) is not dict or list(doc) != ["kind", "metadata", "spec"] or doc["kind"] != "Endpoint":
        raise _Slow
    meta, spec = doc["metadata"], doc["spec"]
    if type(meta) is not dict or list(meta) != ["name", "labels"] or type(spec) is not dict or list(spec) != _SPEC_KEYS:
        raise _Slow
    name, labels = _checked(check_name, meta["name"]), meta["labels"]
    if key != endpoint_key(str(spec["host"]), name) or type(labels) is not dict or list(labels) != sorted(labels):
        raise _Slow
    for k, lv in labels.items():
        _checked(check_label_key, k)
        _checked(check_label_value, lv)
    s = spec
    v6, v4 = _hosts(s["ipv6_addresses"], _v6_host), _hosts(s["ipv4_addresses"], _v4_host)
    gw6, gw4, profiles, mac = s["ipv6_gateway"], s["ipv4_gateway"], s["profiles"], _text(s["mac"])
    if not (v6 or v4) or s["orchestrator"] not in ("vm", "container") or s["allowed_sources"] != [] \
            or type(s["port_security"]) is not bool or type(profiles) is not list \
            or not _WORKLOAD_ID_RE.fullmatch(_text(s["workload_id"])) or _mac(mac) != mac:
        raise _Slow
    return _built(Endpoint, {"kind": "Endpoint", "metadata": _built(Metadata, {"name": name, "labels": labels}),
                             "spec": _built(EndpointSpec, {
        "host": _checked(check_name, s["host"]), "orchestrator": s["orchestrator"], "workload_id": s["workload_id"],
        "interface": _checked(check_workload_interface, s["interface"]), "mac": mac, "ipv6_addresses": v6,
        "ipv4_addresses": v4,
        "ipv6_gateway": None if gw6 is None else IPv6Address(int.from_bytes(_packed(_text(gw6), AF_INET6), "big")),
        "ipv4_gateway": None if gw4 is None else IPv4Address(int.from_bytes(_packed(_text(gw4), AF_INET), "big")),
        "profiles": tuple(_checked(check_name, p) for p in profiles), "allowed_sources": (),
        "port_security": s["port_security"]})})


_set = object.__setattr__


def _built(cls: Any, fields: dict[str, Any]) -> Any:
    """``cls.model_construct(**fields)`` for a model given every field, without its loop over the
    fields' defaults and aliases (a third of this path's cost): the same four attributes it sets."""
    m = object.__new__(cls)
    _set(m, "__dict__", fields)
    _set(m, "__pydantic_fields_set__", set(fields))
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


def endpoint(key: str, value: bytes) -> Endpoint | None:
    """The Endpoint under ``key`` if ``value`` is in the canonical form, else None (never raises:
    the full decoder then decides, and words what is wrong)."""
    if len(value) > MAX_RECORD_BYTES or not key.startswith(_ENDPOINTS):
        return None
    try:
        # orjson: 2.2 + 0.6 us a record against the json module's 5.0 + 6.6 (measured here). Its
        # compact output is codec.encode's for every value this path takes: each string the checks
        # let through is plain ASCII, so no escape or non-ASCII text can be written two ways; and
        # what it refuses that json takes (NaN, a lone surrogate, a huge integer) goes to the full
        # decoder like every other surprise.
        doc = orjson.loads(value)
        ep = _endpoint(key, doc)
        if orjson.dumps(doc) != value:
            return None
    except Exception:  # not canonical (_Slow), not JSON, or any surprise: the full decoder decides
        return None
    return ep
