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


class State:
    store_url: str = ""

    def client(self) -> ResourceClient:
        try:
            return ResourceClient(open_store(self.store_url))
        except (ValueError, StoreError, OSError) as e:
            fail(f"cannot open store {self.store_url}: {e}")


STATE = State()


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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
                f" as{spec.asn} rid {res.effective_router_id()}"
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
) -> None:
    """Show resources."""
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
        err.print(f"[yellow]warning:[/] corrupt record {key} skipped: {problem}", highlight=False)
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
            table.add_row(r.metadata.name, labels or "-", _summary(r))
        out.print(table)


@app.command()
def delete(kind: str, name: str) -> None:
    """Delete one resource."""
    try:
        kind = resolve_kind(kind)
        rev = STATE.client().delete(kind, name)
    except (ValueError, StoreError) as e:
        fail(str(e))
    out.print(f"{kind.lower()}/{name} deleted (revision {rev})", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
