"""``tabby guest check``: run inside a guest; each requirement met or not, with the fix."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tabby.guest.render import DHCLIENT_FIX


@dataclass(frozen=True)
class Finding:
    requirement: str
    ok: bool
    detail: str
    fix: str = ""


def check(interfaces: tuple[str, ...] = ("eth0",), root: Path = Path("/")) -> list[Finding]:
    """Files are read under root (an image, or /); sysctls always from this running system."""
    out = []
    proc = Path("/proc/sys/net/ipv6/conf")
    for i in interfaces:
        ra = (proc / i / "accept_ra")
        fwd = (proc / i / "forwarding")
        if ra.exists():
            v = int(ra.read_text())
            f = int(fwd.read_text()) if fwd.exists() else 0
            ok = v == 2 or (v == 1 and f == 0)
            out.append(Finding(f"{i} accepts Router Advertisements", ok, f"accept_ra={v} forwarding={f}",
                               f"sysctl -w net.ipv6.conf.{i}.accept_ra=1 (and add 'accept_ra 1' to its inet6 stanza)"))
        else:
            out.append(Finding(f"{i} accepts Router Advertisements", False, "no such interface",
                               "check the interface name"))
        configured = any(i in p.read_text() and "inet6 dhcp" in p.read_text()
                         for p in (root / "etc/network").rglob("*") if p.is_file()) if (root / "etc/network").exists() \
            else False
        rh = root / f"etc/sysconfig/network-scripts/ifcfg-{i}"
        configured = configured or (rh.exists() and "DHCPV6C=yes" in rh.read_text())
        out.append(Finding(f"{i} asks DHCPv6 for its address at boot", configured,
                           "configured" if configured else "no inet6 dhcp / DHCPV6C=yes found",
                           "tabby guest render --distro DISTRO --root /"))
    script = root / "sbin/dhclient-script"
    if script.exists() or (root / "sbin/dhclient").exists() or shutil.which("dhclient"):
        fixed = script.exists() and (DHCLIENT_FIX.split()[0] in script.read_text())
        debian_128 = script.exists() and "/128" in script.read_text()
        out.append(Finding("ISC dhclient installs a /128, not a /64", fixed or debian_128,
                           "fixed" if fixed else ("the script installs /128 itself" if debian_128 else "not fixed"),
                           f"add '{DHCLIENT_FIX.split()[0]}' at the start of /sbin/dhclient-script"))
    return out
