"""tabby: a pure layer-3 network fabric for VMs and containers with first-class IPv6."""

__version__ = "0.1.0"
