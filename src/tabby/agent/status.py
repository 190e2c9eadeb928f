"""Writes endpoint status and host liveness to the Store, off the programming path.

The agent's loop only records the latest status per endpoint (cheap, no I/O); this thread
writes what changed, coalescing bursts, and keeps what it could not write for the next try when
the Store is unreachable. Liveness: where the Store has leases (etcd) the host record is put
once with a lease of ``ttl_s`` and the lease renewed every ``ttl_s / 3`` (no write, so no watch
event anywhere; the record is written again only when what it says changes, and etcd deletes it
when renewals stop); where it has not (SQLite), the record carries its own expiry
(``expires``) and is rewritten every ``ttl_s / 3``, under ``/tabby/status/`` where no agent
watches. A reader treats an expired or missing record as down.

Failure: a write that fails (the Store unreachable, locked, full, read-only, corrupt) ends the
pass; what was not written stays queued (a newer status for the same endpoint replaces it) and
the whole pass, heartbeat included, is tried again after a back-off that doubles from
``retry_s`` to ``max_retry_s`` (1 s .. 30 s), one log line per retry naming the attempt and the
error. New statuses arriving meanwhile wait for that retry instead of hammering a failing Store.
``failing`` says why while it lasts (health reports it). The thread survives any exception.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

from tabby.model.keys import endpoint_status_key, host_status_key
from tabby.store import Lease, NotFound, PermissionDenied, Store, StoreError, StoreFault, Unavailable

log = logging.getLogger(__name__)


class StatusWriter:
    def __init__(self, store: Store, host: str, *, ttl_s: float = 30.0, retry_s: float = 1.0,
                 max_retry_s: float = 30.0) -> None:
        self.store = store
        self.host = host
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._inflight: dict[str, dict[str, Any] | None] = {}  # the batch being written now
        self._written: dict[str, dict[str, Any]] = {}
        self._docs: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._failing: str | None = None
        self.host_info: dict[str, Any] = {}
        self._lease: Lease | None = None
        self._lease_doc: dict[str, Any] | None = None  # what the leased record says
        self._leases = True  # until the Store says it has none
        self._keep: set[str] | None = None  # forget_others: the endpoints this host has, until looked at
        self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)

    @property
    def failing(self) -> str | None:
        """Why status and heartbeat writes fail, while they do; None once a retry got through."""
        return self._failing

    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the writer; a last heartbeat that has already expired says "stopped" at once,
        instead of leaving readers to wait out the TTL."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(5)
        now = time.time()
        try:  # written without the lease, so revoking it does not take this record along
            self.store.put(host_status_key(self.host), json.dumps(
                {"host": self.host, "heartbeat": now, "expires": now, **self.host_info}).encode())
            if self._lease is not None:
                self._lease.revoke()
        except StoreError as e:
            log.warning("last heartbeat (stopped) not written: %s", e)

    def set(self, endpoint: str, state: str | None, reason: str = "") -> None:
        """state: up | down | error, or None to remove the record (endpoint gone from this host)."""
        status = None if state is None else {"host": self.host, "state": state, "reason": reason}
        with self._cond:
            # the same as what the Store will hold once what is in flight is written: nothing to do
            # (compared with the in-flight value first: up, then down being written, then up again
            # must be written, though "up" is what was written last)
            last = self._inflight[endpoint] if endpoint in self._inflight else self._written.get(endpoint)
            if status is not None and last == status and endpoint not in self._pending:
                return
            self._pending[endpoint] = status
            self._cond.notify()

    def forget_others(self, keep: set[str]) -> None:
        """Once the agent has its first full view: this host's status records of endpoints not in
        keep (deleted, or moved away, while the agent was down) are removed. Nothing else removes
        them: they said "up" for ever, and after a move the endpoint read as up on two hosts."""
        with self._cond:
            self._keep = set(keep)
            self._cond.notify()

    def set_doc(self, key: str, doc: dict[str, Any]) -> None:
        """Any other record this host owns (BGP session status), written as it is."""
        with self._cond:
            self._docs[key] = doc
            self._cond.notify()

    def _run(self) -> None:
        next_beat = 0.0  # monotonic time the heartbeat is due
        retry_at: float | None = None  # while failing: nothing is tried before this
        attempt = 0
        denied = ""  # the permission refusal logged last
        while True:
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    due = now if self._pending or self._docs or self._keep is not None else next_beat
                    until = retry_at if retry_at is not None else due  # a retry waits out its back-off
                    if now >= until:
                        break
                    self._cond.wait(until - now)
                if self._stop:
                    return
                batch, self._pending = self._pending, {}
                docs, self._docs = self._docs, {}
                self._inflight = dict(batch)
            beat = time.monotonic() >= next_beat
            try:
                failed = self._look_for_others(batch)
                if failed is None:
                    failed = self._write(batch, docs, beat)
                else:
                    self._requeue(batch, docs)
            finally:
                with self._cond:
                    self._inflight = {}
            if failed is None:
                if beat:
                    next_beat = time.monotonic() + self.ttl_s / 3
                if attempt:
                    log.info("status writer: writes to the store work again after %d failed attempt(s)", attempt)
                attempt, retry_at, self._failing, denied = 0, None, None, ""
                continue
            what, error = failed
            attempt += 1
            # at most a third of the TTL: a heartbeat that waited out a longer back-off let the lease
            # (or the expiry the record states) pass, and the host read as dead once the Store was back
            delay = min(self.retry_s * 2 ** min(attempt - 1, 20), self.max_retry_s, self.ttl_s / 3)
            retry_at = time.monotonic() + delay
            self._failing = f"status writes: {what} not written: {error} (attempt {attempt}, next try in {delay:g}s)"
            with self._cond:
                queued = len(self._pending) + len(self._docs)
            # a refused permission stays refused until an operator grants it: said once, not per retry
            again = isinstance(error, PermissionDenied) and str(error) == denied
            denied = str(error) if isinstance(error, PermissionDenied) else denied
            log.log(logging.DEBUG if again else logging.WARNING,
                    "status writer: %s not written, attempt %d: %s; retrying in %gs (%d record(s) queued)",
                    what, attempt, error, delay, queued)

    def _write(self, batch: dict[str, dict[str, Any] | None], docs: dict[str, dict[str, Any]],
               beat: bool) -> tuple[str, Exception] | None:
        """One pass: the heartbeat if due, statuses, other records. The first failure ends
        it (a Store that refused one write will likely refuse the next) and puts back what was
        not written; returns what failed and why. A record that fails for a reason of its own
        (a bug, or a Store that refuses that request rather than failing) is dropped, so that
        it cannot hold up every other record behind it."""
        queue: dict[str, Any] | None = None  # where the record being written came from
        what, item = "status", ""
        try:
            if beat:  # liveness first: a reader takes a host whose heartbeat expired for down
                what = "host heartbeat"
                self._beat()
            for name in list(batch):
                what, queue, item = f"status of {name}", batch, name
                status = batch[name]
                key = endpoint_status_key(self.host, name)
                if status is None:
                    with contextlib.suppress(NotFound):
                        self.store.delete(key)
                    self._written.pop(name, None)
                else:
                    self.store.put(key, json.dumps({**status, "at": time.time()}).encode())
                    self._written[name] = status
                del batch[name]
            for key in list(docs):
                what, queue, item = key, docs, key
                self.store.put(key, json.dumps(docs[key]).encode())
                del docs[key]
        except Exception as e:  # a Store error, or a bug: the thread goes on either way
            if not isinstance(e, (StoreFault, Unavailable)):
                log.error("status writer: %s dropped: %r", what, e, exc_info=not isinstance(e, StoreError))
                if queue is not None:
                    queue.pop(item, None)
            self._requeue(batch, docs)
            return what, e
        return None

    def _look_for_others(self, batch: dict[str, dict[str, Any] | None]) -> tuple[str, Exception] | None:
        """forget_others' listing, in this thread: what it finds is queued for removal (not what is
        set since, in the batch about to be written or queued after it)."""
        keep = self._keep
        if keep is None:
            return None
        try:
            kvs, _ = self.store.list(endpoint_status_key(self.host, ""))
        except Exception as e:  # tried again with the next pass
            return "the listing of this host's endpoint statuses", e
        with self._cond:
            self._keep = None
            stale = [n for kv in kvs if (n := kv.key.rsplit("/", 1)[1]) not in keep and n not in self._pending
                     and n not in self._written and n not in batch]
            for name in stale:
                self._pending[name] = None
            if stale:
                log.info("removing the status of %d endpoint(s) this host no longer has: %s", len(stale),
                         ", ".join(stale[:10]) + (" ..." if len(stale) > 10 else ""))
        return None

    def _beat(self) -> None:
        doc = {"host": self.host, **self.host_info}
        key = host_status_key(self.host)
        if self._leases:
            if self._lease is not None and self._lease_doc == doc:
                if self._lease.keep_alive():
                    return
                log.warning("status writer: the liveness lease expired (the Store was out of reach for longer "
                            "than %g s); taking a new one", self.ttl_s)
                self._lease = None
            if self._lease is None:
                self._lease = self.store.grant_lease(self.ttl_s)
                self._leases = self._lease is not None
            if self._lease is not None:
                self._lease_doc = None
                try:
                    self.store.put(key, json.dumps({**doc, "heartbeat": time.time(), "expires": None}).encode(),
                                   lease=self._lease)
                except Exception:
                    # a lease the put could not use (it expired during an outage: etcd says "requested
                    # lease not found", for ever): the next try takes a new one
                    self._lease = None
                    raise
                self._lease_doc = doc
                return
        now = time.time()
        self.store.put(key, json.dumps({**doc, "heartbeat": now, "expires": now + self.ttl_s}).encode())

    def _requeue(self, batch: dict[str, dict[str, Any] | None], docs: dict[str, dict[str, Any]]) -> None:
        """Put back what was not written; anything set meanwhile is newer and wins."""
        with self._cond:
            for name, status in batch.items():
                self._pending.setdefault(name, status)
            for key, doc in docs.items():
                self._docs.setdefault(key, doc)
