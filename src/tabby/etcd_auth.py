"""etcd users and roles for a fabric: who may write which keys (the key layout is ``model/keys.py``).

One user per writer: ``tabby-agent-<host>`` and ``tabby-cni-<host>`` per host, ``tabby-neutron``
for the Neutron driver, and ``root`` (etcd's own superuser) for the CLI and operators. etcd grants
by key range, so what a range can say is enforced by etcd itself:

- an agent reads resources and IPAM (``/tabby/v1/``) and writes only its own status: its host's
  liveness and BGP keys and its endpoint statuses under ``/tabby/status/endpoints/<host>/``; it
  cannot write any resource, nor another host's status, nor read other hosts' status;
- the CNI plugin of a host reads ``/tabby/v1/``, writes its own host's Endpoints
  (``/tabby/v1/endpoints/<host>/``) and block affinities, and IPAM blocks and handles;
- the Neutron driver reads ``/tabby/v1/`` and writes Endpoints, Profiles and IPPools.

What a range cannot say (documented in docs/architecture.md, "etcd users and roles"): a record's
content. An Endpoint's key names its host, and a record whose ``spec.host`` is not its key's
is refused by every reader; but IPAM blocks are shared records, so a CNI user can take an
address from a block another host holds. That is the agents' and IPAM's check (conflicts
refused, first holder wins), not etcd's.

``provision`` is idempotent: roles get exactly these permissions (stale ones revoked), users their
role and password, and auth is switched on last (as root, which is made first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tabby.model.keys import (
    IPAM_AFFINITIES_PREFIX,
    IPAM_BLOCKS_PREFIX,
    IPAM_HANDLES_PREFIX,
    PREFIX,
    STATUS_PREFIX,
    bgp_status_key,
    endpoint_prefix,
    host_status_key,
    kind_prefix,
)
from tabby.store import StoreError
from tabby.store.etcd import EtcdStore, b64, prefix_end

ROOT_USER = "root"
NEUTRON_USER = "tabby-neutron"


def agent_user(host: str) -> str:
    return f"tabby-agent-{host}"


def cni_user(host: str) -> str:
    return f"tabby-cni-{host}"


@dataclass(frozen=True)
class Perm:
    """READ, WRITE or READWRITE on one key, or on every key under a prefix."""

    type: Literal["READ", "WRITE", "READWRITE"]
    key: str
    prefix: bool = True

    def request(self) -> dict[str, str]:
        end = prefix_end(self.key) if self.prefix else b""
        return {"permType": self.type, "key": b64(self.key), **({"range_end": b64(end)} if end else {})}


def agent_perms(host: str) -> list[Perm]:
    return [Perm("READ", PREFIX), Perm("READWRITE", f"{STATUS_PREFIX}endpoints/{host}/"),
            Perm("READWRITE", host_status_key(host), prefix=False),
            Perm("READWRITE", bgp_status_key(host), prefix=False)]


def cni_perms(host: str) -> list[Perm]:
    return [Perm("READ", PREFIX), Perm("READWRITE", endpoint_prefix(host)), Perm("READWRITE", IPAM_BLOCKS_PREFIX),
            Perm("READWRITE", IPAM_HANDLES_PREFIX), Perm("READWRITE", f"{IPAM_AFFINITIES_PREFIX}{host}/")]


def neutron_perms() -> list[Perm]:
    return [Perm("READ", PREFIX), *(Perm("READWRITE", kind_prefix(k)) for k in ("Endpoint", "Profile", "IPPool"))]


def roles(hosts: list[str], neutron: bool = False) -> dict[str, list[Perm]]:
    """Each user's own role (named like the user) and its permissions."""
    out = {agent_user(h): agent_perms(h) for h in hosts}
    out.update({cni_user(h): cni_perms(h) for h in hosts})
    if neutron:
        out[NEUTRON_USER] = neutron_perms()
    return out


def _ignore(store: EtcdStore, path: str, payload: dict[str, object], already: str) -> None:
    """One auth call; etcd saying it is done already (user exists, permission not granted) is fine."""
    try:
        store.admin(path, payload)
    except StoreError as e:
        if already not in str(e):
            raise


def provision(store: EtcdStore, passwords: dict[str, str], grants: dict[str, list[Perm]]) -> None:
    """Make root (passwords[ROOT_USER]) and every user of grants with its own role, then turn auth
    on. store: connected as root once auth is on (or before it is: then without a user)."""
    for user, password in passwords.items():
        _ignore(store, "/auth/user/add", {"name": user, "password": password}, "already exists")
        store.admin("/auth/user/changepw", {"name": user, "password": password})
    _ignore(store, "/auth/role/add", {"name": ROOT_USER}, "already exists")
    _ignore(store, "/auth/user/grant", {"user": ROOT_USER, "role": ROOT_USER}, "already exists")
    for role, perms in grants.items():
        _ignore(store, "/auth/role/add", {"name": role}, "already exists")
        have = store.admin("/auth/role/get", {"role": role}).get("perm") or []
        want = [p.request() for p in perms]
        for old in have:  # a permission this layout no longer grants goes
            if not any(old.get("key") == w["key"] and old.get("range_end", "") == w.get("range_end", "") and
                       old.get("permType", "READ") == w["permType"] for w in want):
                store.admin("/auth/role/revoke", {"role": role, "key": old.get("key", ""),
                                                  "range_end": old.get("range_end", "")})
        for w in want:
            store.admin("/auth/role/grant", {"name": role, "perm": w})
        _ignore(store, "/auth/user/grant", {"user": role, "role": role}, "already exists")
    store.admin("/auth/enable", {})
