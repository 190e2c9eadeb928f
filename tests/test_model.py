"""Model validation: round trips, errors that name the field, and properties under hypothesis."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tabby.model import (
    ConfigSpec,
    InvalidResource,
    decode,
    derive_router_id,
    effective_config,
    encode,
    key_of,
    parse_documents,
    refused_hosts,
    to_plain,
    validate,
)
from tabby.model.selector import SelectorError, parse_selector

EXAMPLES: list[dict[str, Any]] = [
    {"kind": "Host", "metadata": {"name": "host-a"},
     "spec": {"ipv6_address": "2001:db8:f::1", "ipv4_address": "192.0.2.1", "asn": 65001}},
    {"kind": "Host", "metadata": {"name": "v6only"}, "spec": {"ipv6_address": "2001:db8:f::2"}},
    {"kind": "IPPool", "metadata": {"name": "v6"}, "spec": {"cidr": "2001:db8:100::/112", "nat_outgoing": True}},
    {"kind": "IPPool", "metadata": {"name": "v4"}, "spec": {"cidr": "192.0.2.0/24", "block_size": 28}},
    {"kind": "Endpoint", "metadata": {"name": "vm1", "labels": {"role": "db", "tabby.dev/ns": "prod"}},
     "spec": {"host": "host-a", "orchestrator": "vm", "workload_id": "9f1c-port", "interface": "tap9f1c0000-aa",
              "mac": "FA:16:3E:00:00:01", "ipv6_addresses": ["2001:db8:100::10"], "ipv4_addresses": ["192.0.2.10/32"],
              "ipv6_gateway": "2001:db8:100::1", "profiles": ["default"]}},
    {"kind": "Endpoint", "metadata": {"name": "c1"},
     "spec": {"host": "v6only", "orchestrator": "container", "workload_id": "k8s/abc", "interface": "tby1a2b3c4d5e6",
              "mac": "ee:ee:ee:ee:ee:ee", "ipv6_addresses": ["2001:db8:100::40"]}},
    {"kind": "Endpoint", "metadata": {"name": "v4only"},
     "spec": {"host": "host-a", "orchestrator": "vm", "workload_id": "x", "interface": "tap1",
              "mac": "52:54:00:00:00:02", "ipv4_addresses": ["192.0.2.11"]}},
    {"kind": "Profile", "metadata": {"name": "default"},
     "spec": {"ingress": [{"action": "allow", "src_selector": "role == 'web'"},
                          {"action": "allow", "protocol": "icmpv6", "icmp_type": 128}],
              "egress": [{"action": "allow"}]}},
    {"kind": "Policy", "metadata": {"name": "db"},
     "spec": {"order": 10, "selector": "role == \"db\"",
              "ingress": [{"action": "allow", "protocol": "tcp", "dst_ports": [5432, "8000:8080"],
                           "src_nets": ["2001:db8::/32"]},
                          {"action": "deny"}]}},
    {"kind": "BGPPeer", "metadata": {"name": "tor"}, "spec": {"peer_ip": "2001:db8:f::fe", "asn": 65100}},
    {"kind": "BGPPeer", "metadata": {"name": "ll"},
     "spec": {"peer_ip": "fe80::1", "interface": "eth0", "asn": 65100, "host": "host-a"}},
    {"kind": "Config", "metadata": {"name": "global"}, "spec": {"resync_interval_s": 30}},
    {"kind": "Config", "metadata": {"name": "host.host-a"}, "spec": {"log_level": "debug"}},
]


@pytest.mark.parametrize("doc", EXAMPLES, ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_round_trip_yaml_json_and_store(doc: dict[str, Any]) -> None:
    res = validate(doc)
    assert validate(yaml.safe_load(yaml.safe_dump(to_plain(res)))) == res
    assert validate(json.loads(json.dumps(to_plain(res)))) == res
    key = key_of(res)
    assert decode(key, encode(res)) == res
    assert hash(res) == hash(validate(doc))


def test_canonical_forms() -> None:
    ep = validate(EXAMPLES[4])
    assert ep.spec.mac == "fa:16:3e:00:00:01"
    assert ep.spec.ipv6_addresses == (ipaddress.IPv6Interface("2001:db8:100::10/128"),)
    assert validate(EXAMPLES[2]).spec.block_size == 122
    assert validate(EXAMPLES[3]).spec.block_size == 28


def test_multi_document_yaml_and_json_list() -> None:
    text = yaml.safe_dump_all(EXAMPLES)
    assert len(parse_documents(text)) == len(EXAMPLES)
    assert len(parse_documents(json.dumps(EXAMPLES))) == len(EXAMPLES)


def _endpoint(**spec: Any) -> dict[str, Any]:
    base = {"host": "h", "orchestrator": "vm", "workload_id": "w", "interface": "tap0",
            "mac": "52:54:00:00:00:01", "ipv6_addresses": ["fd00::1"]}
    base.update(spec)
    return {"kind": "Endpoint", "metadata": {"name": "e"}, "spec": base}


BAD: list[tuple[dict[str, Any], str]] = [
    (_endpoint(ipv6_addresses=["fd00::1/64"]), "spec.ipv6_addresses.0"),
    (_endpoint(ipv4_addresses=["10.0.0.1/24"]), "spec.ipv4_addresses.0"),
    (_endpoint(interface="tap;rm -rf /"), "spec.interface"),
    (_endpoint(interface="tap0123456789abcdef"), "spec.interface"),
    (_endpoint(interface="eth0:1"), "spec.interface"),
    (_endpoint(interface="a b"), "spec.interface"),
    (_endpoint(interface="$(reboot)"), "spec.interface"),
    (_endpoint(interface="tap0\n"), "spec.interface"),  # `$` in a Python regex matches before a final newline
    (_endpoint(interface="-h"), "spec.interface"),  # read as an option by a tool it is handed to
    (_endpoint(interface="--help"), "spec.interface"),
    (_endpoint(interface=".tap0"), "spec.interface"),
    (_endpoint(interface=".."), "spec.interface"),
    (_endpoint(interface="tbys0"), "spec.interface"),  # tabby's own links, deleted and re-made by name
    (_endpoint(interface="tbyra0"), "spec.interface"),
    (_endpoint(interface="tabby64"), "spec.interface"),
    (_endpoint(interface="lo"), "spec.interface"),  # the host's loopback, through the guard's drops
    ({"kind": "Host", "metadata": {"name": "h1\n"}, "spec": {"ipv6_address": "fd00::1"}}, "metadata.name"),
    (_endpoint(mac="01:00:5e:00:00:01"), "spec.mac"),
    (_endpoint(mac="zz:00:00:00:00:01"), "spec.mac"),
    (_endpoint(orchestrator="bare-metal"), "spec.orchestrator"),
    (_endpoint(ipv6_addresses=[]), "spec"),
    (_endpoint(ipv6_addresses=["fe80::1"]), "spec"),
    (_endpoint(ipv6_addresses=["not-an-address"]), "spec.ipv6_addresses.0"),
    (_endpoint(ipv6_addresses=["fd00::5", "fd00::5%a"]), "spec.ipv6_addresses.1"),  # a zone hid the duplicate
    (_endpoint(ipv6_addresses=["fd00::5%$(reboot)/128"]), "spec.ipv6_addresses.0"),
    (_endpoint(allowed_sources=[{"address": "fd00::2%y"}]), "spec.allowed_sources.0.address"),
    ({"kind": "Endpoint", "metadata": {"name": "bad/name"}, "spec": _endpoint()["spec"]}, "metadata.name"),
    ({"kind": "Host", "metadata": {"name": "h"}, "spec": {"ipv6_address": "fd00::1", "router_id": "0.0.0.0"}},
     "spec.router_id"),
    ({"kind": "Host", "metadata": {"name": "h"}, "spec": {"ipv6_address": "fd00::1", "router_id": "239.1.1.1"}},
     "spec.router_id"),
    ({"kind": "Host", "metadata": {"name": "h"}, "spec": {}}, "spec"),
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00::1/64"}}, "spec.cidr"),
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00::/64", "block_size": 100}}, "spec"),
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/8", "block_size": 19}}, "spec"),
    ({"kind": "BGPPeer", "metadata": {"name": "p"}, "spec": {"peer_ip": "fe80::1", "asn": 1}}, "spec"),
    ({"kind": "BGPPeer", "metadata": {"name": "p"}, "spec": {"peer_ip": "fd00::1", "asn": 0}}, "spec.asn"),
    ({"kind": "Policy", "metadata": {"name": "p"}, "spec": {"selector": "role ==="}}, "spec.selector"),
    ({"kind": "Policy", "metadata": {"name": "p"}, "spec": {"ingress": [{"action": "allow", "dst_ports": [80]}]}},
     "spec.ingress.0"),
    ({"kind": "Policy", "metadata": {"name": "p"},
      "spec": {"ingress": [{"action": "allow", "protocol": "icmpv6", "src_nets": ["10.0.0.0/8"]}]}},
     "spec.ingress.0"),
    ({"kind": "Config", "metadata": {"name": "other"}, "spec": {}}, "(document)"),
    ({"kind": "Gadget", "metadata": {"name": "g"}, "spec": {}}, "(document)"),
    # a number or a boolean is no address (pydantic's lax mode took true for ::1, 5 for ::5)
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": True, "block_size": 128}}, "spec.cidr"),
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": 2**40, "block_size": 128}}, "spec.cidr"),
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00::/64", "dns_servers": [1]}},
     "spec.dns_servers.0"),
    (_endpoint(ipv6_addresses=[5]), "spec.ipv6_addresses.0"),
    (_endpoint(ipv4_addresses=[167772161]), "spec.ipv4_addresses.0"),
    (_endpoint(ipv6_gateway=True), "spec.ipv6_gateway"),
    (_endpoint(ipv4_gateway=1.5), "spec.ipv4_gateway"),
    ({"kind": "Host", "metadata": {"name": "h"}, "spec": {"ipv6_address": 1}}, "spec.ipv6_address"),
    ({"kind": "Host", "metadata": {"name": "h"}, "spec": {"ipv6_address": "fd00::1", "router_id": 16909060}},
     "spec.router_id"),
    ({"kind": "BGPPeer", "metadata": {"name": "p"}, "spec": {"peer_ip": 5, "asn": 1}}, "spec.peer_ip"),
    ({"kind": "Policy", "metadata": {"name": "p"}, "spec": {"ingress": [{"action": "allow", "src_nets": [3]}]}},
     "spec.ingress.0.src_nets.0"),
    ({"kind": "Config", "metadata": {"name": "global"}, "spec": {"nat64_prefix": 1}}, "spec.nat64_prefix"),
    ({"kind": "Config", "metadata": {"name": "global"}, "spec": {"dns64_upstreams": [False]}},
     "spec.dns64_upstreams.0"),
    # a number is a JSON number and a yes a JSON true (lax mode read "122" and 5.0 as 122 and 5, 1 and
    # "yes" as true, true as the port 1)
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00::/64", "block_size": "122"}},
     "spec.block_size"),
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00::/64", "block_size": 122.0}},
     "spec.block_size"),
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00::/64", "nat_outgoing": "yes"}},
     "spec.nat_outgoing"),
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00::/64", "disabled": 1}}, "spec.disabled"),
    (_endpoint(port_security="false"), "spec.port_security"),
    ({"kind": "Host", "metadata": {"name": "h"}, "spec": {"ipv6_address": "fd00::1", "asn": "65001"}}, "spec.asn"),
    ({"kind": "BGPPeer", "metadata": {"name": "p"}, "spec": {"peer_ip": "fd00::1", "asn": True}}, "spec.asn"),
    ({"kind": "BGPPeer", "metadata": {"name": "p"}, "spec": {"peer_ip": "fd00::1", "asn": 1, "bfd": "on"}},
     "spec.bfd"),
    ({"kind": "BGPPeer", "metadata": {"name": "p"}, "spec": {"peer_ip": "fd00::1", "asn": 1, "multihop": "5"}},
     "spec.multihop"),
    ({"kind": "Policy", "metadata": {"name": "p"}, "spec": {"order": "10"}}, "spec.order"),
    ({"kind": "Policy", "metadata": {"name": "p"},
      "spec": {"ingress": [{"action": "allow", "protocol": "tcp", "dst_ports": ["80"]}]}},
     "spec.ingress.0.dst_ports.0"),
    ({"kind": "Policy", "metadata": {"name": "p"},
      "spec": {"ingress": [{"action": "allow", "protocol": "icmpv6", "icmp_type": True}]}},
     "spec.ingress.0.icmp_type"),
    ({"kind": "Policy", "metadata": {"name": "p"}, "spec": {"ingress": [{"action": "allow", "protocol": 6.0}]}},
     "spec.ingress.0.protocol"),
    ({"kind": "Policy", "metadata": {"name": "p"}, "spec": {"ingress": [{"action": "allow", "ip_version": 4.0}]}},
     "spec.ingress.0.ip_version"),
    ({"kind": "Policy", "metadata": {"name": "p"}, "spec": {"ingress": [{"action": "allow", "ip_version": True}]}},
     "spec.ingress.0.ip_version"),
    ({"kind": "Config", "metadata": {"name": "global"}, "spec": {"metrics_port": True}}, "spec.metrics_port"),
    ({"kind": "Config", "metadata": {"name": "global"}, "spec": {"resync_interval_s": "30"}},
     "spec.resync_interval_s"),
    ({"kind": "Config", "metadata": {"name": "global"}, "spec": {"node_to_node_mesh": "false"}},
     "spec.node_to_node_mesh"),
    # a field of either family names the field, not pydantic's union members
    ({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00::/64", "dns_servers": ["bogus"]}},
     "spec.dns_servers.0"),
    ({"kind": "Policy", "metadata": {"name": "p"}, "spec": {"egress": [{"action": "allow", "dst_nets": ["x"]}]}},
     "spec.egress.0.dst_nets.0"),
]


@pytest.mark.parametrize(("doc", "field"), BAD)
def test_bad_input_names_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidResource) as exc:
        validate(doc)
    assert any(e.startswith(field + ":") for e in exc.value.errors), exc.value.errors


def test_parse_documents_reports_every_bad_document() -> None:
    docs = [EXAMPLES[0], _endpoint(interface="x|y"), EXAMPLES[1], _endpoint(mac="nope")]
    with pytest.raises(InvalidResource) as exc:
        parse_documents(yaml.safe_dump_all(docs), "f.yaml")
    assert len(exc.value.errors) == 2
    assert "document 2" in exc.value.errors[0] and "spec.interface" in exc.value.errors[0]
    assert "document 4" in exc.value.errors[1] and "spec.mac" in exc.value.errors[1]


@pytest.mark.parametrize("value", [b"{not json", b'{"kind": "Host"}', encode(validate(EXAMPLES[0]))])
def test_decode_corrupt_records(value: bytes) -> None:
    with pytest.raises(InvalidResource) as exc:
        decode("/tabby/v1/hosts/other-name", value)
    assert exc.value.where == "/tabby/v1/hosts/other-name"


@given(st.text(max_size=40))
def test_interface_names_accepted_are_safe(name: str) -> None:
    try:
        res = validate(_endpoint(interface=name))
    except InvalidResource as e:
        assert any(err.startswith("spec.interface:") for err in e.errors)
        return
    iface = res.spec.interface
    assert 1 <= len(iface) <= 15
    assert not set(iface) & set("/: \t\n;|&$`'\"\\<>()*?![]{}~#%=")
    assert iface[0] not in "-."


@given(st.text(alphabet="abc0123456789-_.", min_size=1, max_size=12), st.sampled_from(list(";|&$`'\"\\<> ()/:")))
def test_any_shell_metacharacter_is_rejected(stem: str, bad: str) -> None:
    with pytest.raises(InvalidResource):
        validate(_endpoint(interface=(stem + bad)[:15]))


@given(st.lists(st.ip_addresses(v=6), min_size=0, max_size=3, unique=True),
       st.lists(st.ip_addresses(v=4), min_size=0, max_size=3, unique=True),
       st.integers(0, 128), st.integers(0, 32))
def test_endpoint_addresses_valid_iff_host_routes(v6: list[Any], v4: list[Any], p6: int, p4: int) -> None:
    doc = _endpoint(ipv6_addresses=[f"{a}/{p6}" for a in v6], ipv4_addresses=[f"{a}/{p4}" for a in v4])
    def usable(a: Any) -> bool:
        return not (a.is_unspecified or a.is_multicast or a.is_loopback or a.is_link_local)

    should = ((v6 or v4) and (not v6 or p6 == 128) and (not v4 or p4 == 32)
              and all(usable(a) for a in [*v6, *v4]))
    try:
        res = validate(doc)
    except InvalidResource:
        assert not should
        return
    assert should
    assert decode("/tabby/v1/endpoints/h/e", encode(res)) == res


@given(st.text(min_size=1, max_size=60, alphabet=st.characters(min_codepoint=33, max_codepoint=126)))
def test_derived_router_id_is_always_acceptable(name: str) -> None:
    rid = derive_router_id(name)
    assert rid != ipaddress.IPv4Address("0.0.0.0")
    assert rid not in ipaddress.IPv4Network("224.0.0.0/3")
    assert rid == derive_router_id(name)


def test_ipv6_only_hosts_get_distinct_router_ids() -> None:
    hosts = [validate({"kind": "Host", "metadata": {"name": f"h{i}"}, "spec": {"ipv6_address": f"fd00::{i + 1}"}})
             for i in range(500)]
    assert refused_hosts([(h, i) for i, h in enumerate(hosts)]) == {}
    rid = hosts[0].effective_router_id()
    twin = validate({"kind": "Host", "metadata": {"name": "twin"},
                     "spec": {"ipv6_address": "fd00::ffff", "router_id": str(rid)}})
    # the newer record is refused, whatever the names say
    assert refused_hosts([*((h, i + 10) for i, h in enumerate(hosts)), (twin, 1000)]) == {
        "twin": f"conflict: router id {rid} held by host h0"}
    assert refused_hosts([*((h, i + 10) for i, h in enumerate(hosts)), (twin, 1)]) == {
        "h0": f"conflict: router id {rid} held by host twin"}
    same_addr = validate({"kind": "Host", "metadata": {"name": "copy"}, "spec": {"ipv6_address": "fd00::2"}})
    assert refused_hosts([(hosts[1], 5), (same_addr, 6)]) == {"copy": "conflict: fabric address fd00::2 held by host h1"
                                                              + (f"; router id {same_addr.effective_router_id()}"
                                                                 f" held by host h1" if same_addr.effective_router_id()
                                                                 == hosts[1].effective_router_id() else "")}


def test_effective_config_layers() -> None:
    cfg = effective_config(ConfigSpec(resync_interval_s=30, log_level="warning"), ConfigSpec(log_level="debug"))
    assert (cfg.resync_interval_s, cfg.log_level, cfg.metrics_port) == (30, "debug", 9091)


@pytest.mark.parametrize(("text", "labels", "expected"), [
    ("all()", {}, True),
    ("role == 'db'", {"role": "db"}, True),
    ("role == 'db'", {"role": "web"}, False),
    ("role != 'db'", {}, True),
    ("has(debug)", {"debug": ""}, True),
    ("!has(debug)", {"debug": ""}, False),
    ("tier in {'a', 'b'} && env == 'prod'", {"tier": "b", "env": "prod"}, True),
    ("tier not in {'a', 'b'} || has(x)", {"tier": "a"}, False),
    ("(a == '1' || b == '2') && !(c == '3')", {"b": "2"}, True),
])
def test_selectors(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(text).matches(labels) is expected


@pytest.mark.parametrize("text", ["", "role", "role == db", "has(", "a == 'x' &&", "a in {'x'", "a ~ 'b'"])
def test_bad_selectors(text: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(text)


def test_yaml_with_a_key_that_is_not_a_string_is_refused_naming_it() -> None:
    with pytest.raises(InvalidResource) as e:
        parse_documents("kind: Host\nmetadata: {name: a, labels: {1: x}}\nspec: {ipv6_address: 'fd00::1'}\n")
    assert "key 1 is not a string" in str(e.value)


def test_escape_free_json_is_still_held_to_the_depth_limit() -> None:
    deep = '{"kind": "Host", "metadata": {"name": "a", "labels": ' + "[" * 40 + "]" * 40 + "}}"
    with pytest.raises(InvalidResource, match="nested deeper than 32"):
        decode("/tabby/v1/hosts/a", deep.encode())
    tricky = '{"kind": "Host", "metadata": {"name": "a", "labels": {"x": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}}}'
    with pytest.raises(InvalidResource, match="label value"):  # brackets inside a string are text
        decode("/tabby/v1/hosts/a", tricky.encode())


@pytest.mark.parametrize("field,value", [("ipv6_address", "fd00::2%x as 64512; } include \"etc\""),
                                         ("ipv6_address", "fe80::1%eth0")])
def test_scoped_addresses_never_reach_a_config(field: str, value: str) -> None:
    with pytest.raises(InvalidResource, match="scoped address"):
        validate({"kind": "Host", "metadata": {"name": "a"}, "spec": {field: value}})
    with pytest.raises(InvalidResource, match="scoped address"):
        validate({"kind": "BGPPeer", "metadata": {"name": "p"}, "spec": {"peer_ip": value, "asn": 65001}})


def test_hostile_keys_in_an_error_are_escaped_and_bounded() -> None:
    with pytest.raises(InvalidResource) as e:
        decode("/tabby/v1/hosts/a", b'{"kind": "Host", "metadata": {"name": "a", "x\\nFORGED": 1}, "spec": {}}')
    assert "\n" not in str(e.value) and "\n" not in e.value.field and "x\\x0aFORGED" in e.value.field
    with pytest.raises(InvalidResource) as e:
        decode("/tabby/v1/hosts/" + "k" * 5000, b"{")
    assert len(e.value.where) <= 1000


@pytest.mark.parametrize(("key", "doc", "field"), [
    ("hosts/h1", {"host": "h1", "heartbeat": "5", "expires": None}, "heartbeat"),
    ("hosts/h1", {"host": "h1", "heartbeat": 5, "expires": True}, "expires"),
    ("hosts/h1", {"host": "h1", "heartbeat": 5, "expires": None,
                  "neighbour_table": {"sized_here": "no", "fits": True, "wanted_gc_thresh3": 1}},
     "neighbour_table.sized_here"),
    ("hosts/h1", {"host": "h1", "heartbeat": 5, "expires": None, "nat64": {"tayga": "up", "restarts": 1.0}},
     "nat64.restarts"),
    ("bgp/h1", {"host": "h1", "sessions": [{"imported": "3"}]}, "sessions.0.imported"),
])
def test_status_records_take_json_types_only(key: str, doc: dict[str, Any], field: str) -> None:
    from tabby.model.keys import STATUS_PREFIX
    from tabby.model.status import decode_status

    with pytest.raises(InvalidResource) as exc:
        decode_status(STATUS_PREFIX + key, json.dumps(doc).encode())
    assert any(e.startswith(field + ":") for e in exc.value.errors), exc.value.errors
    # an integer where a number is wanted is still a number
    ok = decode_status(STATUS_PREFIX + "hosts/h1", b'{"host": "h1", "heartbeat": 5, "expires": null}')
    assert ok.heartbeat == 5.0 and ok.expires is None


def test_yaml_scalars_are_read_as_yaml_1_2_says() -> None:
    """PyYAML reads YAML 1.1: a port range 10:20 was the base-60 integer 620, 010 was 8, a label
    value `on` was true (and refused), 1e3 was text (and refused as an order)."""
    (pol,) = parse_documents("""
