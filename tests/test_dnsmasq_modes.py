"""dnsmasq's config for VMs on pools of each IPv6 mode (pure): the RA modes, the prefix always
off-link, DNS servers per pool, and one anchor per set of SLAAC/stateless pools, so a tap's RA
carries only its own network's prefixes and flags."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tabby.dataplane.dnsmasq_config import ANCHOR, Vm, render
from tabby.model import validate


def pool(cidr: str, mode: str = "dhcpv6-stateful", dns: tuple[str, ...] = ()) -> object:
    spec: dict[str, object] = {"cidr": cidr, "dns_servers": list(dns)}
    if ":" in cidr:
        spec["ipv6_mode"] = mode
    return validate({"kind": "IPPool", "metadata": {"name": cidr.replace("/", "-").replace(":", "-").replace(".", "-")},
                     "spec": spec}).spec


def test_each_mode_gets_its_ra_and_its_own_anchor() -> None:
    pools = [pool("2001:db8:7::/64"), pool("192.0.2.0/24", dns=("192.0.2.53",)),
             pool("2001:db8:8::/64", "slaac"), pool("2001:db8:9::/64", "dhcpv6-stateless", ("2001:db8:9::53",))]
    vms = [Vm("tapa", "52:54:00:00:00:0a", ("2001:db8:7::a",), ("192.0.2.10",)),
           Vm("tapb", "52:54:00:00:00:0b", ("2001:db8:8::5054:ff:fe00:b",), ()),
           Vm("tapc", "52:54:00:00:00:0c", ("2001:db8:9::5054:ff:fe00:c",), ()),
           Vm("tapd", "52:54:00:00:00:0d", ("2001:db8:8::5054:ff:fe00:d",), ())]
    r = render(vms, pools, Path("/run/x"))
    lines = r.conf.splitlines()
    assert "dhcp-range=set:pool1,2001:db8:7::,static,off-link,64,1h" in lines
    assert "dhcp-range=set:pool2,2001:db8:8::,ra-only,off-link,64,1h" in lines
    assert "dhcp-range=set:pool3,2001:db8:9::,ra-stateless,off-link,64,1h" in lines
    assert "dhcp-option=tag:pool3,option6:dns-server,[2001:db8:9::53]" in lines
    assert "dhcp-option=tag:pool0,option:dns-server,192.0.2.53" in lines
    assert r.anchors == ((ANCHOR, ("192.0.2.0/24", "2001:db8:7::/64")), ("tbys0", ("2001:db8:8::/64",)),
                         ("tbys1", ("2001:db8:9::/64",)))
    assert f"bridge-interface={ANCHOR},tapa" in lines
    assert "bridge-interface=tbys0,tapb,tapd" in lines and "bridge-interface=tbys1,tapc" in lines


def test_a_stateful_pool_wider_than_a_64_gets_a_range_per_64_that_dnsmasq_takes(tmp_path: Path) -> None:
    """dnsmasq refuses a range shorter than /64 ("prefix length must be at least 64"): with one in its
    config it would not start, and every VM on the host lost DHCP and, in time, its default route."""
    pools = [pool("2001:db8:100::/48"), pool("2001:db8:7::/64"), pool("2001:db8:200::/80")]
    vms = [Vm("tapa", "52:54:00:00:00:0a", ("2001:db8:100:5::a",), ()),
           Vm("tapb", "52:54:00:00:00:0b", ("2001:db8:100:5::b",), ()),
           Vm("tapc", "52:54:00:00:00:0c", ("2001:db8:100:ff00::c",), ()),
           Vm("tapd", "52:54:00:00:00:0d", ("2001:db8:7::d",), ()),
           Vm("tape", "52:54:00:00:00:0e", ("2001:db8:200::e",), ())]
    r = render(vms, pools, tmp_path)
    ranges = [line for line in r.conf.splitlines() if line.startswith("dhcp-range=")]
    assert ranges == ["dhcp-range=set:pool0,2001:db8:7::,static,off-link,64,1h",
                      "dhcp-range=set:pool1,2001:db8:100:5::,static,off-link,64,1h",
                      "dhcp-range=set:pool1,2001:db8:100:ff00::,static,off-link,64,1h",
                      "dhcp-range=set:pool2,2001:db8:200::,static,off-link,80,1h"]
    # dnsmasq serves a range only through an address of its own in the same /64: one per /64 served
    assert r.anchors == ((ANCHOR, ("2001:db8:7::/64", "2001:db8:100:5::/64", "2001:db8:100:ff00::/64",
                                   "2001:db8:200::/80")),)
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(r.conf)
    (tmp_path / "dnsmasq.hosts").write_text(r.hosts)
    check = subprocess.run(["dnsmasq", "--test", f"--conf-file={conf}"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_a_64_whose_first_address_is_a_workload_s_is_not_anchored_and_says_why(tmp_path: Path) -> None:
    """Handed out before IPAM reserved it: anchoring it would make this host take that workload's
    traffic for itself. That /64 goes unserved here (named), the others are served."""
    pools = [pool("2001:db8:100::/48")]
    vms = [Vm("tapa", "52:54:00:00:00:0a", ("2001:db8:100:5::a",), ()),
           Vm("tapc", "52:54:00:00:00:0c", ("2001:db8:100:6::c",), ())]
    r = render(vms, pools, tmp_path, claimed={"2001:db8:100:5::", "2001:db8:100:6::c"})
    assert r.anchors == ((ANCHOR, ("2001:db8:100:6::/64",)),)
    assert [line for line in r.conf.splitlines() if line.startswith("dhcp-range=")] == \
        ["dhcp-range=set:pool0,2001:db8:100:6::,static,off-link,64,1h"]
    assert len(r.unserved) == 1 and r.unserved[0].startswith("2001:db8:100:5::/64: its first address")
