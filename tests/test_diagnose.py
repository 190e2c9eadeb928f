"""`tabby diagnose` on a real lab: green when all is well, and the first broken layer named."""

from __future__ import annotations

import json
import subprocess
import sys

from lablib import all_ok, lab

from tabby.lab import lab as L
from tabby.lab import netns


def diagnose(the_lab: L.Lab, src: str, dst: str) -> tuple[int, dict[str, object]]:
    r = subprocess.run([sys.executable, "-m", "tabby.cli", "--store", the_lab.store_url, "diagnose", src, dst,
                        "--lab", the_lab.topo.prefix, "-o", "json"], capture_output=True, text=True)
    return r.returncode, json.loads(r.stdout)


def test_diagnose_names_the_first_failing_step() -> None:
    with lab(2, 1, ipv6_only=True) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60)
        src, dst = the_lab.topo.workloads[0], the_lab.topo.workloads[1]
        s_ep, d_ep = the_lab.endpoint_of(src), the_lab.endpoint_of(dst)  # made by tabby-cni
        # all green (the BGP status record is refreshed every 5 s)
        assert L.wait_until(lambda: diagnose(the_lab, s_ep, d_ep)[0] == 0, 15), diagnose(the_lab, s_ep, d_ep)
        # a route deleted by hand on the source host (BIRD puts it back at its next scan, 10 s)
        dst_addr = the_lab.addresses()[dst.name]["v6"][0]
        block = next(r["dst"] for r in json.loads(netns.ip("-j", "-6", "route", "show", ns=src.host.ns))
                     if r.get("protocol") == "bird" and r.get("gateway") == dst.host.v6)
        netns.ip("-6", "route", "del", block, ns=src.host.ns)
        code, doc = diagnose(the_lab, s_ep, d_ep)
        assert code == 1
        assert doc["first_failing"] == f"route to {dst_addr} on {src.host.name} (source host)"
        # an Endpoint that does not exist is the first thing named
        code, doc = diagnose(the_lab, s_ep, "nope")
        assert code == 1 and doc["first_failing"] == "destination endpoint record"
