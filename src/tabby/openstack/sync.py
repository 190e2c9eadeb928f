"""Make the Store hold exactly what Neutron says: write the desired resources, delete the ones
this integration made (label ``openstack``) that Neutron no longer has. Used by the driver at
start and by ``tabby openstack resync``; neither imports Neutron here."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import requests

from tabby.client import ResourceClient
from tabby.model import validate
from tabby.openstack.translate import OWNER_LABEL, desired
from tabby.store import NotFound

log = logging.getLogger(__name__)
KINDS = ("Endpoint", "Profile", "IPPool")


def reconcile(client: ResourceClient, subnets: Iterable[Mapping[str, Any]], ports: Iterable[Mapping[str, Any]],
              groups: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Returns counts: created, updated, unchanged, deleted, invalid."""
    counts = {"created": 0, "updated": 0, "unchanged": 0, "deleted": 0, "invalid": 0}
    wanted: set[tuple[str, str]] = set()
    for doc in desired(subnets, ports, groups):
        try:
            res = validate(doc)
        except ValueError as e:
            counts["invalid"] += 1
            log.error("Neutron %s %s cannot be expressed in tabby: %s", doc["kind"], doc["metadata"]["name"], e)
            continue
        wanted.add((res.kind, res.metadata.name))
        counts[client.apply(res)[0]] += 1
    for kind in KINDS:
        for res in client.list(kind)[0]:
            if OWNER_LABEL in res.metadata.labels and (kind, res.metadata.name) not in wanted:
                try:
                    client.delete(kind, res.metadata.name)
                    counts["deleted"] += 1
                except NotFound:
                    pass
    return counts


def from_neutron_api(url: str, token: str | None = None, timeout: float = 30.0
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(subnets, ports, security groups) from Neutron's HTTP API (v2.0)."""
    headers = {"X-Auth-Token": token} if token else {}
    out = []
    for path, key in (("subnets", "subnets"), ("ports", "ports"), ("security-groups", "security_groups")):
        r = requests.get(f"{url.rstrip('/')}/v2.0/{path}", headers=headers, timeout=timeout)
        r.raise_for_status()
        out.append(r.json()[key])
    return out[0], out[1], out[2]
