"""``tabby guest check``: run inside a guest; each requirement met or not, with the fix."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tabby.guest.render import DHCLIENT_FIX


@dataclass(frozen=True)
class Finding:
    requirement: str
    ok: bool
    detail: str
    fix: str = ""


def _networkd_files(root: Path, interface: str) -> list[str]:
    """The text of each systemd-networkd .network file that names interface in its [Match]."""
    found = []
    for d in ("etc/systemd/network", "run/systemd/network", "usr/lib/systemd/network", "lib/systemd/network"):
        for p in sorted((root / d).glob("*.network")) if (root / d).is_dir() else []:
            text = p.read_text()
            if any(line.strip() in (f"Name={interface}", f"Name= {interface}") for line in text.splitlines()):
                found.append(text)
    return found


def _has(text: str, *settings: str) -> bool:
    lines = {line.replace(" ", "") for line in text.splitlines()}
    return any(s in lines for s in settings)


def _ip_json(*args: str) -> list[dict[str, object]] | None:
    """`ip -j ARGS` of this running system, or None where there is no ip."""
    if not shutil.which("ip"):
        return None
    r = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    return json.loads(r.stdout or "[]") if r.returncode == 0 else None


def running(interface: str) -> list[Finding]:
    """What the requirements are for, seen on the running system: exactly /128 DHCPv6 addresses and
    no on-link route through which the rest of the prefix would bypass the host; one default route,
    via a link-local address (the host's tap) learned from an RA."""
    addrs = _ip_json("-6", "addr", "show", "dev", interface)
    routes = _ip_json("-6", "route", "show", "dev", interface)
    if addrs is None or routes is None:  # no ip here, or no such interface
        return []
    glob = [a for a in (addrs[0].get("addr_info", []) if addrs else []) if a.get("scope") == "global"]  # type: ignore[union-attr]
    wide = [f"{a['local']}/{a['prefixlen']}" for a in glob if a.get("prefixlen") != 128]
    on_link = [r["dst"] for r in routes if r.get("dst") != "default" and "gateway" not in r
               and not str(r.get("dst", "")).startswith("fe80") and not str(r.get("dst", "")).endswith("/128")
               and r.get("dst") not in [a["local"] for a in glob]]
    out = [Finding(f"{interface} has its address as a /128 and no on-link prefix", bool(glob) and not wide
                   and not on_link,
                   (f"{', '.join(str(a['local']) + '/128' for a in glob)}" if glob else "no global IPv6 address")
                   + (f"; wider: {', '.join(wide)}" if wide else "") + (f"; on-link: {', '.join(on_link)}" if on_link
                                                                          else ""),
                   "the dhclient fix (or networkd's DHCPv6), and an RA without the on-link flag"
                   if glob else "a DHCPv6 request at boot: tabby guest render --distro DISTRO --root /")]
    defaults = [r for r in routes if r.get("dst") == "default"]
    ll = [r for r in defaults if str(r.get("gateway", "")).startswith("fe80")]
    out.append(Finding(f"{interface} has its default route from the host's RA", len(defaults) == 1 and len(ll) == 1,
                       ", ".join(f"via {r.get('gateway', '?')} proto {r.get('protocol', '?')}" for r in defaults)
                       or "no IPv6 default route", "accept RAs on the interface (accept_ra 1 / IPv6AcceptRA=yes)"))
    return out



def check(interfaces: tuple[str, ...] = ("eth0",), root: Path = Path("/")) -> list[Finding]:
    """Files are read under root (an image, or /); sysctls always from this running system. An
    interface name becomes part of paths and of the fixes shown: ValueError unless it is one."""
    for i in interfaces:
        # model.names.check_interface_name's rule, written here: this package is copied alone into
        # guests (lab/guest_image.py), without tabby.model
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}", i):
            raise ValueError(f"invalid interface name {i!r}")
    out = []
    proc = Path("/proc/sys/net/ipv6/conf")
    for i in interfaces:
        ra = (proc / i / "accept_ra")
        fwd = (proc / i / "forwarding")
        networkd = _networkd_files(root, i)
        if networkd:  # networkd runs its own RA client and sets the kernel's accept_ra to 0
            ok = any(_has(t, "IPv6AcceptRA=yes", "IPv6AcceptRA=true", "IPv6AcceptRA=1") for t in networkd)
            out.append(Finding(f"{i} accepts Router Advertisements", ok,
                               "systemd-networkd: IPv6AcceptRA=yes" if ok else "networkd without IPv6AcceptRA=yes",
                               f"IPv6AcceptRA=yes in the [Network] section of {i}'s .network file"))
        elif ra.exists():
            v = int(ra.read_text())
            f = int(fwd.read_text()) if fwd.exists() else 0
            ok = v == 2 or (v == 1 and f == 0)
            out.append(Finding(f"{i} accepts Router Advertisements", ok, f"accept_ra={v} forwarding={f}",
                               f"sysctl -w net/ipv6/conf/{i}/accept_ra=1 (and add 'accept_ra 1' to its inet6 stanza)"))
        else:
            out.append(Finding(f"{i} accepts Router Advertisements", False, "no such interface",
                               "check the interface name"))
        configured = any(i in p.read_text() and "inet6 dhcp" in p.read_text()
                         for p in (root / "etc/network").rglob("*") if p.is_file()) if (root / "etc/network").exists() \
            else False
        rh = root / f"etc/sysconfig/network-scripts/ifcfg-{i}"
        configured = configured or (rh.exists() and "DHCPV6C=yes" in rh.read_text())
        configured = configured or any(_has(t, "DHCP=yes", "DHCP=ipv6") for t in networkd)
        out.append(Finding(f"{i} asks DHCPv6 for its address at boot", configured,
                           "configured" if configured else "no inet6 dhcp / DHCPV6C=yes / networkd DHCP=ipv6 found",
                           "tabby guest render --distro DISTRO --root /"))
        if root == Path("/"):
            out += running(i)
    script = root / "sbin/dhclient-script"
    dhclient = (root / "sbin/dhclient").exists() or (root == Path("/") and shutil.which("dhclient"))
    if dhclient or (script.exists() and not all(_networkd_files(root, i) for i in interfaces)):
        fixed = script.exists() and (DHCLIENT_FIX.split()[0] in script.read_text())
        text = script.read_text() if script.exists() else ""
        # Debian's own script (bookworm's too) installs the bare address, which ip takes as a /128;
        # the upstream and RHEL ones install ${new_ip6_address}/${new_ip6_prefixlen}
        debian_128 = "/128" in text or ("ip -6 addr replace ${new_ip6_address}" in text
                                        and "${new_ip6_address}/${new_ip6_prefixlen}" not in text)
        out.append(Finding("ISC dhclient installs a /128, not a /64", fixed or debian_128,
                           "fixed" if fixed else ("the script installs /128 itself" if debian_128 else "not fixed"),
                           f"add '{DHCLIENT_FIX.split()[0]}' at the start of /sbin/dhclient-script"))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python3 -m tabby.guest.check [IFACE...]`: the check without the CLI's dependencies, for a
    guest that has only python3 (the lab's qemu guests); the same lines as `tabby guest check`."""
    import sys

    findings = check(tuple((argv if argv is not None else sys.argv[1:]) or ["eth0"]))
    for f in findings:
        print(f"{'ok  ' if f.ok else 'FAIL'} {f.requirement}: {f.detail}" + ("" if f.ok else f"\n      fix: {f.fix}"))
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    raise SystemExit(main())
