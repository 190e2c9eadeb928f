"""Make the Store hold exactly what Neutron says: write the desired resources, delete the ones
this integration made (label ``openstack``) that Neutron no longer has. Used by the driver at
start and by ``tabby openstack resync``; neither imports Neutron here."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from tabby.client import ResourceClient
from tabby.model import InvalidResource, decode, validate
from tabby.model.keys import kind_prefix
from tabby.openstack.translate import OWNER_LABEL, desired
from tabby.store import KV, NotFound, RevisionMismatch

log = logging.getLogger(__name__)
# what translate.py makes of each kind, by the value of its OWNER_LABEL: only those are ever deleted
# (a CNI netconf's labels may hold an "openstack" key too)
OWNED = {"Endpoint": ("port",), "Profile": ("sg", "builtin"), "IPPool": ("subnet",)}
KINDS = tuple(OWNED)


class PartialListing(ValueError):
    """Neutron's listing cannot be the whole truth: reconciling it would delete live records."""


def reconcile(client: ResourceClient, subnets: Iterable[Mapping[str, Any]], ports: Iterable[Mapping[str, Any]],
              groups: Iterable[Mapping[str, Any]], listed_after: int | None = None) -> dict[str, int]:
    """Returns counts: created, updated, unchanged, deleted, invalid (and kept: records newer than
    the listing). PartialListing, before anything is written, for ports listed without their
    bindings: Neutron shows ``binding:*`` to admins only, and every port would have read as unbound
    (every Endpoint deleted).

    listed_after: the Store's revision before Neutron was listed. A record written after it (the
    driver's, for a port bound or moved while the listing was read) is newer than what the
    listing says of it: neither overwritten nor deleted (a port bound meanwhile lost its Endpoint
    until its next update). Deletes are compare-and-swap on the revision read."""
    ports = list(ports)
    hidden = sum(1 for p in ports if isinstance(p, Mapping) and "binding:vif_type" not in p)
    if hidden:
        raise PartialListing(f"{hidden} of {len(ports)} ports were listed without binding:vif_type and "
                             "binding:host_id (Neutron shows them to admins only): resync needs admin "
                             "credentials; nothing was changed")
    counts = {"created": 0, "updated": 0, "unchanged": 0, "deleted": 0, "invalid": 0, "kept": 0}
    current: dict[str, dict[str, list[KV]]] = {}  # kind -> name -> its records (an Endpoint: one per host)
    for kind in KINDS:
        for kv in client.store.list(kind_prefix(kind))[0]:
            current.setdefault(kind, {}).setdefault(kv.key.rsplit("/", 1)[-1], []).append(kv)
        current.setdefault(kind, {})

    def newer(kv: KV) -> bool:
        if listed_after is not None and kv.mod_revision > listed_after:
            counts["kept"] += 1
            log.info("%s was written after Neutron was listed: kept as the Store has it", kv.key)
            return True
        return False
    problems: list[str] = []
    wanted: set[tuple[str, str]] = set()  # what a record could not be read for stays as the Store has it
    docs = desired(subnets, ports, groups, problems, wanted)
    for text in problems:
        counts["invalid"] += 1
        log.error("Neutron record not translated (what the Store holds for it is kept): %s", text)
    for doc in docs:
        try:
            res = validate(doc)
        except ValueError as e:  # kept as the Store has it, as the driver's own write does: never lost
            counts["invalid"] += 1
            wanted.add((doc["kind"], doc["metadata"]["name"]))
            log.error("Neutron %s %s cannot be expressed in tabby (what the Store holds for it is kept): %s",
                      doc["kind"], doc["metadata"]["name"], e)
            continue
        wanted.add((res.kind, res.metadata.name))
        if any(newer(kv) for kv in current.get(res.kind, {}).get(res.metadata.name, ())):
            continue
        try:
            counts[client.apply(res)[0]] += 1
        except InvalidResource as e:  # larger than a record may hold: kept as the Store has it, the rest goes on
            counts["invalid"] += 1
            log.error("Neutron %s %s cannot be written (what the Store holds for it is kept): %s", res.kind,
                      res.metadata.name, e)
    for kind in KINDS:  # what was there before: a record the driver made meanwhile is not in it
        for kv in (kv for kvs in current[kind].values() for kv in kvs):
            try:
                res = decode(kv.key, kv.value)
            except ValueError:
                continue  # corrupt: what it is for is unknown, so it is not ours to delete
            if res.metadata.labels.get(OWNER_LABEL) not in OWNED[kind] or (kind, res.metadata.name) in wanted \
                    or newer(kv):
                continue
            try:
                client.store.delete(kv.key, expected_revision=kv.mod_revision)
                counts["deleted"] += 1
            except (NotFound, RevisionMismatch):
                pass  # gone, or written meanwhile: the writer knows better than this listing
    return counts


def neutron_adapter(cloud: str | None = None, endpoint: str | None = None) -> Any:
    """A keystoneauth1 Adapter for Neutron's API. The session comes from openstacksdk's loader: a
    clouds.yaml entry (``cloud``) or the usual OS_* environment (password, application credential,
    a token with ``OS_AUTH_TYPE=admin_token``...), so no secret is ever on a command line. Why an
    Adapter and not openstacksdk's resources: those rename Neutron's fields (``binding:host_id``
    becomes ``binding_host_id``), and translate.py reads Neutron's own dicts, as the driver gets them.
    Connection failures and 5xx answers are retried (3 times, keystoneauth's back-off)."""
    import openstack.config
    from keystoneauth1.adapter import Adapter

    region = openstack.config.get_cloud_region(cloud=cloud)
    return Adapter(region.get_session(), service_type="network", interface=region.get_interface("network"),
                   region_name=region.get_region_name("network"),
                   endpoint_override=endpoint or region.get_endpoint("network"),
                   connect_retries=3, status_code_retries=3, retriable_status_codes=[500, 502, 503, 504])


def list_all(adapter: Any, path: str, key: str, page_size: int | None = None) -> list[dict[str, Any]]:
    """Every item of a Neutron collection, following its ``<key>_links`` "next" pages (Neutron
    pages at ``pagination_max_limit`` whether asked or not; a cloud with more ports than one page
    would otherwise lose the rest)."""
    out: list[dict[str, Any]] = []
    url: str | None = f"/v2.0/{path}" + (f"?limit={page_size}" if page_size else "")
    seen: set[str] = set()
    while url is not None and url not in seen:  # a server that links a page to itself ends here
        seen.add(url)
        body = adapter.get(url).json()
        items = body.get(key) if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ValueError(f"Neutron's {url} answered without a list under {key!r}")
        out.extend(items)
        links = body.get(f"{key}_links") or []
        url = next((link["href"] for link in links if isinstance(link, dict) and link.get("rel") == "next"
                    and isinstance(link.get("href"), str)), None) if isinstance(links, list) else None
    return out


def from_neutron_api(adapter: Any, page_size: int | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(subnets, ports, security groups) from Neutron's HTTP API (v2.0), every page."""
    return (list_all(adapter, "subnets", "subnets", page_size), list_all(adapter, "ports", "ports", page_size),
            list_all(adapter, "security-groups", "security_groups", page_size))
