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
5. On SLAAC and DHCPv6-stateless subnets (``ipv6``): the address the guest forms must be exactly
   the orchestrator's, EUI-64 from the MAC (Neutron computes it so, and the host's anti-spoofing
   allows only it): no privacy extensions (``use_tempaddr = 0``, ifupdown ``privext 0``, dhcpcd
   ``slaac hwaddr``) and no stable-privacy or random interface ids (``addr_gen_mode = 0``). The
   address comes from the RA (ifupdown ``inet6 auto``; ``dhcp 1`` for the stateless DHCPv6 that
   gives DNS servers), not from a DHCPv6 lease.
6. For guests that run dhcpcd instead of ISC dhclient: /etc/dhcpcd.conf asking for an address
   (``ia_na``) on each interface, a DUID from the MAC (``duid ll``: stable across reinstalls of the
   image, so the host's DHCPv6 server keeps handing out the orchestrator's address), no IPv4
   link-local, and no IPv4 at all on an IPv6-only network.
"""

from __future__ import annotations

from dataclasses import dataclass

DHCLIENT_FIX = "new_ip6_prefixlen=128  # tabby: a DHCPv6 address is a /128, never an on-link /64"
# "networkd": systemd-networkd's own files (current cloud images, any distribution that runs it)
DISTROS = ("ubuntu", "debian", "centos", "networkd")
IPV6_MODES = ("dhcpv6-stateful", "dhcpv6-stateless", "slaac")  # as IPPool.ipv6_mode, Neutron's address modes


@dataclass(frozen=True)
class GuestFile:
    path: str  # absolute inside the guest
    text: str
    mode: str = "replace"  # "replace" the file, or "prepend-after-shebang" a line into it


SEED_RS_DELAY = 10
DEFAULT_RS_DELAY = 1


def render(distro: str, interfaces: tuple[str, ...] = ("eth0",), ipv4: bool = True,
           rs_delay: int = DEFAULT_RS_DELAY, ipv6: str = "dhcpv6-stateful") -> list[GuestFile]:
    if distro not in DISTROS:
        raise ValueError(f"unknown distro {distro!r}: one of {', '.join(DISTROS)}")
    if ipv6 not in IPV6_MODES:
        raise ValueError(f"unknown IPv6 mode {ipv6!r}: one of {', '.join(IPV6_MODES)}")
    slaac = ipv6 != "dhcpv6-stateful"
    if distro == "networkd":
        return [GuestFile(f"/etc/systemd/network/10-tabby-{i}.network", networkd_unit(i, ipv4, ipv6))
                for i in interfaces]
    files: list[GuestFile] = []
    for i in interfaces:
        if distro in ("ubuntu", "debian"):
            v6 = f"iface {i} inet6 dhcp\n        accept_ra 1\n" if not slaac else \
                f"iface {i} inet6 auto\n        accept_ra 1\n        privext 0\n" + \
                ("        dhcp 1\n" if ipv6 == "dhcpv6-stateless" else "")
            text = f"auto {i}\n" + (f"iface {i} inet dhcp\n" if ipv4 else "") + v6
            files.append(GuestFile(f"/etc/network/interfaces.d/{i}.cfg", text))
        else:
            v6 = "IPV6INIT=yes\nDHCPV6C=yes\nIPV6_AUTOCONF=yes\n" if not slaac else \
                "IPV6INIT=yes\nIPV6_AUTOCONF=yes\nIPV6_PRIVACY=no\n" + \
                ("DHCPV6C=yes\nDHCPV6C_OPTIONS=-S\n" if ipv6 == "dhcpv6-stateless" else "DHCPV6C=no\n")
            proto = "BOOTPROTO=dhcp\n" if ipv4 else "BOOTPROTO=none\n"
            text = f"DEVICE={i}\nONBOOT=yes\nTYPE=Ethernet\n" + proto + v6
            files.append(GuestFile(f"/etc/sysconfig/network-scripts/ifcfg-{i}", text))
        # slashes: sysctl.d reads each dot as a separator, so eth0.100's keys would name nothing
        key = f"net/ipv6/conf/{i}"
        sysctls = f"{key}/router_solicitation_delay = {rs_delay}\n{key}/accept_ra = 1\n"
        if slaac:  # exactly the EUI-64 address the orchestrator computed
            sysctls += f"{key}/autoconf = 1\n{key}/use_tempaddr = 0\n{key}/addr_gen_mode = 0\n"
        files.append(GuestFile(f"/etc/sysctl.d/30-{i}-rs-delay.conf", sysctls))
    files.append(GuestFile("/sbin/dhclient-script", DHCLIENT_FIX + "\n", mode="prepend-after-shebang"))
    files.append(GuestFile("/etc/dhcpcd.conf", dhcpcd_conf(interfaces, ipv4, slaac)))
    return files


def networkd_unit(interface: str, ipv4: bool, ipv6: str = "dhcpv6-stateful") -> str:
    """A systemd-networkd .network file. networkd handles RAs itself (it sets the kernel's accept_ra
    to 0 and runs its own RS/RA client, so the RS-delay sysctl does not apply); it installs a
    DHCPv6 address as a /128 and makes no on-link route from an RA without the on-link flag, so
    it needs no fix. ``WithoutRA=solicit``: the DHCPv6 request goes out at boot, not only once an
    RA with the managed flag has arrived (an RA lost at boot would otherwise cost up to 10 s)."""
    slaac = ipv6 != "dhcpv6-stateful"
    dhcp = ("yes" if ipv4 else "ipv6") if not slaac else ("ipv4" if ipv4 else "no")
    lines = ["# tabby: " + ("the address from the host's RAs (EUI-64, no privacy address)" if slaac else
                            "a DHCPv6 address, the default route from the host's RAs"),
             "[Match]", f"Name={interface}", "", "[Network]", f"DHCP={dhcp}", "IPv6AcceptRA=yes",
             "LinkLocalAddressing=ipv6"]
    if slaac:
        lines += ["IPv6PrivacyExtensions=no", "IPv6LinkLocalAddressGenerationMode=eui64"]
    else:
        lines += ["", "[DHCPv6]", "WithoutRA=solicit"]
    client = "yes" if ipv6 == "dhcpv6-stateless" else "no" if slaac else "always"
    lines += ["", "[IPv6AcceptRA]", f"DHCPv6Client={client}"]
    return "\n".join(lines) + "\n"


def dhcpcd_conf(interfaces: tuple[str, ...], ipv4: bool, slaac: bool = False) -> str:
    lines = ["# tabby: " + ("the address from the host's RAs (EUI-64, no privacy address)" if slaac else
                            "a DHCPv6 address per interface, the default route from the host's RAs"),
             "duid ll", "noipv4ll", "option rapid_commit", f"allowinterfaces {' '.join(interfaces)}"]
    if slaac:
        lines.append("slaac hwaddr")
    if not ipv4:
        lines.append("ipv6only")
    for i in interfaces:
        lines += [f"interface {i}"] + ([] if slaac else ["  ia_na"])
    return "\n".join(lines) + "\n"


def patch_script(text: str) -> str:
    """The dhclient-script with the fix as its first command (idempotent)."""
    if DHCLIENT_FIX in text:
        return text
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith("#!"):
        return lines[0] + DHCLIENT_FIX + "\n" + "".join(lines[1:])
    return DHCLIENT_FIX + "\n" + text


def network_config_v2(interfaces: tuple[str, ...] = ("eth0",), ipv4: bool = True,
                      ipv6: str = "dhcpv6-stateful") -> str:
    """cloud-init network-config version 2 (netplan's YAML, under its ``network:`` key, which both
    read): DHCPv6 (or, on SLAAC subnets, the RA's EUI-64 address) and RAs accepted per interface.
    netplan renders it to systemd-networkd, which needs no dhclient fix (see networkd_unit)."""
    import yaml

    if ipv6 not in IPV6_MODES:
        raise ValueError(f"unknown IPv6 mode {ipv6!r}: one of {', '.join(IPV6_MODES)}")
    eths: dict[str, dict[str, object]] = {}
    for i in interfaces:
        e: dict[str, object] = {"dhcp4": ipv4, "dhcp6": ipv6 != "slaac", "accept-ra": True,
                                "link-local": ["ipv6"]}
        if ipv6 != "dhcpv6-stateful":
            e["ipv6-privacy"] = False
            e["ipv6-address-generation"] = "eui64"
        eths[i] = e
    head = "# tabby: a DHCPv6 address per interface, the default route from the host's RAs\n"
    return head + yaml.safe_dump({"network": {"version": 2, "ethernets": eths}}, sort_keys=False)


def cloud_init(distro: str, interfaces: tuple[str, ...] = ("eth0",), ipv4: bool = True,
               rs_delay: int = DEFAULT_RS_DELAY, ipv6: str = "dhcpv6-stateful") -> str:
    """The same as cloud-init user-data, for images booted with it instead of being edited."""
    import yaml

    write_files, runcmd = [], []
    for f in render(distro, interfaces, ipv4, rs_delay, ipv6):
        if f.mode == "replace":
            write_files.append({"path": f.path, "content": f.text, "permissions": "0644"})
        else:
            runcmd.append(["sh", "-c", f"grep -qF 'new_ip6_prefixlen=128' {f.path} || "
                                       f"sed -i '1a {DHCLIENT_FIX}' {f.path}"])
    runcmd.append(["sysctl", "--system"])
    return "#cloud-config\n" + yaml.safe_dump({"write_files": write_files, "runcmd": runcmd}, sort_keys=False)
