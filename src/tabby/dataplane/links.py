"""Interfaces and their sysctls.

``LinkIndex`` maps interface names to indexes: read at start and on resync, kept
current in between from the netlink monitor's link events. ``SysctlReconciler`` owns the
per-interface sysctls tabby sets on endpoint interfaces, and the host-wide ones (forwarding),
written under /proc/sys/net of the agent's own network namespace. ``NeighbourTables`` sizes the
kernel's neighbour tables, which are the machine's, not the namespace's (see below).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tabby.dataplane.netlink import NeighTable, neigh_tables
from tabby.dataplane.tracker import DeltaTracker

log = logging.getLogger(__name__)

PROC_NET = Path("/proc/sys/net")


class _IfNameIndex(ctypes.Structure):
    _fields_ = [("if_index", ctypes.c_uint), ("if_name", ctypes.c_char_p)]


def _libc_if_nameindex() -> Callable[[], list[tuple[int, str]]] | None:
    """libc's if_nameindex through ctypes, which lets go of the GIL for the call; None if this
    libc cannot be loaded that way (``socket.if_nameindex`` then)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        get, free = libc.if_nameindex, libc.if_freenameindex
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.POINTER(_IfNameIndex)
    get.argtypes = []
    free.argtypes = [ctypes.POINTER(_IfNameIndex)]
    free.restype = None

    def names() -> list[tuple[int, str]]:
        p = get()
        if not p:
            raise OSError(ctypes.get_errno(), "if_nameindex failed")
        try:
            out = []
            i = 0
            while (e := p[i]).if_index:
                out.append((e.if_index, os.fsdecode(e.if_name)))  # as socket.if_nameindex
                i += 1
            return out
        finally:
            free(p)
    return names


# Why not socket.if_nameindex: it keeps the GIL for the whole call (libc dumps every link's
# attributes: 40-57 ms at 4,000 veths), and at a cold start that stalled the Store listing and
# decoding that run meanwhile on the other threads.
_if_nameindex = _libc_if_nameindex() or socket.if_nameindex


class LinkIndex:
    def __init__(self) -> None:
        self.by_name: dict[str, int] = {}
        self.by_index: dict[int, str] = {}

    def refresh(self) -> None:
        # libc's if_nameindex, not a pyroute2 dump: with thousands of veths the dump parses every
        # attribute of every link (seen: 2 s for 4,000 links) when only names and indexes are needed
        self.by_name = {name: index for index, name in _if_nameindex()}
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
                self.failures.pop(path, None)  # (kept, one per path of every veth that came and went)
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
        """Write pending values for interfaces that exist; returns how many failed. os-level
        open/write/close, not Path.write_text (its io layers were ~15% of a cold start's sysctl
        time at 2,000 endpoints). Why not netlink for the neighbour parameters (RTM_SETNEIGHTBL,
        many to a send): measured slower, 0.8 -> 1.25 s at 2,000 endpoints, as the kernel finds a
        device's parameters by walking a list of every device's (of every namespace: the tables
        are the machine's)."""
        for path in list(self.tracker.pending_deletes):
            self.tracker.applied_delete(path)
        failed = 0
        by_name = self.links.by_name
        root = f"{self.root}/"
        for path, value in list(self.tracker.pending_updates.items()):
            if _iface_of(path) not in by_name:
                continue  # waits for the interface
            try:
                fd = os.open(root + path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, value.encode())
                finally:
                    os.close(fd)
                self.tracker.applied_update(path, value)
                self.failures.pop(path, None)
            except OSError as e:
                failed += 1
                self.failures[path] = f"sysctl {path}={value}: {e.strerror}"
        return failed

    def pending_for(self, iface: str) -> list[str]:
        return [p for p in self.by_iface.get(iface, {}) if p in self.tracker.pending_updates]


