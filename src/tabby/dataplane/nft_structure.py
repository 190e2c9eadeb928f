"""The shapes of the one ``inet tabby`` table, as the policy calculation produces them and the
dataplane renders and writes them. Pure data, no I/O.

Why here and not beside the calculation in agent/: the dataplane must not import the agent
(the layers run one way), and both need these types. ``DesiredPolicy`` is what the reconciler
reads from the calculation, as a protocol, for the same reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Protocol

Element = tuple[str, ...]

# the sets every table has; the rest are named after what they stand for
WL_IF, WL_SRC6, WL_SRC4, WL_MAC = "wl_if", "wl_src6", "wl_src4", "wl_mac"
WL_OPEN = "wl_open"  # workload interfaces with port security off: no guards


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@lru_cache(maxsize=65536)  # asked once per endpoint and policy on every rebuild: hash once
def applies_set(kind: str, name: str) -> str:
    """Local interfaces a policy ("po") or profile ("pr") applies to."""
    return f"{kind}_{_h(name)}"


@lru_cache(maxsize=65536)
def selector_set(text: str, version: int) -> str:
    """Addresses (IPv6 or IPv4) of every endpoint a rule's selector matches, on any host."""
    return f"se_{_h(text)}_{version}"


@dataclass(frozen=True)
class PolicyPlan:
    """One policy or profile as the renderer needs it: rules in order, and the set naming it."""

    kind: str  # "po" | "pr"
    name: str
    order: float
    ingress: tuple[Any, ...]  # model Rules
    egress: tuple[Any, ...]

    @property
    def applies(self) -> str:
        return applies_set(self.kind, self.name)


@dataclass(frozen=True)
class Structure:
    policies: tuple[PolicyPlan, ...] = ()  # by order, then name
    profiles: tuple[PolicyPlan, ...] = ()  # by name
    selectors: tuple[str, ...] = ()  # every selector a rule uses, sorted
    pools6: tuple[str, ...] = ()
    pools4: tuple[str, ...] = ()
    nat6: tuple[str, ...] = ()  # pools with nat_outgoing
    nat4: tuple[str, ...] = ()
    nat64_pool4: str | None = None  # this host translates: its NAT64 pool is masqueraded on the way out
    nat64_pools: tuple[str, ...] = ()  # the IPv6 pools it translates for (no other source may use it)
    workload_prefixes: tuple[str, ...] = ("tap", "tby", "vnet")  # unknown interfaces so named: dropped
    # the host's own links (lo, those holding its fabric addresses, its BGP peers'): never dropped
    # as unknown workloads, whatever a prefix covers (a Config "en" cut every host off the Store)
    host_links: tuple[str, ...] = ("lo",)

    def set_names(self) -> dict[str, str | list[str]]:
        """Every named set and its nftables type (read on every element patch: computed once)."""
        return self._set_names

    @cached_property
    def _set_names(self) -> dict[str, str | list[str]]:
        sets: dict[str, str | list[str]] = {
            WL_IF: "ifname", WL_SRC6: ["ifname", "ipv6_addr"], WL_SRC4: ["ifname", "ipv4_addr"],
            WL_MAC: ["ifname", "ether_addr"], WL_OPEN: "ifname"}
        for p in (*self.policies, *self.profiles):
            sets[p.applies] = "ifname"
        for s in self.selectors:
            sets[selector_set(s, 6)] = "ipv6_addr"
            sets[selector_set(s, 4)] = "ipv4_addr"
        return sets


class DesiredPolicy(Protocol):
    """What the policy reconciler reads: the structure, the whole desired element sets, and the
    element changes since it last asked."""

    def structure(self) -> Structure: ...

    def desired_elements(self) -> dict[str, AbstractSet[Element]]: ...

    def take_delta(self) -> dict[str, dict[Element, bool]]: ...
