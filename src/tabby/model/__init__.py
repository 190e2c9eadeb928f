"""Typed resources, validation and the key layout. No I/O."""

from tabby.model.codec import (
    InvalidResource,
    decode,
    encode,
    key_of,
    parse_documents,
    to_plain,
    validate,
)
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

__all__ = [
    "BGPPeer", "Config", "ConfigSpec", "Endpoint", "EndpointSpec", "Host", "HostSpec", "IPPool",
    "IPPoolSpec", "InvalidResource", "Metadata", "Policy", "PolicySpec", "Profile", "ProfileSpec",
    "Rule", "decode", "derive_router_id", "effective_config", "encode",
    "key_of", "parse_documents", "refused_hosts", "to_plain", "validate",
]
