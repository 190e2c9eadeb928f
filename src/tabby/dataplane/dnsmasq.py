"""Runs this host's dnsmasq for its VMs, and keeps its config, hosts and anchor current.

A change of the served interfaces or ranges restarts dnsmasq (it reads those only at start);
a change of only the MAC -> address table is a SIGHUP, which re-reads the hosts file and keeps
every lease. Leases live in a file that dnsmasq reads at start, so a restart disturbs no VM. Before
a (re)start, leases of addresses that no longer belong to the same VM are dropped from that file:
a VM re-created with its old address and a new DUID is otherwise refused while the old lease lives.
dnsmasq is started detached (own session, pid file), so an agent restart adopts it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tabby.dataplane.daemon import adopted_pid, running
from tabby.dataplane.dnsmasq_config import ANCHOR, ANCHOR_PEER, GROUP_ANCHOR, V4_GATEWAY, Rendered, Vm

log = logging.getLogger(__name__)


class DnsmasqError(Exception):
    pass


class DnsmasqReconciler:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.conf = run_dir / "dnsmasq.conf"
        self.hosts = run_dir / "dnsmasq.hosts"
        self.leases = run_dir / "dnsmasq.leases"
        self.pidfile = run_dir / "dnsmasq.pid"
        self.desired: Rendered | None = None
        self.vms: dict[str, Vm] = {}  # address -> the VM it belongs to now
        self.last_error: str | None = None
        self._anchored: tuple[tuple[str, tuple[str, ...]], ...] | None = None  # what _anchors last set up
        # the dnsmasq this reconciler started or signalled: one adopted from an agent before it may
        # never have read the hosts file on disk (that agent can have died between the write and the
        # SIGHUP), so it gets one SIGHUP
        self._told: int | None = None

    def set_desired(self, rendered: Rendered | None, vms: list[Vm]) -> None:
        self.desired = rendered
        self.vms = {a: vm for vm in vms for a in (*vm.v6, *vm.v4)}

    def pid(self) -> int | None:
        return adopted_pid(self.pidfile, self.conf, "dnsmasq")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s: the next dnsmasq cannot bind while this one lives (a
        1 s wait alone let a slow exit fail the restart)."""
        pid = self.pid()
        if pid is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 1.0)):
            if sig == signal.SIGKILL and self.pid() != pid:  # gone meanwhile, its pid perhaps another's
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not running(pid):
                    return
                time.sleep(0.01)
        log.warning("dnsmasq (pid %d) did not end after SIGKILL", pid)

    def _anchors(self, anchors: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
        """The main anchor and the group anchors, and no other group anchor."""
        if self._anchored == anchors and all(Path(f"/sys/class/net/{a}").exists() for a, _ in anchors):
            return
        ip = shutil.which("ip") or "ip"
        wanted = {a for a, _ in anchors}
        for dev in Path("/sys/class/net").iterdir():
            if dev.name.startswith(GROUP_ANCHOR) and not dev.name.endswith("p") and dev.name not in wanted:
                subprocess.run([ip, "link", "del", dev.name], capture_output=True)  # its peer goes with it
        for name, addrs in anchors:
            self._anchor(ip, name, ANCHOR_PEER if name == ANCHOR else name + "p", addrs)
        self._anchored = anchors

    def _anchor(self, ip: str, name: str, peer: str, addrs: tuple[str, ...]) -> None:
        """An anchor veth end carrying each of its pools' first address (no prefix route, no DAD)."""
        if not Path(f"/sys/class/net/{name}").exists():
            subprocess.run([ip, "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
            subprocess.run([ip, "link", "set", peer, "up"], check=True)
            subprocess.run([ip, "link", "set", name, "up"], check=True)
        # first none it no longer serves (a /64 of a wide pool whose last VM here went), with its
        # prefix length: the kernel finds an IPv6 address by address alone, so a "replace" of P/64
        # over a P/56 left the /56, which a removal after it would have taken away
        wanted = {ipaddress.ip_interface(a) for a in addrs}
        r = subprocess.run([ip, "-j", "addr", "show", "dev", name], capture_output=True, text=True)
        held = json.loads(r.stdout)[0].get("addr_info", []) if r.returncode == 0 and r.stdout.strip() else []
        for info in held:
            have = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
            if info.get("scope") == "global" and have not in wanted:
                subprocess.run([ip, "addr", "del", str(have), "dev", name], capture_output=True)
        for a in addrs:
            extra = ["nodad"] if ":" in a else []
            r = subprocess.run([ip, "addr", "replace", a, "dev", name, "noprefixroute", *extra],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise DnsmasqError(f"anchor address {a}: {r.stderr.strip()}")
        if any(":" not in a for a in addrs):
            # proxy ARP on a tap answers for 169.254.1.1 only if the host routes it elsewhere (any
            # anchor will do; every change of anchors puts it on one that exists)
            subprocess.run([ip, "route", "replace", f"{V4_GATEWAY}/32", "dev", name, "proto", "77"],
                           capture_output=True)

    def _prune_leases(self) -> None:
        if not self.leases.exists():
            return
        keep = []
        for line in self.leases.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] != "duid":
                addr = parts[2]
                vm = self.vms.get(addr)
                if vm is None or (":" not in addr and parts[1].lower() != vm.mac):
                    log.info("dropping the lease of %s (no longer this VM's)", addr)
                    continue
            keep.append(line)
        self.leases.write_text("\n".join(keep) + ("\n" if keep else ""))

    def apply(self) -> bool:
        """Returns True if dnsmasq was started, restarted or signalled."""
        r = self.desired
        if r is None or not r.hosts:
            if self.pid() is not None:
                self.stop()
                self._prune_leases()  # a VM coming back with its old address and a new DUID must get it
                log.info("dnsmasq stopped: no VMs on this host")
                return True
            return False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._anchors(r.anchors)
        conf_changed = not self.conf.exists() or self.conf.read_text() != r.conf
        hosts_changed = not self.hosts.exists() or self.hosts.read_text() != r.hosts
        if hosts_changed:
            self.hosts.write_text(r.hosts)
        pid = self.pid()
        if pid is not None and not conf_changed:
            if hosts_changed or pid != self._told:
                os.kill(pid, signal.SIGHUP)
                self._told = pid
                log.info("dnsmasq re-read its hosts (SIGHUP)%s", "" if hosts_changed else ": adopted, as it runs")
                return True
            return False
        if pid is not None:
            self.stop()
        self.conf.write_text(r.conf)
        self._prune_leases()
        argv = [shutil.which("dnsmasq") or "dnsmasq", f"--conf-file={self.conf}"]
        res = subprocess.run(argv, capture_output=True, text=True, start_new_session=True)
        if res.returncode != 0:
            self.last_error = f"dnsmasq: {res.stderr.strip()}"
            raise DnsmasqError(self.last_error)
        for _ in range(100):
            if self.pid() is not None:
                break
            time.sleep(0.01)
        self.last_error = None
        self._told = self.pid()
        log.info("dnsmasq %s (pid %s)", "restarted" if pid else "started", self._told)
        return True
