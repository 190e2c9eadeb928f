"""`tabby lab ...`: a many-host fabric on this machine."""

from __future__ import annotations

import signal
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tabby.cli.common import (
    Output,
    app,
    emit,
    err,
    fail,
    out,
)

lab_app = typer.Typer(help="A many-host tabby fabric on this machine, in network namespaces.", no_args_is_help=True)
app.add_typer(lab_app, name="lab")


def _lab_prefix(value: str) -> str:
    """Every lab command's --prefix, checked before anything is built from it (topology.check_prefix)."""
    from tabby.lab.topology import check_prefix

    try:
        return check_prefix(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


PrefixOpt = Annotated[str, typer.Option(help="name prefix of this lab's namespaces (several labs can coexist): "
                                        "3..8 lower-case letters and digits, starting with a letter",
                                        callback=_lab_prefix)]


class LabStore(StrEnum):
    sqlite = "sqlite"
    etcd = "etcd"


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def families(topo: Any) -> tuple[str, ...]:
    """The matrix's columns: IPv6, IPv4 where workloads have it, NAT64 where the lab has it."""
    return ("v6",) + (() if topo.ipv6_only else ("v4",)) + (("nat64",) if topo.nat64 else ())


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option(help="compute hosts")] = 3,
    containers: Annotated[int, typer.Option(help="containers per host")] = 2,
    vms: Annotated[int, typer.Option(help="VMs per host (DHCPv6 clients: dhclient, dhcpcd, alternating)")] = 2,
    ipv6_only: Annotated[bool, typer.Option("--ipv6-only", help="no IPv4 anywhere (but see --nat64)")] = False,
    nat64: Annotated[bool, typer.Option("--nat64", help="the IPv6 pool is a nat64 pool: every host translates its "
                                        "workloads to the outside's IPv4 (tayga) and resolves with DNS64 (unbound); "
                                        "hosts get IPv4 on the fabric")] = False,
    wait_s: Annotated[float, typer.Option(help="how long to wait for every agent in sync and every route on every "
                                          "host (then for the VMs' DHCP clients: half as long, at least 10 s; "
                                          "qemu guests' boot has its own bound, 240 s each)",
                                          min=1, max=3600)] = 60.0,
    route_reflector: Annotated[bool, typer.Option("--route-reflector", help="host 1 reflects; no full mesh")] = False,
    store: Annotated[LabStore, typer.Option("--store", help="the embedded SQLite file, or a real etcd on the fabric")
                     ] = LabStore.sqlite,
    etcd_members: Annotated[int, typer.Option(help="with --store etcd: 1 member over plain HTTP, or a cluster of "
                                              "this many with TLS, each in a namespace of its own", min=1, max=7)] = 1,
    prefix: PrefixOpt = "tbl",
    tors: Annotated[int, typer.Option(help="2: a routed fabric, every host on a GoBGP and a BIRD top-of-rack router "
                                      "(needs --unnumbered)", min=0, max=2)] = 0,
    unnumbered: Annotated[bool, typer.Option("--unnumbered", help="with --tors: host uplinks carry IPv6 link-local "
                                             "only; IPv4 rides the IPv6 sessions (extended next hop)")] = False,
    vm_kind: Annotated[str, typer.Option(help="netns: VMs as namespaces running a DHCP client (fast); qemu: "
                                         "real guests (Debian images, ifupdown and networkd alternating)")] = "netns",
) -> None:
    """Build the lab (namespaces, fabric, Store, agents with BIRD, containers) and wait until it routes."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tabby.lab import lab as L
    from tabby.lab.topology import topology

    try:
        if bool(tors) != unnumbered:
            raise ValueError("--tors and --unnumbered go together (numbered uplinks are not built)")
        topo = topology(hosts, containers, ipv6_only, prefix, (1,) if route_reflector else (), vms, tors=tors,
                        nat64=nat64)
        if tors and store is not LabStore.sqlite:
            raise ValueError("--tors: the hosts have no shared fabric link to reach etcd on; use the SQLite store")
        if etcd_members > 1 and store is not LabStore.etcd:
            raise ValueError("--etcd-members needs --store etcd")
        from tabby.lab.qemu import KINDS

        if vm_kind not in KINDS:
            raise ValueError(f"--vm-kind: {vm_kind!r} is not one of {', '.join(KINDS)}")
        if nat64 and vm_kind != "netns":
            raise ValueError("--nat64 with --vm-kind qemu is not built (NAT64 was tested with namespace VMs)")
        if tors and vm_kind != "netns":
            raise ValueError("--tors with --vm-kind qemu is not built (the ToR lab was tested with namespace VMs)")
        lab = L.Lab(topo, L.default_store(prefix), store_kind=store.value, etcd_members=etcd_members,
                    vm_kind=vm_kind)
    except ValueError as e:
        fail(str(e))  # before anything is torn down: a mistyped option leaves the running lab as it is
    L.down(prefix)
    # SIGTERM (a CI job's timeout, `kill`) as Ctrl-C: either leaves nothing behind; before, both
    # left every namespace, process and raised threshold of a half-built lab, and said nothing
    signal.signal(signal.SIGTERM, _interrupted)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("building", total=None)
        try:
            lab.up(lambda step: progress.update(task, description=f"building: {step}"))
        except (Exception, KeyboardInterrupt) as e:
            progress.stop()
            L.down(prefix)
            fail("lab up interrupted, everything removed again" if isinstance(e, KeyboardInterrupt) else
                 "lab up failed, everything removed again:", details=str(e).splitlines())
        # the cheap signal (a route dump and /healthz per host), not the O(N²) matrix, in the wait loop
        progress.update(task, description="waiting for every agent in sync and every route on every host")
        fams = families(topo)
        rows = []
        try:
            state = lab.wait_routed(wait_s)
            if state["ok"] and topo.vms:
                progress.update(task, description="waiting for the VMs' DHCP clients")
                lab.wait_vms_addressed(max(10.0, wait_s / 2))
            for g in lab.guests.values():  # qemu guests: booted, and with their address
                progress.update(task, description=f"waiting for guest {g.name} to boot")
                g.wait_up()
            if state["ok"] and lab.members():
                progress.update(task, description="checking connectivity (once)")
                rows = lab.matrix(fams, sample=L.default_sample(hosts))
        except (Exception, KeyboardInterrupt) as e:
            progress.stop()
            L.down(prefix)
            fail("lab up interrupted, everything removed again" if isinstance(e, KeyboardInterrupt) else
                 "lab up failed while checking it, everything removed again:", details=str(e).splitlines())
    out.print(f"lab up: {hosts} hosts, {len(topo.workloads)} containers, {len(topo.vms)} VMs, "
              f"{'IPv6-only' if ipv6_only else 'dual-stack'}{' with NAT64' if nat64 else ''}; store {lab.store_url}",
              highlight=False)
    if not state["ok"]:
        missing = sum(map(len, state["missing"].values()))
        err.print(f"[yellow]not routed after {wait_s:.0f} s: {len(state['not_in_sync'])} agents not in sync, "
                  f"{missing} routes missing; see tabby lab check[/]", highlight=False)
    elif not all(r["ok"] for r in rows):
        bad = sum(not r["ok"] for r in rows)
        err.print(f"[yellow]routed, but {bad} of {len(rows)} checks failed; see tabby lab check[/]",
                  highlight=False)


@lab_app.command("check")
def lab_check(output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
              prefix: PrefixOpt = "tbl",
              sample: Annotated[int | None, typer.Option(
                  "--sample", min=1, help="N random pairs per family, plus every workload once as source and "
                  "as destination (default: every pair up to 20 hosts, 500 above)")] = None,
              seed: Annotated[int | None, typer.Option(
                  help="seed of the sample (to repeat one); only with a sample")] = None,
              ) -> None:
    """The connectivity matrix: containers to each other and the outside, IPv6 (and IPv4 where dual-stack)."""
    from tabby.lab import lab as L

    try:
        lab = L.load(prefix)
    except OSError:
        fail("no lab is up (tabby lab up)")
    except ValueError as e:
        fail(str(e))
    fams = families(lab.topo)
    if sample is None:
        sample = L.default_sample(len(lab.topo.hosts))
    if seed is not None and sample is None:  # an option that would change nothing is refused, not ignored
        fail(f"--seed: this lab of {len(lab.topo.hosts)} hosts is checked in full (every pair); give --sample N "
             "to sample it", code=2)
    rows = lab.matrix(fams, sample=sample, seed=seed)
    if sample is not None and output is Output.table:
        for fam in fams:
            mine = [r for r in rows if r["family"] == fam]
            pairs = {(r["src"], r["dst"]) for r in mine}
            label = {"v6": "IPv6", "v4": "IPv4", "nat64": "NAT64"}[fam]
            out.print(f"{label}: {sum(r['ok'] for r in mine)}/{len(mine)} checks ok "
                      f"over {len(pairs)} {'workloads' if fam == 'nat64' else 'sampled pairs'}", highlight=False)
        for r in rows:
            if not r["ok"]:
                out.print(f"FAIL {escape(r['src'])} -> {escape(r['dst'])} {r['family']} {r['check']} "
                          f"{escape(r['address'])} (expected {r['expect']}): {escape(r['detail'])}", highlight=False)
    elif not emit(rows, output):
        names = [name for name, _ in lab.members()] + ["outside"]
        # wide enough for every column even when not on a terminal (rich would fold it to 80)
        need = (max(map(len, names)) + 3) * (len(names) + 1) + 20
        table_out = out if out.is_terminal else Console(width=max(out.width, need))
        by_pair: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for r in rows:
            by_pair.setdefault((r["src"], r["dst"], r["family"]), []).append(r)
        def cell(hit: list[dict[str, Any]]) -> str:
            bad = sorted({r["check"] for r in hit if not r["ok"]})
            blocked = [r for r in hit if r["expect"] == "blocked"]
            good = "[green]blocked (policy)[/]" if blocked and len(blocked) == len(hit) else \
                "[green]ok, blocked (policy)[/]" if blocked else "[green]ok[/]"
            fail_text = "[red]NOT BLOCKED[/]" if blocked and all(not r["ok"] for r in blocked) else \
                f"[red]FAIL {'+'.join(bad)}[/]"
            return good if hit and not bad else fail_text

        for fam in (f for f in fams if f != "nat64"):
            t = Table(title=f"ping and TCP over {'IPv6' if fam == 'v6' else 'IPv4'}", box=None, header_style="bold")
            t.add_column("from \\ to", min_width=max(map(len, names)), no_wrap=True)
            for n in names:
                t.add_column(n, min_width=len(n), no_wrap=True)
            nat64 = fam == "v6" and "nat64" in fams  # the IPv4-only service by name, through NAT64 and DNS64
            if nat64:
                t.add_column("nat64", no_wrap=True)
            for src in names:
                cells = ["-" if src == dst else cell(by_pair.get((src, dst, fam), [])) for dst in names]
                if nat64:
                    cells.append("-" if src == "outside" else cell(by_pair.get((src, "outside", "nat64"), [])))
                t.add_row(src, *cells)
            table_out.print(t)
        if "nat64" in fams:
            out.print(f"nat64: {L.OUTSIDE_NAME} (IPv4-only) resolved by the workload's own resolver to an AAAA in "
                      f"{L.NAT64_PREFIX}, pinged, and TCP whose far end saw the workload's host's IPv4 address"
                      + (f"; policy {L.NAT64_BLOCK_POLICY} denies {lab.topo.nat64_blocked} egress to "
                         f"{L.NAT64_PREFIX}" if lab.topo.nat64_blocked else ""), highlight=False)
        if lab.topo.blocked_pair:
            out.print(f"policy {L.BLOCK_POLICY} denies {lab.topo.blocked_pair[0]} -> {lab.topo.blocked_pair[1]} "
                      f"(the reverse stays open); every other pair is allowed by profile {L.OPEN_PROFILE}",
                      highlight=False)
    if not all(r["ok"] for r in rows):
        raise typer.Exit(1)


@lab_app.command("status")
def lab_status(prefix: PrefixOpt = "tbl", output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
               ) -> None:
    """The lab's namespaces and the processes in each (agents, bird, dnsmasq, DHCP clients)."""
    from tabby.lab import lab as L
    from tabby.lab import netns

    try:
        lab = L.load(prefix)
    except OSError:
        fail(f"no lab with prefix {prefix} is up (tabby lab up)")
    except ValueError as e:
        fail(str(e))
    rows = [{"namespace": n, "processes": procs} for n, procs in netns.processes(prefix).items()]
    if output is not Output.table:
        doc = {"prefix": prefix, "store": lab.store_url, "namespaces": rows}
        emit(doc, output)
        return
    out.print(f"lab {prefix}: store {lab.store_url}", highlight=False)
    t = Table(box=None, header_style="bold")
    t.add_column("NAMESPACE", no_wrap=True)
    t.add_column("PROCESSES")
    for r in rows:
        t.add_row(escape(r["namespace"]), escape(" ".join(r["processes"])) or "-")
    out.print(t)


@lab_app.command("down")
def lab_down(prefix: PrefixOpt = "tbl") -> None:
    """Remove every lab namespace, link, process and file (also after a crash)."""
    from tabby.lab import lab as L

    try:
        gone = L.down(prefix)
    except ValueError as e:
        fail(str(e))
    out.print(f"removed {len(gone)} namespaces" + (f": {' '.join(gone)}" if gone else ""), highlight=False)
