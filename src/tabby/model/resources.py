"""tabby's resources: what orchestrators write and agents read.

Every resource is ``kind`` + ``metadata`` + ``spec``, frozen and canonical on construction
(addresses as ``ipaddress`` objects, MACs lower-case), so "nothing changed" is ``==``.
No I/O happens here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic.functional_validators import AfterValidator, BeforeValidator

from tabby.model.names import (
    canonical_mac,
    check_interface_name,
    check_label_key,
    check_label_value,
    check_name,
    check_pool_network,
    check_workload_interface,
)
from tabby.model.selector import check_selector


def _unscoped(v: IPv6Address) -> IPv6Address:
    """ipaddress keeps a "%zone" suffix verbatim: it would reach BIRD's config and the kernel."""
    if v.scope_id is not None:
        raise ValueError(f"{v}: a scoped address (%zone) is not accepted here; name the interface instead")
    return v


_IP_TYPES = (str, IPv4Address, IPv6Address, IPv4Network, IPv6Network, IPv4Interface, IPv6Interface)


def _ip_text(v: object) -> object:
    """An address or network is text in a record (or an ipaddress object, from Python): pydantic's
    lax mode would take a number, or true, for one ("cidr": true was the pool ::1/128)."""
    if isinstance(v, _IP_TYPES):
        return v
    raise ValueError(f"an address or network is written as text, not as {type(v).__name__} {str(v)[:40]}")


_Text = BeforeValidator(_ip_text)


def _an_int(v: object) -> object:
    """A Literal of integers compares by value, so it took 4.0 for 4; a JSON integer only."""
    if type(v) is not int:
        raise ValueError(f"an integer is wanted, not {type(v).__name__} {str(v)[:40]}")
    return v
V6Addr = Annotated[IPv6Address, _Text, AfterValidator(_unscoped)]
V4Addr = Annotated[IPv4Address, _Text]
IPAddr = Annotated[V6Addr | V4Addr, _Text]  # the check before the union: one error, not one per member
IPNet = Annotated[IPv6Network | IPv4Network, _Text]
Name = Annotated[str, AfterValidator(check_name)]
InterfaceName = Annotated[str, AfterValidator(check_interface_name)]
WorkloadInterface = Annotated[str, AfterValidator(check_workload_interface)]
Mac = Annotated[str, AfterValidator(canonical_mac)]
Selector = Annotated[str, AfterValidator(check_selector)]
ASN = Annotated[StrictInt, Field(ge=1, le=4_294_967_295)]

DEFAULT_ASN = 64512  # first private 2-byte AS: a lab fabric needs no registered number
V6_BLOCK_DEFAULT, V6_BLOCK_MIN = 122, 116
V4_BLOCK_DEFAULT, V4_BLOCK_MIN = 26, 20


class _Frozen(BaseModel):
    # allow_inf_nan: an order of inf or a port of NaN would sort and compare unpredictably
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Metadata(_Frozen):
    name: Name
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            check_label_key(key)
            check_label_value(value)
        return dict(sorted(v.items()))

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.labels.items())))


def _check_router_id(rid: IPv4Address) -> IPv4Address:
    if rid == IPv4Address("0.0.0.0"):
        raise ValueError("router id 0.0.0.0 is rejected by BGP peers")
    if rid in IPv4Network("224.0.0.0/3"):
        raise ValueError(f"router id {rid} is in 224.0.0.0/3 (multicast/reserved), which peers reject")
    return rid


def derive_router_id(name: str) -> IPv4Address:
    """A stable router id for a host without IPv4: a hash of its name in 1.0.0.0..223.255.255.255.

    BGP needs a 32-bit id even on an IPv6-only fabric. Hashing the name keeps it stable across
    restarts; collisions between hosts are refused by ``refused_hosts``.
    """
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    low, high = int(IPv4Address("1.0.0.0")), int(IPv4Address("223.255.255.255"))
    return IPv4Address(low + h % (high - low + 1))


