"""`tabby apply`, `get`, `delete`: resources in and out of the Store."""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Annotated, Any

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
from tabby.model import InvalidResource, parse_documents, to_plain
from tabby.model.codec import dump_yaml
from tabby.model.keys import KIND_DIRS, resolve_kind
from tabby.store import StoreError


@app.command()
def apply(
    file: Annotated[str, typer.Option("-f", "--file", help="YAML or JSON file, many documents; - for stdin")],
) -> None:
    """Create or update resources. Every document is validated first; if one is bad, nothing is written."""
    text = _read_stdin() if file == "-" else _read(file)
    try:
        resources = parse_documents(text, source=file)
    except InvalidResource as e:
        fail("nothing written:", details=e.errors)
    if not resources:  # an empty or cut-short file is no success
        fail(f"no documents in {'stdin' if file == '-' else file}: nothing written")
    client = STATE.client(create=True)
    for res in resources:
        try:
            what, rev = client.apply(res)
        except StoreError as e:
            fail(f"{res.kind}/{res.metadata.name}: {e}")
        out.print(f"{res.kind.lower()}/{res.metadata.name} {what} (revision {rev})", highlight=False)


MAX_APPLY_BYTES = 64 << 20  # far above any real set of resources; /dev/zero ended in a MemoryError


def _text(raw: bytes, where: str) -> str:
    if len(raw) > MAX_APPLY_BYTES:
        fail(f"cannot read {where}: larger than {MAX_APPLY_BYTES >> 20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"cannot read {where}: not UTF-8 (byte {e.start})")


def _read_stdin() -> str:
    if sys.stdin is None:  # started with stdin closed
        fail("cannot read stdin: it is closed")
    try:
        return _text(sys.stdin.buffer.read(MAX_APPLY_BYTES + 1), "stdin")
    except OSError as e:
        fail(f"cannot read stdin: {e.strerror or e}")


def _read(file: str) -> str:
    """A regular file only: a FIFO would block for ever, a device never end (- reads a pipe)."""
    if not file:
        fail("--file is empty (give a path, or - for stdin)", 2)
    try:  # O_NONBLOCK: opening a FIFO waits for a writer otherwise (no effect on a regular file)
        with open(os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                fail(f"cannot read {file}: not a regular file (use -f - to read a pipe)")
            return _text(f.read(MAX_APPLY_BYTES + 1), file)
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
                (["disabled"] if spec.disabled else []) + \
                ([spec.ipv6_mode] if spec.ipv6_mode != "dhcpv6-stateful" else [])
            return f"{spec.cidr} " + " ".join(flags)
        case "Endpoint":
            addrs = [str(a.ip) for a in (*spec.ipv6_addresses, *spec.ipv4_addresses)]
            extra = ([f"allowed {','.join(str(a.address.ip) for a in spec.allowed_sources)}"]
                     if spec.allowed_sources else []) + ([] if spec.port_security else ["port-security off"])
            return " ".join([f"{spec.host} {spec.orchestrator} {spec.interface} {spec.mac} " + ",".join(addrs),
                             *extra])
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
    if output is Output.yaml and not name:  # YAML: one document per resource, as apply reads them
        print(dump_yaml(plain), end="")
    elif not emit(plain[0] if name else plain, output):
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
