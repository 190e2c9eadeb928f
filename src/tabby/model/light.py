"""IPPool, Config and Endpoint records read and written without pydantic, for the CNI plugin.

Why: a plugin process is started per CNI call, and importing pydantic and the resource models
costs ~250 ms here, against ~30 ms for the whole ADD. IPAM reads pools and Config on every ADD
and the plugin writes and reads one Endpoint, so those three go through this module.

How agreement with the full models (``codec``, ``resources``) is kept: this is a fast path over
a strict subset, not a second definition. It accepts a record only in the exact form tabby's
own encoder writes (JSON types as written, addresses and networks in canonical text, every
constraint of the model checked); anything else — a hand-written record, a lax type, a value the
model refuses — goes to the full model (imported then), which decides and words the error. So a
record is accepted exactly when the model accepts it, with the same values; tests/test_light.py
checks that over generated and hostile documents, and that whatever the model writes takes the
fast path here.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from tabby.model.jsontext import InvalidResource, load_json
from tabby.model.keys import endpoint_host, parse_key
from tabby.model.names import (
    canonical_mac,
    check_interface_name,
    check_label_key,
    check_label_value,
    check_name,
    check_pool_network,
    check_workload_interface,
)
from tabby.model.plain import Plain

# the model's bounds (resources.py), repeated because importing it is what this module avoids
V6_BLOCK_DEFAULT, V6_BLOCK_MIN = 122, 116
V4_BLOCK_DEFAULT, V4_BLOCK_MIN = 26, 20
MAX_ADDRESSES_PER_FAMILY = 64
MAX_ASN = 4_294_967_295
LOG_LEVELS = ("debug", "info", "warning", "error")


class _Slow(Exception):
    """Not in the fast path's form: the full model decides."""


class Meta(Plain):
    __slots__ = ("labels", "name")

    def __init__(self, name: str, labels: dict[str, str]) -> None:
        self.name, self.labels = name, labels


class PoolSpec(Plain):
    __slots__ = ("block_size", "cidr", "disabled", "nat64", "nat_outgoing")

    def __init__(self, cidr: ipaddress.IPv6Network | ipaddress.IPv4Network, block_size: int, nat_outgoing: bool,
                 disabled: bool, nat64: bool = False) -> None:
        self.cidr, self.block_size, self.nat_outgoing, self.disabled = cidr, block_size, nat_outgoing, disabled
        self.nat64 = nat64


class Pool(Plain):
    __slots__ = ("metadata", "spec")
    kind = "IPPool"

    def __init__(self, metadata: Meta, spec: PoolSpec) -> None:
        self.metadata, self.spec = metadata, spec


class ConfSpec(Plain):
    __slots__ = (
        "default_asn",
        "dns64_server",
        "log_level",
        "metrics_port",
        "node_to_node_mesh",
        "resync_interval_s",
        "strict_affinity",
        "workload_interface_prefixes",
    )

    def __init__(self, log_level: str | None, resync_interval_s: float | None, metrics_port: int | None,
                 node_to_node_mesh: bool | None, strict_affinity: bool | None, default_asn: int | None,
                 workload_interface_prefixes: tuple[str, ...] | None) -> None:
        self.log_level, self.resync_interval_s, self.metrics_port = log_level, resync_interval_s, metrics_port
        self.node_to_node_mesh, self.strict_affinity, self.default_asn = node_to_node_mesh, strict_affinity, default_asn
        self.workload_interface_prefixes = workload_interface_prefixes
        self.dns64_server = None  # the fast path takes the NAT64 fields only unset (_CONF_MODEL_ONLY)


class Conf(Plain):
    __slots__ = ("metadata", "spec")
    kind = "Config"

    def __init__(self, metadata: Meta, spec: ConfSpec) -> None:
        self.metadata, self.spec = metadata, spec


