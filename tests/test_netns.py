"""The lab's namespace sweep ends every process, also one started while the others are stopping."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from agentlib import unique

from tabby.lab import netns


def test_sweep_ends_a_process_started_during_the_sweep(tmp_path: Path) -> None:
    ns = netns.add_netns(unique("sw"))
    marker = tmp_path / "child.pid"
    # like an agent that restarts dnsmasq while it is being stopped: on SIGTERM it starts a
    # long-lived child in the same namespace, then exits
    script = f"trap 'sleep 1000 & echo $! > {marker}; exit 0' TERM; while :; do sleep 0.05; done"
    proc = netns.spawn(ns, ["sh", "-c", script], tmp_path / "log")
    netns.wait_for(lambda: subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
                   .stdout.strip() != "", 5)
    assert netns.sweep(ns) == [ns]
    proc.wait(5)
    assert not netns.netns_exists(ns)
    netns.wait_for(marker.exists, 5)  # the child was really started
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = Path(f"/proc/{child}/stat").exists() and \
        Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    assert not alive
