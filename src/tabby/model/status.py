"""The records agents write about themselves (endpoint status, host liveness, BGP sessions),
decoded as strictly as resources: any bytes become one of these or ``InvalidResource``.

They are written by one agent each and read by the CLI, ``diagnose`` and the Neutron driver;
a hostile or damaged one costs its reader one warning line, never the whole listing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from tabby.model.codec import InvalidResource, _describe, load_json
from tabby.model.keys import STATUS_PREFIX
from tabby.model.names import check_name

# A reason is a kernel or daemon message plus a conflict's explanation: a few hundred bytes.
MAX_REASON_CHARS = 4096
MAX_SESSIONS = 4096  # BGP sessions one host can report (a full mesh of 4,000 hosts)

Text = Annotated[str, Field(max_length=MAX_REASON_CHARS)]


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """A kernel's or daemon's message as a status field: control characters folded to spaces,
    cut to the limit, so that what an agent writes always decodes."""
    folded = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"
Timestamp = Annotated[StrictFloat, Field(ge=0)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class EndpointStatus(_Record):
    host: str
    state: Literal["up", "down", "error", "conflict"]
    reason: Text = ""
    at: Timestamp = 0.0


class CorruptReport(_Record):
    key: Text
    field: Text
    error: Text


class NeighbourTableStatus(_Record):
    """Whether the kernel's (machine-wide) neighbour tables fit this host's endpoints: sized_here
    when the agent could raise them (the root namespace), else note says who must."""

    sized_here: StrictBool
    fits: StrictBool
    wanted_gc_thresh3: Annotated[StrictInt, Field(ge=0)]
    gc_thresh3: Annotated[dict[Literal["ipv6", "ipv4"], Annotated[StrictInt, Field(ge=0)]], Field(max_length=2)] = \
        Field(default_factory=dict)
    note: Text = ""


class Nat64Status(_Record):
    """This host's translator and resolver (dataplane/nat64.py): up or down, how often they were
    started again after dying, the last error."""

    tayga: Literal["up", "down"]
    unbound: Literal["up", "down"] | None = None  # None: no DNS64 (Config dns64_server unset)
    restarts: Annotated[StrictInt, Field(ge=0)] = 0
    error: Text | None = None


class HostStatus(_Record):
    host: str
    heartbeat: Timestamp  # when this record was written
    # None: the record is held by a store lease (etcd), which the agent renews without writing,
    # and the store deletes it when renewals stop; else the time after which the host is down
    expires: Timestamp | None
    started: Timestamp | None = None
    degraded: Text | None = None  # why the agent cannot do all it should (the Store, nftables, ...)
    corrupt: Annotated[list[CorruptReport], Field(max_length=1000)] = Field(default_factory=list)
    refused: Annotated[list[Text], Field(max_length=1000)] = Field(default_factory=list)
    neighbour_table: NeighbourTableStatus | None = None  # agent/links.NeighbourTables
    nat64: Nat64Status | None = None  # None: no workload on a nat64 pool here


    def alive(self, now: float) -> bool:
        return self.expires is None or self.expires > now

    def age(self, now: float) -> float | None:
        """Seconds since the agent last showed it is alive; None while a lease vouches for it."""
        return None if self.expires is None else round(now - self.heartbeat, 1)


class BgpSession(_Record):
    name: Text = ""
    state: Text = ""
    proto_state: Text = ""
    since: Text = ""
    imported: Annotated[StrictInt, Field(ge=0)] = 0
    exported: Annotated[StrictInt, Field(ge=0)] = 0
    description: Text = ""
    error: Text | None = None
    why: Text | None = None  # why a session that should be up is not (a TCP MD5 password mismatch)


class BgpStatus(_Record):
    host: str
    sessions: Annotated[list[BgpSession], Field(max_length=MAX_SESSIONS)] = Field(default_factory=list)
    error: Text | None = None
    at: Timestamp = 0.0


_KINDS: dict[str, tuple[type[_Record], int]] = {
    # directory -> (record type, number of key segments after it: host[/endpoint])
    "endpoints": (EndpointStatus, 2),
    "hosts": (HostStatus, 1),
    "bgp": (BgpStatus, 1),
}


def decode_status(key: str, value: bytes) -> Any:
    """A status record -> its model; InvalidResource naming the key and field otherwise,
    including a record whose ``host`` is not the host its key names."""
    rest = key[len(STATUS_PREFIX):].split("/") if key.startswith(STATUS_PREFIX) else []
    kind = _KINDS.get(rest[0]) if rest else None
    if kind is None or len(rest) != 1 + kind[1] or not all(rest[1:]):
        raise InvalidResource(key, ["(key): not a status key of tabby's layout"])
    try:
        for segment in rest[1:]:
            check_name(segment)
    except ValueError as e:
        raise InvalidResource(key, [f"(key): {e}"]) from None
    doc = load_json(key, value)
    try:
        record = kind[0].model_validate(doc)
    except ValidationError as e:
        raise InvalidResource(key, _describe(e)) from None
    if record.host != rest[1]:  # type: ignore[attr-defined]
        raise InvalidResource(key, [f"host: record says {record.host!r} but its key says {rest[1]!r}"])  # type: ignore[attr-defined]
    return record
