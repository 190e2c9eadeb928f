"""A lab of this test's own (unique prefix), always torn down."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tabby.lab import lab as L
from tabby.lab import netns
from tabby.lab.topology import topology


@contextmanager
def lab(hosts: int = 3, containers: int = 2, ipv6_only: bool = False,
        route_reflectors: tuple[int, ...] = (), vms: int = 0, store: str = "sqlite", tors: int = 0) -> Iterator[L.Lab]:
    prefix = "t" + uuid.uuid4().hex[:5]
    topo = topology(hosts, containers, ipv6_only, prefix, route_reflectors, vms, tors=tors)
    the_lab = L.Lab(topo, L.default_store(prefix), store_kind=store)
    try:
        the_lab.up()
        yield the_lab
    finally:
        for h in topo.hosts:
            log = the_lab.dir / f"agent-{h.name}.log"
            if log.exists():
                print(f"--- {h.name} agent log (tail)\n" + log.read_text()[-6000:])
        L.down(prefix)


def all_ok(the_lab: L.Lab) -> bool:
    fams = ("v6",) if the_lab.topo.ipv6_only else ("v6", "v4")
    return all(r["ok"] for r in the_lab.matrix(fams))


def kernel_routes(ns: str, family: str = "-6") -> list[dict[str, object]]:
    return json.loads(netns.ip("-j", family, "route", "show", ns=ns) or "[]")


def birdc(the_lab: L.Lab, host: str, *args: str) -> str:
    sock = the_lab.run_dir / host / "bird.ctl"
    return subprocess.run(["birdc", "-s", str(sock), *args], capture_output=True, text=True).stdout


def agent_pid(host_ns: str) -> int:
    """The tabby agent running in a lab host's namespace."""
    from pathlib import Path

    for pid in subprocess.run(["ip", "netns", "pids", host_ns], capture_output=True, text=True).stdout.split():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tabby.cli" in cmd and b"agent" in cmd:
            return int(pid)
    raise LookupError(f"no agent in {host_ns}")
