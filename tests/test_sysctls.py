"""The per-interface sysctls, written in a real namespace: /proc reads back exactly what was
asked for and the drift check finds nothing to do (values that are whole jiffies at any HZ, as
/proc rounds through jiffies: a proxy_delay of 7 reads back as 6 at HZ 250). A device that does
not exist waits; one deleted under the reconciler fails with its error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from agentlib import namespace

from tabby.lab import netns

WORKER = r"""
import json, sys
from tabby.agent.calc import PAIR_NEIGH_TIMING
from tabby.dataplane.links import LinkIndex, SysctlReconciler
want = {"ipv6/conf/tbs0/accept_ra": "0", "ipv6/conf/tbs0/forwarding": "1", "ipv4/conf/tbs0/proxy_arp": "1",
        "ipv4/conf/tbs0/rp_filter": "1", "ipv6/neigh/tbs0/proxy_delay": "10", "ipv4/neigh/tbs0/proxy_delay": "0",
        "ipv4/neigh/tbs0/delay_first_probe_time": "3",
        **{f"ipv6/neigh/tbs0/{k}": v for k, v in PAIR_NEIGH_TIMING.items()},
        **{f"ipv4/neigh/tbs1/{k}": v for k, v in PAIR_NEIGH_TIMING.items()},
        "ipv4/conf/tbs9/proxy_arp": "1"}  # tbs9 does not exist: it waits, and is no failure
links = LinkIndex()
links.refresh()
out = {}
for round in ("first", "again"):
    rec = SysctlReconciler(links)
    rec.set_interface("tbs0", {k: v for k, v in want.items() if "/tbs0/" in k})
    rec.set_interface("tbs1", {k: v for k, v in want.items() if "/tbs1/" in k})
    rec.set_interface("tbs9", {k: v for k, v in want.items() if "/tbs9/" in k})
    failed = rec.apply()
    got = {k: open(f"/proc/sys/net/{k}").read().strip() for k in want if "/tbs9/" not in k}
    rec.read_back()
    out[round] = {"failed": failed, "got": got, "pending": sorted(rec.tracker.pending_updates),
                             "failures": rec.failures}
    # the next round starts from other values, so each path is written again
    for k in got:
        if "/neigh/" in k:
            open(f"/proc/sys/net/{k}", "w").write("9")
# a device deleted after the index was read: its neighbour parameters fail with their error
import subprocess
subprocess.run(["ip", "link", "del", "tbs0"], check=True)
rec = SysctlReconciler(links)
rec.set_interface("tbs0", {"ipv6/neigh/tbs0/proxy_delay": "0", "ipv6/conf/tbs0/accept_ra": "0"})
out["gone"] = {"failed": rec.apply(), "failures": dict(rec.failures)}
rec.set_interface("tbs0", None)  # its endpoint goes too: its failures with it (they grew for ever)
out["forgotten"] = rec.failures
print(json.dumps({"want": want, **out}))
"""


def test_sysctls_over_netlink_and_proc_read_back_as_asked(tmp_path: Path) -> None:
    with namespace("sysc") as ns:
        netns.ip("-batch", "-", ns=ns, input="link add tbs0 type veth peer name tbs1\nlink set tbs0 up\n"
                                              "link set tbs1 up\n")
        src = str(Path(__file__).resolve().parents[1] / "src")
        r = netns.nsexec(ns, [sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r})\n" + WORKER],
                         timeout=60)
        assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    want = {k: v for k, v in res["want"].items() if "/tbs9/" not in k}
    for mode in ("first", "again"):  # the second round writes over other values
        assert res[mode]["got"] == want, mode
        assert res[mode]["failed"] == 0 and res[mode]["failures"] == {}, res[mode]
        assert res[mode]["pending"] == ["ipv4/conf/tbs9/proxy_arp"], res[mode]  # waits for its device
    gone = res["gone"]
    assert gone["failed"] == 2, gone
    assert "No such file or directory" in gone["failures"]["ipv6/conf/tbs0/accept_ra"], gone
    assert "No such file or directory" in gone["failures"]["ipv6/neigh/tbs0/proxy_delay"], gone
    assert res["forgotten"] == {}