class HostSpec(_Frozen):
    ipv6_address: V6Addr | None = None
    ipv4_address: V4Addr | None = None
    asn: ASN | None = None  # None: the fabric's Config default_asn (64512 unless set)
    router_id: Annotated[V4Addr, AfterValidator(_check_router_id)] | None = None
    route_reflector_cluster_id: Annotated[V4Addr, AfterValidator(_check_router_id)] | None = None

    @model_validator(mode="after")
    def _one_address(self) -> HostSpec:
        if self.ipv6_address is None and self.ipv4_address is None:
            raise ValueError("a host needs a fabric address: set ipv6_address and/or ipv4_address")
        for field in ("ipv6_address", "ipv4_address"):
            addr = getattr(self, field)
            if addr is not None and (addr.is_unspecified or addr.is_multicast or addr.is_loopback
                                     or addr.is_link_local):  # every other host's BIRD: "neighbor fe80::2%None"
                raise ValueError(f"{field}: {addr} cannot be a fabric address")
        if self.ipv4_address is not None and self.ipv4_address in IPv4Network("224.0.0.0/3"):
            # multicast, reserved (240/4) or the broadcast address: no host's; and as the router id
            # (the default) every agent's conflict check and this host's BGP config raised on it
            raise ValueError(f"ipv4_address: {self.ipv4_address} is in 224.0.0.0/3 (multicast/reserved): "
                             "it cannot be a fabric address")
        return self


class Host(_Frozen):
    kind: Literal["Host"] = "Host"
    metadata: Metadata
    spec: HostSpec

    def effective_router_id(self) -> IPv4Address:
        if self.spec.router_id is not None:
            return self.spec.router_id
        if self.spec.ipv4_address is not None:
            return _check_router_id(self.spec.ipv4_address)
        return derive_router_id(self.metadata.name)


def refused_hosts(hosts: Iterable[tuple[Host, int]]) -> dict[str, str]:
    """Hosts refused because an older Host (lower create revision, then name) already has their
    fabric address or router id -> why. A fabric-wide check no single record can make; every
    agent computes the same answer from the same Store, so the newer host is refused everywhere."""
    held: dict[tuple[str, object], str] = {}
    refused: dict[str, str] = {}
    for host, _ in sorted(hosts, key=lambda hc: (hc[1], hc[0].metadata.name)):
        name = host.metadata.name
        claims = [("fabric address", host.spec.ipv6_address), ("fabric address", host.spec.ipv4_address),
                  ("router id", host.effective_router_id())]
        clash = [f"{what} {value} held by host {held[(what, value)]}" for what, value in claims
                 if value is not None and (what, value) in held and held[(what, value)] != name]
        if clash:
            refused[name] = "conflict: " + "; ".join(clash)
            continue
        for what, value in claims:
            if value is not None:
                held[(what, value)] = name
    return refused


# How VMs on an IPv6 pool get their addresses (Neutron's ipv6_address_mode): stateful DHCPv6
# (RA M=1, no autonomous prefix), SLAAC (RA with the prefix autonomous, M=0, O=0), or SLAAC plus
# stateless DHCPv6 for other settings (M=0, O=1). The prefix is never on-link: every VM routes all
# traffic via its tap. SLAAC forms the address from the MAC (EUI-64), which needs a /64.
Ipv6Mode = Literal["dhcpv6-stateful", "dhcpv6-stateless", "slaac"]
MAX_DNS_SERVERS = 3  # what DHCPv4 clients and resolv.conf use; Neutron's default limit is 5


