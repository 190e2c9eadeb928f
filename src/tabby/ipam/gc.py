"""The leak collector: frees what no Endpoint uses, but never on a single sighting.

An allocation leaks when the CNI plugin or Neutron driver died between assigning and writing
the Endpoint, or never released. A handle is leaked when none of its addresses is on a live
Endpoint and the Endpoint it names (if any) does not exist; one live address keeps the whole
handle (all-or-nothing). It is released only when seen leaked by two runs at least ``grace``
seconds apart, which also protects a CNI ADD that has assigned but not yet written its
Endpoint. Empty blocks lose their affinity the same way, except a host's last block. What the
collector saw is kept in one Store record (``ipam/gc``) so runs in different processes agree.

Nothing is freed on the basis of a corrupt record: a handle whose record is corrupt, or whose
record names an address in a corrupt block, is "unknown" and kept (``kept_unknown``); a corrupt
Endpoint keeps its name and every address its bytes might name; an affinity whose block is
corrupt is kept; and when the collector's own record is corrupt it frees nothing and leaves the
record alone (``state_corrupt``), until an operator deletes it. Corrupt records are never written.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from dataclasses import dataclass, field

from tabby.ipam.allocator import IPAM, corrupt, one_call
from tabby.ipam.blocks import IpamError, address
from tabby.model import Endpoint, InvalidResource, decode
from tabby.model.ipam import GcState, Handle, decode_ipam, encode_ipam
from tabby.model.keys import IPAM_GC_KEY, ipam_affinity_key, ipam_block_key, ipam_handle_key, kind_prefix, parse_key
from tabby.store import KV, AlreadyExists, NotFound, RevisionMismatch, Store

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 300.0
# Text that could be an address inside a corrupt record's bytes (checked with ipaddress after).
_ADDRESS_LIKE = re.compile(r"[0-9A-Fa-f:.]{2,45}")


@dataclass
class GcReport:
    leaked: dict[str, list[str]] = field(default_factory=dict)  # handle -> addresses, seen leaked now
    released: dict[str, list[str]] = field(default_factory=dict)  # handle -> addresses freed
    empty_blocks: list[str] = field(default_factory=list)
    released_blocks: list[str] = field(default_factory=list)
    dropped_affinities: list[str] = field(default_factory=list)
    kept_unknown: dict[str, str] = field(default_factory=dict)  # handle -> the corrupt record that keeps it
    corrupt: list[str] = field(default_factory=list)  # "key (field F): what is wrong": IPAM and Endpoint records
    state_corrupt: bool = False  # ipam/gc itself is corrupt: nothing freed, nothing written


def read_endpoints(store: Store) -> tuple[list[Endpoint], list[tuple[KV, InvalidResource]]]:
    """Every Endpoint record that decodes, and the ones that do not (with why)."""
    kvs, _ = store.list(kind_prefix("Endpoint"))
    good: list[Endpoint] = []
    bad: list[tuple[KV, InvalidResource]] = []
    for kv in kvs:
        try:
            good.append(decode(kv.key, kv.value))
        except InvalidResource as e:
            bad.append((kv, e))
    return good, bad


def salvage_addresses(value: bytes) -> set[str]:
    """Every address a corrupt record's bytes might name, so that what it may use is kept."""
    out = set()
    for m in _ADDRESS_LIKE.finditer(value.decode("utf-8", "replace")):
        for text in (m.group(), m.group().rstrip(".:")):
            with contextlib.suppress(ValueError):
                out.add(str(ipaddress.ip_address(text)))
    return out


def endpoint_addresses(ep: Endpoint) -> list[str]:
    return [str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses)]


