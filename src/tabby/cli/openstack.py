"""`tabby openstack resync`: Neutron into the Store."""

from __future__ import annotations

from typing import Annotated

import typer

from tabby.cli.common import (
    STATE,
    app,
    fail,
    out,
)
from tabby.store import StoreError

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