class IPPoolSpec(_Frozen):
    cidr: IPNet
    block_size: StrictInt | None = None
    nat_outgoing: StrictBool = False
    disabled: StrictBool = False
    ipv6_mode: Ipv6Mode = "dhcpv6-stateful"
    dns_servers: Annotated[tuple[IPAddr, ...], Field(max_length=MAX_DNS_SERVERS)] = ()
    # IPv6 pools only: its workloads reach IPv4 through their own host's NAT64 (tayga) under the
    # Config's nat64_prefix, and are given its DNS64 resolver (Config dns64_server)
    nat64: StrictBool = False

    @field_validator("cidr", mode="before")
    @classmethod
    def _strict_cidr(cls, v: object) -> object:
        _ip_text(v)
        if isinstance(v, str):
            if "%" in v:  # a zone means nothing in a pool, and its text would reach daemons' configs
                raise ValueError(f"{v[:60]!r}: a pool is no scoped (%zone) network")
            try:
                return ipaddress.ip_network(v, strict=True)
            except ValueError as e:
                raise ValueError(f"{v!r} is not a network address with prefix length ({e})") from e
        return v

    @model_validator(mode="after")
    def _block(self) -> IPPoolSpec:
        check_pool_network(self.cidr)
        v6 = self.cidr.version == 6
        if self.nat64 and not v6:
            raise ValueError(f"nat64: only for IPv6 pools (NAT64 gives IPv6 workloads IPv4), not {self.cidr}")
        if self.ipv6_mode != "dhcpv6-stateful" and not (v6 and self.cidr.prefixlen == 64):
            raise ValueError(f"ipv6_mode {self.ipv6_mode} needs an IPv6 /64 (SLAAC forms addresses from the MAC), "
                             f"not {self.cidr}")
        lo, default = (V6_BLOCK_MIN, V6_BLOCK_DEFAULT) if v6 else (V4_BLOCK_MIN, V4_BLOCK_DEFAULT)
        hi = 128 if v6 else 32
        if self.block_size is None:
            object.__setattr__(self, "block_size", max(default, self.cidr.prefixlen))
        bs = self.block_size
        assert bs is not None
        if not lo <= bs <= hi:
            raise ValueError(f"block_size {bs} out of range for IPv{self.cidr.version}: {lo}..{hi}")
        if bs < self.cidr.prefixlen:
            raise ValueError(f"block_size /{bs} is larger than the pool {self.cidr}")
        return self


class IPPool(_Frozen):
    kind: Literal["IPPool"] = "IPPool"
    metadata: Metadata
    spec: IPPoolSpec


def _host_route_v6(v: IPv6Interface) -> IPv6Interface:
    if "%" in str(v):  # its .ip drops the zone, its text keeps it: it bypassed the duplicate check
        raise ValueError(f"{v}: a scoped address (%zone) is not accepted here")
    if v.network.prefixlen != 128:
        raise ValueError(f"{v} must be a single address (/128): tabby routes each workload address on its own")
    return v


def _host_route_v4(v: IPv4Interface) -> IPv4Interface:
    if v.network.prefixlen != 32:
        raise ValueError(f"{v} must be a single address (/32): tabby routes each workload address on its own")
    return v


V6Host = Annotated[IPv6Interface, _Text, AfterValidator(_host_route_v6)]
V4Host = Annotated[IPv4Interface, _Text, AfterValidator(_host_route_v4)]


# One workload interface with more addresses than this is a mistake or an attack (each is a
# route, a neighbour and set elements on its host); Neutron's default is 5 fixed IPs per port.
MAX_ADDRESSES_PER_FAMILY = 64
# workload_id is free text from an orchestrator (a container id, a Nova instance uuid): printable
# ASCII without spaces is all any of them uses.
_WORKLOAD_ID = r"^[!-~]{1,253}$"


class AllowedSource(_Frozen):
    """An extra address (and MAC) a workload may send from and is routed, besides its own: a
    VRRP/keepalived virtual address, a load balancer's VIP (Neutron's allowed address pairs)."""

    address: V6Host | V4Host  # one address, as for the endpoint's own (tabby routes each alone)
    mac: Mac | None = None  # None: the endpoint's own MAC

    @field_validator("address")
    @classmethod
    def _routable(cls, v: IPv6Interface | IPv4Interface) -> IPv6Interface | IPv4Interface:
        ip = v.ip
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local:
            raise ValueError(f"{ip} cannot be a workload address")
        return v


