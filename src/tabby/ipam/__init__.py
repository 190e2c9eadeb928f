"""Block-affinity IP address management on the Store's compare-and-swap."""

from tabby.ipam.allocator import IPAM, Assigned, Snapshot
from tabby.ipam.blocks import (
    AddressInUse,
    Contention,
    CorruptRecord,
    IpamError,
    NoPool,
    NotAllocated,
    PoolExhausted,
    StaleRelease,
)

__all__ = ["IPAM", "AddressInUse", "Assigned", "Contention", "CorruptRecord", "IpamError", "NoPool", "NotAllocated",
           "PoolExhausted", "Snapshot", "StaleRelease"]
