"""VMs: namespaces running a real DHCP client (ISC dhclient or dhcpcd), configured by the files
`tabby guest render` writes (dhclient's script, dhcpcd.conf, the sysctls), plus one lab-only
change to each, so that this machine's /etc/resolv.conf is left alone; the host's dnsmasq (run by
the agent) serves RAs and DHCPv6/DHCPv4."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from lablib import all_ok, lab

from tabby.lab import lab as L
from tabby.lab import netns
from tabby.lab.netns import wait_for


def vm_state(ns: str) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    addrs = json.loads(netns.ip("-j", "addr", "show", "dev", "eth0", ns=ns))[0]["addr_info"]
    routes = json.loads(netns.ip("-j", "-6", "route", "show", ns=ns))
    return addrs, routes


def test_dual_stack_vms_with_dhclient_and_dhcpcd() -> None:
    with lab(2, 0, vms=2) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 90), the_lab.matrix()
        for v in the_lab.topo.vms:
            addrs, routes = vm_state(v.ns)
            global6 = [a for a in addrs if a["family"] == "inet6" and a["scope"] == "global"]
            assert len(global6) == 1 and global6[0]["prefixlen"] == 128, (v.client, global6)  # no SLAAC address
            assert [a for a in addrs if a["family"] == "inet"], f"{v.name}: no IPv4 address"
            tap_ll = next(a["local"] for a in json.loads(netns.ip("-j", "addr", "show", "dev", v.tap, ns=v.host.ns))[0]
                      ["addr_info"] if a["family"] == "inet6")
            defaults = [r for r in routes if r["dst"] == "default"]
            assert [r["gateway"] for r in defaults] == [tap_ll], (v.client, defaults)
            on_link = [r for r in routes if r["dst"] not in ("default", global6[0]["local"]) and "gateway" not in r
                       and not r["dst"].startswith("fe80")]
            assert on_link == [], (v.client, on_link)  # no on-link /64 (or /112) in the VM
            # the RA, as the VM sees it: managed, prefix neither on-link nor autonomous
            ra = netns.nsexec(v.ns, ["rdisc6", "-1", "eth0"]).stdout
            assert "Stateful address conf.    :          Yes" in ra
            assert "On-link                 :           No" in ra
            assert "Autonomous address conf.:           No" in ra
            # the VM reaches its own host, and (through the matrix above) VMs on the other host
            r = netns.nsexec(v.ns, ["ping", "-6", "-c", "1", "-W", "2", v.host.v6])
            assert r.returncode == 0, r.stdout


def test_ipv6_only_vms_and_guest_check() -> None:
    with lab(2, 1, ipv6_only=True, vms=2) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60), the_lab.matrix(("v6",))
        for v in the_lab.topo.vms:
            addrs, _ = vm_state(v.ns)
            assert not [a for a in addrs if a["family"] == "inet"]
        # `tabby guest check`, run in a VM against its rendered files: every requirement met
        v = the_lab.topo.vms[0]
        guest = the_lab.dir / f"guest-{v.name}"
        r = netns.nsexec(v.ns, [".venv/bin/tabby", "guest", "check", "--root", str(guest)])
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.count("ok") >= 3 and "FAIL" not in r.stdout
        # and it names what is missing, with the fix, where a requirement is not met
        netns.nsexec(v.ns, ["sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=0"])
        r = netns.nsexec(v.ns, [".venv/bin/tabby", "guest", "check", "--root", str(guest)])
        assert r.returncode == 1 and "FAIL eth0 accepts Router Advertisements" in r.stdout and "fix:" in r.stdout


def test_vm_recreated_with_same_address_and_new_duid_gets_it_fast() -> None:
    with lab(1, 0, ipv6_only=True, vms=1) as the_lab:
        v = the_lab.topo.vms[0]
        assert L.wait_until(lambda: bool(the_lab.addresses()[v.name]["v6"]), 30)
        old = the_lab.addresses()[v.name]["v6"][0]
        leases = (the_lab.run_dir / v.host.name / "dnsmasq.leases").read_text()
        assert old in leases
        the_lab.remove_vm(v)  # Endpoint, allocation, tap and namespace gone; dhclient's DUID with it
        wait_for(lambda: old not in (the_lab.run_dir / v.host.name / "dnsmasq.leases").read_text()
                 if (the_lab.run_dir / v.host.name / "dnsmasq.leases").exists() else True, 10, 0.1,
                 "old lease dropped")
        the_lab.add_vm(v, start_client=False, addresses=(old,))
        run = the_lab.run_dir / v.host.name

        def serving() -> bool:  # the agent has (re)started dnsmasq for the new tap
            conf = run / "dnsmasq.conf"
            return conf.exists() and f"interface={v.tap}" in conf.read_text() and \
                (run / "dnsmasq.pid").exists() and Path(f"/proc/{(run / 'dnsmasq.pid').read_text().strip()}").exists()

        wait_for(serving, 10, 0.05, "dnsmasq serving the new tap")
        t0 = time.monotonic()
        the_lab.start_dhcp_client(v)
        wait_for(lambda: the_lab.addresses()[v.name]["v6"] == [old], 30, 0.05, "same address, new DUID")
        print(f"re-created VM had its address in {time.monotonic() - t0:.2f} s")
        duids = [line.split()[-1] for line in (the_lab.run_dir / v.host.name / "dnsmasq.leases").read_text()
                 .splitlines() if old in line]
        assert len(duids) == 1


def test_guest_render_and_check_cli(tmp_path: object) -> None:
    root = Path(str(tmp_path))
    (root / "sbin").mkdir()
    (root / "sbin/dhclient-script").write_text("#!/bin/sh\necho script\n")
    r = subprocess.run([".venv/bin/tabby", "guest", "render", "--distro", "ubuntu", "--root", str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "iface eth0 inet6 dhcp\n        accept_ra 1" in (root / "etc/network/interfaces.d/eth0.cfg").read_text()
    assert (root / "sbin/dhclient-script").read_text().splitlines()[1].startswith("new_ip6_prefixlen=128")
    assert "router_solicitation_delay = 1\n" in (root / "etc/sysctl.d/30-eth0-rs-delay.conf").read_text()
    seed = subprocess.run([".venv/bin/tabby", "guest", "render", "--distro", "debian", "--rs-delay", "10"],
                          capture_output=True, text=True).stdout
    assert "net/ipv6/conf/eth0/router_solicitation_delay = 10" in seed  # the seed's own value, on request
    ci = subprocess.run([".venv/bin/tabby", "guest", "render", "--distro", "centos", "--cloud-init"],
                        capture_output=True, text=True).stdout
    assert ci.startswith("#cloud-config") and "DHCPV6C=yes" in ci
    bad = subprocess.run([".venv/bin/tabby", "guest", "render", "--distro", "ubuntu", "--interface", "eth0;x"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "invalid interface name" in bad.stderr


def test_vms_on_a_pool_wider_than_a_64_get_their_addresses_in_any_64() -> None:
    """dnsmasq takes no range wider than a /64 and serves a range only through an address of its
    own in it: the agent gives it a range and an anchor address per /64 its VMs are in. Two VMs in
    the 6th and the 10th /64 of a /48 get their addresses by DHCPv6 and reach their host; when the
    second goes, so does its /64 from the anchor."""
    from tabby.client import ResourceClient
    from tabby.lab.topology import LabVm
    from tabby.model import validate
    from tabby.store import open_store

    with lab(1, 0, ipv6_only=True, vms=1) as the_lab:
        host = the_lab.topo.hosts[0]
        ResourceClient(open_store(the_lab.store_url)).apply(validate({
            "kind": "IPPool", "metadata": {"name": "wide"},
            "spec": {"cidr": "fd00:48::/48", "ipv6_mode": "dhcpv6-stateful"}}))
        wide = {LabVm(host, 7): "fd00:48:0:5::a", LabVm(host, 8): "fd00:48:0:9::b"}
        for v, addr in wide.items():
            the_lab.add_vm(v, addresses=(addr,))

        def has(v: LabVm, addr: str) -> bool:  # (and past DAD: a tentative address cannot be a source)
            return any(a.get("local") == addr and a.get("prefixlen") == 128 and not a.get("tentative")
                       for a in vm_state(v.ns)[0])

        for v, addr in wide.items():
            wait_for(lambda v=v, addr=addr: has(v, addr), 60, 0.2, f"{v.name} has {addr} by DHCPv6")
            assert L.wait_until(lambda v=v, addr=addr: netns.nsexec(
                v.ns, ["ping", "-6", "-c", "1", "-W", "1", "-I", addr, host.v6]).returncode == 0, 15, 0.2), \
                (v.name, netns.ip("-6", "route", ns=host.ns), netns.ip("-6", "route", ns=v.ns))

        def anchor() -> set[str]:
            info = json.loads(netns.ip("-j", "addr", "show", "dev", "tbyra0", ns=host.ns))[0]["addr_info"]
            return {f"{a['local']}/{a['prefixlen']}" for a in info if a.get("scope") == "global"}

        assert {"fd00:48:0:5::/64", "fd00:48:0:9::/64"} <= anchor()
        gone = LabVm(host, 8)
        the_lab.remove_vm(gone)
        wait_for(lambda: "fd00:48:0:9::/64" not in anchor(), 30, 0.2, "the /64 no VM uses left the anchor")
        assert "fd00:48:0:5::/64" in anchor()