class EndpointSpec(_Frozen):
    host: Name
    orchestrator: Literal["vm", "container"]
    workload_id: Annotated[str, Field(pattern=_WORKLOAD_ID)]
    interface: WorkloadInterface
    mac: Mac
    ipv6_addresses: Annotated[tuple[V6Host, ...], Field(max_length=MAX_ADDRESSES_PER_FAMILY)] = ()
    ipv4_addresses: Annotated[tuple[V4Host, ...], Field(max_length=MAX_ADDRESSES_PER_FAMILY)] = ()
    ipv6_gateway: V6Addr | None = None
    ipv4_gateway: V4Addr | None = None
    profiles: tuple[Name, ...] = ()
    # Neutron's allowed address pairs: sources allowed besides the endpoint's own, and routed to
    # it unless a workload has the address as its own (see agent/calc.py)
    allowed_sources: Annotated[tuple[AllowedSource, ...], Field(max_length=MAX_ADDRESSES_PER_FAMILY)] = ()
    # False (Neutron's port_security_enabled false): no guards on this interface, neither the
    # anti-spoofing checks (source address, source MAC) nor the RA and DHCP-server drops; the
    # policy (profiles, policies) still applies
    port_security: StrictBool = True

    @model_validator(mode="after")
    def _some_address(self) -> EndpointSpec:
        if not self.ipv6_addresses and not self.ipv4_addresses:
            raise ValueError("an endpoint needs at least one address in ipv6_addresses or ipv4_addresses")
        for field in ("ipv6_addresses", "ipv4_addresses"):
            addrs = getattr(self, field)
            if len(set(addrs)) != len(addrs):
                raise ValueError(f"{field}: duplicate address")
            for a in addrs:
                ip = a.ip
                if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local:
                    raise ValueError(f"{field}: {ip} cannot be a workload address")
        pairs = [(a.address, a.mac or self.mac) for a in self.allowed_sources]
        if len(set(pairs)) != len(pairs):
            raise ValueError("allowed_sources: duplicate address and MAC")
        return self


class Endpoint(_Frozen):
    kind: Literal["Endpoint"] = "Endpoint"
    metadata: Metadata
    spec: EndpointSpec


# [0-9], not \d: the regex engine's \d matches every script's digits, which int() then accepts
PortSpec = Annotated[StrictInt, Field(ge=0, le=65535)] | Annotated[str, Field(pattern=r"^[0-9]{1,5}:[0-9]{1,5}$")]


class Rule(_Frozen):
    action: Literal["allow", "deny"]
    protocol: Literal["tcp", "udp", "sctp", "icmp", "icmpv6"] | Annotated[StrictInt, Field(ge=0, le=255)] | None = None
    ip_version: Annotated[Literal[4, 6], BeforeValidator(_an_int)] | None = None
    icmp_type: Annotated[StrictInt, Field(ge=0, le=255)] | None = None
    icmp_code: Annotated[StrictInt, Field(ge=0, le=255)] | None = None
    src_nets: tuple[IPNet, ...] = ()
    dst_nets: tuple[IPNet, ...] = ()
    src_selector: Selector | None = None
    dst_selector: Selector | None = None
    src_ports: tuple[PortSpec, ...] = ()
    dst_ports: tuple[PortSpec, ...] = ()

    @field_validator("src_nets", "dst_nets")
    @classmethod
    def _unscoped_nets(cls, v: tuple[IPv6Network | IPv4Network, ...]) -> tuple[IPv6Network | IPv4Network, ...]:
        for n in v:
            if n.version == 6 and n.network_address.scope_id is not None:
                raise ValueError(f"{str(n)[:60]!r}: a rule's network has no %zone")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if (self.icmp_type is not None or self.icmp_code is not None) and self.protocol not in ("icmp", "icmpv6"):
            raise ValueError("icmp_type/icmp_code need protocol icmp or icmpv6")
        if self.icmp_code is not None and self.icmp_type is None:
            raise ValueError("icmp_code needs icmp_type")
        if (self.src_ports or self.dst_ports) and self.protocol not in ("tcp", "udp", "sctp"):
            raise ValueError("ports need protocol tcp, udp or sctp")
        for p in (*self.src_ports, *self.dst_ports):
            if isinstance(p, str):
                lo, hi = (int(x) for x in p.split(":"))
                if not lo <= hi <= 65535:
                    raise ValueError(f"port range {p!r} must be low:high within 0..65535")
        family = {"icmp": 4, "icmpv6": 6}.get(self.protocol) if isinstance(self.protocol, str) else None
        if family and self.ip_version and family != self.ip_version:
            raise ValueError(f"protocol {self.protocol} contradicts ip_version {self.ip_version}")
        family = family or self.ip_version
        for net in (*self.src_nets, *self.dst_nets):
            if family and net.version != family:
                raise ValueError(f"network {net} is not IPv{family}, as the rule's protocol/ip_version says")
        return self


