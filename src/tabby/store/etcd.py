"""The etcd v3 Store, for fabrics of many hosts.

Talks to etcd's JSON gateway through etcd3gw's client (session, API-path discovery; plain HTTP:
TLS and several members are not wired yet), but
issues ``range``, ``txn``, ``compaction`` and ``watch`` requests itself: the Store contract
needs the header revision of a listing, compare-and-swap on ``mod_revision``, and the watch's
``compact_revision`` signal, which etcd3gw's helpers drop. Every write is one transaction, so
a lost compare-and-swap writes nothing.

Errors name the URL and are typed: no ``requests``, etcd3gw, ``KeyError`` or ``ValueError``
leaves this module. Unreachable, timed out, or an HTTP 5xx (etcd without a leader, shutting
down, overloaded) is ``Unavailable``; a reply that is not the v3 API's JSON is ``BadResponse``;
any other refusal (HTTP 4xx) is a plain ``StoreError`` carrying etcd's own message.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (
    ApiVersionDiscoveryFailedError,
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
    InternalServerError,
)

from tabby.store.base import (
    KV,
    AlreadyExists,
    BadResponse,
    Event,
    HistoryGone,
    Lease,
    NotFound,
    RevisionMismatch,
    StoreError,
    Unavailable,
)


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def _prefix_end(prefix: str) -> bytes:
    """etcd's range end for a prefix: the prefix with its last byte incremented."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # empty prefix: every key


def _kv(d: dict[str, Any]) -> KV:
    return KV(_unb64(d["key"]).decode(), _unb64(d.get("value")), int(d.get("mod_revision", 0)),
              int(d.get("create_revision", 0)))


_DETAIL_MAX = 300  # characters of an error body kept in a message


def _short(text: object) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= _DETAIL_MAX else t[:_DETAIL_MAX] + "..."


def _etcd_error(url: str, e: Exception) -> StoreError:
    """The typed Store error for what etcd3gw or requests raised talking to url."""
    if isinstance(e, requests.exceptions.JSONDecodeError):  # a RequestException too: test it first
        return BadResponse(url, f"not JSON: {_short(e)}")
    if isinstance(e, requests.RequestException):
        return Unavailable(f"store {url}: unreachable ({_short(e)})")
    if isinstance(e, ApiVersionDiscoveryFailedError):
        return BadResponse(url, _short(e))
    detail = _short(" ".join(str(x) for x in (getattr(e, "detail_text", None), e) if x))  # the body, then the reason
    if isinstance(e, (ConnectionFailedError, ConnectionTimeoutError, InternalServerError)):
        return Unavailable(f"store {url}: unavailable ({detail})")
    return StoreError(f"store {url}: {detail}")


