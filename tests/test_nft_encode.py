"""The netlink encoder of the policy table against libnftables: the same varied table written both
ways into two namespaces must list identically, bytecode included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agentlib import namespace
from test_policy import ep

from tabby.agent.policy_calc import PolicyIndex
from tabby.dataplane.nft_encode import Unsupported, replace_messages
from tabby.dataplane.nft_rules import render
from tabby.model import validate

# every expression kind the renderer has: meta, payload (merged or not), cmp, ranges as two cmps,
# prefixes byte-aligned or masked, lookups (inverted too), named and anonymous sets (plain,
# interval, open-ended, one element), concatenations, ct state, mark bitwise, verdicts, jumps,
# counters, masquerade, wildcard interface names
RULES: list[dict[str, Any]] = [
    {"action": "allow"},
    {"action": "allow", "protocol": "tcp", "dst_ports": [80]},
    {"action": "allow", "protocol": "udp", "dst_ports": [53, "5000:5010"], "src_ports": [1234]},
    {"action": "allow", "protocol": "tcp", "dst_ports": [1, 2, "30:40", 5, 6, "7:7"]},
    {"action": "deny", "protocol": "sctp", "src_ports": [9, 10, 11, 12, 13]},
    {"action": "allow", "protocol": 47},
    {"action": "allow", "protocol": "icmp", "icmp_type": 8, "icmp_code": 0},
    {"action": "allow", "protocol": "icmpv6", "icmp_type": 128},
    {"action": "deny", "src_nets": ["fd00:99::/64", "10.99.0.0/16"]},
    {"action": "deny", "src_nets": ["fd00:98::/64", "fd00:97::1/128", "2001:db8::/32"], "dst_nets": ["fd00:1::5/128"]},
    {"action": "allow", "dst_nets": ["192.0.2.0/24", "198.51.100.7/32"], "protocol": "tcp"},
    {"action": "allow", "src_selector": 'role == "cli"', "dst_selector": "has(role)", "protocol": "tcp",
     "dst_ports": [443]},
    {"action": "allow", "ip_version": 4, "protocol": "udp"},
    {"action": "deny", "ip_version": 6},
    {"action": "deny", "src_nets": ["10.128.0.0/9", "fd00:a0::/28"]},
    {"action": "allow", "src_nets": ["10.1.1.1/32"], "dst_nets": ["10.2.2.2/32"], "protocol": "udp",
     "src_ports": [7], "dst_ports": [8]},
    {"action": "allow", "src_nets": ["10.99.0.0/16"], "dst_nets": ["10.1.2.3/32"]},
    {"action": "allow", "src_nets": ["fd00:1::1/128", "fd00:1::2/128"], "protocol": "icmpv6", "icmp_type": 1,
     "icmp_code": 4},
    {"action": "allow", "protocol": "tcp", "src_ports": ["1000:2000", 3000, "0:10"],
     "dst_ports": [65535, "60000:65535", 5, 9, 7]},
    # anonymous sets too big for one netlink attribute (64 KiB): their elements span several messages
    {"action": "deny", "protocol": "tcp", "src_nets": [f"fd00:77::{i:x}/128" for i in range(1500)] + ["fd00:78::/64"],
     "dst_ports": list(range(10_000, 15_000))},
    {"action": "deny", "dst_nets": [f"10.77.{i // 256}.{i % 256}/32" for i in range(0, 9000, 2)]},
    # a /0 alone (nft: the whole field masked with zeros): it sent every replace through libnftables
    {"action": "deny", "src_nets": ["0.0.0.0/0"], "protocol": "udp", "dst_ports": [9]},
    {"action": "allow", "dst_nets": ["::/0"], "protocol": "tcp", "dst_ports": [9]},
]


def varied_index() -> PolicyIndex:
    idx = PolicyIndex()
    idx.set_policy("web", validate({"kind": "Policy", "metadata": {"name": "web"}, "spec": {
        "order": 10, "selector": 'role == "web"', "ingress": RULES, "egress": RULES[:3]}}))
    idx.set_policy("db", validate({"kind": "Policy", "metadata": {"name": "db"}, "spec": {
        "order": 5, "selector": 'role == "db"', "ingress": [{"action": "deny", "src_selector": 'role == "web"'}]}}))
    idx.set_profile("open", validate({"kind": "Profile", "metadata": {"name": "open"}, "spec": {
        "ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]}}))
    # two IPv6 pools (an anonymous interval set), one IPv4 pool (a plain prefix match)
    for name, cidr, nat in (("p6", "fd00:e::/64", True), ("q6", "fd00:f::/64", False), ("p4", "10.65.0.0/16", True)):
        idx.set_pool(name, validate({"kind": "IPPool", "metadata": {"name": name},
                                     "spec": {"cidr": cidr, "nat_outgoing": nat}}))
    idx.set_nat64("10.64.0.0/24", ("fd00:e::/64", "fd00:f::/64"))  # NAT64's masquerade and forward guards
    roles = ["web", "db", "cli"]
    for i in range(1, 40):
        idx.set_endpoint(f"e{i}", ep(f"e{i}", i, {"role": roles[i % 3]}, host="h1" if i % 4 else "h2",
                                     v4=bool(i % 5), profiles=("open",) if i % 2 else ()), bool(i % 4))
    idx.take_delta()
    return idx


WRITE_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_nft_encode import varied_index
from tabby.dataplane.nft_encode import replace_messages
from tabby.dataplane.nft_netlink import NftSocket
from tabby.dataplane.nft_rules import render, replace_text
import nftables
nft = nftables.Nftables()
nft.set_json_output(True)  # which also makes it read JSON
idx = varied_index()
s = idx.structure()
cmds, _ = render(s)
for _ in range(2):  # the second time over an existing table: the delete half of the replace
    if sys.argv[2] == "json":
        rc, _, err = nft.cmd(replace_text(cmds, idx.desired_elements()))
        assert rc == 0, err
    else:
        NftSocket().transaction(replace_messages("tabby", cmds, s.set_names(), idx.desired_elements()))
"""


