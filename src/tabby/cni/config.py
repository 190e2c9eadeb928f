"""The CNI network configuration tabby accepts, validated with errors that name the field.

stdin is decoded by ``load_json`` first (size, nesting depth, UTF-8, no duplicate keys, no NaN,
no control characters in any string), then checked field by field here.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tabby.cni.inputs import MAX_STDIN_BYTES
from tabby.cni.shim import SUPPORTED_VERSIONS as _SHIM_VERSIONS
from tabby.model.codec import InvalidResource, load_json
from tabby.model.names import canonical_mac, check_name
from tabby.model.resources import Metadata
from tabby.store import ETCD_OPTIONS, with_etcd_options

# Every spec version whose result format tabby writes (result.py): 0.3.x and 0.4.0 ips carry
# "version", 1.0.0 drops it, 1.1.0 adds interface and route mtu (and the GC and STATUS verbs).
# The list lives in the shim, which answers VERSION without loading anything.
SUPPORTED_VERSIONS = _SHIM_VERSIONS
MAX_REQUESTED_IPS = 8


class RuntimeConfig(BaseModel):
    """The capability arguments a runtime injects for what the plugin's "capabilities" ask for."""

    model_config = ConfigDict(extra="allow")

    mac: str | None = None
    ips: Annotated[list[str], Field(max_length=MAX_REQUESTED_IPS)] = Field(default_factory=list)


class NetConf(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    cni_version: str = Field(alias="cniVersion")
    name: str
    type: str
    store: str | None = None  # sqlite:///..., etcd://... or etcds://...; default $TABBY_STORE
    # etcd's TLS files and user, folded into store's query by parse (or there already; or $TABBY_ETCD_*)
    etcd_ca: str | None = None
    etcd_cert: str | None = None
    etcd_key: str | None = None
    etcd_user: str | None = None
    etcd_password_file: str | None = None
    host: str | None = None  # the Host this node is; default $TABBY_HOST, else the hostname
    server_socket: str | None = None
    ipv6: bool = True
    ipv4: bool = True
    ipv6_pool: str | None = None
    ipv4_pool: str | None = None
    ipv6_gateway: Literal["link-local", "proxy-ndp"] = "link-local"
    mtu: Annotated[int, Field(ge=1280, le=65535)] | None = None  # both veth ends; IPv6 needs 1280
    profiles: list[str] = Field(default_factory=list)  # policy Profiles every container here gets
    labels: dict[str, str] = Field(default_factory=dict)  # labels for policy selectors
    capabilities: dict[str, bool] = Field(default_factory=dict)
    runtime_config: RuntimeConfig = Field(default_factory=RuntimeConfig, alias="runtimeConfig")
    args: dict[str, Any] = Field(default_factory=dict)
    prev_result: dict[str, Any] | None = Field(default=None, alias="prevResult")



class ConfError(ValueError):
    pass


class Request(BaseModel):
    """What parse() derived from the configuration: the runtime's requests, checked."""

    mac: str | None = None
    ips: tuple[ipaddress.IPv6Address | ipaddress.IPv4Address, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)


def load(raw: bytes) -> dict[str, Any]:
    """stdin -> a JSON object, or ConfError naming the field."""
    try:
        doc = load_json("stdin", raw, max_bytes=MAX_STDIN_BYTES)
    except InvalidResource as e:
        raise ConfError("; ".join(e.errors)) from None
    if not isinstance(doc, dict):
        raise ConfError("(document): the network configuration must be a JSON object")
    return doc


def parse(raw: bytes | dict[str, Any]) -> NetConf:
    doc = load(raw) if isinstance(raw, bytes) else raw
    try:
        conf = NetConf.model_validate(doc)
    except ValidationError as e:
        msgs = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfError("; ".join(msgs)) from None
    if conf.cni_version not in SUPPORTED_VERSIONS:
        raise ConfError(f"cniVersion: {conf.cni_version} not supported ({', '.join(SUPPORTED_VERSIONS)})")
    try:
        check_name(conf.name)
    except ValueError as e:
        raise ConfError(f"name: {e}") from None
    for i, profile in enumerate(conf.profiles):
        try:
            check_name(profile)
        except ValueError as e:
            raise ConfError(f"profiles.{i}: {e}") from None
    try:
        Metadata(name="x", labels=conf.labels)
    except ValidationError as e:
        raise ConfError("; ".join(f"labels: {err['msg']}" for err in e.errors())) from None
    if not conf.ipv6 and not conf.ipv4:
        raise ConfError("ipv6/ipv4: at least one family must be on")
    etcd = {k: getattr(conf, f"etcd_{k}") for k in ETCD_OPTIONS}
    if any(etcd.values()):
        if not conf.store:
            raise ConfError(f"store: {', '.join(f'etcd_{k}' for k, v in etcd.items() if v)} need the store URL too")
        try:
            conf.store = with_etcd_options(conf.store, **etcd)
        except ValueError as e:
            raise ConfError(f"store: {e}") from None
    return conf


def request(conf: NetConf) -> Request:
    """The capability arguments (runtimeConfig.mac, runtimeConfig.ips) and the older
    ``args.cni`` ones (ips, labels), checked; ConfError names the field."""
    mac = None
    if conf.runtime_config.mac is not None:
        try:
            mac = canonical_mac(conf.runtime_config.mac)
        except ValueError as e:
            raise ConfError(f"runtimeConfig.mac: {e}") from None
    cni_args = conf.args.get("cni", {}) if isinstance(conf.args, dict) else {}
    if not isinstance(cni_args, dict):
        raise ConfError("args.cni: must be an object")
    wanted: list[tuple[str, Any]] = [(f"runtimeConfig.ips.{i}", v) for i, v in enumerate(conf.runtime_config.ips)]
    raw_ips = cni_args.get("ips", [])
    if not isinstance(raw_ips, list) or len(raw_ips) > MAX_REQUESTED_IPS:
        raise ConfError(f"args.cni.ips: a list of at most {MAX_REQUESTED_IPS} addresses")
    wanted += [(f"args.cni.ips.{i}", v) for i, v in enumerate(raw_ips)]
    ips: list[ipaddress.IPv6Address | ipaddress.IPv4Address] = []
    for where, value in wanted:
        if not isinstance(value, str):
            raise ConfError(f"{where}: must be a string")
        try:
            ip = ipaddress.ip_interface(value).ip
        except ValueError:
            raise ConfError(f"{where}: {value!r} is not an IP address") from None
        if ip in ips:
            continue
        if (ip.version == 6 and not conf.ipv6) or (ip.version == 4 and not conf.ipv4):
            raise ConfError(f"{where}: IPv{ip.version} is off in this network")
        if any(other.version == ip.version for other in ips):
            raise ConfError(f"{where}: one address per family")
        ips.append(ip)
    labels: dict[str, str] = {}
    raw_labels = cni_args.get("labels", [])
    if not isinstance(raw_labels, list):
        raise ConfError("args.cni.labels: must be a list of {key, value}")
    for i, item in enumerate(raw_labels):
        if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not isinstance(item.get("value"),
                                                                                             str):
            raise ConfError(f"args.cni.labels.{i}: must be {{\"key\": string, \"value\": string}}")
        labels[item["key"]] = item["value"]
    if labels:
        try:
            Metadata(name="x", labels=labels)
        except ValidationError as e:
            raise ConfError("; ".join(f"args.cni.labels: {err['msg']}" for err in e.errors())) from None
    return Request(mac=mac, ips=tuple(ips), labels=labels)