def set_host_sysctls(root: Path = PROC_NET) -> list[str]:
    """Forwarding on for both families (the host routes between its workloads and the fabric);
    returns the ones that were off. Written only where it is not on yet: a write of ipv6
    all/forwarding visits every device under the RTNL (~40 ms with 4,000 veths), and an agent
    restart finds them on."""
    written = []
    for path in ("ipv6/conf/all/forwarding", "ipv6/conf/default/forwarding", "ipv4/ip_forward"):
        if (root / path).read_text().strip() != "1":
            (root / path).write_text("1")
            written.append(path)
    return written


# -- neighbour tables ---------------------------------------------------------------------------
#
# The kernel's IPv6 (ndisc_cache) and IPv4 (arp_cache) neighbour tables are machine-wide: every
# network namespace's entries count against one limit, gc_thresh3, which only the root namespace
# can set. Seen on this kernel (6.x): inside any other namespace /proc/sys/net/ipv{4,6}/neigh/
# has only per-device directories (no "default", so gc_thresh* are absent: ENOENT), and
# RTM_SETNEIGHTBL with thresholds answers ENOENT too; RTM_GETNEIGHTBL still reports the machine's
# values. Over gc_thresh3 a new entry is refused (dmesg: "neighbor table overflow!") and traffic to
# that neighbour fails: a 50-host lab lost 40% of its pairs to it at the default 1024.
# Permanent entries (what the agent writes per endpoint address) are exempt from the count; what
# counts is dynamic: a workload's entry for its gateway (in its own namespace, but the same table),
# the host's entry for the workload's link-local address, and the fabric neighbours.

NEIGH_FAMILIES = ("ipv6", "ipv4")
NEIGH_KEYS = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
# Why these floors: 4x/8x the kernel's defaults (128/512/1024), as distributions tuned for many
# containers set them; a small host never needs less, and a table holds nothing it does not use.
NEIGH_FLOORS = (1024, 4096, 8192)
FABRIC_NEIGHBOURS = 256  # room for the hosts and routers on the fabric link a host may talk to