class ProfileSpec(_Frozen):
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()


class Profile(_Frozen):
    kind: Literal["Profile"] = "Profile"
    metadata: Metadata
    spec: ProfileSpec


class PolicySpec(_Frozen):
    order: StrictFloat = 1000.0
    selector: Selector = "all()"
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()


class Policy(_Frozen):
    kind: Literal["Policy"] = "Policy"
    metadata: Metadata
    spec: PolicySpec


# A TCP MD5 key is at most 80 bytes (TCP_MD5SIG_MAXKEYLEN); printable ASCII without '"' and '\\' so
# that it can sit inside a quoted BIRD string unchanged (BIRD has no escapes we would trust with it)
_PASSWORD = re.compile(r'[!#-\[\]-~ ]{1,80}')


def check_password(value: str, where: str = "password") -> str:
    """A TCP MD5 password as read from its file, or ValueError naming where it came from (never the
    password itself: the message may reach a log)."""
    if not _PASSWORD.fullmatch(value):
        raise ValueError(f"{where}: a BGP password must be 1..80 printable ASCII characters without '\"' or '\\'")
    return value


def _secret_path(value: str) -> str:
    """A password file: an absolute, normalised path of plain characters (it is read by the agent,
    as root: no relative path that depends on its working directory, no '..')."""
    if not re.fullmatch(r"(/[A-Za-z0-9._+-]+)+", value) or any(p in (".", "..") for p in value.split("/")):
        raise ValueError(f"{value[:80]!r}: an absolute path of letters, digits and ._+- without '.' or '..' parts")
    if len(value) > 255:
        raise ValueError("path longer than 255 characters")
    return value


SecretPath = Annotated[str, AfterValidator(_secret_path)]
REDACTED = "<redacted>"  # what every output but the Store's own encoding shows of a secret
MAX_SECRETS = 64


def _check_secret(v: SecretStr) -> SecretStr:
    text = v.get_secret_value()
    if text == REDACTED:
        raise ValueError(f"a secret cannot be {REDACTED!r}: that is what `tabby get` shows, not the secret")
    check_password(text, "secret")
    return v


def _show_secret(v: SecretStr, info: SerializationInfo) -> str:
    """The secret only for the Store's encoding (codec.encode asks with context reveal_secrets);
    every other dump (`tabby get`, logs, the agent's views) shows REDACTED."""
    return v.get_secret_value() if (info.context or {}).get("reveal_secrets") else REDACTED


BgpSecret = Annotated[SecretStr, AfterValidator(_check_secret), PlainSerializer(_show_secret, return_type=str)]
BFD_DEFAULT_MS, BFD_DEFAULT_MULT = 100, 3  # detection in 300 ms: under the 1 s the fabric promises


