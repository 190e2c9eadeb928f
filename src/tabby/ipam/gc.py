"""The leak collector: frees what no Endpoint uses, but never on a single sighting.

An allocation leaks when the CNI plugin or Neutron driver died between assigning and writing
the Endpoint, or never released. A handle is leaked when none of its addresses is on a live
Endpoint and the Endpoint it names (if any) does not exist; one live address keeps the whole
handle (all-or-nothing). It is released only when seen leaked by two runs at least ``grace``
seconds apart, which also protects a CNI ADD that has assigned but not yet written its
Endpoint. Empty blocks lose their affinity the same way, except a host's last block. What the
collector saw is kept in one Store record (``ipam/gc``) so runs in different processes agree.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from dataclasses import dataclass, field

from tabby.ipam.allocator import IPAM
from tabby.ipam.blocks import address
from tabby.model import decode
from tabby.model.ipam import Affinity, GcState
from tabby.model.keys import IPAM_AFFINITIES_PREFIX, IPAM_GC_KEY, ipam_affinity_key, ipam_block_key, kind_prefix
from tabby.store import NotFound, RevisionMismatch

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 300.0


@dataclass
class GcReport:
    leaked: dict[str, list[str]] = field(default_factory=dict)  # handle -> addresses, seen leaked now
    released: dict[str, list[str]] = field(default_factory=dict)  # handle -> addresses freed
    empty_blocks: list[str] = field(default_factory=list)
    released_blocks: list[str] = field(default_factory=list)
    dropped_affinities: list[str] = field(default_factory=list)


def _live_endpoints(ipam: IPAM) -> tuple[set[str], set[str]]:
    kvs, _ = ipam.store.list(kind_prefix("Endpoint"))
    ips: set[str] = set()
    names: set[str] = set()
    for kv in kvs:
        try:
            ep = decode(kv.key, kv.value)
        except ValueError:
            # a corrupt endpoint record still names a workload: keep everything it might use
            names.add(kv.key.rsplit("/", 1)[1])
            continue
        names.add(ep.metadata.name)
        ips.update(str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses))
    return ips, names


def collect(ipam: IPAM, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False) -> GcReport:
    now = ipam.clock()
    report = GcReport()
    live_ips, live_names = _live_endpoints(ipam)
    blocks = ipam._all_blocks()
    handles = {h.handle: h for h in ipam.handles()}

    # addresses per handle, from the blocks (the truth) and the handle records
    by_handle: dict[str, set[str]] = {}
    for b, _ in blocks:
        for o, alloc in b.allocations.items():
            by_handle.setdefault(alloc.handle, set()).add(str(address(b, o)))
    for h in handles.values():
        by_handle.setdefault(h.handle, set()).update(a.ip for a in h.addresses)

    gc_kv = ipam.store.get(IPAM_GC_KEY)
    state = GcState.model_validate_json(gc_kv.value) if gc_kv else GcState()
    seen_leaked: dict[str, float] = {}
    for handle, ips in sorted(by_handle.items()):
        rec = handles.get(handle)
        if ips & live_ips or (rec is not None and rec.endpoint in live_names):
            continue
        report.leaked[handle] = sorted(ips)
        first = state.leaked_handles.get(handle, now)
        seen_leaked[handle] = first
        if now - first >= grace_s and handle in state.leaked_handles:
            report.released[handle] = sorted(ips)
            if not dry_run:
                _release_all(ipam, handle, ips)
                del seen_leaked[handle]

    # empty blocks: a host keeps its last one
    per_host: dict[str, int] = {}
    for b, _ in blocks:
        if b.host is not None:
            per_host[b.host] = per_host.get(b.host, 0) + 1
    seen_empty: dict[str, float] = {}
    for b, kv in blocks:
        if b.allocations or (b.host is not None and per_host[b.host] <= 1):
            continue
        report.empty_blocks.append(b.cidr)
        first = state.empty_blocks.get(b.cidr, now)
        seen_empty[b.cidr] = first
        if now - first >= grace_s and b.cidr in state.empty_blocks:
            if dry_run:
                report.released_blocks.append(b.cidr)
                continue
            try:  # only if still empty: an allocation since we read it makes this fail
                ipam.store.delete(ipam_block_key(b.cidr), expected_revision=kv.mod_revision)
            except (RevisionMismatch, NotFound):
                continue
            if b.host is not None:
                per_host[b.host] -= 1
                with contextlib.suppress(NotFound):
                    ipam.store.delete(ipam_affinity_key(b.host, b.cidr))
            report.released_blocks.append(b.cidr)
            del seen_empty[b.cidr]
            log.info("released empty block %s (host %s)", b.cidr, b.host)

    # pending affinities left by a claim that crashed before its block was written
    block_hosts = {b.cidr: b.host for b, _ in blocks}
    kvs, _ = ipam.store.list(IPAM_AFFINITIES_PREFIX)
    for kv in kvs:
        aff = Affinity.model_validate_json(kv.value)
        if block_hosts.get(aff.cidr) != aff.host and now - aff.since >= grace_s:
            report.dropped_affinities.append(f"{aff.host}:{aff.cidr}")
            if not dry_run:
                with contextlib.suppress(NotFound, RevisionMismatch):
                    ipam.store.delete(kv.key, expected_revision=kv.mod_revision)

    if not dry_run:
        ipam.store.put(IPAM_GC_KEY, GcState(leaked_handles=seen_leaked, empty_blocks=seen_empty)
                       .model_dump_json().encode())
    return report


def _release_all(ipam: IPAM, handle: str, ips: set[str]) -> None:
    """Free the handle's record and any allocation carrying its id that the record missed."""
    freed = {str(ip) for ip in ipam.release_handle(handle)}
    for ip in sorted(ips - freed):
        try:
            ipam.release_address(ipaddress.ip_address(ip))
        except Exception as e:  # a crash-leftover may be half gone already
            log.warning("gc: %s of handle %s: %s", ip, handle, e)
    log.warning("gc released leaked handle %s: %s", handle, ", ".join(sorted(ips)))
