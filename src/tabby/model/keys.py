"""The Store key layout, written down in one place.

    /tabby/v1/hosts/<name>                      Host
    /tabby/v1/ippools/<name>                    IPPool
    /tabby/v1/endpoints/<host>/<name>           Endpoint, under its spec.host: an agent watches
                                                its own host's range (a live migration is a
                                                create under the new host, then a delete)
    /tabby/v1/profiles/<name>                   Profile
    /tabby/v1/policies/<name>                   Policy
    /tabby/v1/bgppeers/<name>                   BGPPeer
    /tabby/v1/config/<global|host.NAME>         Config
    /tabby/v1/ipam/...                          IPAM's own records (blocks, affinities, handles)
    /tabby/status/endpoints/<host>/<name>       endpoint status, written by that host's agent
    /tabby/status/hosts/<host>                  host liveness, written by its agent
    /tabby/status/bgp/<host>                    BGP sessions as that host's bird sees them

Writers put whole JSON documents. Agents watch each kind's directory but the endpoints', and
their own host's block affinities; their own host's endpoints as they come; and every other
host's endpoints paced, in batches (docs/architecture.md, "What agents watch"). Why status is
not under ``/tabby/v1/``: every agent writes it and no agent reads it, and a watch is one key
range, so status inside the watched range would reach every agent of the fabric (the cost of
each agent growing with the number of hosts, the fabric's with its square).
"""

from __future__ import annotations

ROOT = "/tabby/"  # everything tabby keeps: what whole-Store readers (``tabby status``) list
PREFIX = "/tabby/v1/"  # resources and IPAM

KIND_DIRS: dict[str, str] = {
    "Host": "hosts",
    "IPPool": "ippools",
    "Endpoint": "endpoints",
    "Profile": "profiles",
    "Policy": "policies",
    "BGPPeer": "bgppeers",
    "Config": "config",
}
DIR_KINDS = {v: k for k, v in KIND_DIRS.items()}

# Names people type on the command line, all mapping to a kind.
KIND_ALIASES: dict[str, str] = {}
for _kind, _dir in KIND_DIRS.items():
    for _alias in (_kind.lower(), _dir, _dir.rstrip("s")):
        KIND_ALIASES[_alias] = _kind
KIND_ALIASES.update({"pool": "IPPool", "pools": "IPPool", "ep": "Endpoint", "eps": "Endpoint",
                     "policy": "Policy", "peer": "BGPPeer", "peers": "BGPPeer"})

STATUS_PREFIX = ROOT + "status/"
IPAM_PREFIX = PREFIX + "ipam/"


def kind_prefix(kind: str) -> str:
    return f"{PREFIX}{KIND_DIRS[kind]}/"


ENDPOINTS_PREFIX = PREFIX + "endpoints/"


def resource_key(kind: str, name: str) -> str:
    """The key of a resource of any kind but Endpoint, whose key also names its host."""
    assert kind != "Endpoint", "an Endpoint's key names its host: endpoint_key(host, name)"
    return kind_prefix(kind) + name


def endpoint_prefix(host: str) -> str:
    return f"{ENDPOINTS_PREFIX}{host}/"


def endpoint_key(host: str, name: str) -> str:
    return endpoint_prefix(host) + name


def endpoint_host(key: str) -> str | None:
    """The host segment of an Endpoint key; None for any other key."""
    if not key.startswith(ENDPOINTS_PREFIX):
        return None
    parts = key[len(ENDPOINTS_PREFIX):].split("/")
    return parts[0] if len(parts) == 2 and all(parts) else None


def parse_key(key: str) -> tuple[str, str] | None:
    """(kind, name) for a resource key; None for status, IPAM or foreign keys."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX):].split("/")
    if parts[0] == "endpoints":
        return ("Endpoint", parts[2]) if len(parts) == 3 and parts[1] and parts[2] else None
    if len(parts) != 2 or parts[0] not in DIR_KINDS or not parts[1]:
        return None
    return DIR_KINDS[parts[0]], parts[1]


def resolve_kind(text: str) -> str:
    kind = KIND_ALIASES.get(text.lower())
    if kind is None:
        raise ValueError(f"unknown kind {text!r}; known: {', '.join(KIND_DIRS)}")
    return kind


def endpoint_status_key(host: str, name: str) -> str:
    return f"{STATUS_PREFIX}endpoints/{host}/{name}"


def host_status_key(host: str) -> str:
    return f"{STATUS_PREFIX}hosts/{host}"


def bgp_status_key(host: str) -> str:
    return f"{STATUS_PREFIX}bgp/{host}"


def _cidr_segment(cidr: object) -> str:
    """'fd00:e::/122' -> 'fd00:e::-122': a CIDR as one key segment."""
    return str(cidr).replace("/", "-")


def ipam_block_key(cidr: object) -> str:
    return f"{IPAM_PREFIX}blocks/{_cidr_segment(cidr)}"


def ipam_affinity_prefix(host: str) -> str:
    return f"{IPAM_PREFIX}affinities/{host}/"


def ipam_affinity_key(host: str, cidr: object) -> str:
    return ipam_affinity_prefix(host) + _cidr_segment(cidr)


def ipam_handle_key(handle: str) -> str:
    from urllib.parse import quote

    return f"{IPAM_PREFIX}handles/{quote(handle, safe='')}"


IPAM_BLOCKS_PREFIX = IPAM_PREFIX + "blocks/"
IPAM_AFFINITIES_PREFIX = IPAM_PREFIX + "affinities/"
IPAM_HANDLES_PREFIX = IPAM_PREFIX + "handles/"
IPAM_GC_KEY = IPAM_PREFIX + "gc"
