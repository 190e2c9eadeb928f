"""`tabby ipam ...`: blocks, handles, leaks, the cross-check."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from tabby.cli.common import (
    STATE,
    Output,
    app,
    emit,
    err,
    fail,
    one_line,
    out,
)
from tabby.store import StoreError

ipam_app = typer.Typer(help="IP address management: blocks, handles, leaks.", no_args_is_help=True)
app.add_typer(ipam_app, name="ipam")


def _ipam() -> Any:
    from tabby.ipam import IPAM

    return IPAM(STATE.client().store)


def _quiet_ipam_log() -> None:
    """show, check and gc name each corrupt record themselves, in one warning line: IPAM's own log
    line about it (Python's last-resort handler, on stderr) is not shown as well."""
    import logging

    logging.getLogger("tabby.ipam").addHandler(logging.NullHandler())


def _warn_corrupt(corrupt: list[tuple[str, str, list[str]]]) -> None:
    """One warning line per corrupt record, (key, field, errors) (stderr: stdout stays the report)."""
    for key, field, errors in corrupt:
        err.print(f"[yellow]warning:[/] corrupt record {one_line(key)} (field {one_line(field)}): "
                  f"{one_line('; '.join(errors))}", highlight=False, soft_wrap=True)


@ipam_app.command("show")
def ipam_show(
    host: Annotated[str | None, typer.Option(help="only this host's blocks (every corrupt IPAM record still gets its "
                                             "warning line)")] = None,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 if any record read is corrupt")] = False,
) -> None:
    """Blocks, their affine host and how full they are. A corrupt IPAM record gets one warning line
    (stderr) naming its key and field; the good ones are listed all the same (exit 0; 1 with --strict)."""
    ipam = _ipam()
    _quiet_ipam_log()
    snap = ipam.snapshot()
    _warn_corrupt([(c.key, c.field, c.errors) for c in snap.corrupt])
    rows = [r for r in ipam.usage(snap) if host is None or r["host"] == host]
    if output is not Output.table:
        emit(rows, output)
    else:
        table = Table(box=None, header_style="bold")
        for col in ("BLOCK", "HOST", "USED", "SIZE"):
            table.add_column(col)
        for r in rows:
            table.add_row(str(r["block"]), one_line(r["host"] or "-"), str(r["used"]), str(r["size"]))
        out.print(table)
    if strict and snap.corrupt:
        raise typer.Exit(1)


@ipam_app.command("assign")
def ipam_assign(
    handle: Annotated[str, typer.Option(help="e.g. NETWORK.CONTAINERID or a Neutron port id")],
    host: Annotated[str, typer.Option()],
    ipv6: Annotated[int | None, typer.Option(help="how many IPv6 addresses (default 1)")] = None,
    ipv4: Annotated[int | None, typer.Option(help="how many IPv4 addresses (default 0)")] = None,
    address: Annotated[str | None, typer.Option(help="one specific address instead")] = None,
) -> None:
    """Allocate addresses to a handle (what the CNI plugin and Neutron driver do)."""
    from tabby.ipam import IpamError

    if address is not None and (ipv6 is not None or ipv4 is not None):
        fail("--address assigns that one address: give it without --ipv6 or --ipv4", 2)
    from tabby.model import InvalidResource

    try:  # a block claimed for a host no agent serves would be announced by nobody
        known = STATE.client().get("Host", host) is not None
    except InvalidResource:
        known = True  # a corrupt Host record: there is one, whatever it says
    except (ValueError, StoreError) as e:
        fail(str(e))
    if not known:
        fail(f"--host {one_line(host)}: no Host record of that name (apply one first)")
    try:
        got = [_ipam().assign_address(handle, host, address)] if address is not None else \
            _ipam().assign(handle, host, ipv6=1 if ipv6 is None else ipv6, ipv4=ipv4 or 0)
    except (IpamError, ValueError, StoreError) as e:
        fail(str(e))
    for a in got:
        out.print(f"{a.ip} block {a.block} seq {a.seq}", highlight=False)


@ipam_app.command("release")
def ipam_release(
    handle: Annotated[str | None, typer.Option(help="release every address of this handle")] = None,
    address: Annotated[str | None, typer.Option(help="release one address")] = None,
    seq: Annotated[int | None, typer.Option(help="only if the address still carries this sequence number")] = None,
) -> None:
    """Free addresses by handle or by address. A corrupt handle record frees nothing and is left as
    it is: the error names its key and field (exit 1)."""
    from tabby.ipam import IpamError

    if (handle is None) == (address is None):
        fail("give exactly one of --handle or --address", 2)
    if seq is not None and address is None:
        fail("--seq applies to --address: a handle's addresses are released whatever their sequence numbers", 2)
    try:
        if handle is not None:
            freed = _ipam().release_handle(handle)
            out.print(f"released {len(freed)} address(es) of {one_line(handle)}: " + ", ".join(map(str, freed)),
                      highlight=False)
        else:
            owner = _ipam().release_address(address, seq)  # type: ignore[arg-type]
            out.print(f"released {one_line(address)} (handle {one_line(owner)})", highlight=False)
    except (IpamError, ValueError, StoreError) as e:
        fail(str(e))


@ipam_app.command("gc")
def ipam_gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report, change nothing")] = False,
    grace_s: Annotated[float, typer.Option(help="a leak must be seen twice this far apart", min=0, max=86400 * 365)
                       ] = 300.0,
) -> None:
    """Free addresses no Endpoint uses and empty blocks, once seen twice across the grace period.
    Nothing is freed on the basis of a corrupt record: each gets a warning line, and what it might
    concern is kept."""
    from tabby.ipam.gc import collect

    ipam = _ipam()
    _quiet_ipam_log()
    report = collect(ipam, grace_s=grace_s, dry_run=dry_run)
    for line in report.corrupt:
        err.print(f"[yellow]warning:[/] corrupt record {one_line(line)}", highlight=False, soft_wrap=True)
    if report.state_corrupt:
        err.print("[yellow]warning:[/] the collector's own record is corrupt: nothing freed, nothing written; "
                  "delete it to start afresh", highlight=False)
    verb = "would release" if dry_run else "released"
    for handle, ips in report.leaked.items():
        state = verb if handle in report.released else "seen leaked (waiting for the grace period)"
        out.print(f"handle {one_line(handle)}: {', '.join(ips)}: {state}", highlight=False)
    for handle, why in report.kept_unknown.items():
        out.print(f"handle {one_line(handle)}: kept, {one_line(why)}", highlight=False)
    for cidr in report.empty_blocks:
        state = verb if cidr in report.released_blocks else "seen empty (waiting for the grace period)"
        out.print(f"block {cidr}: {state}", highlight=False)
    for aff in report.dropped_affinities:
        out.print(f"stale pending affinity {one_line(aff)}: {verb}", highlight=False)
    if not (report.leaked or report.empty_blocks or report.dropped_affinities or report.kept_unknown):
        out.print("nothing leaked")


