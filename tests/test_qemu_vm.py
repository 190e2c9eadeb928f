"""Real VMs: the seed's guest recipe in real guest kernels under qemu (issue 18).

Debian guests built from packages (lab/guest_image.py, cached per machine), configured only by
``tabby guest render --root`` on a copy of the pristine image, each booting a qcow2 overlay under
qemu on its lab host's tap. One lab for the module; at most two guests run at once (2 cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import time
import uuid
from collections.abc import Iterator

import pytest

from tabby.client import ResourceClient
from tabby.lab import guest_image, qemu
from tabby.lab import lab as L
from tabby.lab.topology import OUTSIDE_V4, OUTSIDE_V6, LabVm, topology
from tabby.model import validate
from tabby.store import open_store

BOOT_S = 240  # TCG on a loaded 2-core machine; a boot takes ~30-60 s here
# the configured images the module boots (flavour, IPv4, render), as qemu.Guest.image asks for them
IMAGES = (("ifupdown", True, "render"), ("networkd", True, "render"), ("ifupdown", True, "none"),
          ("networkd", False, "cloud-init"))


class Laps:
    """Where the module's seconds go: lap(name) takes the time since the previous lap; the table is
    printed at the module's end (with -s), so a slow run says which step was slow."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []
        self.last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.rows.append((name, now - self.last))
        self.last = now

    def table(self) -> str:
        width = max((len(n) for n, _ in self.rows), default=0)
        lines = [f"{n:<{width}}  {s:6.1f} s" for n, s in self.rows]
        return "\n".join([*lines, f"{'total':<{width}}  {sum(s for _, s in self.rows):6.1f} s"])


LAPS = Laps()


@pytest.fixture(scope="module")
def qlab() -> Iterator[L.Lab]:
    # the images first (built once per machine, ~1.5 min on a fresh one), so the lab's wait is for boots
    LAPS.lap("(before the module)")
    for fl in guest_image.FLAVOURS:
        guest_image.pristine(fl)
    LAPS.lap("pristine images (built once per machine)")
    for flavour, ipv4, render in IMAGES:
        guest_image.configured(flavour, ipv4, render=render)
    LAPS.lap("configured images (per guest code)")
    prefix = "q" + uuid.uuid4().hex[:5]
    topo = topology(3, 1, False, prefix)
    h1, h2, _ = topo.hosts
    topo = dataclasses.replace(topo, vms=(LabVm(h1, 1, "ifupdown"), LabVm(h2, 1, "networkd")))
    the_lab = L.Lab(topo, L.default_store(prefix), vm_kind="qemu")
    try:
        the_lab.up()
        LAPS.lap("lab up (hosts, agents, containers; 2 guests started)")
        yield the_lab
    finally:
        for name, g in the_lab.guests.items():
            if g.console.exists():
                print(f"--- {name} console\n" + g.console.read_text(errors="replace")[-20000:])
            log = g.dir / f"qemu-{name}.log"
            if log.exists():
                print(f"--- {name} qemu\n" + log.read_text(errors="replace")[-3000:])
        gone = L.down(prefix)
        LAPS.lap("lab down")
        print("--- where the module's seconds went\n" + LAPS.table())
        assert not [g for g in the_lab.guests.values() if g.pid() is not None], gone


def endpoint(the_lab: L.Lab, name: str) -> object:
    return ResourceClient(open_store(the_lab.store_url)).get("Endpoint", name)


def tap_link_local(v: LabVm) -> str:
    import json

    from tabby.lab import netns

    info = json.loads(netns.ip("-j", "addr", "show", "dev", v.tap, ns=v.host.ns))[0]["addr_info"]
    return next(a["local"] for a in info if a["family"] == "inet6" and a["local"].startswith("fe80"))


def wait_address(g: qemu.Guest, v6: str, timeout: float = 60) -> float:
    """Seconds until the guest has v6 on eth0."""
    t0 = time.monotonic()
    assert L.wait_until(lambda: v6 in g.addresses()["v6"], timeout, 0.5), (g.name, g.addresses())
    return time.monotonic() - t0


