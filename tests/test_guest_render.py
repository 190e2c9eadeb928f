"""`tabby guest render --distro networkd` (and --cloud-init's network-config v2) and `guest check`
reading networkd files: as text here; proven in booted guests in test_qemu_vm.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tabby.guest import check as C
from tabby.guest import render as R


def tabby(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tabby.cli", *args], capture_output=True, text=True)


def test_networkd_unit_asks_dhcpv6_at_boot_and_accepts_ras() -> None:
    dual = R.networkd_unit("eth0", True)
    assert "Name=eth0\n" in dual and "DHCP=yes\n" in dual and "IPv6AcceptRA=yes\n" in dual
    assert "WithoutRA=solicit\n" in dual and "LinkLocalAddressing=ipv6\n" in dual
    assert "DHCP=ipv6\n" in R.networkd_unit("eth1", False)
    slaac = R.networkd_unit("eth0", False, "slaac")
    assert "DHCP=no\n" in slaac and "IPv6PrivacyExtensions=no\n" in slaac and "WithoutRA" not in slaac
    files = R.render("networkd", ("eth0", "eth1"))
    assert [f.path for f in files] == ["/etc/systemd/network/10-tabby-eth0.network",
                                       "/etc/systemd/network/10-tabby-eth1.network"]  # no dhclient fix to make


def test_network_config_v2() -> None:
    doc = yaml.safe_load(R.network_config_v2(("eth0",), ipv4=False))
    assert doc == {"network": {"version": 2, "ethernets": {"eth0": {
        "dhcp4": False, "dhcp6": True, "accept-ra": True, "link-local": ["ipv6"]}}}}
    r = tabby("guest", "render", "--distro", "networkd", "--cloud-init")
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["network"]["ethernets"]["eth0"]["dhcp4"] is True


def test_cli_writes_networkd_and_netplan_files_and_refuses_what_it_would_ignore(tmp_path: Path) -> None:
    r = tabby("guest", "render", "--distro", "networkd", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "DHCP=yes" in (tmp_path / "etc/systemd/network/10-tabby-eth0.network").read_text()
    r = tabby("guest", "render", "--distro", "networkd", "--cloud-init", "--root", str(tmp_path))
    assert r.returncode == 0 and (tmp_path / "etc/netplan/50-tabby.yaml").stat().st_mode & 0o077 == 0
    r = tabby("guest", "render", "--distro", "networkd", "--rs-delay", "10")
    assert r.returncode == 1 and "--rs-delay" in r.stderr
    r = tabby("guest", "render", "--distro", "debian", "--cloud-init", "--root", str(tmp_path))
    assert r.returncode == 1 and "--cloud-init with --root" in r.stderr


def test_check_reads_networkd_files(tmp_path: Path) -> None:
    (tmp_path / "etc/systemd/network").mkdir(parents=True)
    (tmp_path / "etc/systemd/network/10-tabby-eth0.network").write_text(R.networkd_unit("eth0", True))
    found = {f.requirement: f for f in C.check(("eth0",), tmp_path)}
    assert found["eth0 accepts Router Advertisements"].ok
    assert found["eth0 asks DHCPv6 for its address at boot"].ok
    assert not any("dhclient" in k for k in found)  # no ISC dhclient in a networkd guest: nothing to fix
    (tmp_path / "etc/systemd/network/10-tabby-eth0.network").write_text("[Match]\nName=eth0\n[Network]\nDHCP=no\n")
    found = {f.requirement: f for f in C.check(("eth0",), tmp_path)}
    assert not found["eth0 accepts Router Advertisements"].ok and "IPv6AcceptRA=yes" in \
        found["eth0 accepts Router Advertisements"].fix
    assert not found["eth0 asks DHCPv6 for its address at boot"].ok


def test_check_refuses_an_interface_name_that_is_no_name(tmp_path: Path) -> None:
    """It goes into paths under /proc and root, and into the fixes shown (it once read
    /proc/sys/net/ipv6/conf/../../../../../x/accept_ra)."""
    for bad in ("../../../../../tmp/x", "eth0;reboot", "a" * 16, "", "..", "-h", ".eth0"):
        with pytest.raises(ValueError):
            C.check((bad,), tmp_path)
    r = tabby("guest", "check", "--interface", "../../etc", "--root", str(tmp_path))
    assert r.returncode != 0 and "--interface" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_render_writes_nothing_through_a_symlink_out_of_the_image(tmp_path: Path) -> None:
    """An image's etc -> (this machine's) etc had the files written here, not into the image."""
    img, outside = tmp_path / "img", tmp_path / "hostetc"
    img.mkdir()
    outside.mkdir()
    (img / "etc").symlink_to(outside)
    for args in (("--distro", "networkd", "--cloud-init"), ("--distro", "networkd")):
        r = tabby("guest", "render", *args, "--root", str(img))
        assert r.returncode == 1 and "leads outside the image" in r.stderr, r.stderr
    assert list(outside.iterdir()) == []


def test_sysctl_keys_name_a_dotted_interface() -> None:
    """sysctl reads each dot as a separator: net.ipv6.conf.eth0.100.accept_ra names no VLAN
    interface; with slashes its dots stay in its name (sysctl.d(5))."""
    (f,) = [f for f in R.render("ubuntu", ("eth0.100",), True, 1, "dhcpv6-stateful") if "sysctl.d" in f.path]
    assert "net/ipv6/conf/eth0.100/accept_ra = 1\n" in f.text and "net.ipv6" not in f.text


def test_render_into_a_root_that_is_no_directory_or_cannot_take_a_file_is_a_clear_error(tmp_path: Path) -> None:
    """A traceback before (NotADirectoryError, IsADirectoryError), and a root that was not there was
    made: an image not mounted on it got the files."""
    gone = tmp_path / "not-mounted"
    r = tabby("guest", "render", "--distro", "ubuntu", "--root", str(gone))
    assert r.returncode == 1 and "not a directory" in r.stderr and not gone.exists(), r.stderr
    img = tmp_path / "img"
    img.mkdir()
    (img / "etc").write_text("a file where a directory should be")
    r = tabby("guest", "render", "--distro", "ubuntu", "--root", str(img))
    assert r.returncode == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr, r.stderr
