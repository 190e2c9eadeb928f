"""The ``tabby`` command. Thin: parse arguments, call a part, print. ``-o json`` for machines.

One module per command group; importing them registers their commands on ``app``.
"""

from __future__ import annotations

from tabby.cli import daemons, guest, ipam, lab, openstack, resources, status  # noqa: F401 - registers commands
from tabby.cli.common import app, err, one_line
from tabby.store import StoreError


def main() -> None:
    """A Store failure a command did not handle itself is still one clear line, never a traceback."""
    import sys

    try:
        app()
    except StoreError as e:
        err.print(f"[bold red]error:[/] store: {one_line(e)}", highlight=False, soft_wrap=True)
        sys.exit(1)
