"""The CNI network configuration tabby accepts, validated with errors that name the field.

stdin is decoded by ``load_json`` first (size, nesting depth, UTF-8, no duplicate keys, no NaN,
no control characters in any string), then checked field by field here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from tabby.cni.inputs import MAX_STDIN_BYTES
from tabby.cni.shim import SUPPORTED_VERSIONS as _SHIM_VERSIONS
from tabby.cni.shim import plain_socket_path
from tabby.model.jsontext import InvalidResource, load_json
from tabby.model.names import canonical_mac, check_label_key, check_label_value, check_name
from tabby.model.plain import Plain
from tabby.store import ETCD_OPTIONS, with_etcd_options

# Every spec version whose result format tabby writes (result.py): 0.3.x and 0.4.0 ips carry
# "version", 1.0.0 drops it, 1.1.0 adds interface and route mtu (and the GC and STATUS verbs).
# The list lives in the shim, which answers VERSION without loading anything.
SUPPORTED_VERSIONS = _SHIM_VERSIONS
MAX_REQUESTED_IPS = 8
IPV6_GATEWAYS = ("link-local", "proxy-ndp")


class ConfError(ValueError):
    pass


class RuntimeConfig(Plain):
    """The capability arguments a runtime injects for what the plugin's "capabilities" ask for
    (other keys are the runtime's and are ignored)."""

    __slots__ = ("ips", "mac")

    def __init__(self, mac: str | None = None, ips: list[str] | None = None) -> None:
        self.mac = mac
        self.ips = [] if ips is None else ips


class NetConf(Plain):
    """The network configuration. Why plain Python, not a pydantic model: the plugin process is
    started per call, and pydantic's import alone costs several times a whole ADD. Types are
    JSON's, strictly (as Go's encoding/json reads them for the reference plugins): "mtu": "1500"
    or "ipv6": "true" are refused, naming the field. Keys tabby does not know are kept by the
    runtime's document (``gc`` reads its own from there), not here."""

    __slots__ = ("args", "capabilities", "cni_version", "etcd_ca", "etcd_cert", "etcd_key", "etcd_password_file",
                 "etcd_user", "host", "ipv4", "ipv4_pool", "ipv6", "ipv6_gateway", "ipv6_pool", "labels", "mtu",
                 "name", "prev_result", "profiles", "runtime_config", "server_socket", "store", "type")

    def __init__(self, cni_version: str, name: str, type: str, *, store: str | None = None, host: str | None = None,
                 server_socket: str | None = None, ipv6: bool = True, ipv4: bool = True, ipv6_pool: str | None = None,
                 ipv4_pool: str | None = None, ipv6_gateway: str = "link-local", mtu: int | None = None,
                 profiles: list[str] | None = None, labels: dict[str, str] | None = None,
                 capabilities: dict[str, bool] | None = None, runtime_config: RuntimeConfig | None = None,
                 args: dict[str, Any] | None = None, prev_result: dict[str, Any] | None = None,
                 etcd_ca: str | None = None, etcd_cert: str | None = None, etcd_key: str | None = None,
                 etcd_user: str | None = None, etcd_password_file: str | None = None) -> None:
        self.cni_version, self.name, self.type = cni_version, name, type
        self.store = store  # sqlite:///..., etcd://... or etcds://...; default $TABBY_STORE
        # etcd's TLS files and user, folded into store's query by parse (or there already; or $TABBY_ETCD_*)
        self.etcd_ca, self.etcd_cert, self.etcd_key = etcd_ca, etcd_cert, etcd_key
        self.etcd_user, self.etcd_password_file = etcd_user, etcd_password_file
        self.host = host  # the Host this node is; default $TABBY_HOST, else the hostname
        self.server_socket = server_socket
        self.ipv6, self.ipv4, self.ipv6_pool, self.ipv4_pool = ipv6, ipv4, ipv6_pool, ipv4_pool
        self.ipv6_gateway = ipv6_gateway  # one of IPV6_GATEWAYS
        self.mtu = mtu  # both veth ends; IPv6 needs 1280
        self.profiles = [] if profiles is None else profiles  # policy Profiles every container here gets
        self.labels = {} if labels is None else labels  # labels for policy selectors
        self.capabilities = {} if capabilities is None else capabilities
        self.runtime_config = RuntimeConfig() if runtime_config is None else runtime_config
        self.args = {} if args is None else args
        self.prev_result = prev_result


class Request(Plain):
    """What parse() derived from the configuration: the runtime's requests, checked."""

    __slots__ = ("ips", "labels", "mac")

    def __init__(self, mac: str | None = None, ips: tuple[ipaddress.IPv6Address | ipaddress.IPv4Address, ...] = (),
                 labels: dict[str, str] | None = None) -> None:
        self.mac, self.ips = mac, ips
        self.labels = {} if labels is None else labels


# -- one check per kind of field: the value, or ValueError saying what it must be -------------------

def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def _optional_string(v: Any) -> str | None:
    return None if v is None else _string(v)


def _optional_host(v: Any) -> str | None:
    """The Host this node is: it becomes part of Store keys and the server's socket name. Empty is
    unset (a template's empty variable), as before."""
    if v is None or v == "":
        return None
    try:
        return check_name(_string(v))
    except ValueError:
        raise ValueError("must be a host name (letters, digits, '.', '_', '-'; at most 253)") from None


def _optional_socket(v: Any) -> str | None:
    if v is None or v == "":  # unset, as the shim reads it
        return None
    if not plain_socket_path(_string(v)):
        raise ValueError("must be an absolute path of at most 107 bytes, with no '.' or '..' step")
    return v


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _mtu(v: Any) -> int | None:
    if v is None:
        return None
    if type(v) is not int or not 1280 <= v <= 65535:
        raise ValueError("must be an integer from 1280 (IPv6's minimum) to 65535")
    return v


def _gateway(v: Any) -> str:
    if not isinstance(v, str) or v not in IPV6_GATEWAYS:
        raise ValueError(f"must be one of {', '.join(IPV6_GATEWAYS)}")
    return v


def _strings(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("must be a list of strings")
    return v


def _object(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("must be an object")
    return v


def _optional_object(v: Any) -> dict[str, Any] | None:
    return None if v is None else _object(v)


def _string_map(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise ValueError("must be an object of strings")
    return v


def _flag_map(v: Any) -> dict[str, bool]:
    if not isinstance(v, dict) or not all(isinstance(x, bool) for x in v.values()):
        raise ValueError("must be an object of true/false")
    return v


def _runtime_config(v: Any) -> RuntimeConfig:
    """(An error inside names its key from a leading ".": "runtimeConfig.mac: ...".)"""
    d = _object(v)
    mac = d.get("mac")
    if mac is not None and not isinstance(mac, str):
        raise ValueError(".mac: must be a string")
    ips = d.get("ips", [])
    if not isinstance(ips, list) or len(ips) > MAX_REQUESTED_IPS:
        raise ValueError(f".ips: a list of at most {MAX_REQUESTED_IPS} addresses")
    for i, ip in enumerate(ips):
        if not isinstance(ip, str):
            raise ValueError(f".ips.{i}: must be a string")
    return RuntimeConfig(mac=mac, ips=ips)


# JSON key -> (NetConf field, check); a key that is absent keeps the field's default
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "cniVersion": ("cni_version", _string), "name": ("name", _string), "type": ("type", _string),
    "store": ("store", _optional_string), "host": ("host", _optional_host),
    "server_socket": ("server_socket", _optional_socket), "ipv6": ("ipv6", _boolean), "ipv4": ("ipv4", _boolean),
    "ipv6_pool": ("ipv6_pool", _optional_string), "ipv4_pool": ("ipv4_pool", _optional_string),
    "ipv6_gateway": ("ipv6_gateway", _gateway), "mtu": ("mtu", _mtu), "profiles": ("profiles", _strings),
    "labels": ("labels", _string_map), "capabilities": ("capabilities", _flag_map),
    "runtimeConfig": ("runtime_config", _runtime_config), "args": ("args", _object),
    "prevResult": ("prev_result", _optional_object),
    **{f"etcd_{k}": (f"etcd_{k}", _optional_string) for k in ETCD_OPTIONS},
}
_REQUIRED = ("cniVersion", "name", "type")


def _check_labels(labels: dict[str, str], where: str) -> None:
    for key, value in labels.items():
        try:
            check_label_key(key)
            check_label_value(value)
        except ValueError as e:
            raise ConfError(f"{where}: {e}") from None


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
    """The configuration, checked; ConfError names every bad field (the JSON key)."""
    doc = load(raw) if isinstance(raw, bytes) else raw
    values: dict[str, Any] = {}
    errors = [f"{key}: required" for key in _REQUIRED if key not in doc]
    for key, (attr, check) in _FIELDS.items():
        if key in doc:
            try:
                values[attr] = check(doc[key])
            except ValueError as e:
                errors.append(f"{key}{e}" if str(e).startswith(".") else f"{key}: {e}")
    if errors:
        raise ConfError("; ".join(errors))
    conf = NetConf(**values)
    if conf.cni_version not in SUPPORTED_VERSIONS:
        raise ConfError(f"cniVersion: {conf.cni_version} not supported ({', '.join(SUPPORTED_VERSIONS)})")
    try:
        check_name(conf.name)
        # it is each attachment's "cni.network" label too: one a label cannot hold failed every ADD
        # late (the veth made, the addresses assigned, then all rolled back as an invalid endpoint)
        check_label_value(conf.name)
    except ValueError as e:
        raise ConfError(f"name: {e} (a network name is also a label value: at most 63 characters)") from None
    for i, profile in enumerate(conf.profiles):
        try:
            check_name(profile)
        except ValueError as e:
            raise ConfError(f"profiles.{i}: {e}") from None
    _check_labels(conf.labels, "labels")
    if not conf.ipv6 and not conf.ipv4:
        raise ConfError("ipv6/ipv4: at least one family must be on")
    etcd = {k: getattr(conf, f"etcd_{k}") or None for k in ETCD_OPTIONS}  # "" unset, as for host
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
    _check_labels(labels, "args.cni.labels")
    return Request(mac=mac, ips=tuple(ips), labels=labels)