class EndpointSpec(Plain):
    __slots__ = (
        "host",
        "interface",
        "ipv4_addresses",
        "ipv4_gateway",
        "ipv6_addresses",
        "ipv6_gateway",
        "mac",
        "orchestrator",
        "profiles",
        "workload_id",
    )

    def __init__(self, host: str, orchestrator: str, workload_id: str, interface: str, mac: str,
                 ipv6_addresses: tuple[ipaddress.IPv6Interface, ...],
                 ipv4_addresses: tuple[ipaddress.IPv4Interface, ...],
                 ipv6_gateway: ipaddress.IPv6Address | None, ipv4_gateway: ipaddress.IPv4Address | None,
                 profiles: tuple[str, ...]) -> None:
        self.host, self.orchestrator, self.workload_id, self.interface = host, orchestrator, workload_id, interface
        self.mac, self.ipv6_addresses, self.ipv4_addresses = mac, ipv6_addresses, ipv4_addresses
        self.ipv6_gateway, self.ipv4_gateway, self.profiles = ipv6_gateway, ipv4_gateway, profiles


class Endpoint(Plain):
    __slots__ = ("metadata", "spec")
    kind = "Endpoint"

    def __init__(self, metadata: Meta, spec: EndpointSpec) -> None:
        self.metadata, self.spec = metadata, spec


# -- strict readers of one value: the value, or _Slow --------------------------------------------

