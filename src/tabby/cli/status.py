"""`tabby status`, `diagnose`, `bgp status`: what the agents report, and why a pair cannot talk."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tabby.cli.common import (
    STATE,
    Output,
    Strict,
    app,
    emit,
    fail,
    out,
    warn_corrupt,
)
from tabby.model import InvalidResource
from tabby.store import StoreError


@app.command()
def status(
    host: Annotated[str | None, typer.Option(help="only this host's row and endpoints (the corrupt records are "
                                             "all listed: a corrupt Policy or Profile is every host's)")] = None,
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
            host_rows.append({"host": h.host, "alive": h.alive(now), "heartbeat": "lease" if h.age(now) is None
                              else "record", "heartbeat_age_s": h.age(now), "refused": refused.get(h.host, ""),
                              "degraded": h.degraded or "", "corrupt_seen": len(h.corrupt),
                              "nat64": h.nat64.model_dump() if h.nat64 else None})
    # every Host, also one whose agent never beat (or whose lease ran out with it: on etcd the
    # heartbeat goes with the lease, and a crashed host's row vanished instead of saying no)
    beating = {r["host"] for r in host_rows}
    for h, _ in host_records:
        name = h.metadata.name
        if name not in beating and (host is None or name == host):
            host_rows.append({"host": name, "alive": False, "heartbeat": "none", "heartbeat_age_s": None,
                              "refused": refused.get(name, ""), "degraded": "", "corrupt_seen": 0, "nat64": None})
    alive = {r["host"] for r in host_rows if r["alive"]}
    for kv in eps:
        try:
            e = decode_status(kv.key, kv.value)
        except InvalidResource:
            continue
        # what a host's agent last said: not news of now if that agent is not alive
        ep_rows.append({"endpoint": kv.key.rsplit("/", 1)[1], "host": e.host, "state": e.state, "reason": e.reason,
                        "host_alive": e.host in alive})
    bad_rows = [{"key": c.where, "field": c.field, "error": "; ".join(c.errors)} for c in corrupt]
    if output is not Output.table:
        doc = {"hosts": host_rows, "endpoints": ep_rows, "corrupt": bad_rows}
        emit(doc, output)
    else:
        t = Table(box=None, header_style="bold")
        for col in ("HOST", "ALIVE", "HEARTBEAT AGE", "NOTES"):
            t.add_column(col)
        for r in host_rows:
            n = r["nat64"]
            nat64 = n and (f"nat64: tayga {n['tayga']}" + (f", unbound {n['unbound']}" if n["unbound"] else "")
                           + (f", {n['restarts']} restarts" if n["restarts"] else "")
                           + (f", error: {n['error']}" if n["error"] else ""))
            notes = "; ".join(x for x in (r["refused"] and f"refused: {r['refused']}",
                                          r["degraded"] and f"degraded: {r['degraded']}", nat64) if x)
            age = {"lease": "lease", "none": "none"}.get(str(r["heartbeat"]), f"{r['heartbeat_age_s']}s")
            t.add_row(escape(str(r["host"])), "[green]yes[/]" if r["alive"] else "[red]no[/]", age, escape(notes))
        out.print(t)
        t = Table(box=None, header_style="bold")
        for col in ("ENDPOINT", "HOST", "STATE", "REASON"):
            t.add_column(col)
        colour = {"up": "green", "down": "yellow", "error": "red", "conflict": "red"}
        for r in ep_rows:
            c = colour.get(str(r["state"]), "white") if r["host_alive"] else "dim"
            stale = "" if r["host_alive"] else " (its host is not alive: as last reported)"
            t.add_row(escape(str(r["endpoint"])), escape(str(r["host"])), f"[{c}]{r['state']}[/]",
                      escape(str(r["reason"]) + stale))
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

    if lab is not None:  # refused at once: it only marked the route steps "not checked" (exit 0)
        from tabby.lab.topology import check_prefix

        try:
            check_prefix(lab)
        except ValueError as e:
            fail(f"--lab: {e}", 2)
    store = STATE.client().store
    try:
        steps = run(store, src, dst, lab_route_reader(lab) if lab else None, tcp_port)
    except StoreError as e:
        fail(str(e))
    first_bad = next((st for st in steps if st.state == "failed"), None)
    if output is not Output.table:
        doc = {"steps": [{"name": st.name, "state": st.state, "ok": st.ok, "detail": st.detail} for st in steps],
               "first_failing": first_bad.name if first_bad else None}
        emit(doc, output)
    else:
        mark = {"ok": "[green]ok  [/]", "failed": "[red]FAIL[/]", "not checked": "[yellow]--  [/]"}
        for st in steps:
            out.print(f"{mark[st.state]} {escape(st.name)}: {escape(st.detail)}", highlight=False)
        unchecked = sum(st.state == "not checked" for st in steps)
        out.print(f"\nfirst failing step: [bold red]{escape(first_bad.name)}[/]" if first_bad
                  else "\n[green]no step fails[/]" + (f" ({unchecked} not checked)" if unchecked else ""))
    if first_bad:
        raise typer.Exit(1)


bgp_app = typer.Typer(help="BGP sessions as each host's BIRD reports them.", no_args_is_help=True)
app.add_typer(bgp_app, name="bgp")


@bgp_app.command("status")
def bgp_status(
    host: Annotated[str | None, typer.Option(help="only this host's sessions (a corrupt status record of any "
                                             "host still gets its warning line)")] = None,
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
        emit(docs, output)
        return
    t = Table(box=None, header_style="bold")
    for col in ("HOST", "PEER", "STATE", "SINCE", "IN", "OUT"):
        t.add_column(col)
    for d in docs:
        if d["error"]:
            t.add_row(escape(d["host"]), "-", f"[red]{escape(d['error'])}[/]", "", "", "")
        for sess in d["sessions"]:
            st = sess["error"] or sess["state"] or "?"
            if sess.get("why"):
                st = f"{st}: {sess['why']}"
            c = "green" if st == "Established" else "red"
            t.add_row(escape(d["host"]), escape(sess["description"] or sess["name"] or "?"), f"[{c}]{escape(st)}[/]",
                      escape(sess["since"]), str(sess["imported"]), str(sess["exported"]))
    out.print(t)