class EtcdStore:
    def __init__(self, host: str = "127.0.0.1", port: int = 2379, *, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._client = Etcd3Client(host=host, port=port, timeout=timeout)  # it brackets an IPv6 host itself
        self.url = self._client.base_url

    def __repr__(self) -> str:
        return f"EtcdStore({self.host}:{self.port})"

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._client.post(self._client.get_url(path), json=payload)
        except (requests.RequestException, Etcd3Exception) as e:
            raise _etcd_error(self.url, e) from e
        if not isinstance(resp, dict):
            raise BadResponse(self.url, f"{path}: expected a JSON object, got {_short(resp)}")
        return resp

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn a reply without the fields the v3 API always sends into BadResponse."""
        try:
            yield
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise BadResponse(self.url, f"{what}: {type(e).__name__}: {_short(e)}") from e

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        resp = self._post("/kv/range", {"key": _b64(key)})
        with self._reading("range"):
            kvs = resp.get("kvs") or []
            return _kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[KV], int]:
        resp = self._post("/kv/range", {"key": _b64(prefix or b"\0"), "range_end": _b64(_prefix_end(prefix)),
                                        "sort_order": "ASCEND", "sort_target": "KEY"})
        with self._reading("range"):
            return [_kv(d) for d in resp.get("kvs") or []], int(resp["header"]["revision"])

    def revision(self) -> int:
        resp = self._post("/kv/range", {"key": _b64("\0"), "count_only": True})
        with self._reading("range"):
            return int(resp["header"]["revision"])

    # -- writes --------------------------------------------------------------------------

    def _txn(self, key: str, compare: list[dict[str, Any]], op: dict[str, Any]) -> tuple[bool, int, KV | None]:
        resp = self._post("/kv/txn", {
            "compare": compare,
            "success": [op],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        with self._reading("txn"):
            rev = int(resp["header"]["revision"])
            if resp.get("succeeded"):
                return True, rev, None
            rng = (resp.get("responses") or [{}])[0].get("response_range", {})
            kvs = rng.get("kvs") or []
            return False, rev, _kv(kvs[0]) if kvs else None

    def create(self, key: str, value: bytes) -> int:
        ok, rev, _ = self._txn(
            key,
            [{"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            {"request_put": {"key": _b64(key), "value": _b64(value)}},
        )
        if not ok:
            raise AlreadyExists(key)
        return rev

    def update(self, key: str, value: bytes, expected_revision: int) -> int:
        ok, rev, current = self._txn(
            key,
            [{"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": expected_revision}],
            {"request_put": {"key": _b64(key), "value": _b64(value)}},
        )
        if not ok:
            if current is None:
                raise NotFound(key)
            raise RevisionMismatch(key, expected_revision, current.mod_revision)
        return rev

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        payload = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            if not isinstance(lease, EtcdLease):
                raise StoreError(f"store {self.url}: not a lease of this store: {lease!r}")
            payload["lease"] = str(lease.id)
        resp = self._post("/kv/put", payload)
        with self._reading("put"):
            return int(resp["header"]["revision"])

    def grant_lease(self, ttl_s: float) -> EtcdLease:
        resp = self._post("/lease/grant", {"TTL": max(1, round(ttl_s))})
        with self._reading("lease grant"):
            return EtcdLease(self, int(resp["ID"]))

    def delete(self, key: str, expected_revision: int | None = None) -> int:
        if expected_revision is None:
            compare = [{"key": _b64(key), "result": "GREATER", "target": "CREATE", "create_revision": 0}]
        else:
            compare = [{"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": expected_revision}]
        ok, rev, current = self._txn(key, compare, {"request_delete_range": {"key": _b64(key)}})
        if not ok:
            if current is None:
                raise NotFound(key)
            raise RevisionMismatch(key, expected_revision or 0, current.mod_revision)
        return rev

    def compact(self, revision: int) -> None:
        try:
            self._post("/kv/compaction", {"revision": revision, "physical": True})
        except StoreError as e:
            if "compacted" not in str(e):  # already compacted that far: nothing to do
                raise

    def watch(self, prefix: str, after_revision: int) -> EtcdWatch:
        return EtcdWatch(self, prefix, after_revision)

    def close(self) -> None:
        self._client.session.close()


class EtcdLease:
    """An etcd lease: renewed with keep-alive requests, which are not writes (no revision, no
    watch event), so liveness on etcd costs the watchers nothing."""

    def __init__(self, store: EtcdStore, lease_id: int) -> None:
        self.store, self.id = store, lease_id

    def __repr__(self) -> str:
        return f"EtcdLease({self.id:x})"

    def keep_alive(self) -> bool:
        resp = self.store._post("/lease/keepalive", {"ID": str(self.id)})
        with self.store._reading("lease keepalive"):
            result = resp.get("result", resp)  # the gateway streams {"result": {...}}
            return int(result.get("TTL", 0)) > 0

    def revoke(self) -> None:
        try:
            self.store._post("/lease/revoke", {"ID": str(self.id)})
        except StoreError as e:
            if "not found" not in str(e):  # expired already: nothing to revoke
                raise


class EtcdWatch:
    """One streaming watch request. ``close`` shuts the socket down so a blocked read returns."""

    def __init__(self, store: EtcdStore, prefix: str, after_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._after = after_revision
        self._closed = threading.Event()
        self._resp: requests.Response | None = None
        self._session = requests.Session()

    def close(self) -> None:
        self._closed.set()
        resp = self._resp
        if resp is not None:
            try:
                fd = resp.raw._fp.fp.raw._sock.fileno()  # type: ignore[union-attr]
                socket.socket(fileno=socket.dup(fd)).shutdown(socket.SHUT_RDWR)
            except (AttributeError, OSError, ValueError):
                pass
            resp.close()
        self._session.close()

    def __iter__(self) -> Iterator[Event]:
        create = {
            "key": _b64(self._prefix or b"\0"),
            "range_end": _b64(_prefix_end(self._prefix)),
            "start_revision": self._after + 1,
        }
        store = self._store
        url = store.url
        try:
            self._resp = self._session.post(store._client.get_url("/watch"), json={"create_request": create},
                                            stream=True, timeout=(store.timeout, None))
            if self._closed.is_set():
                return
            if self._resp.status_code != 200:
                text = _short(self._resp.text)
                if self._resp.status_code >= 500:
                    raise Unavailable(f"store {url}: watch refused, HTTP {self._resp.status_code} ({text})")
                raise StoreError(f"store {url}: watch refused, HTTP {self._resp.status_code} ({text})")
            for line in self._resp.iter_lines(chunk_size=None):
                if self._closed.is_set():
                    return
                if not line.strip():
                    continue
                yield from self._events(url, line)
        except (requests.RequestException, Etcd3Exception, OSError, AttributeError) as e:
            if self._closed.is_set():
                return
            if isinstance(e, (requests.RequestException, Etcd3Exception)):
                raise _etcd_error(url, e) from e
            raise Unavailable(f"store {url}: watch: {_short(e)}") from e

    def _events(self, url: str, line: bytes) -> Iterator[Event]:
        """The events of one line of the watch stream; a line that is not etcd's is BadResponse."""
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise TypeError(f"expected a JSON object, got {type(msg).__name__}")
            if "error" in msg:
                err = msg["error"]
                if isinstance(err, dict) and (err.get("grpc_code") == 14 or err.get("http_code") == 503):
                    # shutting down / restarting
                    raise Unavailable(f"store {url}: watch: {_short(err.get('message', err))}")
                raise StoreError(f"store {url}: watch: {_short(err)}")
            result = msg.get("result", {})
            compact = int(result.get("compact_revision", 0) or 0)
            if compact:
                raise HistoryGone(self._after + 1, compact)
            if result.get("canceled"):
                raise StoreError(f"store {url}: etcd cancelled the watch: {_short(result.get('cancel_reason', ''))}")
            events = []
            for ev in result.get("events") or []:
                kv = ev["kv"]
                typ = "delete" if ev.get("type") == "DELETE" else "put"  # PUT may carry no "type"
                value = None if typ == "delete" else _unb64(kv.get("value"))
                events.append(Event(typ, _unb64(kv["key"]).decode(), value, int(kv.get("mod_revision", 0))))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise BadResponse(url, f"watch: {type(e).__name__}: {_short(e)}") from e
        for event in events:
            self._after = event.revision
            yield event
