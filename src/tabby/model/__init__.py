"""Typed resources, validation and the key layout. No I/O.

The names below are loaded on first use (PEP 562): importing ``tabby.model.keys`` or
``tabby.model.names`` must not pay for pydantic and every resource model (~250 ms here), which
the CNI plugin, started once per call, never needs on its normal path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_CODEC = ("InvalidResource", "decode", "encode", "key_of", "parse_documents", "to_plain", "validate")
_RESOURCES = ("BGPPeer", "Config", "ConfigSpec", "Endpoint", "EndpointSpec", "Host", "HostSpec", "IPPool",
              "IPPoolSpec", "Metadata", "Policy", "PolicySpec", "Profile", "ProfileSpec", "Rule",
              "derive_router_id", "effective_config", "refused_hosts")
_WHERE = {**dict.fromkeys(_CODEC, "tabby.model.codec"), **dict.fromkeys(_RESOURCES, "tabby.model.resources")}

__all__ = [
    "BGPPeer", "Config", "ConfigSpec", "Endpoint", "EndpointSpec", "Host", "HostSpec", "IPPool",
    "IPPoolSpec", "InvalidResource", "Metadata", "Policy", "PolicySpec", "Profile", "ProfileSpec",
    "Rule", "decode", "derive_router_id", "effective_config", "encode",
    "key_of", "parse_documents", "refused_hosts", "to_plain", "validate",
]

if TYPE_CHECKING:
    from tabby.model.codec import InvalidResource, decode, encode, key_of, parse_documents, to_plain, validate
    from tabby.model.resources import (
        BGPPeer,
        Config,
        ConfigSpec,
        Endpoint,
        EndpointSpec,
        Host,
        HostSpec,
        IPPool,
        IPPoolSpec,
        Metadata,
        Policy,
        PolicySpec,
        Profile,
        ProfileSpec,
        Rule,
        derive_router_id,
        effective_config,
        refused_hosts,
    )


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tabby.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value
