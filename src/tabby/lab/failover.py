"""Cut a lab host off and time how long the other hosts' kernels keep its routes (BFD's promise).

Two causes: ``link-down`` (the host's fabric port on the bridge goes down: its eth0 loses carrier,
the others see nothing but silence) and ``blackhole`` (an nftables table in the host's namespace,
``LAB_TABLE``, drops everything in and out: links up, packets gone). The time is from the cut to
the kernel route deletion that ``ip monitor`` reports in every other host. Used by
tests/test_bfd.py and bench/bfd.py.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tabby.lab import netns

if TYPE_CHECKING:
    from tabby.lab.lab import Lab
    from tabby.lab.topology import LabHost

LAB_TABLE = "labcut"  # the lab's own nft table for a blackhole cut; tabby's is "inet tabby"
CAUSES = ("link-down", "blackhole")


class RouteWatch:
    """``ip -6 monitor route`` (and -4) in a namespace, each line stamped when it arrived."""

    def __init__(self, ns: str, family: str = "-6") -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(["ip", "-n", ns, family, "monitor", "route"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def deleted(self, match: str, since: float) -> float | None:
        """When a route whose line contains match was deleted, after since."""
        for t, line in list(self.lines):
            if t >= since and line.startswith("Deleted") and match in line:
                return t
        return None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def cut(lab: Lab, h: LabHost, cause: str) -> Callable[[], None]:
    """Cut h off; returns the function that puts it back."""
    if cause == "link-down":
        netns.ip("link", "set", h.bridge_port, "down", ns=lab.topo.fabric_ns)
        return lambda: netns.ip("link", "set", h.bridge_port, "up", ns=lab.topo.fabric_ns)
    if cause == "blackhole":
        script = (f"add table inet {LAB_TABLE}\n"
                  f"add chain inet {LAB_TABLE} in {{ type filter hook input priority -400; policy drop; }}\n"
                  f"add chain inet {LAB_TABLE} out {{ type filter hook output priority -400; policy drop; }}\n")
        subprocess.run(["ip", "netns", "exec", h.ns, "nft", "-f", "-"], input=script, text=True, check=True)
        return lambda: subprocess.run(["ip", "netns", "exec", h.ns, "nft", "delete", "table", "inet", LAB_TABLE],
                                      check=True)
    raise ValueError(f"cause {cause!r}: one of {CAUSES}")


def host_block(lab: Lab, h: LabHost, timeout: float = 30.0) -> str:
    """h's IPv6 block, as its own kernel's blackhole says, once it has one (``lab up`` returns
    when the containers are made, not when BIRD has their blocks); how long that took goes to
    stderr when it was not at once, so a slow agent is seen, not hidden."""
    t0 = time.monotonic()

    def blocks() -> list[str]:
        return [w for w in netns.ip("-6", "route", "show", "type", "blackhole", ns=h.ns).split()
                if w.startswith("fd00:e:")]

    found = netns.wait_for(blocks, timeout, 0.05, f"{h.name}'s block in its kernel (a blackhole route)")
    if (waited := time.monotonic() - t0) > 0.1:
        print(f"{h.name}'s block {found[0]} came {waited:.2f} s after it was first looked for", file=sys.stderr)
    return found[0]


def _has_route(ns: str, block: str) -> bool:
    return bool(netns.ip("-6", "route", "show", block, ns=ns).strip())


def failover_ms(lab: Lab, victim: LabHost, cause: str, cuts: int, settle_s: float = 30.0) -> list[float]:
    """Cut victim off ``cuts`` times; per cut, ms until the slowest other host's kernel lost its
    block (its routes). Between cuts: put back, and wait until every other host has its route again."""
    others = [h for h in lab.topo.hosts if h != victim]
    block = host_block(lab, victim)
    out: list[float] = []
    for _ in range(cuts):
        netns.wait_for(lambda: all(_has_route(h.ns, block) for h in others), settle_s, 0.1,
                       f"{victim.name}'s block {block} on every other host")
        time.sleep(0.5)  # the sessions settle (BFD up again everywhere)
        watches = [RouteWatch(h.ns) for h in others]
        try:
            time.sleep(0.1)
            t0 = time.monotonic()
            restore = cut(lab, victim, cause)
            try:
                netns.wait_for(lambda t0=t0, ws=watches: all(w.deleted(block, t0) for w in ws), 15, 0.01,
                               f"{victim.name}'s block withdrawn everywhere ({cause})")
                out.append(max((w.deleted(block, t0) or 0) - t0 for w in watches) * 1000)
            finally:
                restore()
        finally:
            for w in watches:
                w.close()
    return out


def withdrawals(lab: Lab, victim: LabHost, during: Callable[[], None], watch_s: float) -> list[str]:
    """Route deletions of victim's block at the other hosts while ``during`` runs and watch_s after."""
    others = [h for h in lab.topo.hosts if h != victim]
    block = host_block(lab, victim)
    watches = [RouteWatch(h.ns) for h in others]
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        during()
        time.sleep(watch_s)
        return [f"{h.name}: {line}" for h, w in zip(others, watches, strict=True) for t, line in w.lines
                if t >= t0 and line.startswith("Deleted") and block in line]
    finally:
        for w in watches:
            w.close()


def stats(values: Sequence[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank: with 10 values, p99 is the largest)."""
    s = sorted(values)
    rank = math.ceil(0.99 * len(s))  # nearest rank, 1-based
    return {"p50": statistics.median(s), "p99": s[max(0, rank - 1)]}
