"""What every command group shares: the app, the Store option, errors, and one output helper."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tabby.client import ResourceClient
from tabby.model.codec import dump_yaml
from tabby.store import ETCD_OPTIONS, StoreError, open_store, store_url, with_etcd_options

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

    def client(self, create: bool = False) -> ResourceClient:
        """create: a command that writes resources may make a new SQLite store; any other is told
        when the file is not there (a mistyped path showed an empty fabric, all well)."""
        try:
            return ResourceClient(open_store(self.store_url, create=create))
        except (ValueError, StoreError, OSError) as e:
            fail(f"cannot open store {self.store_url}: {e}")


STATE = State()


def one_line(text: object) -> str:
    """Text for one line of rich output: control characters escaped (a newline or an escape
    sequence in a name given or read must not forge a line or restyle the terminal), markup escaped."""
    return escape("".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                          for c in str(text)))


def fail(message: str, code: int = 1, *, details: list[str] | None = None) -> typer.Exit:
    """One error line (and an indented line per detail), every part escaped by ``one_line``."""
    lines = [f"[bold red]error:[/] {one_line(message)}", *(f"  {one_line(d)}" for d in details or [])]
    err.print("\n".join(lines), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn_corrupt(key: str, problem: str) -> None:
    """One line per corrupt record: its key and what is wrong (text from the Store is escaped,
    so a record cannot restyle or forge the terminal's output)."""
    err.print(f"[yellow]warning:[/] corrupt record {one_line(key)} skipped: {one_line(problem)}",
              highlight=False, soft_wrap=True)



def emit(doc: Any, output: Output) -> bool:
    """Print doc as JSON or YAML for machines; False for a table (the command draws its own)."""
    if output is Output.json:
        print(json.dumps(doc, indent=2))
    elif output is Output.yaml:
        print(dump_yaml([doc]), end="")
    else:
        return False
    return True


Strict = Annotated[bool, typer.Option("--strict", help="exit 1 if any record read is corrupt")]


def _etcd_opt(flag: str, what: str) -> Any:
    """One of the etcd options as a flag (--etcd-ca: the URL's ca=, default $TABBY_ETCD_CA)."""
    var = ETCD_OPTIONS[flag.removeprefix("--etcd-").replace("-", "_")]
    return typer.Option(flag, help=f"etcd: {what} (or in the URL's query; default ${var})")


@app.callback()
def _main(
    store: Annotated[str | None, typer.Option(
        "--store", help="sqlite:///PATH, etcd://HOST:PORT[,HOST:PORT...] or etcds://... (TLS) (default: $TABBY_STORE, "
        "else sqlite:///var/lib/tabby/tabby.db)")] = None,
    etcd_ca: Annotated[str | None, _etcd_opt("--etcd-ca", "the CA file of the members' certificates")] = None,
    etcd_cert: Annotated[str | None, _etcd_opt("--etcd-cert", "this client's certificate file")] = None,
    etcd_key: Annotated[str | None, _etcd_opt("--etcd-key", "its key file")] = None,
    etcd_user: Annotated[str | None, _etcd_opt("--etcd-user", "the user")] = None,
    etcd_password_file: Annotated[str | None, _etcd_opt("--etcd-password-file", "a file holding its password")] = None,
) -> None:
    try:
        STATE.store_url = with_etcd_options(store_url(store), ca=etcd_ca, cert=etcd_cert, key=etcd_key,
                                            user=etcd_user, password_file=etcd_password_file)
    except ValueError as e:
        fail(str(e))

