"""The ``tabby`` command. Thin: parse arguments, call a part, print. ``-o json`` for machines.

One module per command group; importing them registers their commands on ``app``.
"""

from __future__ import annotations

from tabby.cli import daemons, guest, ipam, lab, openstack, resources, status  # noqa: F401 - registers commands
from tabby.cli.common import app


def main() -> None:
    app()
