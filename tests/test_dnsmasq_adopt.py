"""The agent's dnsmasq across an agent restart, with a real dnsmasq in a namespace: one adopted from
the agent before is told to read its hosts file once, since that agent may have died between
writing the file and the SIGHUP (the VM it was for got no DHCP until something else changed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agentlib import namespace

SCRIPT = r"""
import dataclasses, json, sys, time
from pathlib import Path
from tabby.dataplane.dnsmasq import DnsmasqReconciler
from tabby.dataplane.dnsmasq_config import Vm, render
from tabby.model import validate
run = Path(sys.argv[1])
pool = validate({"kind": "IPPool", "metadata": {"name": "p6"}, "spec": {"cidr": "fd00:d1::/64"}}).spec
a = Vm("tapa", "52:54:00:00:00:0a", ("fd00:d1::a",), ())
b = Vm("tapb", "52:54:00:00:00:0b", ("fd00:d1::b",), ())
def reads():  # dnsmasq logs each read of its hosts file: at its start and on every SIGHUP
    time.sleep(0.3)
    log = run / "dnsmasq.log"
    return log.read_text().count("dnsmasq.hosts") if log.exists() else 0
first = DnsmasqReconciler(run)
first.set_desired(render([a], [pool], run), [a])
assert first.apply()
pid = first.pid()
out = {"started": reads()}
# that agent wrote the hosts file for a second VM on a served tap, then died before its SIGHUP
with_b = dataclasses.replace(render([a], [pool], run), hosts=render([a, b], [pool], run).hosts)
(run / "dnsmasq.hosts").write_text(with_b.hosts)
second = DnsmasqReconciler(run)  # the next agent: the same config, the same hosts file on disk
second.set_desired(with_b, [a, b])
out["adopted_signalled"] = second.apply()
out["same_pid"] = second.pid() == pid
out["after_adopt"] = reads()
out["again"] = second.apply()  # nothing new since: no signal
out["after_again"] = reads()
second.stop()
print(json.dumps(out))
"""


def test_an_adopted_dnsmasq_reads_the_hosts_file_once(tmp_path: Path) -> None:
    with namespace("dq") as ns:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "tapa", "type", "veth", "peer", "name", "tapap"],
                    ["ip", "link", "set", "tapa", "up"], ["ip", "link", "set", "tapap", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT, str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["adopted_signalled"] is True and out["same_pid"] is True, out
        assert out["after_adopt"] == out["started"] + 1, out
        assert out["again"] is False and out["after_again"] == out["after_adopt"], out
