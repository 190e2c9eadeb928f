"""The guest-side requirements of the seed, as files per distribution. Pure: returns paths and text.

1. A DHCPv6 request on each interface at boot, to learn the orchestrator's address.
2. Router Advertisements accepted (the default route comes from them; forwarding is off in a VM).
3. ISC dhclient's prefix-length bug fixed: upstream and RHEL-style dhclient-scripts install the
   DHCPv6 address as /64 (``--address-prefix-len`` default), which makes the whole /64 on-link and
   bypasses the host; forcing ``new_ip6_prefixlen=128`` at the start of the script installs /128.
4. A router-solicitation delay (``router_solicitation_delay``). The seed sets 10 s; we render 1 s
   (the kernel's default) unless asked: Linux also delays an interface's first DAD probe by a random
   time up to this value, and DHCPv6 clients wait for the link-local address to pass DAD, so 10 s
   made a VM's boot take 5-12 s here. dnsmasq's periodic RAs (every 10 s) cover a lost early RS.
5. For guests that run dhcpcd instead of ISC dhclient: /etc/dhcpcd.conf asking for an address
   (``ia_na``) on each interface, a DUID from the MAC (``duid ll``: stable across reinstalls of the
   image, so the host's DHCPv6 server keeps handing out the orchestrator's address), no IPv4
   link-local, and no IPv4 at all on an IPv6-only network.
"""

from __future__ import annotations

from dataclasses import dataclass

DHCLIENT_FIX = "new_ip6_prefixlen=128  # tabby: a DHCPv6 address is a /128, never an on-link /64"
DISTROS = ("ubuntu", "debian", "centos")


@dataclass(frozen=True)
class GuestFile:
    path: str  # absolute inside the guest
    text: str
    mode: str = "replace"  # "replace" the file, or "prepend-after-shebang" a line into it


SEED_RS_DELAY = 10
DEFAULT_RS_DELAY = 1


def render(distro: str, interfaces: tuple[str, ...] = ("eth0",), ipv4: bool = True,
           rs_delay: int = DEFAULT_RS_DELAY) -> list[GuestFile]:
    if distro not in DISTROS:
        raise ValueError(f"unknown distro {distro!r}: one of {', '.join(DISTROS)}")
    files: list[GuestFile] = []
    for i in interfaces:
        if distro in ("ubuntu", "debian"):
            text = f"auto {i}\n" + (f"iface {i} inet dhcp\n" if ipv4 else "") + \
                f"iface {i} inet6 dhcp\n        accept_ra 1\n"
            files.append(GuestFile(f"/etc/network/interfaces.d/{i}.cfg", text))
        else:
            text = (f"DEVICE={i}\nONBOOT=yes\nTYPE=Ethernet\n" + ("BOOTPROTO=dhcp\n" if ipv4 else "BOOTPROTO=none\n")
                    + "IPV6INIT=yes\nDHCPV6C=yes\nIPV6_AUTOCONF=yes\n")
            files.append(GuestFile(f"/etc/sysconfig/network-scripts/ifcfg-{i}", text))
        files.append(GuestFile(f"/etc/sysctl.d/30-{i}-rs-delay.conf",
                               f"net.ipv6.conf.{i}.router_solicitation_delay = {rs_delay}\n"
                               f"net.ipv6.conf.{i}.accept_ra = 1\n"))
    files.append(GuestFile("/sbin/dhclient-script", DHCLIENT_FIX + "\n", mode="prepend-after-shebang"))
    files.append(GuestFile("/etc/dhcpcd.conf", dhcpcd_conf(interfaces, ipv4)))
    return files


def dhcpcd_conf(interfaces: tuple[str, ...], ipv4: bool) -> str:
    lines = ["# tabby: a DHCPv6 address per interface, the default route from the host's RAs",
             "duid ll", "noipv4ll", "option rapid_commit", f"allowinterfaces {' '.join(interfaces)}"]
    if not ipv4:
        lines.append("ipv6only")
    for i in interfaces:
        lines += [f"interface {i}", "  ia_na"]
    return "\n".join(lines) + "\n"


def patch_script(text: str) -> str:
    """The dhclient-script with the fix as its first command (idempotent)."""
    if DHCLIENT_FIX in text:
        return text
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith("#!"):
        return lines[0] + DHCLIENT_FIX + "\n" + "".join(lines[1:])
    return DHCLIENT_FIX + "\n" + text


def cloud_init(distro: str, interfaces: tuple[str, ...] = ("eth0",), ipv4: bool = True,
               rs_delay: int = DEFAULT_RS_DELAY) -> str:
    """The same as cloud-init user-data, for images booted with it instead of being edited."""
    import yaml

    write_files, runcmd = [], []
    for f in render(distro, interfaces, ipv4, rs_delay):
        if f.mode == "replace":
            write_files.append({"path": f.path, "content": f.text, "permissions": "0644"})
        else:
            runcmd.append(["sh", "-c", f"grep -qF 'new_ip6_prefixlen=128' {f.path} || "
                                       f"sed -i '1a {DHCLIENT_FIX}' {f.path}"])
    runcmd.append(["sysctl", "--system"])
    return "#cloud-config\n" + yaml.safe_dump({"write_files": write_files, "runcmd": runcmd}, sort_keys=False)
