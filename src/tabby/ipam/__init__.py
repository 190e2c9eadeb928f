"""Block-affinity IP address management on the Store's compare-and-swap."""

from tabby.ipam.allocator import IPAM, Assigned
from tabby.ipam.blocks import AddressInUse, IpamError, NoPool, NotAllocated, PoolExhausted, StaleRelease

__all__ = ["IPAM", "AddressInUse", "Assigned", "IpamError", "NoPool", "NotAllocated", "PoolExhausted",
           "StaleRelease"]
