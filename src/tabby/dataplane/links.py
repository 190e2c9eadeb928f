"""Interfaces and their sysctls.

``LinkIndex`` maps interface names to indexes: read at start and on resync, kept
current in between from the netlink monitor's link events. ``SysctlReconciler`` owns the
per-interface sysctls tabby sets on endpoint interfaces, and the host-wide ones (forwarding,
neighbour table sizes), written under /proc/sys/net of the agent's own network namespace.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path

from tabby.dataplane.tracker import DeltaTracker

log = logging.getLogger(__name__)

PROC_NET = Path("/proc/sys/net")


class LinkIndex:
    def __init__(self) -> None:
        self.by_name: dict[str, int] = {}
        self.by_index: dict[int, str] = {}

    def refresh(self) -> None:
        # libc's if_nameindex, not a pyroute2 dump: with thousands of veths the dump parses every
        # attribute of every link (seen: 2 s for 4,000 links) when only names and indexes are needed
        self.by_name = {name: index for index, name in socket.if_nameindex()}
        self.by_index = {i: n for n, i in self.by_name.items()}

    def added(self, name: str, index: int) -> None:
        old = self.by_index.pop(index, None)
        if old is not None and old != name:
            self.by_name.pop(old, None)
        self.by_name[name] = index
        self.by_index[index] = name

    def removed(self, index: int) -> str | None:
        name = self.by_index.pop(index, None)
        if name is not None and self.by_name.get(name) == index:
            del self.by_name[name]
        return name


def _iface_of(path: str) -> str:
    return path.split("/")[2]  # "ipv6/conf/<iface>/accept_ra"


class SysctlReconciler:
    def __init__(self, links: LinkIndex, root: Path = PROC_NET) -> None:
        self.links = links
        self.root = root
        self.tracker: DeltaTracker[str, str] = DeltaTracker()
        self.by_iface: dict[str, dict[str, str]] = {}
        self.failures: dict[str, str] = {}

    def set_interface(self, iface: str, sysctls: dict[str, str] | None) -> None:
        old = self.by_iface.pop(iface, {})
        for path in old:
            if not sysctls or path not in sysctls:
                self.tracker.delete_desired(path)  # left as it is: the device is usually gone
        if sysctls:
            self.by_iface[iface] = dict(sysctls)
            for path, value in sysctls.items():
                self.tracker.set_desired(path, value)

    def interface_gone(self, iface: str) -> None:
        for path in self.by_iface.get(iface, {}):
            self.tracker.dataplane_gone(path)

    def read_back(self) -> None:
        """Drift check: read every desired value from the kernel."""
        actual: dict[str, str] = {}
        for path in self.tracker.desired:
            with contextlib.suppress(OSError):
                actual[path] = (self.root / path).read_text().strip()
        self.tracker.replace_dataplane(actual)

    def apply(self) -> int:
        """Write pending values for interfaces that exist; returns how many failed."""
        for path in list(self.tracker.pending_deletes):
            self.tracker.applied_delete(path)
        failed = 0
        for path, value in list(self.tracker.pending_updates.items()):
            if _iface_of(path) not in self.links.by_name:
                continue  # waits for the interface
            try:
                (self.root / path).write_text(value)
                self.tracker.applied_update(path, value)
                self.failures.pop(path, None)
            except OSError as e:
                failed += 1
                self.failures[path] = f"sysctl {path}={value}: {e.strerror}"
        return failed

    def pending_for(self, iface: str) -> list[str]:
        return [p for p in self.by_iface.get(iface, {}) if p in self.tracker.pending_updates]


def set_host_sysctls(root: Path = PROC_NET, endpoints: int = 0) -> list[str]:
    """Forwarding on for both families, and neighbour tables sized for the endpoints served.

    gc_thresh* exist only in the root network namespace on this kernel; inside a host namespace
    (the lab) they are absent and the kernel's limits apply to the whole machine."""
    notes = []
    for path in ("ipv6/conf/all/forwarding", "ipv6/conf/default/forwarding", "ipv4/ip_forward"):
        (root / path).write_text("1")
    for fam in ("ipv6", "ipv4"):
        base = root / fam / "neigh" / "default"
        if not (base / "gc_thresh3").exists():
            notes.append(f"{fam} neighbour table thresholds not in this namespace; left to the root namespace")
            continue
        want = {"gc_thresh1": max(1024, endpoints * 2), "gc_thresh2": max(4096, endpoints * 4),
                "gc_thresh3": max(8192, endpoints * 8)}
        for name, value in want.items():
            cur = int((base / name).read_text())
            if cur < value:
                (base / name).write_text(str(value))
    return notes
