"""VM boot: the VM's interface up -> its address configured by its own DHCP client, per client.

    python bench/vm_boot.py [--quick]

A one-host IPv6-only lab (own prefix, torn down at the end). For each VM: the agent has its
Endpoint and dnsmasq serves its tap; then the VM's eth0 goes up and its DHCPv6 client starts
(ISC dhclient or dhcpcd, configured by `tabby guest render`), and we time until the allocated
/128 is on eth0. This includes the VM's own link-local DAD (~1-2 s), as a real boot does.
Prints p50_s (the median) and max_s (the slowest boot) per client, with labels client and boots
(10 boots per client, 3 with --quick): too few samples for any tail percentile but the maximum.
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

METRICS = ("p50_s", "max_s")


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


if __name__ == "__main__":
    main()