def neigh_thresholds(entries: int) -> dict[str, int]:
    """gc_thresh1..3 for a table expected to hold ``entries`` dynamic entries, with headroom.

    gc_thresh1 is the level below which nothing is collected: the steady state must fit under it,
    or live entries are dropped and re-resolved; gc_thresh2 (the soft limit) twice that, and
    gc_thresh3, the hard limit past which entries are refused, four times (a burst of new
    neighbours, stale entries not yet collected). Rounded up to 1024 so the values read plainly."""
    def up(n: int) -> int:
        return -(-n // 1024) * 1024
    base = max(0, entries)
    return {k: max(floor, up(base * mult)) for k, floor, mult in zip(NEIGH_KEYS, NEIGH_FLOORS, (1, 2, 4), strict=True)}


def host_neigh_entries(endpoints: int) -> int:
    """Dynamic entries one host's workloads and fabric need per family (see above)."""
    return 2 * max(0, endpoints) + FABRIC_NEIGHBOURS


def read_neigh_thresholds(root: Path = PROC_NET) -> dict[str, dict[str, int]] | None:
    """family -> gc_thresh1..3 from /proc/sys, or None where this namespace has none (not root)."""
    out: dict[str, dict[str, int]] = {}
    for fam in NEIGH_FAMILIES:
        base = root / fam / "neigh" / "default"
        try:
            out[fam] = {k: int((base / k).read_text()) for k in NEIGH_KEYS}
        except FileNotFoundError:
            return None
    return out


def raise_neigh_thresholds(want: dict[str, int], root: Path = PROC_NET) -> dict[str, dict[str, int]]:
    """Raise each threshold to at least ``want`` (a larger value someone set is kept), both families.

    Written from the top down, so thresh1 <= thresh2 <= thresh3 holds throughout (the kernel takes
    each value alone and does not check their order).
    Returns what was written (family -> key -> new value). OSError if the files are absent or not
    writable (FileNotFoundError: not the root namespace)."""
    written: dict[str, dict[str, int]] = {}
    for fam in NEIGH_FAMILIES:
        base = root / fam / "neigh" / "default"
        for k in reversed(NEIGH_KEYS):
            cur = int((base / k).read_text())
            if cur < want[k]:
                (base / k).write_text(str(want[k]))
                written.setdefault(fam, {})[k] = want[k]
    return written


def write_neigh_thresholds(values: dict[str, dict[str, int]], root: Path = PROC_NET) -> None:
    """Set the thresholds to exactly these values (the lab restoring what it found), in an order
    that keeps thresh1 <= thresh2 <= thresh3 whether each moves up or down."""
    for fam, vals in values.items():
        base = root / fam / "neigh" / "default"
        cur = {k: int((base / k).read_text()) for k in NEIGH_KEYS}
        lowering = vals.get("gc_thresh3", cur["gc_thresh3"]) < cur["gc_thresh3"]
        for k in (NEIGH_KEYS if lowering else tuple(reversed(NEIGH_KEYS))):
            if k in vals and vals[k] != cur[k]:
                (base / k).write_text(str(vals[k]))


class NeighbourTables:
    """The agent's side: size the machine's neighbour tables for this host's endpoints where it
    can (the root namespace: raise only, an operator's larger value stays), and say so once where
    it cannot (any other namespace: the root namespace's owner, e.g. the lab, must size them).

    ``size`` is cheap when nothing changes (the wanted values move in steps of 1024), so the agent
    may call it on every endpoint count change. ``status()`` is what the host's status record
    carries; it changes only when ``size`` returns True."""

    def __init__(self, root: Path = PROC_NET, read_kernel: Callable[[], list[NeighTable]] | None = None) -> None:
        self.root = root
        self.read_kernel = read_kernel or neigh_tables
        self.wanted: dict[str, int] | None = None
        self._status: dict[str, Any] = {}
        self._said: set[str] = set()

    def size(self, endpoints: int) -> bool:
        """Make the tables fit ``endpoints``; True when the status changed (publish it again)."""
        want = neigh_thresholds(host_neigh_entries(endpoints))
        if want == self.wanted:
            return False
        self.wanted = want
        sized_here, note = False, ""
        try:
            if read_neigh_thresholds(self.root) is None:
                note = ("neighbour table thresholds are not in this network namespace (only the root "
                        "namespace has net.ipv{4,6}.neigh.default.gc_thresh*): they are the machine's, sized there")
            else:
                written = raise_neigh_thresholds(want, self.root)
                sized_here = True
                if written:
                    self._say(f"raised {written}", logging.INFO, f"neighbour table thresholds raised for {endpoints} "
                              f"endpoints: {written}")
        except OSError as e:
            note = f"neighbour table thresholds not writable here: {e.strerror or e}"
        try:
            machine = {_FAMILY_NAME.get(t.family, str(t.family)): t.gc_thresh3 for t in self.read_kernel()}
        except OSError as e:
            machine = {}
            note = (note + "; " if note else "") + f"reading them over netlink failed: {e.strerror or e}"
        fits = bool(machine) and all(machine.get(f, 0) >= want["gc_thresh3"] for f in NEIGH_FAMILIES)
        if note:
            level = logging.INFO if fits else logging.WARNING
            extra = "" if fits else (f"; the machine's gc_thresh3 {machine or '(unknown)'} is below the "
                                     f"{want['gc_thresh3']} this host wants for {endpoints} endpoints")
            self._say(f"{note} fits={fits}", level, note + extra)
        self._status = {"sized_here": sized_here, "fits": fits, "wanted_gc_thresh3": want["gc_thresh3"],
                        "gc_thresh3": machine, "note": note}
        return True

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def _say(self, key: str, level: int, text: str) -> None:
        """One log line per distinct situation, not one per call."""
        if key not in self._said:
            self._said.add(key)
            log.log(level, "%s", text)


_FAMILY_NAME = {socket.AF_INET6: "ipv6", socket.AF_INET: "ipv4"}