class BGPPeerSpec(_Frozen):
    """An external BGP peer (a top-of-rack router, a reflector outside the fabric).

    peer_ip None with an interface: unnumbered, the host peers with whatever router speaks BGP on
    that link from its IPv6 link-local address (BIRD's dynamic ``neighbor range fe80::/10``,
    passive: the router connects). A link-local peer_ip names the router's address on that link."""

    peer_ip: IPAddr | None = None
    asn: ASN
    interface: InterfaceName | None = None
    host: Name | None = None  # None: every host peers with it; a name: only that host
    # this session also carries IPv4 routes with IPv6 next hops (RFC 8950): an IPv6 session only
    extended_next_hop: StrictBool = False
    bfd: StrictBool = False  # BFD (100 ms x 3) on this session; the peer must run BFD too
    password_file: SecretPath | None = None  # TCP MD5 password, read by the agent; never in the Store
    password_secret: Name | None = None  # or: the TCP MD5 password is Config bgp_secrets[name]
    # the peer carries the fabric's own routes between hosts (a ToR of a routed fabric, usually with
    # the node mesh off): routes inside the pools are accepted from it, except this host's own blocks
    fabric: StrictBool = False
    multihop: Annotated[StrictInt, Field(ge=2, le=255)] | None = None  # TTL; None: a directly connected peer

    @model_validator(mode="after")
    def _link_local(self) -> BGPPeerSpec:
        if self.password_file is not None and self.password_secret is not None:
            raise ValueError("password_secret: one password source, not password_file as well")
        if self.peer_ip is None:
            if self.interface is None:
                raise ValueError("peer_ip: needed unless interface names the link of an unnumbered peer")
            if self.bfd:
                raise ValueError("bfd: needs peer_ip (an unnumbered peer's address is learnt; BFD needs it first)")
            if self.multihop is not None:
                raise ValueError("multihop: an unnumbered peer is on the link itself")
            return self
        if self.peer_ip.is_link_local and self.peer_ip.version == 6 and self.interface is None:
            raise ValueError(f"peer_ip {self.peer_ip} is link-local: interface is required")
        if self.peer_ip.is_unspecified or self.peer_ip.is_multicast:
            raise ValueError(f"peer_ip {self.peer_ip} cannot be a BGP peer")
        if self.extended_next_hop and self.peer_ip.version == 4:
            raise ValueError("extended_next_hop: only an IPv6 session carries IPv4 with IPv6 next hops")
        if self.multihop is not None and (self.interface is not None or self.peer_ip.is_link_local):
            raise ValueError("multihop: a peer reached over several hops is not on one interface")
        if self.multihop is not None and self.bfd:
            raise ValueError("bfd: single-hop only (multihop BFD is not built)")
        return self


class BGPPeer(_Frozen):
    kind: Literal["BGPPeer"] = "BGPPeer"
    metadata: Metadata
    spec: BGPPeerSpec


def _check_interface_prefix(value: str) -> str:
    check_interface_name(value)
    if len(value) > 12:  # a prefix leaves room for the name it starts
        raise ValueError(f"interface prefix {value!r} is longer than 12 characters")
    return value


InterfacePrefix = Annotated[str, AfterValidator(_check_interface_prefix)]
DEFAULT_WORKLOAD_PREFIXES = ("tap", "tby", "vnet")  # VM taps (Nova, tabby), tabby's veths, libvirt's


NAT64_WKP = "64:ff9b::/96"
NAT64_POOL4_DEFAULT = "192.168.255.0/24"  # tayga's example pool; host-local, masqueraded on the way out


def _nat64_prefix(v: IPv6Network) -> IPv6Network:
    if v.network_address.scope_id is not None:
        raise ValueError("a NAT64 prefix has no %zone")
    if v.prefixlen != 96:
        raise ValueError(f"{v}: a NAT64 prefix here is a /96 (the IPv4 address is its last 32 bits)")
    if v.network_address.packed[0] == 0 and str(v) != NAT64_WKP:
        # tayga (0.9.x) refuses any prefix in ::/8 but the well-known one
        raise ValueError(f"{v}: in ::/8; use {NAT64_WKP} or a prefix of your own (ULA or global)")
    if v.network_address.is_link_local or v.network_address.is_multicast:
        raise ValueError(f"{v}: link-local or multicast, not a NAT64 prefix")
    return v