def test_two_guests_configured_only_by_render(qlab: L.Lab) -> None:
    for g in qlab.guests.values():
        g.wait_ready(BOOT_S)
        print(f"{g.name} ({g.flavour}): agent {time.monotonic() - g.started:.1f} s after qemu start")
    LAPS.lap("1: both guests' boots to their agents")
    for v in qlab.topo.vms:
        g = qlab.guests[v.name]
        ep = endpoint(qlab, v.name)
        want6 = [str(a).partition("/")[0] for a in ep.spec.ipv6_addresses]  # type: ignore[attr-defined]
        want4 = [str(a).partition("/")[0] for a in ep.spec.ipv4_addresses]  # type: ignore[attr-defined]
        print(f"{v.name} ({g.flavour}): address {wait_address(g, want6[0]):.1f} s after its agent answered")
        assert L.wait_until(lambda g=g, want4=want4: g.addresses()["v4"] == want4, 30, 0.5), g.addresses()
        # the DHCPv6 reply can come before the first RA (networkd: WithoutRA=solicit); RAs come every 10 s
        assert L.wait_until(g.usable, 15, 0.5), (g.flavour, g.ip_json("-6", "route"), g.ip_json("-6", "addr"))
        addrs = g.ip_json("addr", "show", "dev", "eth0")[0]["addr_info"]
        global6 = [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet6" and a["scope"] == "global"]
        assert global6 == [(want6[0], 128)], (g.flavour, global6)  # exactly the Endpoint's, as a /128
        routes = g.ip_json("-6", "route", "show", "dev", "eth0")
        on_link = [r["dst"] for r in routes if r["dst"] != "default" and "gateway" not in r
                   and not r["dst"].startswith("fe80") and ipaddress.ip_network(r["dst"]).prefixlen != 128]
        assert on_link == [], (g.flavour, routes)  # no on-link prefix route
        defaults = [r for r in routes if r["dst"] == "default"]
        assert [r.get("gateway") for r in defaults] == [tap_link_local(v)], (g.flavour, defaults)
        assert all(r.get("protocol") == "ra" for r in defaults), defaults  # learned from the RA
        r = g.check()
        print(f"--- guest check in {v.name} ({g.flavour})\n{r['out']}{r['err']}")
        assert r["rc"] == 0 and "FAIL" not in r["out"] and r["out"].count("ok") >= 4, r
    LAPS.lap("1: addresses, routes, guest check")
    # each guest reaches the other guest, the containers (one on the third host) and the outside
    # router, over both families, ping and TCP; and they reach the guests
    assert L.wait_until(lambda: qlab.wait_routed(30)["ok"], 60)
    LAPS.lap("1: routed")
    rows = qlab.matrix()
    LAPS.lap("1: matrix (v6, v4; ping, TCP)")
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    names = {v.name for v in qlab.topo.vms}
    for fam, outside in (("v6", OUTSIDE_V6), ("v4", OUTSIDE_V4)):
        for n in names:
            assert any(r["src"] == n and r["dst"] == "outside" and r["address"] == outside and r["reached"]
                       for r in rows)
            assert any(r["src"] == n and r["dst"] in names - {n} and r["family"] == fam and r["reached"]
                       for r in rows)
            assert any(r["src"] == n and r["dst"].startswith("h3-") and r["family"] == fam and r["reached"]
                       for r in rows)


def lease_duids(the_lab: L.Lab, v: LabVm, address: str) -> list[str]:
    leases = the_lab.run_dir / v.host.name / "dnsmasq.leases"
    return [line.split()[-1] for line in leases.read_text().splitlines() if address in line.split()]


def test_reboot_keeps_address_and_moved_guest_is_reachable_fast(qlab: L.Lab) -> None:
    from tabby.lab import netns, probe

    v1, v2 = qlab.topo.vms
    g1, g2 = qlab.guests[v1.name], qlab.guests[v2.name]
    for g in (g1, g2):
        g.wait_ready(BOOT_S)
    addr1 = str(endpoint(qlab, v1.name).spec.ipv6_addresses[0]).partition("/")[0]  # type: ignore[attr-defined]
    addr2 = str(endpoint(qlab, v2.name).spec.ipv6_addresses[0]).partition("/")[0]  # type: ignore[attr-defined]
    wait_address(g2, addr2)
    duids = lease_duids(qlab, v2, addr2)
    assert len(duids) == 1, duids
    boot = g2.call({"op": "hello"})["boot_id"]
    LAPS.lap("2: before the reboot")
    with contextlib.suppress(OSError):  # the agent may go before it answers
        g2.run(["systemctl", "reboot"], 5)

    # meanwhile g1 moves: its Endpoint now on host 3, qemu stopped on host 1, started on host 3 with
    # the same disk (and the same tap name, now in host 3's namespace)
    h3 = qlab.topo.hosts[2]
    g1.stop()
    ep = endpoint(qlab, v1.name)
    spec = ep.spec.model_dump(mode="json")  # type: ignore[attr-defined]
    ResourceClient(open_store(qlab.store_url)).apply(validate({
        "kind": "Endpoint", "metadata": {"name": v1.name, "labels": dict(ep.metadata.labels)},  # type: ignore[attr-defined]
        "spec": {**spec, "host": h3.name}}))
    g1.delete_tap()
    moved = dataclasses.replace(g1, host_ns=h3.ns)
    qlab.guests[v1.name] = moved
    t_start = moved.start()
    LAPS.lap("2: reboot asked, guest 1 stopped and moved")
    moved.wait_ready(BOOT_S)
    t_agent = time.monotonic()
    state = moved.wait_booted(BOOT_S)
    t_booted = time.monotonic()
    print(f"moved guest: agent {t_agent - t_start:.1f} s after qemu start, boot over ({state}) "
          f"{t_booted - t_agent:.1f} s later; address {wait_address(moved, addr1):.1f} s after that")
    container = next(w for w in qlab.topo.workloads if w.host == qlab.topo.hosts[1])  # on host 2
    assert L.wait_until(lambda: probe.in_ns(container.ns, lambda: probe.ping(addr1, 0.5))[0], 30, 0.1), \
        moved.addresses()
    t_reached = time.monotonic()
    LAPS.lap("2: moved guest booted, addressed and reached")
    print(f"moved guest: booted {t_booted - t_start:.1f} s after qemu start, reachable from host 2 "
          f"{t_reached - t_booted:.1f} s after that")
    assert netns.ip("-o", "link", "show", v1.tap, ns=h3.ns)

    # the rebooted guest: a new boot, the same address, the same DUID in the lease
    assert L.wait_until(lambda: g2.ready(2) and g2.call({"op": "hello"})["boot_id"] != boot, BOOT_S, 1)
    t_back = time.monotonic()
    wait_address(g2, addr2)
    g2.wait_up(BOOT_S)  # past DAD, with the RA's default route: what `lab up` waits for before a matrix
    print(f"rebooted guest: address and default route {time.monotonic() - t_back:.1f} s after its agent answered")
    assert lease_duids(qlab, v2, addr2) == duids
    LAPS.lap("2: rebooted guest back, same address and DUID")
    # host 3's routes to and from the outside router settle after the move (BGP), as in the first test
    assert L.wait_until(lambda: qlab.wait_routed(30)["ok"], 60)
    LAPS.lap("2: routed")
    rows = qlab.matrix(("v6",))
    LAPS.lap("2: matrix (v6)")
    bad = [(r["src"], r["dst"], r["check"], r["detail"]) for r in rows if not r["ok"]]
    assert not bad, (bad, g2.ip_json("-6", "route"), g2.ip_json("-6", "addr", "show", "dev", "eth0"))


def test_pristine_image_has_the_seed_problem_and_ipv6_only_guest_has_no_ipv4(qlab: L.Lab) -> None:
    """Without the render, the ifupdown image asks nothing (no DHCPv6 address; `guest check` names
    the fixes); with the seed's interfaces stanza, the address (Debian's own dhclient-script makes
    it a /128); with the upstream script's line and a /64 client, the seed's dhclient problem (an
    on-link /64 through which the other guest is unreachable), undone by the fix. A networkd guest configured
    by network-config v2 (--cloud-init --no-ipv4, through netplan) on an IPv6-only Endpoint gets
    its IPv6 /128 alone."""
    for g in list(qlab.guests.values()):
        g.stop()  # two guests at most at once
    h1, h2, _ = qlab.topo.hosts
    pv, sv = LabVm(h1, 2, "ifupdown"), LabVm(h2, 2, "networkd", ipv4=False)
    qlab._orchestrate_vm(pv, ())
    pristine = qemu.add_vm(qlab, pv, orchestrate=False, render="none")
    # configured by `tabby guest render --distro networkd --cloud-init --root`: network-config v2 for
    # netplan, which renders it to networkd at boot
    six = qemu.add_vm(qlab, sv, render="cloud-init")
    ep6 = endpoint(qlab, sv.name)
    assert not ep6.spec.ipv4_addresses  # type: ignore[attr-defined]
    want = str(ep6.spec.ipv6_addresses[0]).partition("/")[0]  # type: ignore[attr-defined]
    LAPS.lap("3: guests stopped, 2 more started")
    for g in (pristine, six):
        g.wait_ready(BOOT_S)
        print(f"{g.name}: agent {time.monotonic() - g.started:.1f} s after qemu start")
    LAPS.lap("3: both guests' boots to their agents")
    wait_address(six, want)
    t_addr = time.monotonic()
    assert six.ip_json("-6", "addr", "show", "dev", "eth0")[0]["addr_info"][0]["prefixlen"] == 128
    assert "10-netplan-eth0.network" in six.run(["ls", "/run/systemd/network"])["out"]  # netplan's doing
    r = six.check()
    print(f"--- guest check in the network-config v2 guest\n{r['out']}")
    assert r["rc"] == 0 and "FAIL" not in r["out"], r
    # the pristine guest: up as long as the other, and no address of any kind on eth0
    assert pristine.addresses() == {"v6": [], "v4": []}
    r = pristine.check()
    print(f"--- guest check in the pristine guest\n{r['out']}")
    assert r["rc"] == 1 and "FAIL eth0 asks DHCPv6 for its address at boot" in r["out"] and "fix:" in r["out"]
    # 5 s after its IPv6 address (the checks above, read-only, took part of them): the v4 a DHCPv4
    # client would have had by now
    time.sleep(max(0.0, 5 - (time.monotonic() - t_addr)))
    assert six.addresses() == {"v6": [want], "v4": []}
    LAPS.lap("3: IPv6-only guest, pristine guest checked")

    # the seed's recipe by hand in the running pristine guest. First only the interfaces stanza
    # (DHCPv6 with accept_ra), Debian's dhclient-script as it is: Debian 12's ISC dhclient (4.4)
    # already hands the script a /128, unlike the seed's (Ubuntu 14.04, 4.2: a /64)
    wantp = str(endpoint(qlab, pv.name).spec.ipv6_addresses[0]).partition("/")[0]  # type: ignore[attr-defined]
    write = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
    r = pristine.run(["python3", "-c", write, "/etc/network/interfaces.d/eth0.cfg",
                      "auto eth0\niface eth0 inet6 dhcp\n        accept_ra 1\n"])
    assert r["rc"] == 0, r
    r = pristine.run(["ifup", "eth0"], 120)
    assert r["rc"] == 0, r
    wait_address(pristine, wantp)
    assert global6(pristine) == [(wantp, 128)]
    assert L.wait_until(lambda: pristine.ping(want, 2)[0], 20, 0.5)
    r = pristine.run(["ifdown", "eth0"], 60)
    assert r["rc"] == 0 and global6(pristine) == [], r
    LAPS.lap("3: the seed's interfaces stanza by hand")

    # Debian's script installs the bare address (a /128) whatever dhclient says: Debian fixed the
    # seed's problem in its own script. The seed's problem comes back with the upstream ISC script's
    # line (as Ubuntu 14.04's and RHEL's: address/${new_ip6_prefixlen}) and a client whose default
    # prefix length is 64 (--address-prefix-len 64, 4.2's default): an on-link /64, through which
    # the other guest, in the same prefix, is unreachable (nobody answers its neighbour
    # solicitation); the outside router, beyond the default route, is reached
    upstream = ("p = '/sbin/dhclient-script'; t = open(p).read(); a = 'ip -6 addr replace ${new_ip6_address} '; "
                "assert t.count(a) == 1, t; open(p, 'w').write(t.replace(a, a[:-1] + '/${new_ip6_prefixlen} '))")
    r = pristine.run(["python3", "-c", upstream])
    assert r["rc"] == 0, r
    seed_dhclient = ["dhclient", "-6", "-1", "--address-prefix-len", "64", "-sf", "/sbin/dhclient-script",
                     "-lf", "/run/seed6.leases", "-pf", "/run/seed6.pid", "eth0"]
    assert pristine.run(["ip", "link", "set", "eth0", "up"])["rc"] == 0
    run_dhclient(pristine, seed_dhclient)
    assert L.wait_until(lambda: global6(pristine) == [(wantp, 64)], 30, 0.5), global6(pristine)
    routes = [r["dst"] for r in pristine.ip_json("-6", "route", "show", "dev", "eth0")]
    on_link = [d for d in routes if d.endswith("/64") and not d.startswith("fe80")]
    assert len(on_link) == 1 and ipaddress.ip_address(want) in ipaddress.ip_network(on_link[0]), routes
    reached, out = pristine.ping(want, 3)
    assert not reached, out
    assert L.wait_until(lambda: pristine.ping(OUTSIDE_V6, 2)[0], 20, 0.5)
    r = pristine.check()
    assert r["rc"] == 1 and "FAIL eth0 has its address as a /128" in r["out"] and "FAIL ISC dhclient" in r["out"], r
    # stopped, and the /64 taken away by hand (Debian's release would delete a /128)
    stop = [*seed_dhclient[:2], "-x", *seed_dhclient[5:]]
    pristine.run(stop, 60)
    r = pristine.run(["ip", "-6", "addr", "flush", "dev", "eth0", "scope", "global"])
    assert r["rc"] == 0, r
    for d in on_link:  # gone with the address, unless a renewal raced the flush
        pristine.run(["ip", "-6", "route", "del", d, "dev", "eth0"])
    assert global6(pristine) == [] and not [r for r in pristine.ip_json("-6", "route", "show", "dev", "eth0")
                                            if r["dst"] in on_link], pristine.ip_json("-6", "route", "show")

    # then the fix, as `tabby guest render` patches the script (its own code, in the guest): the same
    # /64-minded client now installs a /128, no on-link route, and the other guest is reached
    patch = ("from tabby.guest.render import patch_script; p = '/sbin/dhclient-script'; "
             "t = patch_script(open(p).read()); open(p, 'w').write(t)")
    LAPS.lap("3: the upstream script's /64")
    r = pristine.run(["env", f"PYTHONPATH={guest_image.CHECK_DIR}", "python3", "-c", patch])
    assert r["rc"] == 0, r
    run_dhclient(pristine, seed_dhclient)
    assert L.wait_until(lambda: global6(pristine) == [(wantp, 128)], 30, 0.5), global6(pristine)
    routes = [r["dst"] for r in pristine.ip_json("-6", "route", "show", "dev", "eth0")]
    assert not [d for d in routes if d.endswith("/64") and not d.startswith("fe80")], routes
    assert L.wait_until(lambda: pristine.ping(want, 2)[0], 20, 0.5)
    LAPS.lap("3: the fix")


def run_dhclient(g: qemu.Guest, argv: list[str]) -> None:
    """dhclient -6 as a boot service runs it: once the link-local address has passed DAD (it exits
    at once before), and again if it gave up."""
    def link_local_ready() -> bool:
        out = g.run(["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"])["out"]
        return "fe80" in out and "tentative" not in out

    assert L.wait_until(link_local_ready, 30, 0.5)
    for _ in range(5):
        r = g.run(argv, 90)
        if r["rc"] == 0:
            return
        time.sleep(1)
    raise AssertionError(f"{' '.join(argv)}: {r}")


def global6(g: qemu.Guest) -> list[tuple[str, int]]:
    info = g.ip_json("-6", "addr", "show", "dev", "eth0")
    return [(a["local"], a["prefixlen"]) for a in (info[0]["addr_info"] if info else []) if a["scope"] == "global"]