kind: Policy
metadata: {name: p, labels: {enabled: on, since: 2026-12-01}}
spec:
  order: 1e3
  ingress: [{action: allow, protocol: tcp, dst_ports: [10:20, 010, 0x50]}]
""")
    assert pol.metadata.labels == {"enabled": "on", "since": "2026-12-01"}
    assert pol.spec.order == 1000.0 and pol.spec.ingress[0].dst_ports == ("10:20", 10, 80)
    with pytest.raises(InvalidResource, match=r"spec\.order"):
        parse_documents("kind: Policy\nmetadata: {name: p}\nspec: {order: yes}\n")


def test_yaml_written_by_get_reads_back_the_same() -> None:
    """PyYAML's dumper wrote the strings 1e3 and 0o17 plain (YAML 1.1 reads them as text), and
    apply, reading YAML 1.2, took them for numbers."""
    from tabby.model.codec import dump_yaml

    ep = validate({"kind": "Endpoint", "metadata": {"name": "vm-1e3", "labels": {
        "a": "1e3", "b": "0o17", "c": "on", "d": "010", "e": "2026-12-01", "f": "true", "g": "0x1F"}},
        "spec": {"host": "h", "orchestrator": "vm", "workload_id": "12e1", "interface": "tap0",
                 "mac": "52:54:00:00:00:01", "ipv6_addresses": ["fd00::1"]}})
    text = dump_yaml([to_plain(ep)])
    assert parse_documents(text) == [ep]
    assert yaml.safe_load(text)["metadata"]["labels"] == ep.metadata.labels  # and a YAML 1.1 reader too


@pytest.mark.parametrize("field,value", [("ipv6_address", "fe80::2"), ("ipv4_address", "169.254.0.7")])
def test_a_link_local_fabric_address_is_refused(field: str, value: str) -> None:
    """Every other host's BIRD would peer with it as "neighbor fe80::2%None" (no interface is known)."""
    with pytest.raises(InvalidResource, match="cannot be a fabric address"):
        validate({"kind": "Host", "metadata": {"name": "a"}, "spec": {field: value}})