def _nat64_pool4(v: IPv4Network) -> IPv4Network:
    if not 8 <= v.prefixlen <= 30:
        raise ValueError(f"{v}: the NAT64 pool must be /8../30 (its first address is the translator's own)")
    a = v.network_address
    if a.is_loopback or a.is_link_local or a.is_multicast or a.is_reserved or int(a) >> 24 == 0:
        raise ValueError(f"{v}: loopback, link-local, multicast or reserved, not a NAT64 pool")
    return v


def _service_address(v: IPv6Address) -> IPv6Address:
    if v.is_link_local or v.is_multicast or v.is_unspecified or v.is_loopback or v.ipv4_mapped is not None:
        raise ValueError(f"{v}: a resolver every workload reaches through its host needs a routable address "
                         "(not link-local, multicast, loopback, IPv4-mapped or ::)")
    return v


def _upstream(v: IPv6Address | IPv4Address) -> IPv6Address | IPv4Address:
    if v.is_multicast or v.is_unspecified or (v.version == 6 and v.ipv4_mapped is not None):
        raise ValueError(f"{v}: not a resolver's address (multicast, unspecified or IPv4-mapped)")
    return v


Nat64Prefix = Annotated[IPv6Network, _Text, AfterValidator(_nat64_prefix)]
Nat64Pool4 = Annotated[IPv4Network, _Text, AfterValidator(_nat64_pool4)]


class ConfigSpec(_Frozen):
    """Settings; ``global`` applies everywhere, ``host.<name>`` overrides it for one host."""

    log_level: Literal["debug", "info", "warning", "error"] | None = None
    resync_interval_s: Annotated[StrictFloat, Field(gt=0, le=86400)] | None = None
    metrics_port: Annotated[StrictInt, Field(ge=0, le=65535)] | None = None
    node_to_node_mesh: StrictBool | None = None
    strict_affinity: StrictBool | None = None
    default_asn: ASN | None = None
    # BFD (100 ms x 3) on the host mesh and reflector sessions; peers withdraw a dead host in < 1 s
    # (~320 ms measured). Off by default: in a full mesh it is N-1 BFD sessions per host, 10 packets
    # a second each way, an idle cost that grows with the fabric (DESIGN: it must stay flat), and
    # the agent's BFD watcher costs ~1.4% of a core per host at idle (measured, 3 hosts)
    mesh_bfd: StrictBool | None = None
    mesh_password_file: SecretPath | None = None  # TCP MD5 password of every mesh/reflector session
    mesh_password_secret: Name | None = None  # or: it is bgp_secrets[name]
    # TCP MD5 passwords by name (BGPPeer password_secret, mesh_password_secret): kept in the Store,
    # shown as <redacted> by `tabby get` and everywhere else
    bgp_secrets: Annotated[dict[Name, BgpSecret], Field(max_length=MAX_SECRETS)] | None = None
    # Interfaces named so are workloads' even when no Endpoint names them yet: their traffic is
    # dropped until their Endpoint's policy is in (fail closed).
    # (at least one: an empty list would turn fail-closed off; leaving out a prefix does so for it)
    workload_interface_prefixes: Annotated[tuple[InterfacePrefix, ...], Field(min_length=1, max_length=16)] | None \
        = None
    # NAT64 for pools with nat64 (each host translates its own workloads: tayga, see
    # docs/architecture.md). nat64_prefix: the /96 IPv4 addresses are written in (the well-known
    # 64:ff9b::/96 translates only global IPv4, RFC 6052 3.1; an operator's prefix any);
    # nat64_pool4: the host-local IPv4 addresses translated workloads get before the host
    # masquerades them to its own IPv4 address (never leaves the host)
    nat64_prefix: Nat64Prefix | None = None
    nat64_pool4: Nat64Pool4 | None = None
    # DNS64: the resolver address every host serves (unbound, on its loopback) for workloads on
    # nat64 pools, synthesizing AAAA records in nat64_prefix; it forwards to dns64_upstreams
    dns64_server: Annotated[V6Addr, AfterValidator(_service_address)] | None = None
    dns64_upstreams: Annotated[tuple[Annotated[IPAddr, AfterValidator(_upstream)], ...],
                               Field(max_length=MAX_DNS_SERVERS)] | None = None

    @model_validator(mode="after")
    def _one_mesh_password(self) -> ConfigSpec:
        if self.mesh_password_file is not None and self.mesh_password_secret is not None:
            raise ValueError("mesh_password_secret: one password source, not mesh_password_file as well")
        if self.dns64_server is not None:
            if self.nat64_prefix is not None and self.dns64_server in self.nat64_prefix:
                raise ValueError(f"dns64_server: {self.dns64_server} is inside nat64_prefix {self.nat64_prefix}")
            if self.dns64_server in (self.dns64_upstreams or ()):
                raise ValueError(f"dns64_upstreams: {self.dns64_server} is dns64_server itself (a forwarding loop)")
        return self


