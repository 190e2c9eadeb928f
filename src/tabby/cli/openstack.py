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
    cloud: Annotated[str | None, typer.Option(help="the clouds.yaml entry; default: $OS_CLOUD, else the OS_* "
                                              "environment (OS_AUTH_URL, OS_USERNAME, ... or OS_AUTH_TYPE, OS_TOKEN)")]
    = None,
    neutron_url: Annotated[str | None, typer.Option(help="Neutron's API (e.g. http://controller:9696) instead of "
                                                    "the catalog's")] = None,
    page_size: Annotated[int | None, typer.Option(help="items per page asked of Neutron", min=1)] = None,
) -> None:
    """Make the Store hold exactly what Neutron says: subnets, bound ports, security groups.
    Credentials only from clouds.yaml or the environment: never on the command line (ps shows it)."""
    try:
        from keystoneauth1.exceptions import ClientException
        from openstack.exceptions import SDKException

        from tabby.openstack.sync import PartialListing, from_neutron_api, neutron_adapter, reconcile
    except ImportError as e:
        fail(f"tabby openstack resync needs openstacksdk and keystoneauth1 (neutron-server's environment has them; "
             f"pip install 'tabby[openstack]'): {e}")
    try:
        before = STATE.client(create=True).store.revision()  # what the driver writes meanwhile is newer
    except StoreError as e:
        fail(f"store: {e}")
    try:
        adapter = neutron_adapter(cloud, neutron_url)
        subnets, ports, groups = from_neutron_api(adapter, page_size)
    except (ClientException, SDKException, ValueError, KeyError) as e:  # SDKException: clouds.yaml, OS_* errors
        fail(f"cannot read Neutron: {e}")
    try:
        counts = reconcile(STATE.client(), subnets, ports, groups, listed_after=before)
    except PartialListing as e:
        fail(f"refused: {e}")
    except StoreError as e:
        fail(f"store: {e}")
    out.print(" ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
