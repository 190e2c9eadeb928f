"""The Store contract and its backends; ``open_store`` is how a composition root picks one."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from tabby.store.base import (
    KV,
    AlreadyExists,
    BadResponse,
    Event,
    HistoryGone,
    Lease,
    NotFound,
    RevisionMismatch,
    Store,
    StoreCorrupt,
    StoreError,
    StoreFault,
    StoreFull,
    StoreIOError,
    StoreLocked,
    StoreReadOnly,
    Unavailable,
    Watch,
)

DEFAULT_STORE_URL = "sqlite:///var/lib/tabby/tabby.db"

__all__ = [
    "DEFAULT_STORE_URL", "KV", "AlreadyExists", "BadResponse", "Event", "HistoryGone", "Lease", "NotFound",
    "RevisionMismatch", "Store", "StoreCorrupt", "StoreError", "StoreFault", "StoreFull", "StoreIOError",
    "StoreLocked", "StoreReadOnly", "Unavailable", "Watch", "open_store", "store_url",
]


def store_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("TABBY_STORE") or DEFAULT_STORE_URL


def open_store(url: str) -> Store:
    """``sqlite:///abs/path.db`` or ``etcd://host:port``."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from tabby.store.sqlite import SqliteStore

        path = parsed.path if not parsed.netloc else f"/{parsed.netloc}{parsed.path}"
        if not path or path == "/":
            raise ValueError(f"store URL {url!r}: sqlite needs a file path, e.g. sqlite:///var/lib/tabby/tabby.db")
        return SqliteStore(path)
    if parsed.scheme == "etcd":
        from tabby.store.etcd import EtcdStore

        if not parsed.hostname:
            raise ValueError(f"store URL {url!r}: etcd needs host:port, e.g. etcd://127.0.0.1:2379")
        return EtcdStore(parsed.hostname, parsed.port or 2379)
    raise ValueError(f"store URL {url!r}: scheme must be sqlite:// or etcd://")
