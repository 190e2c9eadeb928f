"""Writes endpoint status and host liveness to the Store, off the programming path.

The agent's loop only records the latest status per endpoint (cheap, no I/O); this thread
writes what changed, coalescing bursts, and keeps what it could not write for the next try when
the Store is unreachable. Liveness is a heartbeat record carrying its own expiry (``expires``),
so it works the same on SQLite and etcd: a reader treats a host whose record has expired as down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

from tabby.model.keys import endpoint_status_key, host_status_key
from tabby.store import NotFound, Store, StoreError

log = logging.getLogger(__name__)


class StatusWriter:
    def __init__(self, store: Store, host: str, *, ttl_s: float = 30.0) -> None:
        self.store = store
        self.host = host
        self.ttl_s = ttl_s
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._written: dict[str, dict[str, Any]] = {}
        self._docs: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._stop = False
        self.host_info: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(5)

    def set(self, endpoint: str, state: str | None, reason: str = "") -> None:
        """state: up | down | error, or None to remove the record (endpoint gone from this host)."""
        status = None if state is None else {"host": self.host, "state": state, "reason": reason}
        with self._cond:
            if status is not None and self._written.get(endpoint) == status and endpoint not in self._pending:
                return
            self._pending[endpoint] = status
            self._cond.notify()

    def set_doc(self, key: str, doc: dict[str, Any]) -> None:
        """Any other record this host owns (BGP session status), written as it is."""
        with self._cond:
            self._docs[key] = doc
            self._cond.notify()

    def current(self, endpoint: str) -> dict[str, Any] | None:
        with self._cond:
            if endpoint in self._pending:
                return self._pending[endpoint]
            return self._written.get(endpoint)

    def _run(self) -> None:
        next_beat = 0.0
        while True:
            with self._cond:
                if self._stop:
                    return
                timeout = max(0.0, next_beat - time.monotonic())
                if not self._pending and timeout > 0:
                    self._cond.wait(timeout)
                batch, self._pending = self._pending, {}
                docs, self._docs = self._docs, {}
            failed: dict[str, dict[str, Any] | None] = {}
            for name, status in batch.items():
                try:
                    key = endpoint_status_key(self.host, name)
                    if status is None:
                        with contextlib.suppress(NotFound):
                            self.store.delete(key)
                        self._written.pop(name, None)
                    else:
                        self.store.put(key, json.dumps({**status, "at": time.time()}).encode())
                        self._written[name] = status
                except StoreError as e:
                    failed[name] = status
                    log.warning("status of %s not written (%s); will retry", name, e)
            for key, doc in docs.items():
                try:
                    self.store.put(key, json.dumps(doc).encode())
                except StoreError as e:
                    log.warning("%s not written: %s", key, e)
            if time.monotonic() >= next_beat:
                try:
                    now = time.time()
                    self.store.put(host_status_key(self.host), json.dumps(
                        {"host": self.host, "heartbeat": now, "expires": now + self.ttl_s, **self.host_info}).encode())
                    next_beat = time.monotonic() + self.ttl_s / 3
                except StoreError as e:
                    log.warning("host heartbeat not written: %s", e)
                    next_beat = time.monotonic() + 1.0
            if failed:
                with self._cond:
                    for name, status in failed.items():
                        self._pending.setdefault(name, status)
                    self._cond.wait(1.0)
