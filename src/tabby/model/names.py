"""Validators for the names tabby puts into keys, the kernel and daemon configs.

Every name that later reaches a netlink message, a BIRD or dnsmasq config line or a Store key
is checked here once, so nothing downstream ever has to quote or escape it.
"""

from __future__ import annotations

import ipaddress
import re

# Resource names become Store key segments and BIRD protocol names: no '/', no spaces.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
# Linux allows more in an interface name, but a conservative set rules out shell
# metacharacters, '/', ':' (alias syntax) and whitespace in one go; and no leading '-' or '.',
# so that a name is never read as an option by a tool it is handed to ("-h", "--help").
_IFACE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_LABEL_KEY_RE = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}/)?[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")

IFNAMSIZ = 16  # the kernel's buffer, including the NUL: 15 usable characters

# tabby's own links on a host (dataplane: dnsmasq's anchors, NAT64's tun), which the agent creates
# and deletes by name: no workload may name one (an Endpoint on "tbys0" had its link deleted and
# anchor addresses put on it)
DNSMASQ_ANCHOR, DNSMASQ_ANCHOR_PEER = "tbyra0", "tbyra1"
DNSMASQ_GROUP_ANCHOR = "tbys"  # + k: one per group of SLAAC/stateless pools (never a CNI veth: "tby" + hex)
NAT64_TUN = "tabby64"


def check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid name {value!r}: 1..253 characters of letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def check_interface_name(value: str) -> str:
    if not 1 <= len(value) < IFNAMSIZ:
        raise ValueError(f"invalid interface name {value!r}: must be 1..15 characters")
    if not _IFACE_RE.fullmatch(value):
        raise ValueError(
            f"invalid interface name {value!r}: only letters, digits, '_', '.' and '-' are "
            "allowed, starting with a letter, digit or '_' (no '/', ':', whitespace or shell metacharacters)"
        )
    return value


def check_workload_interface(value: str) -> str:
    """An Endpoint's interface: a plain interface name that is none of tabby's own links, nor the
    host's loopback (taken for a workload's, its traffic went through the guard's spoofing drops)."""
    check_interface_name(value)
    if value == "lo":
        raise ValueError("invalid interface name 'lo': the host's loopback is no workload's")
    if value in (DNSMASQ_ANCHOR, DNSMASQ_ANCHOR_PEER, NAT64_TUN) or value.startswith(DNSMASQ_GROUP_ANCHOR):
        raise ValueError(f"invalid interface name {value!r}: tabby's own links ({DNSMASQ_ANCHOR}, "
                         f"{DNSMASQ_ANCHOR_PEER}, {DNSMASQ_GROUP_ANCHOR}*, {NAT64_TUN}) are no workload's")
    return value


def check_label_key(value: str) -> str:
    if not _LABEL_KEY_RE.fullmatch(value):
        raise ValueError(f"invalid label key {value!r}")
    return value


def check_label_value(value: str) -> str:
    if not _LABEL_VALUE_RE.fullmatch(value):
        raise ValueError(f"invalid label value {value!r}")
    return value


def canonical_mac(value: str) -> str:
    """MACs are stored lower-case with colons so that equality means the same MAC."""
    mac = value.strip().lower().replace("-", ":")
    if not _MAC_RE.fullmatch(mac):
        raise ValueError(f"invalid MAC address {value!r}: expected six hex octets like 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"invalid MAC address {value!r}: a multicast MAC cannot be an endpoint's")
    if mac == "00:00:00:00:00:00":
        raise ValueError(f"invalid MAC address {value!r}: all zeroes")
    return mac


# no workload may hold these (the Endpoint model refuses them), so no pool may hold any either: a
# pool over one handed them out, and each ADD failed after its allocation
_NOT_FOR_POOLS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3", "::/127", "fe80::/10", "ff00::/8"))


def check_pool_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    """ValueError if the pool overlaps unspecified, loopback, link-local or multicast space."""
    for bad in _NOT_FOR_POOLS:
        if bad.version == net.version and net.overlaps(bad):  # type: ignore[arg-type]
            raise ValueError(f"{net} overlaps {bad} (unspecified, loopback, link-local or multicast), which no "
                             "workload may hold")