@ipam_app.command("check")
def ipam_check(
    grace_s: Annotated[float, typer.Option(help="report a handle without an Endpoint only once it is this old",
                                           min=0, max=86400 * 365)] = 300.0,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 if any record read is corrupt")] = False,
) -> None:
    """IPAM's records agree with each other and with the Endpoints.

    Exit 0: no inconsistency (corrupt records may have been found: one warning line each on stderr,
    naming key and field; they are skipped, not counted as inconsistencies, unless --strict).
    Exit 1: a corrupt record with --strict, or at least one problem: allocations and handles that
    disagree, blocks that overlap or are not whole, an Endpoint on an address IPAM calls free, two
    Endpoints on one address, a handle older than --grace-s with no Endpoint. Exit 2: bad usage."""
    import dataclasses
    import time

    from tabby.ipam.crosscheck import cross_check
    from tabby.ipam.gc import read_endpoints
    from tabby.model.keys import parse_key

    ipam = _ipam()
    _quiet_ipam_log()
    snap = ipam.snapshot()
    problems = ipam.check(snap)
    endpoints, bad_endpoints = read_endpoints(ipam.store)
    unknown = {parsed[1] for kv, _ in bad_endpoints if (parsed := parse_key(kv.key))}
    findings = cross_check([b for b, _ in snap.blocks], [h for h, _ in snap.handles], endpoints,
                           now=time.time(), grace_s=grace_s, unknown_endpoints=unknown)
    corrupt = [{"key": c.key, "field": c.field, "errors": c.errors} for c in snap.corrupt]
    corrupt += [{"key": kv.key, "field": e.field, "errors": e.errors} for kv, e in bad_endpoints]
    if output is not Output.table:
        doc = {"consistent": not (problems or findings), "problems": problems,
               "findings": [dataclasses.asdict(f) for f in findings], "corrupt": corrupt}
        emit(doc, output)
    else:
        _warn_corrupt([(c["key"], c["field"], c["errors"]) for c in corrupt])
        for p in problems:
            out.print(f"[red]problem:[/] {one_line(p)}", highlight=False, soft_wrap=True)
        for f in findings:
            out.print(f"[red]problem:[/] {f.kind}: {one_line(f.message)}", highlight=False, soft_wrap=True)
        if not (problems or findings):
            out.print("ipam consistent" + (f" ({len(corrupt)} corrupt record(s) skipped)" if corrupt else ""))
    if problems or findings or (strict and corrupt):
        raise typer.Exit(1)
