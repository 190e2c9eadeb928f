"""The ``tabby`` command. Thin: parse arguments, call a part, print. ``-o json`` for machines."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tabby.client import ResourceClient
from tabby.model import InvalidResource, parse_documents, to_plain
from tabby.model.keys import KIND_DIRS, resolve_kind
from tabby.store import StoreError, open_store, store_url

app = typer.Typer(help="tabby: a pure layer-3 fabric for VMs and containers, IPv6 first.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)


class Output(StrEnum):
    table = "table"
    yaml = "yaml"
    json = "json"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class State:
    store_url: str = ""

    def client(self) -> ResourceClient:
        try:
            return ResourceClient(open_store(self.store_url))
        except (ValueError, StoreError, OSError) as e:
            fail(f"cannot open store {self.store_url}: {e}")


STATE = State()


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn_corrupt(key: str, problem: str) -> None:
    """One line per corrupt record: its key and what is wrong (text from the Store is escaped,
    so a record cannot restyle or forge the terminal's output)."""
    err.print(f"[yellow]warning:[/] corrupt record {escape(key)} skipped: {escape(problem)}",
              highlight=False, soft_wrap=True)


Strict = Annotated[bool, typer.Option("--strict", help="exit 1 if any record read is corrupt")]


@app.callback()
def _main(
    store: Annotated[str | None, typer.Option(
        "--store", help="sqlite:///PATH or etcd://HOST:PORT (default: $TABBY_STORE, else "
        "sqlite:///var/lib/tabby/tabby.db)")] = None,
) -> None:
    STATE.store_url = store_url(store)


@app.command()
def apply(
    file: Annotated[str, typer.Option("-f", "--file", help="YAML or JSON file, many documents; - for stdin")],
) -> None:
    """Create or update resources. Every document is validated first; if one is bad, nothing is written."""
    text = sys.stdin.read() if file == "-" else _read(file)
    try:
        resources = parse_documents(text, source=file)
    except InvalidResource as e:
        fail("nothing written:\n  " + "\n  ".join(e.errors))
    client = STATE.client()
    for res in resources:
        try:
            what, rev = client.apply(res)
        except StoreError as e:
            fail(f"{res.kind}/{res.metadata.name}: {e}")
        out.print(f"{res.kind.lower()}/{res.metadata.name} {what} (revision {rev})", highlight=False)


def _read(file: str) -> str:
    try:
        return Path(file).read_text()
    except OSError as e:
        fail(f"cannot read {file}: {e.strerror}")


def _summary(res: Any) -> str:
    spec = res.spec
    match res.kind:
        case "Host":
            return " ".join(str(a) for a in (spec.ipv6_address, spec.ipv4_address) if a) + \
                f" as{spec.asn or 'default'} rid {res.effective_router_id()}"
        case "IPPool":
            flags = [f"/{spec.block_size} blocks"] + (["nat"] if spec.nat_outgoing else []) + \
                (["disabled"] if spec.disabled else [])
            return f"{spec.cidr} " + " ".join(flags)
        case "Endpoint":
            addrs = [str(a.ip) for a in (*spec.ipv6_addresses, *spec.ipv4_addresses)]
            return f"{spec.host} {spec.orchestrator} {spec.interface} {spec.mac} " + ",".join(addrs)
        case "Policy":
            return f"order {spec.order} {spec.selector} in:{len(spec.ingress)} out:{len(spec.egress)}"
        case "Profile":
            return f"in:{len(spec.ingress)} out:{len(spec.egress)}"
        case "BGPPeer":
            return f"{spec.peer_ip} as{spec.asn}" + (f" host {spec.host}" if spec.host else " global")
        case _:
            return json.dumps({k: v for k, v in to_plain(res)["spec"].items() if v is not None})


@app.command()
def get(
    kind: Annotated[str, typer.Argument(help=f"one of {', '.join(KIND_DIRS)} (or a plural)")],
    name: Annotated[str | None, typer.Argument()] = None,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
    strict: Strict = False,
) -> None:
    """Show resources. Corrupt records are named on stderr, one line each, and skipped."""
    try:
        kind = resolve_kind(kind)
    except ValueError as e:
        fail(str(e))
    client = STATE.client()
    try:
        if name is not None:
            res = client.get(kind, name)
            if res is None:
                fail(f"{kind}/{name} not found")
            items, bad = [res], []
        else:
            items, bad = client.list(kind)
    except (StoreError, InvalidResource) as e:
        fail(str(e))
    for key, problem in bad:
        warn_corrupt(key, problem)
    plain = [to_plain(r) for r in items]
    if output is Output.json:
        print(json.dumps(plain[0] if name else plain, indent=2))
    elif output is Output.yaml:
        print(yaml.safe_dump_all(plain, sort_keys=False), end="")
    else:
        table = Table(box=None, header_style="bold")
        table.add_column("NAME")
        table.add_column("LABELS")
        table.add_column("SPEC")
        for r in items:
            labels = ",".join(f"{k}={v}" for k, v in r.metadata.labels.items())
            table.add_row(r.metadata.name, labels or "-", escape(_summary(r)))
        out.print(table)
    if strict and bad:
        raise typer.Exit(1)


@app.command()
def delete(kind: str, name: str) -> None:
    """Delete one resource."""
    try:
        kind = resolve_kind(kind)
        rev = STATE.client().delete(kind, name)
    except (ValueError, StoreError) as e:
        fail(str(e))
    out.print(f"{kind.lower()}/{name} deleted (revision {rev})", highlight=False)


def _daemon_setup(host: str, log_level: str | None, what: str) -> None:
    """A long-running command's checks and logging: the host name first, then one log format."""
    import logging

    from tabby.model.names import check_name

    try:
        check_name(host)
    except ValueError as e:
        fail(f"--host: {e}")
    logging.basicConfig(level=(log_level or "info").upper(),
                        format=f"%(asctime)s {host} {what}%(levelname)s %(name)s: %(message)s")


@app.command()
def agent(
    host: Annotated[str, typer.Option(help="the Host this agent serves (its Endpoints have spec.host = HOST)")],
    metrics_port: Annotated[int | None, typer.Option(
        help="port for /healthz and /metrics; 0 picks a free one (default: Config metrics_port, 9091)",
        min=0, max=65535)] = None,
    metrics_addr: Annotated[str, typer.Option(help="address for /healthz and /metrics")] = "127.0.0.1",
    resync_s: Annotated[float | None, typer.Option(
        help="full kernel check interval, jittered by 10% (default: Config resync_interval_s, 90)",
        min=0.1, max=86400)] = None,
    log_level: Annotated[LogLevel | None, typer.Option(help="default: Config log_level, info")] = None,
    bgp: Annotated[bool, typer.Option(help="run and configure BIRD for this host")] = True,
    run_dir: Annotated[Path | None, typer.Option(help="BIRD's files (default /run/tabby/HOST)")] = None,
) -> None:
    """Run the per-host agent in this network namespace, until SIGTERM or SIGINT."""
    import logging
    import signal

    from tabby.agent.agent import Agent

    _daemon_setup(host, log_level, "")
    for noisy in ("pyroute2", "urllib3", "asyncio"):  # one debug line per message or connection
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        store = open_store(STATE.store_url)
    except (ValueError, StoreError, OSError) as e:
        fail(f"cannot open store {STATE.store_url}: {e}")
    given = {"log_level": log_level, "resync_interval_s": resync_s, "metrics_port": metrics_port}
    a = Agent(store, host, resync_s=resync_s or 90.0, metrics_addr=metrics_addr,
              metrics_port=9091 if metrics_port is None else metrics_port, bgp=bgp,
              overrides=frozenset(k for k, v in given.items() if v is not None),
              run_dir=run_dir)
    signal.signal(signal.SIGTERM, lambda *_: a.stop())
    signal.signal(signal.SIGINT, lambda *_: a.stop())
    a.run()


@app.command("cni-server")
def cni_server(
    host: Annotated[str, typer.Option(help="the Host this node is (the default for calls that name none)")],
    socket_path: Annotated[Path | None, typer.Option("--socket", help="default /run/tabby/cni/HOST.sock")] = None,
    log_level: Annotated[LogLevel, typer.Option()] = LogLevel.info,
) -> None:
    """Serve tabby-cni calls warm, in this network namespace, until SIGTERM or SIGINT."""
    import logging
    import signal
    import threading

    from tabby.cni.server import serve
    from tabby.cni.shim import SOCKET_DIR

    _daemon_setup(host, log_level, "cni-server ")
    path = socket_path or Path(SOCKET_DIR) / f"{host}.sock"
    server = serve(path, {"TABBY_STORE": STATE.store_url, "TABBY_HOST": host})
    stop = lambda *_: threading.Thread(target=server.shutdown).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("tabby.cni").info("serving on %s", path)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        path.unlink(missing_ok=True)


@app.command()
def status(
    host: Annotated[str | None, typer.Option(help="only this host")] = None,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
    strict: Strict = False,
) -> None:
    """Hosts (alive or not, refused for a conflict), endpoint status as agents report it, and
    every corrupt record in the Store with its key and field."""
    import time as _time

    from tabby.model import refused_hosts
    from tabby.model.keys import STATUS_PREFIX
    from tabby.model.status import decode_status

    client = STATE.client()
    store = client.store
    try:
        hosts, _ = store.list(STATUS_PREFIX + "hosts/")
        eps, _ = store.list(STATUS_PREFIX + "endpoints/" + (f"{host}/" if host else ""))
        host_records, _ = client.list_created("Host")
        corrupt = client.corrupt_records()
    except StoreError as e:
        fail(str(e))
    now = _time.time()
    refused = refused_hosts(host_records)
    host_rows, ep_rows = [], []
    for kv in hosts:
        try:
            h = decode_status(kv.key, kv.value)
        except InvalidResource:
            continue  # listed with the corrupt records below
        if host is None or h.host == host:
            host_rows.append({"host": h.host, "alive": h.expires > now,
                              "heartbeat_age_s": round(now - h.heartbeat, 1), "refused": refused.get(h.host, ""),
                              "degraded": h.degraded or "", "corrupt_seen": len(h.corrupt)})
    for kv in eps:
        try:
            e = decode_status(kv.key, kv.value)
        except InvalidResource:
            continue
        ep_rows.append({"endpoint": kv.key.rsplit("/", 1)[1], "host": e.host, "state": e.state, "reason": e.reason})
    bad_rows = [{"key": c.where, "field": c.field, "error": "; ".join(c.errors)} for c in corrupt]
    if output is not Output.table:
        doc = {"hosts": host_rows, "endpoints": ep_rows, "corrupt": bad_rows}
        print(json.dumps(doc, indent=2) if output is Output.json else yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        t = Table(box=None, header_style="bold")
        for col in ("HOST", "ALIVE", "HEARTBEAT AGE", "NOTES"):
            t.add_column(col)
        for r in host_rows:
            notes = "; ".join(x for x in (r["refused"] and f"refused: {r['refused']}",
                                          r["degraded"] and f"degraded: {r['degraded']}") if x)
            t.add_row(escape(str(r["host"])), "[green]yes[/]" if r["alive"] else "[red]no[/]",
                      f"{r['heartbeat_age_s']}s", escape(notes))
        out.print(t)
        t = Table(box=None, header_style="bold")
        for col in ("ENDPOINT", "HOST", "STATE", "REASON"):
            t.add_column(col)
        colour = {"up": "green", "down": "yellow", "error": "red", "conflict": "red"}
        for r in ep_rows:
            c = colour.get(str(r["state"]), "white")
            t.add_row(escape(str(r["endpoint"])), escape(str(r["host"])), f"[{c}]{r['state']}[/]",
                      escape(str(r["reason"])))
        out.print(t)
        if bad_rows:
            t = Table(box=None, header_style="bold", title="corrupt records (ignored; the last good version, "
                      "if any, stays in effect)")
            for col in ("KEY", "FIELD", "ERROR"):
                t.add_column(col)
            for r in bad_rows:
                t.add_row(escape(r["key"]), escape(r["field"]), escape(r["error"]))
            out.print(t)
    if strict and corrupt:
        raise typer.Exit(1)


@app.command()
def diagnose(
    src: Annotated[str, typer.Argument(help="source Endpoint name")],
    dst: Annotated[str, typer.Argument(help="destination Endpoint name")],
    lab: Annotated[str | None, typer.Option(help="read each host's kernel in this lab (prefix, e.g. tbl)")] = None,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
    tcp_port: Annotated[int | None, typer.Option("--tcp-port", min=1, max=65535,
                                                 help="judge a TCP connection to this port (default: a ping)")] = None,
) -> None:
    """Why SRC can or cannot reach DST: each step green or red; the first failing one is named."""
    from tabby.diagnose import diagnose as run
    from tabby.diagnose import lab_route_reader

    store = STATE.client().store
    try:
        steps = run(store, src, dst, lab_route_reader(lab) if lab else None, tcp_port)
    except StoreError as e:
        fail(str(e))
    first_bad = next((st for st in steps if st.state == "failed"), None)
    if output is not Output.table:
        doc = {"steps": [{"name": st.name, "state": st.state, "ok": st.ok, "detail": st.detail} for st in steps],
               "first_failing": first_bad.name if first_bad else None}
        print(json.dumps(doc, indent=2) if output is Output.json else yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        mark = {"ok": "[green]ok  [/]", "failed": "[red]FAIL[/]", "not checked": "[yellow]--  [/]"}
        for st in steps:
            out.print(f"{mark[st.state]} {escape(st.name)}: {escape(st.detail)}", highlight=False)
        unchecked = sum(st.state == "not checked" for st in steps)
        out.print(f"\nfirst failing step: [bold red]{escape(first_bad.name)}[/]" if first_bad
                  else "\n[green]no step fails[/]" + (f" ({unchecked} not checked)" if unchecked else ""))
    if first_bad:
        raise typer.Exit(1)


openstack_app = typer.Typer(help="OpenStack: Neutron into the Store.", no_args_is_help=True)
app.add_typer(openstack_app, name="openstack")


@openstack_app.command("resync")
def openstack_resync(
    neutron_url: Annotated[str, typer.Option(help="Neutron's API, e.g. http://controller:9696")],
    token: Annotated[str | None, typer.Option(help="a Keystone token (X-Auth-Token), if Neutron wants one")] = None,
) -> None:
    """Make the Store hold exactly what Neutron says: subnets, bound ports, security groups."""
    import requests

    from tabby.openstack.sync import from_neutron_api, reconcile

    try:
        subnets, ports, groups = from_neutron_api(neutron_url, token)
    except (requests.RequestException, ValueError, KeyError) as e:
        fail(f"cannot read Neutron at {neutron_url}: {e}")
    try:
        counts = reconcile(STATE.client(), subnets, ports, groups)
    except StoreError as e:
        fail(f"store: {e}")
    out.print(" ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)


bgp_app = typer.Typer(help="BGP sessions as each host's BIRD reports them.", no_args_is_help=True)
app.add_typer(bgp_app, name="bgp")


@bgp_app.command("status")
def bgp_status(
    host: Annotated[str | None, typer.Option(help="only this host")] = None,
    output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
) -> None:
    """Sessions, state, since when, prefixes in and out, for every host (from the Store)."""
    from tabby.model.keys import STATUS_PREFIX

    try:
        kvs, _ = STATE.client().store.list(STATUS_PREFIX + "bgp/")
    except StoreError as e:
        fail(str(e))
    from tabby.model.status import decode_status

    docs = []
    for kv in kvs:
        try:
            d = decode_status(kv.key, kv.value).model_dump()
        except InvalidResource as e:
            warn_corrupt(kv.key, "; ".join(e.errors))
            continue
        if host is None or d["host"] == host:
            docs.append(d)
    if output is not Output.table:
        print(json.dumps(docs, indent=2) if output is Output.json else yaml.safe_dump(docs, sort_keys=False), end="")
        return
    t = Table(box=None, header_style="bold")
    for col in ("HOST", "PEER", "STATE", "SINCE", "IN", "OUT"):
        t.add_column(col)
    for d in docs:
        if d["error"]:
            t.add_row(escape(d["host"]), "-", f"[red]{escape(d['error'])}[/]", "", "", "")
        for sess in d["sessions"]:
            st = sess["error"] or sess["state"] or "?"
            c = "green" if st == "Established" else "red"
            t.add_row(escape(d["host"]), escape(sess["description"] or sess["name"] or "?"), f"[{c}]{escape(st)}[/]",
                      escape(sess["since"]), str(sess["imported"]), str(sess["exported"]))
    out.print(t)


guest_app = typer.Typer(help="What a VM image needs for tabby: render it, or check a running guest.",
                        no_args_is_help=True)
app.add_typer(guest_app, name="guest")


@guest_app.command("render")
def guest_render(
    distro: Annotated[str, typer.Option(help="ubuntu | debian | centos")],
    root: Annotated[Path | None, typer.Option(help="write into this mounted image root instead of printing")] = None,
    interface: Annotated[list[str] | None, typer.Option(help="guest interfaces (repeat); default eth0")] = None,
    ipv4: Annotated[bool, typer.Option(help="also DHCPv4 (dual-stack)")] = True,
    cloud_init: Annotated[bool, typer.Option("--cloud-init", help="print cloud-init user-data instead")] = False,
    rs_delay: Annotated[int, typer.Option(help="router_solicitation_delay in seconds (the seed: 10; it also "
                                          "delays the first DAD probe, so boot is slower)", min=0, max=60)] = 1,
) -> None:
    """DHCPv6 on each interface with accept_ra 1, the dhclient /128 fix, the RS-delay sysctl."""
    from tabby.guest import render as R

    ifaces = tuple(interface or ["eth0"])
    try:
        from tabby.model.names import check_interface_name

        for i in ifaces:
            check_interface_name(i)
        files = R.render(distro, ifaces, ipv4, rs_delay)
    except ValueError as e:
        fail(str(e))
    if cloud_init:
        print(R.cloud_init(distro, ifaces, ipv4, rs_delay), end="")
        return
    for f in files:
        if root is None:
            print(f"# {f.path}" + (" (insert after the first line)" if f.mode != "replace" else ""))
            print(f.text)
            continue
        target = root / f.path.lstrip("/")
        if f.mode == "replace":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.text)
        elif target.exists():
            target.write_text(R.patch_script(target.read_text()))
        else:
            err.print(f"[yellow]warning:[/] {f.path} not in the image: no ISC dhclient to fix")
            continue
        out.print(f"wrote {target}", highlight=False)


@guest_app.command("check")
def guest_check(interface: Annotated[list[str] | None, typer.Option(help="interfaces (repeat)")] = None,
                root: Annotated[Path, typer.Option(help="where the guest's files are (default /)")] = Path("/"),
                ) -> None:
    """Run inside a guest: each requirement met or not, with the fix. Exit 1 if any is not met."""
    from tabby.guest.check import check

    findings = check(tuple(interface or ["eth0"]), root)
    for f in findings:
        mark = "[green]ok[/]  " if f.ok else "[red]FAIL[/]"
        out.print(f"{mark} {f.requirement}: {f.detail}" + ("" if f.ok else f"\n      fix: {f.fix}"), highlight=False)
    if not all(f.ok for f in findings):
        raise typer.Exit(1)


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
                                        "3..8 of [a-z0-9], starting with a letter", callback=_lab_prefix)]


class LabStore(StrEnum):
    sqlite = "sqlite"
    etcd = "etcd"


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option(help="compute hosts")] = 3,
    containers: Annotated[int, typer.Option(help="containers per host")] = 2,
    vms: Annotated[int, typer.Option(help="VMs per host (DHCPv6 clients: dhclient, dhcpcd, alternating)")] = 2,
    ipv6_only: Annotated[bool, typer.Option("--ipv6-only", help="no IPv4 anywhere")] = False,
    wait_s: Annotated[float, typer.Option(help="how long to wait for full connectivity")] = 60.0,
    route_reflector: Annotated[bool, typer.Option("--route-reflector", help="host 1 reflects; no full mesh")] = False,
    store: Annotated[LabStore, typer.Option("--store", help="the embedded SQLite file, or a real etcd on the fabric")
                     ] = LabStore.sqlite,
    prefix: PrefixOpt = "tbl",
) -> None:
    """Build the lab (namespaces, fabric, Store, agents with BIRD, containers) and wait until it routes."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from tabby.lab import lab as L
    from tabby.lab.topology import topology

    try:
        topo = topology(hosts, containers, ipv6_only, prefix, (1,) if route_reflector else (), vms)
        L.down(prefix)
        lab = L.Lab(topo, L.default_store(prefix), store_kind=store.value)
    except ValueError as e:
        fail(str(e))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("building", total=None)
        try:
            lab.up(lambda step: progress.update(task, description=f"building: {step}"))
        except Exception as e:
            progress.stop()
            L.down(prefix)
            fail(f"lab up failed, everything removed again: {e}")
        progress.update(task, description="waiting for BGP to spread every route")
        fams = ("v6",) if ipv6_only else ("v6", "v4")
        ok = L.wait_until(lambda: all(r["ok"] for r in lab.matrix(fams)), wait_s) if lab.members() else True
    out.print(f"lab up: {hosts} hosts, {len(topo.workloads)} containers, {len(topo.vms)} VMs, "
              f"{'IPv6-only' if ipv6_only else 'dual-stack'}; store {lab.store_url}", highlight=False)
    if not ok:
        err.print("[yellow]not every pair connects yet; see tabby lab check[/]")


@lab_app.command("check")
def lab_check(output: Annotated[Output, typer.Option("-o", "--output")] = Output.table,
              prefix: PrefixOpt = "tbl") -> None:
    """The connectivity matrix: every container to every other, IPv6 (and IPv4 where dual-stack)."""
    from tabby.lab import lab as L

    try:
        lab = L.load(prefix)
    except OSError:
        fail("no lab is up (tabby lab up)")
    except ValueError as e:
        fail(str(e))
    fams = ("v6",) if lab.topo.ipv6_only else ("v6", "v4")
    rows = lab.matrix(fams)
    if output is Output.json:
        print(json.dumps(rows, indent=2))
    else:
        names = [name for name, _ in lab.members()] + ["outside"]
        # wide enough for every column even when not on a terminal (rich would fold it to 80)
        need = (max(map(len, names)) + 3) * (len(names) + 1) + 20
        table_out = out if out.is_terminal else Console(width=max(out.width, need))
        for fam in fams:
            t = Table(title=f"ping and TCP over {'IPv6' if fam == 'v6' else 'IPv4'}", box=None, header_style="bold")
            t.add_column("from \\ to", min_width=max(map(len, names)), no_wrap=True)
            for n in names:
                t.add_column(n, min_width=len(n), no_wrap=True)
            for src in names:
                cells = []
                for dst in names:
                    hit = [r for r in rows if r["src"] == src and r["dst"] == dst and r["family"] == fam]
                    bad = sorted({r["check"] for r in hit if not r["ok"]})
                    blocked = bool(hit) and all(r["expect"] == "blocked" for r in hit)
                    good = "[green]blocked (policy)[/]" if blocked else "[green]ok[/]"
                    fail_text = "[red]NOT BLOCKED[/]" if blocked else f"[red]FAIL {'+'.join(bad)}[/]"
                    cells.append("-" if src == dst else (good if hit and not bad else fail_text))
                t.add_row(src, *cells)
            table_out.print(t)
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
    import subprocess as sp

    from tabby.lab import lab as L
    from tabby.lab import netns

    try:
        lab = L.load(prefix)
    except OSError:
        fail(f"no lab with prefix {prefix} is up (tabby lab up)")
    except ValueError as e:
        fail(str(e))
    names = sorted(e.name for e in netns.NETNS_DIR.iterdir() if e.name.startswith(prefix + "-")) \
        if netns.NETNS_DIR.exists() else []
    rows = []
    for n in names:
        pids = sp.run(["ip", "netns", "pids", n], capture_output=True, text=True).stdout.split()
        procs = []
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            procs.append(f"{comm}[{pid}]")
        rows.append({"namespace": n, "processes": sorted(procs)})
    if output is not Output.table:
        doc = {"prefix": prefix, "store": lab.store_url, "namespaces": rows}
        print(json.dumps(doc, indent=2) if output is Output.json else yaml.safe_dump(doc, sort_keys=False), end="")
        return
    out.print(f"lab {prefix}: store {lab.store_url}", highlight=False)
    t = Table(box=None, header_style="bold")
    t.add_column("NAMESPACE", no_wrap=True)
    t.add_column("PROCESSES")
    for r in rows:
        t.add_row(r["namespace"], " ".join(r["processes"]) or "-")
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


ipam_app = typer.Typer(help="IP address management: blocks, handles, leaks.", no_args_is_help=True)
app.add_typer(ipam_app, name="ipam")


def _ipam() -> Any:
    from tabby.ipam import IPAM

    return IPAM(STATE.client().store)


def _plain(text: object) -> str:
    """Text from the Store for one line of rich output: control characters escaped (a newline in a
    key must not forge a line), rich markup escaped (a handle may hold "[")."""
    from rich.markup import escape

    return escape("".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(text)))


def _quiet_ipam_log() -> None:
    """show, check and gc name each corrupt record themselves, in one warning line: IPAM's own log
    line about it (Python's last-resort handler, on stderr) is not shown as well."""
    import logging

    logging.getLogger("tabby.ipam").addHandler(logging.NullHandler())


def _warn_corrupt(corrupt: list[tuple[str, str, list[str]]]) -> None:
    """One warning line per corrupt record, (key, field, errors) (stderr: stdout stays the report)."""
    for key, field, errors in corrupt:
        err.print(f"[yellow]warning:[/] corrupt record {_plain(key)} (field {_plain(field)}): "
                  f"{_plain('; '.join(errors))}", highlight=False, soft_wrap=True)


@ipam_app.command("show")
def ipam_show(
    host: Annotated[str | None, typer.Option(help="only this host's blocks")] = None,
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
        print(json.dumps(rows, indent=2) if output is Output.json else yaml.safe_dump(rows, sort_keys=False), end="")
    else:
        table = Table(box=None, header_style="bold")
        for col in ("BLOCK", "HOST", "USED", "SIZE"):
            table.add_column(col)
        for r in rows:
            table.add_row(str(r["block"]), _plain(r["host"] or "-"), str(r["used"]), str(r["size"]))
        out.print(table)
    if strict and snap.corrupt:
        raise typer.Exit(1)


@ipam_app.command("assign")
def ipam_assign(
    handle: Annotated[str, typer.Option(help="e.g. NETWORK.CONTAINERID or a Neutron port id")],
    host: Annotated[str, typer.Option()],
    ipv6: Annotated[int, typer.Option(help="how many IPv6 addresses")] = 1,
    ipv4: Annotated[int, typer.Option(help="how many IPv4 addresses")] = 0,
    address: Annotated[str | None, typer.Option(help="one specific address instead")] = None,
) -> None:
    """Allocate addresses to a handle (what the CNI plugin and Neutron driver do)."""
    from tabby.ipam import IpamError

    try:
        got = [_ipam().assign_address(handle, host, address)] if address else \
            _ipam().assign(handle, host, ipv6=ipv6, ipv4=ipv4)
    except (IpamError, ValueError, StoreError) as e:
        fail(_plain(e))
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
    try:
        if handle is not None:
            freed = _ipam().release_handle(handle)
            out.print(f"released {len(freed)} address(es) of {_plain(handle)}: " + ", ".join(map(str, freed)),
                      highlight=False)
        else:
            owner = _ipam().release_address(address, seq)  # type: ignore[arg-type]
            out.print(f"released {_plain(address)} (handle {_plain(owner)})", highlight=False)
    except (IpamError, ValueError, StoreError) as e:
        fail(_plain(e))


@ipam_app.command("gc")
def ipam_gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report, change nothing")] = False,
    grace_s: Annotated[float, typer.Option(help="a leak must be seen twice this far apart")] = 300.0,
) -> None:
    """Free addresses no Endpoint uses and empty blocks, once seen twice across the grace period.
    Nothing is freed on the basis of a corrupt record: each gets a warning line, and what it might
    concern is kept."""
    from tabby.ipam.gc import collect

    ipam = _ipam()
    _quiet_ipam_log()
    report = collect(ipam, grace_s=grace_s, dry_run=dry_run)
    for line in report.corrupt:
        err.print(f"[yellow]warning:[/] corrupt record {_plain(line)}", highlight=False, soft_wrap=True)
    if report.state_corrupt:
        err.print("[yellow]warning:[/] the collector's own record is corrupt: nothing freed, nothing written; "
                  "delete it to start afresh", highlight=False)
    verb = "would release" if dry_run else "released"
    for handle, ips in report.leaked.items():
        state = verb if handle in report.released else "seen leaked (waiting for the grace period)"
        out.print(f"handle {_plain(handle)}: {', '.join(ips)}: {state}", highlight=False)
    for handle, why in report.kept_unknown.items():
        out.print(f"handle {_plain(handle)}: kept, {_plain(why)}", highlight=False)
    for cidr in report.empty_blocks:
        state = verb if cidr in report.released_blocks else "seen empty (waiting for the grace period)"
        out.print(f"block {cidr}: {state}", highlight=False)
    for aff in report.dropped_affinities:
        out.print(f"stale pending affinity {_plain(aff)}: {verb}", highlight=False)
    if not (report.leaked or report.empty_blocks or report.dropped_affinities or report.kept_unknown):
        out.print("nothing leaked")


@ipam_app.command("check")
def ipam_check(
    grace_s: Annotated[float, typer.Option(help="report a handle without an Endpoint only once it is this old")
                       ] = 300.0,
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
        print(json.dumps(doc, indent=2) if output is Output.json else yaml.safe_dump(doc, sort_keys=False), end="")
    else:
        _warn_corrupt([(c["key"], c["field"], c["errors"]) for c in corrupt])
        for p in problems:
            out.print(f"[red]problem:[/] {_plain(p)}", highlight=False, soft_wrap=True)
        for f in findings:
            out.print(f"[red]problem:[/] {f.kind}: {_plain(f.message)}", highlight=False, soft_wrap=True)
        if not (problems or findings):
            out.print("ipam consistent" + (f" ({len(corrupt)} corrupt record(s) skipped)" if corrupt else ""))
    if problems or findings or (strict and corrupt):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