def _live_endpoints(store: Store) -> tuple[set[str], set[str], list[tuple[KV, InvalidResource]]]:
    good, bad = read_endpoints(store)
    ips: set[str] = set()
    names: set[str] = set()
    for ep in good:
        names.add(ep.metadata.name)
        ips.update(endpoint_addresses(ep))
    for kv, e in bad:
        # a corrupt endpoint record still names a workload: keep everything it might use
        log.error("gc keeps what corrupt Endpoint record %s (field %s) may use: %s", kv.key, e.field, e)
        parsed = parse_key(kv.key)
        names.add(parsed[1] if parsed else kv.key.rsplit("/", 1)[-1])
        ips.update(salvage_addresses(kv.value))
    return ips, names, bad


def _unknown(handle: str, rec: Handle | None, bad: set[str]) -> str | None:
    """Why a handle that looks leaked must be kept because a record about it is corrupt, or None."""
    if ipam_handle_key(handle) in bad:
        return f"its record {ipam_handle_key(handle)} is corrupt"
    for a in rec.addresses if rec is not None else ():
        if ipam_block_key(a.block) in bad:
            return f"its address {a.ip} is in corrupt block record {ipam_block_key(a.block)}"
    return None


@one_call
def collect(ipam: IPAM, *, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False) -> GcReport:
    now = ipam.clock()
    report = GcReport()
    snap = ipam.snapshot()
    bad = snap.corrupt_keys
    live_ips, live_names, bad_endpoints = _live_endpoints(ipam.store)
    report.corrupt = [f"{c.key} (field {c.field}): {'; '.join(c.errors)}" for c in snap.corrupt]
    report.corrupt += [f"{kv.key} (field {e.field}): {'; '.join(e.errors)}" for kv, e in bad_endpoints]
    blocks = snap.blocks
    handles = {h.handle: h for h, _ in snap.handles}

    # addresses per handle, from the blocks (the truth) and the handle records
    allocated: dict[str, dict[str, tuple[str, int]]] = {}  # handle -> ip -> (block, seq), from blocks
    by_handle: dict[str, set[str]] = {}
    for b, _ in blocks:
        for o, alloc in b.allocations.items():
            ip = str(address(b, o))
            allocated.setdefault(alloc.handle, {})[ip] = (b.cidr, alloc.seq)
            by_handle.setdefault(alloc.handle, set()).add(ip)
    for h in handles.values():
        by_handle.setdefault(h.handle, set()).update(a.ip for a in h.addresses)

    if snap.gc is not None:
        state = snap.gc[0]
    else:
        state = GcState()
        report.state_corrupt = IPAM_GC_KEY in bad
        if report.state_corrupt:
            log.error("gc: its own record %s is corrupt: nothing is freed until it is deleted", IPAM_GC_KEY)
    writes = not dry_run and not report.state_corrupt
    seen_leaked: dict[str, float] = {}
    for handle, ips in sorted(by_handle.items()):
        rec = handles.get(handle)
        if ips & live_ips or (rec is not None and rec.endpoint in live_names):
            continue
        why = _unknown(handle, rec, bad)
        if why is not None:
            report.kept_unknown[handle] = why
            continue
        report.leaked[handle] = sorted(ips)
        first = state.leaked_handles.get(handle, now)
        seen_leaked[handle] = first
        # and its record as old (its allocator's clock): a run before this one on a clock behind
        # ours made the first sighting look old, and a workload being set up lost its addresses
        young = rec is not None and rec.created is not None and now - rec.created < grace_s
        if now - first >= grace_s and handle in state.leaked_handles and not young:
            report.released[handle] = sorted(ips)
            if writes:
                _release_all(ipam, handle, allocated.get(handle, {}))
                del seen_leaked[handle]

    # empty blocks: a host keeps its last one of each family
    per_host: dict[tuple[str, int], int] = {}
    for b, _ in blocks:
        if b.host is not None:
            per_host[b.host, b.network.version] = per_host.get((b.host, b.network.version), 0) + 1
    seen_empty: dict[str, float] = {}
    for b, kv in blocks:
        mine = (b.host or "", b.network.version)
        if b.allocations or (b.host is not None and per_host[mine] <= 1):
            continue
        report.empty_blocks.append(b.cidr)
        first = state.empty_blocks.get(b.cidr, now)
        seen_empty[b.cidr] = first
        if now - first >= grace_s and b.cidr in state.empty_blocks:
            if not writes:  # what a real run would do, the last block of a host's family kept
                report.released_blocks.append(b.cidr)
                if b.host is not None:
                    per_host[mine] -= 1
                continue
            try:  # only if still empty: an allocation since we read it makes this fail
                ipam.store.delete(ipam_block_key(b.cidr), expected_revision=kv.mod_revision)
            except (RevisionMismatch, NotFound):
                continue
            if b.host is not None:
                per_host[mine] -= 1
                _drop_affinity(ipam, b.host, b.cidr)
            report.released_blocks.append(b.cidr)
            del seen_empty[b.cidr]
            log.info("released empty block %s (host %s)", b.cidr, b.host)

    # pending affinities left by a claim that crashed before its block was written
    block_hosts = {b.cidr: b.host for b, _ in blocks}
    for aff, kv in snap.affinities:
        if ipam_block_key(aff.cidr) in bad:
            continue  # what its block says is unknown: keep it
        if block_hosts.get(aff.cidr) != aff.host and now - aff.since >= grace_s:
            report.dropped_affinities.append(f"{aff.host}:{aff.cidr}")
            if writes:
                with contextlib.suppress(NotFound, RevisionMismatch):
                    ipam.store.delete(kv.key, expected_revision=kv.mod_revision)

    if writes:
        new = encode_ipam(GcState(leaked_handles=seen_leaked, empty_blocks=seen_empty))
        try:  # compare-and-swap: a collector running at the same time wins, and we do not clobber it
            if snap.gc is None:
                ipam.store.create(IPAM_GC_KEY, new)
            else:
                ipam.store.update(IPAM_GC_KEY, new, snap.gc[1].mod_revision)
        except (AlreadyExists, RevisionMismatch, NotFound):
            log.warning("gc: %s changed during this run (another collector?): not rewritten", IPAM_GC_KEY)
    return report


