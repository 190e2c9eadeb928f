"""`tabby diagnose` on a real lab: green when all is well, and the first broken layer named."""

from __future__ import annotations

import json
import subprocess
import sys

from lablib import agent_pid, all_ok, lab

from tabby.lab import lab as L
from tabby.lab import netns


def diagnose(the_lab: L.Lab, src: str, dst: str) -> tuple[int, dict[str, object]]:
    r = subprocess.run([sys.executable, "-m", "tabby.cli", "--store", the_lab.store_url, "diagnose", src, dst,
                        "--lab", the_lab.topo.prefix, "-o", "json"], capture_output=True, text=True)
    return r.returncode, json.loads(r.stdout)


def test_diagnose_names_the_first_failing_step() -> None:
    with lab(2, 1, ipv6_only=True) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60)
        a, b = the_lab.topo.workloads[0], the_lab.topo.workloads[1]
        assert the_lab.topo.blocked_pair == (a.name, b.name)  # the lab's policy blocks a -> b
        a_ep, b_ep = the_lab.endpoint_of(a), the_lab.endpoint_of(b)  # made by tabby-cni
        # b -> a is open: all green (the BGP status record is refreshed every 5 s)
        assert L.wait_until(lambda: diagnose(the_lab, b_ep, a_ep)[0] == 0, 15), diagnose(the_lab, b_ep, a_ep)
        # a -> b: every layer up to the policy is fine, and the policy is what blocks it
        # (BGP status is written when sessions change: wait for it as for the green run above)
        assert L.wait_until(lambda: diagnose(the_lab, a_ep, b_ep)[1]["first_failing"] == "policy verdict (IPv6 ping)",
                            15), diagnose(the_lab, a_ep, b_ep)
        code, doc = diagnose(the_lab, a_ep, b_ep)
        assert code == 1 and doc["first_failing"] == "policy verdict (IPv6 ping)", doc
        verdict = next(st for st in doc["steps"] if st["name"] == "policy verdict (IPv6 ping)")
        assert "policy lab-block ingress rule 0 (deny)" in verdict["detail"]
        assert all(st["ok"] for st in doc["steps"] if not st["name"].startswith("policy"))
        a_addr = the_lab.addresses()[a.name]["v6"][0]
        assert netns.nsexec(a.ns, ["ping", "-6", "-c", "1", "-W", "1", the_lab.addresses()[b.name]["v6"][0]]
                            ).returncode != 0  # and the kernel agrees
        # a route deleted by hand on b's host, toward a (BIRD puts it back at its next scan, 10 s)
        block = next(r["dst"] for r in json.loads(netns.ip("-j", "-6", "route", "show", ns=b.host.ns))
                     if r.get("protocol") == "bird" and r.get("gateway") == a.host.v6)
        want = f"route to {a_addr} on {b.host.name} (source host)"

        def route_deleted_is_named() -> bool:
            # BIRD's kernel scan may put the route back before diagnose looks: delete it again then
            netns.ip("-6", "route", "del", block, ns=b.host.ns, check=False)
            code, doc = diagnose(the_lab, b_ep, a_ep)
            return code == 1 and doc["first_failing"] == want

        assert L.wait_until(route_deleted_is_named, 30, 0.1), diagnose(the_lab, b_ep, a_ep)
        # an Endpoint that does not exist is the first thing named
        code, doc = diagnose(the_lab, a_ep, "nope")
        assert code == 1 and doc["first_failing"] == "destination endpoint record"
        # b's host agent stopped: what only its agent could say is "not checked", never green
        netns.kill_pid(agent_pid(b.host.ns))
        assert L.wait_until(lambda: diagnose(the_lab, b_ep, a_ep)[1]["first_failing"] == "source host agent alive",
                            15), diagnose(the_lab, b_ep, a_ep)
        steps = {st["name"]: st for st in diagnose(the_lab, b_ep, a_ep)[1]["steps"]}
        assert steps["source host agent alive"]["state"] == "failed"
        assert steps["source endpoint programmed"]["state"] == "not checked"
        assert "not alive" in steps["source endpoint programmed"]["detail"]
        bgp = next(st for name, st in steps.items() if name.startswith(f"BGP {b.host.name}"))
        assert bgp["state"] == "not checked"
        assert steps["destination endpoint programmed"]["state"] == "ok"  # a's host is fine