def test_what_a_review_found_the_decoders_took_or_choked_on() -> None:
    """Pools over addresses no workload may hold (IPAM handed out 127.0.0.1 and fe80::1, and each
    ADD failed after), a record of half a million bad values (2 GB and seconds to refuse, a
    MemoryError under a limit), YAML tags past the text checks, an IPAM seq of 4,300 digits."""
    import json

    from tabby.model import InvalidResource, decode, parse_documents
    from tabby.model.ipam import decode_ipam

    for cidr in ("127.0.0.0/24", "224.0.0.0/24", "169.254.0.0/16", "fe80::/64", "::/0", "0.0.0.0/0", "ff02::/16"):
        with pytest.raises(InvalidResource, match="spec"):
            validate({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": cidr}})
        raw = json.dumps({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": cidr}}).encode()
        with pytest.raises(InvalidResource):
            decode("/tabby/v1/ippools/p", raw)
    validate({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "fd00:e::/64"}})
    huge = json.dumps({"kind": "Policy", "metadata": {"name": "p"},
                       "spec": {"ingress": [{"action": "allow", "src_nets": [1] * 520_000}]}},
                      separators=(",", ":")).encode()  # 1,040,094 bytes: under the 1 MiB a record may hold
    with pytest.raises(InvalidResource, match="more than 100000 values"):
        decode("/tabby/v1/policies/p", huge)
    with pytest.raises(InvalidResource, match="no JSON value"):
        parse_documents("kind: Policy\nmetadata: {name: p}\nspec:\n  selector: !!binary cm9sZSA9PSAieCIK\n")
    block = {"cidr": "10.0.0.0/26", "host": "h1", "seq": int("9" * 4300), "allocations": {},
             "free": list(range(1, 63)), "reserved": [0, 63]}
    text = json.dumps(block).encode()
    with pytest.raises(InvalidResource, match="seq"):
        decode_ipam("/tabby/v1/ipam/blocks/10.0.0.0-26", text)
    # what the readers refuse is not written either: more values than a record may hold, in 578 KB
    many = {"kind": "Policy", "metadata": {"name": "p"}, "spec": {"ingress": [
        {"action": "allow", "protocol": "tcp", "dst_ports": list(range(1, 50_001))} for _ in range(2)]}}
    with pytest.raises(InvalidResource, match="more than 100000 values"):
        parse_documents(json.dumps(many))
    # YAML merge keys still let a mapping's own key override the merged one
    docs = parse_documents("kind: Profile\nmetadata: {name: p}\nspec:\n  ingress:\n"
                           "  - &web {action: allow, protocol: tcp, dst_ports: [80]}\n"
                           "  - <<: *web\n    dst_ports: [443]\n")
    assert [r.dst_ports for r in docs[0].spec.ingress] == [(80,), (443,)]