def _drop_affinity(ipam: IPAM, host: str, cidr: str) -> None:
    """Delete host's affinity for cidr, if it is a good record (a corrupt one is left alone), and
    only while the block is still gone: its host may have claimed it again since the block was
    deleted (the claim reuses the affinity it finds), and a block in use without its affinity is
    never announced. A claim after this read changes the affinity (its confirm), so the delete
    at this revision fails; one confirming after the delete makes the affinity again."""
    key = ipam_affinity_key(host, cidr)
    kv = ipam.store.get(key)
    if kv is None:
        return
    try:
        decode_ipam(key, kv.value)
    except InvalidResource as e:
        corrupt(e)
        return
    if ipam.store.get(ipam_block_key(cidr)) is not None:
        log.info("gc: block %s was claimed again meanwhile: its affinity stays", cidr)
        return
    with contextlib.suppress(NotFound, RevisionMismatch):
        ipam.store.delete(key, expected_revision=kv.mod_revision)


def _release_all(ipam: IPAM, handle: str, allocations: dict[str, tuple[str, int]]) -> None:
    """Free the handle's record, then any allocation carrying its id that the record missed (only
    allocations the blocks themselves give to this handle, at the sequence they gave it)."""
    try:
        freed = {str(ip) for ip in ipam.release_handle(handle)}
    except IpamError as e:  # its record turned corrupt since the snapshot: keep everything
        log.warning("gc: handle %s not released: %s", handle, e)
        return
    for ip, (cidr, seq) in sorted(allocations.items()):
        if ip in freed:
            continue
        try:
            ipam._free_in_block(cidr, ipaddress.ip_address(ip), seq, handle)
        except IpamError as e:  # a crash-leftover may be half gone already
            log.warning("gc: %s of handle %s: %s", ip, handle, e)
    log.warning("gc released leaked handle %s: %s", handle, ", ".join(sorted({*freed, *allocations})))