def _fields(doc: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(doc, dict) or any(k not in allowed for k in doc) or any(k not in doc for k in required):
        raise _Slow
    return doc


def _check(fn: Any, v: Any) -> Any:
    if not isinstance(v, str):
        raise _Slow
    try:
        return fn(v)
    except ValueError:
        raise _Slow from None


def _bool(v: Any, optional: bool = False) -> bool | None:
    if type(v) is bool or (optional and v is None):
        return v
    raise _Slow


def _int(v: Any, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Slow
    return v


def _text_form(v: Any, parse: Any) -> Any:
    """An address or network written as tabby writes it (canonical, no %zone); parsed."""
    if not isinstance(v, str) or "%" in v:
        raise _Slow
    try:
        obj = parse(v)
    except ValueError:
        raise _Slow from None
    if str(obj) != v:
        raise _Slow
    return obj


def _meta(doc: Any) -> Meta:
    d = _fields(doc, ("name", "labels"), ("name",))
    labels = d.get("labels", {})
    if not isinstance(labels, dict):
        raise _Slow
    for k, v in labels.items():
        _check(check_label_key, k)
        _check(check_label_value, v)
    return Meta(_check(check_name, d["name"]), dict(sorted(labels.items())))


def _resource(key: str, value: bytes, kind: str) -> tuple[dict[str, Any], Meta]:
    """(spec, metadata) of a record under its key, or _Slow; InvalidResource for bytes that are
    no JSON (which the full decoder would refuse with the same words: it reads them the same way)."""
    if parse_key(key) is None or parse_key(key)[0] != kind:  # type: ignore[index]
        raise _Slow  # the full decoder words what is wrong with the key
    doc = _fields(load_json(key, value), ("kind", "metadata", "spec"), ("kind", "metadata", "spec"))
    if doc["kind"] != kind:
        raise _Slow
    meta = _meta(doc["metadata"])
    if parse_key(key) != (kind, meta.name):
        raise _Slow
    return doc["spec"], meta


def _pool(key: str, spec: Any, meta: Meta) -> Pool:
    d = _fields(spec, ("cidr", "block_size", "nat_outgoing", "disabled", "ipv6_mode", "dns_servers", "nat64"),
                ("cidr",))
    # SLAAC modes and DNS servers (OpenStack's pools, which CNI never allocates from) are the model's
    if d.get("ipv6_mode", "dhcpv6-stateful") != "dhcpv6-stateful" or d.get("dns_servers", []) != []:
        raise _Slow
    cidr = _text_form(d["cidr"], lambda s: ipaddress.ip_network(s, strict=True))
    try:
        check_pool_network(cidr)
    except ValueError:
        raise _Slow from None  # the model words it
    v6 = cidr.version == 6
    lo, default, hi = (V6_BLOCK_MIN, V6_BLOCK_DEFAULT, 128) if v6 else (V4_BLOCK_MIN, V4_BLOCK_DEFAULT, 32)
    bs = d.get("block_size")
    bs = max(default, cidr.prefixlen) if bs is None else _int(bs, max(lo, cidr.prefixlen), hi)
    nat, disabled = _bool(d.get("nat_outgoing", False)), _bool(d.get("disabled", False))
    nat64 = _bool(d.get("nat64", False))
    if nat64 and not v6:
        raise _Slow
    return Pool(meta, PoolSpec(cidr, bs, bool(nat), bool(disabled), bool(nat64)))


def _interface_prefix(v: str) -> str:
    check_interface_name(v)
    if len(v) > 12:
        raise ValueError(v)
    return v


# Config's BGP and NAT64 fields: tabby's encoder writes them null when unset; set, the full model
# decides (it knows their rules: passwords, secret names, paths, NAT64 prefixes and pools). The CNI
# plugin reads dns64_server, so on a NAT64 fabric its Config reads take the model's path (the warm
# CNI server has it imported already)
_CONF_MODEL_ONLY = ("mesh_bfd", "mesh_password_file", "mesh_password_secret", "bgp_secrets", "nat64_prefix",
                    "nat64_pool4", "dns64_server", "dns64_upstreams")


def _conf(key: str, spec: Any, meta: Meta) -> Conf:
    if meta.name != "global" and not meta.name.startswith("host."):
        raise _Slow
    d = _fields(spec, (*ConfSpec.__slots__, *_CONF_MODEL_ONLY))  # (dns64_server is in both)
    if any(d.get(k) is not None for k in _CONF_MODEL_ONLY):
        raise _Slow
    level = d.get("log_level")
    if level is not None and (not isinstance(level, str) or level not in LOG_LEVELS):
        raise _Slow
    resync = d.get("resync_interval_s")
    if resync is not None:
        if type(resync) not in (int, float) or not 0 < resync <= 86400:
            raise _Slow
        resync = float(resync)
    port, asn = d.get("metrics_port"), d.get("default_asn")
    prefixes = d.get("workload_interface_prefixes")
    if prefixes is not None:
        if not isinstance(prefixes, list) or not 1 <= len(prefixes) <= 16:
            raise _Slow
        prefixes = tuple(_check(_interface_prefix, p) for p in prefixes)
    return Conf(meta, ConfSpec(
        log_level=level, resync_interval_s=resync,
        metrics_port=None if port is None else _int(port, 0, 65535),
        node_to_node_mesh=_bool(d.get("node_to_node_mesh"), optional=True),
        strict_affinity=_bool(d.get("strict_affinity"), optional=True),
        default_asn=None if asn is None else _int(asn, 1, MAX_ASN),
        workload_interface_prefixes=prefixes))


_WORKLOAD_ID_MAX = 253


def _workload_id(v: str) -> str:
    if not 0 < len(v) <= _WORKLOAD_ID_MAX or not all("!" <= c <= "~" for c in v):
        raise ValueError(v)
    return v


def _host_addresses(v: Any, parse: Any, bits: int) -> tuple[Any, ...]:
    if not isinstance(v, list) or len(v) > MAX_ADDRESSES_PER_FAMILY:
        raise _Slow
    out = tuple(_text_form(a, parse) for a in v)
    for a in out:
        ip = a.ip
        if a.network.prefixlen != bits or ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local:
            raise _Slow
    if len(set(out)) != len(out):
        raise _Slow
    return out


def _endpoint(key: str | None, spec: Any, meta: Meta) -> Endpoint:
    """key: the record's Store key, which must be under its host (None: a document, no key yet)."""
    d = _fields(spec, (*EndpointSpec.__slots__, "allowed_sources", "port_security"),
                ("host", "orchestrator", "workload_id", "interface", "mac"))
    # allowed sources and port security off (OpenStack's ports, never CNI's) are the model's
    if d.get("allowed_sources", []) != [] or d.get("port_security", True) is not True:
        raise _Slow
    if d["orchestrator"] not in ("vm", "container") or not isinstance(d["orchestrator"], str):
        raise _Slow
    v6 = _host_addresses(d.get("ipv6_addresses", []), ipaddress.IPv6Interface, 128)
    v4 = _host_addresses(d.get("ipv4_addresses", []), ipaddress.IPv4Interface, 32)
    if not v6 and not v4:
        raise _Slow
    gw6, gw4 = d.get("ipv6_gateway"), d.get("ipv4_gateway")
    profiles = d.get("profiles", [])
    if not isinstance(profiles, list):
        raise _Slow
    mac = _check(canonical_mac, d["mac"])
    if mac != d["mac"]:
        raise _Slow
    host = _check(check_name, d["host"])
    if key is not None and endpoint_host(key) != host:
        raise _Slow  # the full decoder names the mismatch
    return Endpoint(meta, EndpointSpec(
        host=host, orchestrator=d["orchestrator"],
        workload_id=_check(_workload_id, d["workload_id"]), interface=_check(check_workload_interface, d["interface"]),
        mac=mac, ipv6_addresses=v6, ipv4_addresses=v4,
        ipv6_gateway=None if gw6 is None else _text_form(gw6, ipaddress.IPv6Address),
        ipv4_gateway=None if gw4 is None else _text_form(gw4, ipaddress.IPv4Address),
        profiles=tuple(_check(check_name, p) for p in profiles)))


_READERS = {"IPPool": _pool, "Config": _conf, "Endpoint": _endpoint}


def fast(key: str, value: bytes, kind: str) -> Pool | Conf | Endpoint | None:
    """The fast path alone: the light record if it is in tabby's own form, else None (the full
    model decides); InvalidResource for bytes that are no JSON of an object."""
    try:
        return _READERS[kind](key, *_resource(key, value, kind))  # type: ignore[no-any-return]
    except _Slow:
        return None


def read(key: str, value: bytes, kind: str) -> Any:
    """The record under key, of the given kind: a light object when it is in tabby's own form,
    else whatever the full decoder makes of it (a resource model, or InvalidResource naming the
    key and field). A record of another kind than asked for is InvalidResource too."""
    got = fast(key, value, kind)
    if got is not None:
        return got
    from tabby.model.codec import decode

    resource = decode(key, value)
    if resource.kind != kind:
        raise InvalidResource(key, [f"kind: {resource.kind}, not {kind}"])
    return resource


def endpoint_record(doc: dict[str, Any]) -> bytes:
    """An Endpoint document -> the bytes ``encode(validate(doc))`` gives; ValueError (from the
    full model, naming the field) if the model refuses it."""
    try:
        meta = _meta(doc.get("metadata"))
        if doc.get("kind") != "Endpoint" or set(doc) != {"kind", "metadata", "spec"}:
            raise _Slow
        ep = _endpoint(None, doc["spec"], meta)
    except _Slow:
        from tabby.model.codec import encode, validate

        return encode(validate(doc))
    s = ep.spec
    out = {"kind": "Endpoint", "metadata": {"name": meta.name, "labels": meta.labels},
           "spec": {"host": s.host, "orchestrator": s.orchestrator, "workload_id": s.workload_id,
                    "interface": s.interface, "mac": s.mac, "ipv6_addresses": [str(a) for a in s.ipv6_addresses],
                    "ipv4_addresses": [str(a) for a in s.ipv4_addresses],
                    "ipv6_gateway": None if s.ipv6_gateway is None else str(s.ipv6_gateway),
                    "ipv4_gateway": None if s.ipv4_gateway is None else str(s.ipv4_gateway),
                    "profiles": list(s.profiles), "allowed_sources": [], "port_security": True}}  # the fast path's
    return json.dumps(out, separators=(",", ":")).encode()
