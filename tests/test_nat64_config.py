"""NAT64/DNS64's pure parts: the model's checks, the tayga and unbound configs, the DNS servers a
nat64 pool's workloads get, the masquerade rule, the CNI result's name servers. The daemons
themselves run for real in tests/test_lab_nat64.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tabby.cni.result import Plumbed, build
from tabby.dataplane.nat64_config import TUN, clash, dns_servers, inputs, render
from tabby.dataplane.nft_rules import render as render_nft
from tabby.dataplane.nft_structure import Structure
from tabby.model import InvalidResource, validate
from tabby.model.resources import CONFIG_DEFAULTS, effective_config


def pool(cidr: str, **spec: object) -> object:
    return validate({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": cidr, **spec}}).spec


def config(**spec: object) -> object:
    return effective_config(validate({"kind": "Config", "metadata": {"name": "global"}, "spec": spec}).spec, None)


@pytest.mark.parametrize(("spec", "words"), [
    ({"nat64_prefix": "64:ff9b:1::/96"}, "nat64_prefix: 64:ff9b:1::/96: in ::/8"),
    ({"nat64_prefix": "fd00:64::/64"}, "is a /96"),
    ({"nat64_prefix": "fe80::/96"}, "link-local"),
    ({"nat64_pool4": "127.0.0.0/24"}, "nat64_pool4: 127.0.0.0/24: loopback"),
    ({"nat64_pool4": "10.64.0.0/31"}, "/8../30"),
    ({"dns64_server": "10.0.0.1"}, "dns64_server"),
    ({"dns64_server": "fe80::53"}, "dns64_server: fe80::53: a resolver every workload reaches"),
    ({"dns64_server": "::ffff:10.0.0.1"}, "IPv4-mapped"),
    ({"nat64_prefix": "fd00:64::%x\n  access-control: ::0 allow\n#/96"}, "nat64_prefix"),
    ({"dns64_server": "fd00:64::35", "nat64_prefix": "fd00:64::/96"}, "dns64_server: fd00:64::35 is inside"),
    ({"dns64_server": "fd00:53::1", "dns64_upstreams": ["fd00:53::1"]}, "a forwarding loop"),
    ({"dns64_upstreams": ["0.0.0.0"]}, "not a resolver's address"),
    ({"dns64_upstreams": ["10.0.0.1", "fd00::1", "10.0.0.2", "10.0.0.3"]}, "dns64_upstreams"),
])
def test_config_refuses_what_tayga_or_unbound_could_not_take(spec: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidResource, match=words.replace("(", r"\(").replace(".", r"\.")):
        validate({"kind": "Config", "metadata": {"name": "global"}, "spec": spec})


def test_nat64_is_for_ipv6_pools_only_and_no_pool_is_scoped() -> None:
    with pytest.raises(InvalidResource, match="nat64: only for IPv6 pools"):
        pool("10.0.0.0/24", nat64=True)
    with pytest.raises(InvalidResource, match="no scoped"):  # its text would reach unbound's access-control
        pool("fd00:1::%x\n  local-data: x/64", nat64=True)
    with pytest.raises(InvalidResource, match="no %zone"):  # nor a rule's (the nftables table)
        validate({"kind": "Policy", "metadata": {"name": "p"}, "spec": {
            "selector": "all()", "egress": [{"action": "deny", "dst_nets": ["fd00:64::%x/96"]}]}})
    assert pool("fd00:e::/112", nat64=True).nat64  # type: ignore[attr-defined]


def test_no_nat64_pool_no_translator_and_a_disabled_one_keeps_its_workloads_translated() -> None:
    assert inputs([pool("fd00:e::/112"), pool("10.0.0.0/24")], CONFIG_DEFAULTS, "fd00:f::1") is None
    inp = inputs([pool("fd00:e::/112", nat64=True, disabled=True)], CONFIG_DEFAULTS, "fd00:f::1")
    assert inp is not None and inp.clients == ("fd00:e::/112",)


def test_nat64_that_would_take_another_resources_addresses_is_refused() -> None:
    cfg = config(nat64_prefix="fd00:64::/96", nat64_pool4="10.64.0.0/24", dns64_server="fd00:e::53")
    inp = inputs([pool("fd00:e::/112", nat64=True)], cfg, None)
    assert inp is not None

    def rec(kind: str, spec: dict[str, object]) -> object:
        return validate({"kind": kind, "metadata": {"name": "x"}, "spec": spec})

    assert "dns64_server fd00:e::53 is inside IPPool x" in str(clash(inp, [rec("IPPool", {"cidr": "fd00:e::/112"})]))
    assert "overlaps IPPool x" in str(clash(inp, [rec("IPPool", {"cidr": "10.64.0.0/16"})]))
    assert "overlaps IPPool x" in str(clash(inp, [rec("IPPool", {"cidr": "fd00:64::/64"})]))
    assert "fabric address 10.64.0.9" in str(clash(inp, [rec("Host", {"ipv4_address": "10.64.0.9"})]))
    assert clash(inp, [rec("IPPool", {"cidr": "fd00:d::/112"}), rec("Host", {"ipv6_address": "fd00:f::1"})]) is None


def test_the_defaults_render_the_well_known_prefix_and_tayga_accepts_them(tmp_path: Path) -> None:
    inp = inputs([pool("fd00:e::/112", nat64=True)], CONFIG_DEFAULTS, "fd00:f::1")
    assert inp is not None and inp.prefix == "64:ff9b::/96" and inp.dns64_server is None
    r = render(inp, tmp_path)
    assert r.unbound is None and r.dns64_address is None  # DNS64 only with a dns64_server
    assert r.routes == ("64:ff9b::/96", "192.168.255.0/24")
    lines = r.tayga.splitlines()
    assert f"tun-device {TUN}" in lines and "prefix 64:ff9b::/96" in lines
    assert "ipv4-addr 192.168.255.1" in lines and "dynamic-pool 192.168.255.0/24" in lines
    # tayga cannot map a private ipv4-addr into the well-known prefix: its own IPv6 address is given
    assert "ipv6-addr fd00:f::1" in lines
    (tmp_path / "tayga").mkdir()
    conf = tmp_path / "tayga.conf"
    conf.write_text(r.tayga)
    # tayga reads and checks the whole config, then makes the persistent tun: in a namespace of
    # its own (unshare), gone with it
    res = subprocess.run(["unshare", "-n", "tayga", "-c", str(conf), "--mktun"], capture_output=True, text=True)
    assert res.returncode == 0 and f"Created persistent tun device {TUN}" in res.stdout + res.stderr, \
        res.stdout + res.stderr


def test_dns64_renders_unbound_for_the_nat64_pools_only(tmp_path: Path) -> None:
    cfg = config(nat64_prefix="fd00:64::/96", nat64_pool4="10.64.0.0/24", dns64_server="fd00:53::1",
                 dns64_upstreams=["10.99.0.53", "fd00:99::53"])
    inp = inputs([pool("fd00:e::/112", nat64=True), pool("fd00:d::/112"), pool("10.65.0.0/16")], cfg, None)
    assert inp is not None and inp.clients == ("fd00:e::/112",)
    r = render(inp, tmp_path)
    assert not any(line.startswith("ipv6-addr") for line in r.tayga.splitlines())
    assert r.unbound is not None and r.dns64_address == "fd00:53::1"
    u = [line.strip() for line in r.unbound.splitlines()]
    assert "interface: fd00:53::1" in u and "dns64-prefix: fd00:64::/96" in u
    assert 'module-config: "dns64 iterator"' in u
    assert "access-control: fd00:e::/112 allow" in u and "access-control: fd00:d::/112 allow" not in u
    assert "access-control: ::/0 refuse" in u
    assert u[u.index("forward-zone:"):] == ["forward-zone:", 'name: "."', "forward-addr: 10.99.0.53",
                                            "forward-addr: fd00:99::53"]
    conf = tmp_path / "unbound.conf"
    conf.write_text(r.unbound)
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_nat64_pool_gives_the_dns64_resolver_first() -> None:
    cfg = config(dns64_server="fd00:53::1")
    assert [str(a) for a in dns_servers(pool("fd00:e::/112", nat64=True, dns_servers=["fd00::53"]), cfg)] == \
        ["fd00:53::1", "fd00::53"]
    assert [str(a) for a in dns_servers(pool("fd00:e::/112", dns_servers=["fd00::53"]), cfg)] == ["fd00::53"]
    assert dns_servers(pool("fd00:e::/112", nat64=True), CONFIG_DEFAULTS) == ()  # no dns64_server: none


def test_the_nat64_pool_is_masqueraded_the_tun_is_its_pools_alone_and_no_unknown_workload() -> None:
    cmds, _ = render_nft(Structure(nat64_pool4="10.64.0.0/24", nat64_pools=("fd00:e::/112",)))
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    nat = [r for r in rules if r["chain"] == "nat_out"]
    assert len(nat) == 1 and {"masquerade": None} in nat[0]["expr"]
    assert "10.64.0.0" in str(nat[0]["expr"])
    guards = {r["comment"].split(":", 1)[1]: r for r in rules if r["chain"] == "forward" and "NAT64" in r["comment"]}
    assert set(guards) == {"NAT64 from outside the nat64 pools", "NAT64 pool: no new connection in"}
    assert "fd00:e::" in str(guards["NAT64 from outside the nat64 pools"]["expr"])
    unknown = [r for r in rules if "unknown" in r["comment"]]
    assert unknown and all(TUN in str(r["expr"]) for r in unknown)
    cmds, _ = render_nft(Structure())
    assert not [c for c in cmds if c.get("add", {}).get("rule", {}).get("chain") == "nat_out"]


def test_the_cni_result_names_the_resolver_before_a_previous_plugins() -> None:
    p = Plumbed("tby1", "ee:ee:ee:ee:ee:ee", "eth0", "02:00:00:00:00:01", "/run/netns/x", 1500,
                (("fd00:e::5/128", "fe80::1"),), (("::/0", "fe80::1"),))
    assert build("1.1.0", p, None, None, ("fd00:53::1",))["dns"] == {"nameservers": ["fd00:53::1"]}
    prev = {"dns": {"nameservers": ["fd00::53", "fd00:53::1"], "search": ["example"]}}
    assert build("1.1.0", p, prev, None, ("fd00:53::1",))["dns"] == {  # DNS64 first, once
        "nameservers": ["fd00:53::1", "fd00::53"], "search": ["example"]}
    for odd in (None, "8.8.8.8", [1, None, {}], {"x": 1}):  # a previous plugin's odd value: left out
        assert build("1.1.0", p, {"dns": {"nameservers": odd}}, None, ("fd00:53::1",))["dns"]["nameservers"] == \
            ["fd00:53::1"]
    assert "dns" not in build("1.1.0", p)