def listings(ns: str) -> tuple[Any, list[str]]:
    def nft(*args: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, "nft", *args, "list", "table", "inet", "tabby"],
                              capture_output=True, text=True, check=True).stdout

    listed = json.loads(nft("-j"))["nftables"]
    for item in listed:  # a hash set lists in its own (seeded) order
        if "set" in item and "elem" in item["set"]:
            item["set"]["elem"] = sorted(item["set"]["elem"], key=json.dumps)
    # the bytecode as the kernel holds it: each set's elements sorted for the same reason
    blocks: list[list[str]] = []
    for line in nft("--debug=netlink").splitlines():
        if not line.startswith("\t") or not blocks:
            blocks.append([line])
        else:
            blocks[-1].append(line)
    debug = [line for b in blocks for line in [b[0], *sorted(b[1:])] if b[0].startswith("inet tabby @")]
    debug += [line for b in blocks if not b[0].startswith("inet tabby @") for line in b]
    return listed, debug


def test_netlink_replace_lists_exactly_like_libnftables() -> None:
    tests_dir = str(Path(__file__).parent)
    out = {}
    for how in ("json", "netlink"):
        with namespace("enc") as ns:
            r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", WRITE_SCRIPT, tests_dir, how],
                               capture_output=True, text=True, timeout=300)  # labs load this machine
            assert r.returncode == 0, r.stderr
            out[how] = listings(ns)
    listed, debug = out["netlink"]
    assert listed == out["json"][0]
    assert debug == out["json"][1]
    text = "\n".join(debug)
    for needle in ("lookup reg 1 set __set", "bitwise reg 1", "cmp gte", "masq", "jump -> guard",
                   "meta load iiftype", "ct load state", "set wl_src6 0x1"):
        assert needle in text, needle
    assert re.search(r"payload load 4b @ transport header \+ 0", text)  # sport and dport merged
    assert "element 0000973a" in text and "element 26234d0a" in text  # the last of 5,000 ports, of 4,500 /32s


def test_shapes_the_encoder_does_not_know_are_refused_not_guessed() -> None:
    s = varied_index().structure()
    cmds, _ = render(s)
    skuid = {"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": 0}}
    odd = [*cmds, {"add": {"rule": {"family": "inet", "table": "tabby", "chain": "guard", "expr": [skuid]}}}]
    with pytest.raises(Unsupported):
        replace_messages("tabby", odd, s.set_names(), {})
    no_dependency = [*cmds, {"add": {"rule": {"family": "inet", "table": "tabby", "chain": "guard", "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.0.0.1"}}]}}}]
    with pytest.raises(Unsupported):  # nft would add "meta nfproto ipv4"; we do not guess it
        replace_messages("tabby", no_dependency, s.set_names(), {})