class Config(_Frozen):
    kind: Literal["Config"] = "Config"
    metadata: Metadata
    spec: ConfigSpec

    @model_validator(mode="after")
    def _scope(self) -> Config:
        name = self.metadata.name
        if name != "global" and not name.startswith("host."):
            raise ValueError("config name must be 'global' or 'host.<hostname>'")
        return self


CONFIG_DEFAULTS = ConfigSpec(
    log_level="info",
    resync_interval_s=90.0,
    metrics_port=9091,
    node_to_node_mesh=True,
    strict_affinity=False,
    default_asn=DEFAULT_ASN,
    mesh_bfd=False,
    workload_interface_prefixes=DEFAULT_WORKLOAD_PREFIXES,
    nat64_prefix=IPv6Network(NAT64_WKP),
    nat64_pool4=IPv4Network(NAT64_POOL4_DEFAULT),
    dns64_upstreams=(),
)


_MESH_PASSWORD_SOURCES = frozenset({"mesh_password_file", "mesh_password_secret"})


# Settings every host must agree on, so only Config global sets them: default_asn is the AS of
# every Host that names none (a host.b override made b expect 65001 of its peers while they
# expected 64512 of b: no session came up), and a mesh session is two-sided. A host's own AS is
# its Host record's asn.
FABRIC_WIDE = frozenset({"default_asn", "node_to_node_mesh"})


def effective_config(global_cfg: ConfigSpec | None, host_cfg: ConfigSpec | None) -> ConfigSpec:
    """Per-host settings over global ones over defaults, field by field; FABRIC_WIDE ones from
    the global layer only (``ignored_host_settings`` names what a host layer sets of them)."""
    merged = CONFIG_DEFAULTS.model_dump()
    for layer in (global_cfg, host_cfg):
        if layer is not None:
            mine = {k: v for k, v in layer.model_dump(context={"reveal_secrets": True}).items() if v is not None
                    and not (layer is host_cfg and k in FABRIC_WIDE)}
            if mine.keys() & _MESH_PASSWORD_SOURCES:
                # one source replaces the other: a host's file over the global secret (or the reverse)
                # must not make a config with both, which ConfigSpec refuses
                for k in _MESH_PASSWORD_SOURCES:
                    merged.pop(k, None)
            merged.update(mine)
    return ConfigSpec(**merged)


def ignored_host_settings(host_cfg: ConfigSpec | None) -> list[str]:
    """The fabric-wide fields a host's Config sets, which ``effective_config`` leaves out."""
    return sorted(f for f in FABRIC_WIDE if host_cfg is not None and getattr(host_cfg, f) is not None)


Resource = Annotated[
    Host | IPPool | Endpoint | Profile | Policy | BGPPeer | Config,
    Field(discriminator="kind"),
]
