"""The lab's namespace sweep ends every process, also one started while the others are stopping."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from agentlib import unique

from tabby.lab import netns


def test_sweep_ends_a_process_started_during_the_sweep(tmp_path: Path) -> None:
    ns = netns.add_netns(unique("sw"))
    marker = tmp_path / "child.pid"
    proc = None
    try:
        # like an agent that restarts dnsmasq while it is being stopped: on SIGTERM it starts a
        # long-lived child in the same namespace, then exits
        ready = tmp_path / "ready"
        script = f"trap 'sleep 1000 & echo $! > {marker}; exit 0' TERM; : > {ready}; while :; do sleep 0.05; done"
        proc = netns.spawn(ns, ["sh", "-c", script], tmp_path / "log")
        # the trap is set (a process in the namespace may still be `ip netns exec`, or a shell before
        # its trap: a SIGTERM then ends it with no child, which is the flake this wait ends)
        netns.wait_for(ready.exists, 5)
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
    finally:  # a failure above must not leave the looping shell, its child or the namespace
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        with contextlib.suppress(OSError, ValueError):  # the child we had started, if its pid still runs it
            pid = int(marker.read_text())
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00":
                netns.kill_pid(pid, 9)
        if netns.netns_exists(ns):
            netns.sweep(ns)
