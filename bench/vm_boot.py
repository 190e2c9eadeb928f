"""VM boot: the VM's interface up -> its address configured by its own DHCP client, per client.

    python bench/vm_boot.py [--quick]

A one-host IPv6-only lab (own prefix, torn down at the end). For each VM: the agent has its
Endpoint and dnsmasq serves its tap; then the VM's eth0 goes up and its DHCPv6 client starts
(ISC dhclient or dhcpcd, configured by `tabby guest render`), and we time until the allocated
/128 is on eth0. This includes the VM's own link-local DAD (~1-2 s), as a real boot does.
Prints p50_s (the median) and max_s (the slowest boot) per client, with labels client and boots
(10 boots per client, 3 with --quick): too few samples for any tail percentile but the maximum.

Then label ``guest`` (a two-host IPv6-only lab): ``netns`` (a namespace VM with dhclient),
``qemu-ifupdown`` and ``qemu-networkd`` (real Debian guests under qemu, TCG, configured only by
``tabby guest render``; lab/qemu.py). boot_to_address: qemu start (for netns: eth0 up and the
client started) -> the Endpoint's address on the guest's eth0, as the guest's own ``ip`` shows it;
address_to_reachable: -> the first ping from host 2's namespace answered (BGP, routes, the guest's
default route from the RA). p50 and max over 5 boots per kind; a boot is a new VM each time (new
Endpoint, new overlay, first boot of its machine-id). The two qemu kinds boot side by side (two at
once at most: 2 cores). --quick boots the netns kind once and no qemu guest: a TCG boot alone takes
80-110 s here, past the 60 s a quick run may take (tests/test_qemu_vm.py boots them in every test run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tabby.lab import lab as L
from tabby.lab import netns
from tabby.lab.topology import LabVm, topology

METRICS = ("p50_s", "max_s", "boot_to_address_p50_s", "boot_to_address_max_s", "address_to_reachable_p50_s",
           "address_to_reachable_max_s")
GUEST_BOOTS = 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 3 if args.quick else 10
    prefix = "v" + uuid.uuid4().hex[:5]
    the_lab = L.Lab(topology(1, 0, True, prefix), L.default_store(prefix))
    times: dict[str, list[float]] = {"dhclient": [], "dhcpcd": []}
    try:
        the_lab.up()
        host = the_lab.topo.hosts[0]
        run = the_lab.run_dir / host.name
        for i in range(2 * n):
            v = LabVm(host, i + 1, "dhclient" if i % 2 == 0 else "dhcpcd")
            the_lab.add_vm(v, start_client=False)
            netns.ip("link", "set", "eth0", "down", ns=v.ns)
            ok = L.wait_until(lambda v=v: f"interface={v.tap}" in (run / "dnsmasq.conf").read_text()
                              if (run / "dnsmasq.conf").exists() else False, 10, 0.02)
            if not ok:
                raise RuntimeError(f"dnsmasq never served {v.tap}")
            time.sleep(0.2)
            t0 = time.monotonic()
            netns.ip("link", "set", "eth0", "up", ns=v.ns)
            the_lab.start_dhcp_client(v)
            got = L.wait_until(lambda v=v: "scope global" in netns.ip("-6", "-o", "addr", "show", "dev", "eth0",
                                                                         ns=v.ns), 30, 0.02)
            if not got:
                raise RuntimeError(f"{v.name} ({v.client}) got no address in 30 s")
            times[v.client].append(time.monotonic() - t0)
        for client, ts in times.items():
            for metric, value in (("p50_s", statistics.median(ts)), ("max_s", max(ts))):
                print(json.dumps({"bench": "vm_boot", "metric": metric, "value": round(value, 3), "unit": "s",
                                  "client": client, "boots": len(ts)}), flush=True)
    finally:
        L.down(prefix)
    guest_boots(1 if args.quick else GUEST_BOOTS, with_qemu=not args.quick)


def guest_boots(n: int, with_qemu: bool = True) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tabby.lab import probe, qemu

    prefix = "g" + uuid.uuid4().hex[:5]
    the_lab = L.Lab(topology(2, 0, True, prefix), L.default_store(prefix))
    times: dict[str, dict[str, list[float]]] = {k: {"boot_to_address": [], "address_to_reachable": []}
                                                for k in ("netns", *(("qemu-ifupdown", "qemu-networkd") if with_qemu
                                                                     else ()))}
    try:
        the_lab.up()
        h1, h2 = the_lab.topo.hosts
        from tabby.client import ResourceClient
        from tabby.store import open_store

        def address_of(v: LabVm) -> str:
            ep = ResourceClient(open_store(the_lab.store_url)).get("Endpoint", v.name)
            return str(ep.spec.ipv6_addresses[0]).partition("/")[0]

        def reachable_from_h2(a: str) -> float:
            if not L.wait_until(lambda: probe.in_ns(h2.ns, lambda: probe.ping(a, 0.3))[0], 60, 0.05):
                raise RuntimeError(f"{a} not reachable from {h2.name} in 60 s")
            return time.monotonic()

        def one_qemu(v: LabVm) -> tuple[float, float]:
            g = qemu.add_vm(the_lab, v)
            try:
                a = address_of(v)
                if not L.wait_until(lambda: a in g.addresses(1.0)["v6"], 300, 0.2):
                    raise RuntimeError(f"{v.name} ({g.flavour}) had no address in 300 s: see {g.console}")
                t_addr = time.monotonic()
                return t_addr - g.started, reachable_from_h2(a) - t_addr
            finally:
                the_lab.remove_vm(v)

        for i in range(n):
            v = LabVm(h1, 1 + i, "dhclient")
            the_lab.add_vm(v, start_client=False)
            netns.ip("link", "set", "eth0", "down", ns=v.ns)
            a = address_of(v)
            time.sleep(1.0)  # dnsmasq serving the new tap (the agent's reload)
            t0 = time.monotonic()
            netns.ip("link", "set", "eth0", "up", ns=v.ns)
            the_lab.start_dhcp_client(v)
            if not L.wait_until(lambda v=v, a=a: a in netns.ip("-6", "-o", "addr", "show", "dev", "eth0", ns=v.ns),
                                30, 0.02):
                raise RuntimeError(f"{v.name} got no address in 30 s")
            t_addr = time.monotonic()
            times["netns"]["boot_to_address"].append(t_addr - t0)
            times["netns"]["address_to_reachable"].append(reachable_from_h2(a) - t_addr)
            the_lab.remove_vm(v)
        with ThreadPoolExecutor(2) as ex:
            for i in range(n if with_qemu else 0):
                pair = [LabVm(h1, 20 + i, "ifupdown"), LabVm(h1, 40 + i, "networkd")]
                for kind, (b, r) in zip(("qemu-ifupdown", "qemu-networkd"), ex.map(one_qemu, pair), strict=True):
                    times[kind]["boot_to_address"].append(b)
                    times[kind]["address_to_reachable"].append(r)
        for kind, series in times.items():
            for name, ts in series.items():
                # max, not p99: 5 samples hold no 99th percentile (it was named p99 and was the maximum)
                for metric, value in ((f"{name}_p50_s", statistics.median(ts)), (f"{name}_max_s", max(ts))):
                    print(json.dumps({"bench": "vm_boot", "metric": metric, "value": round(value, 3), "unit": "s",
                                      "guest": kind, "boots": len(ts)}), flush=True)
    finally:
        L.down(prefix)


if __name__ == "__main__":
    main()
