"""Helpers for tests that run a real agent in a real network namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tabby.client import ResourceClient
from tabby.lab import netns
from tabby.lab.etcd import free_port
from tabby.model import validate
from tabby.store import Store

PREFIX = "tbyt"  # every namespace a test makes starts with this


def unique(stem: str) -> str:
    return f"{PREFIX}{stem}{uuid.uuid4().hex[:6]}"


@contextmanager
def namespace(stem: str = "h") -> Iterator[str]:
    name = netns.add_netns(unique(stem))
    try:
        yield name
    finally:
        for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
            netns.kill_pid(int(pid), 9)
        netns.del_netns(name)


class AgentProc:
    def __init__(self, ns: str, store_url: str, host: str, log: Path, resync_s: float = 90.0) -> None:
        self.ns, self.store_url, self.host, self.log = ns, store_url, host, log
        self.port = free_port()
        self.resync_s = resync_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        self.proc = netns.spawn(self.ns, [sys.executable, "-m", "tabby.cli", "--store", self.store_url, "agent",
                                          "--host", self.host, "--metrics-port", str(self.port),
                                          "--resync-s", str(self.resync_s), "--log-level", "debug",
                                          "--run-dir", str(self.log.parent / f"run-{self.host}")], self.log)
        return self

    def http(self, path: str) -> tuple[int, str]:
        r = netns.nsexec(self.ns, [sys.executable, "-c",
                                   "import urllib.request,sys\n"
                                   "try:\n"
                                   f"  r=urllib.request.urlopen('http://127.0.0.1:{self.port}{path}',timeout=2)\n"
                                   "  print(r.status); print(r.read().decode())\n"
                                   "except urllib.error.HTTPError as e:\n"
                                   "  print(e.code); print(e.read().decode())\n"])
        if r.returncode != 0 or not r.stdout:
            return 0, r.stderr
        code, _, body = r.stdout.partition("\n")
        return int(code), body

    def healthy(self) -> bool:
        return self.http("/healthz")[0] == 200

    def store_events(self) -> int:
        """Store updates the agent has folded in so far (its tabby_store_events_total)."""
        code, body = self.http("/metrics")
        assert code == 200, body
        return int(float(next(line.split()[1] for line in body.splitlines()
                              if line.startswith("tabby_store_events_total "))))

    def stop(self) -> None:
        if self.proc is not None:
            netns.stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def endpoint(name: str, host: str, iface: str, v6: list[str] = (), v4: list[str] = (),  # type: ignore[assignment]
             mac: str = "52:54:00:00:00:01", gw6: str | None = None, orchestrator: str = "vm") -> Any:
    spec: dict[str, Any] = {"host": host, "orchestrator": orchestrator, "workload_id": name, "interface": iface,
                            "mac": mac, "ipv6_addresses": list(v6), "ipv4_addresses": list(v4)}
    if gw6:
        spec["ipv6_gateway"] = gw6
    return validate({"kind": "Endpoint", "metadata": {"name": name}, "spec": spec})


def apply(store: Store, *resources: Any) -> None:
    client = ResourceClient(store)
    for r in resources:
        client.apply(r)


def routes(ns: str) -> dict[str, str]:
    """dst -> dev, for tabby's routes (proto 77)."""
    out = {}
    for fam in ("-6", "-4"):
        for r in json.loads(netns.ip("-j", fam, "route", "show", "proto", "77", ns=ns) or "[]"):
            dst = r["dst"] if "/" in r["dst"] else r["dst"] + ("/128" if ":" in r["dst"] else "/32")
            out[dst] = r["dev"]
    return out


def neighbours(ns: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for n in json.loads(netns.ip("-j", "neigh", "show", ns=ns) or "[]"):
        out[(n["dev"], n["dst"])] = n
    return out


def proxies(ns: str) -> set[tuple[str, str]]:
    return {(n["dev"], n["dst"]) for n in json.loads(netns.ip("-j", "neigh", "show", "proxy", ns=ns) or "[]")}


def sysctl(ns: str, path: str) -> str:
    return netns.nsexec(ns, ["cat", f"/proc/sys/net/{path}"]).stdout.strip()


def status(store: Store, host: str, name: str) -> dict[str, Any] | None:
    kv = store.get(f"/tabby/status/endpoints/{host}/{name}")
    return json.loads(kv.value) if kv else None


__all__ = ["AgentProc", "apply", "endpoint", "namespace", "neighbours", "proxies", "routes", "status", "sysctl",
           "unique"]
