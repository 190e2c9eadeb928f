"""The etcd v3 Store, for fabrics of many hosts: one member or a cluster, plain or TLS, with users.

Talks to etcd's JSON gateway with etcd3gw's client, one per member (the session with its CA and
client certificate, the base URL, API-path discovery), but issues ``range``, ``txn``,
``compaction`` and ``watch`` requests itself: the Store contract needs the header revision of a
listing, compare-and-swap on ``mod_revision``, and the watch's ``compact_revision`` signal, which
etcd3gw's helpers drop. Every write is one transaction, so a lost compare-and-swap writes nothing.

Members and failover: requests go to the member that answered last; when it cannot be reached
the next is tried, round after round for up to ``RIDE_OUT_S`` (an election takes 1-3 s; one
member alone is tried once), before the call fails with ``Unavailable`` naming every member.
Every request carries etcd's "require leader" flag, so a member cut off from the others refuses at once ("no leader")
instead of serving stale reads or hanging a write until etcd's own timeout. A read, and any
request etcd certainly did not apply (the connection was never made, "no leader", "too many
requests", an expired token), is simply sent to the next member. A write whose outcome is unknown
(the member died or timed out after it had the request: etcd may still commit it) is never sent
again behind the caller's back: it fails with ``OutcomeUnknown`` (an ``Unavailable``), and the
caller, who knows what it meant, reads and decides (a compare-and-swap retried blindly could apply twice).

Watches resume on another member from the revision after the last event delivered (revisions
are the cluster's, so nothing is lost or repeated); compaction past it is ``HistoryGone`` (the
syncer lists again). A stream silent for ``WATCH_IDLE_S`` is opened again: a member that vanished
without a FIN (a host cut off by a firewall) is noticed that way. Watches ask for etcd's progress
notifications, which say "nothing else in your range up to revision R" and move the resume point
to R: a quiet range (the Config, the BGP peers, a stable fabric's endpoints) is then never older
than the last notification, and a compaction of other keys' history does not send it back to a
full listing. etcd sends them every ``--experimental-watch-progress-notify-interval`` (10 min by
default; 3.6 names it ``--watch-progress-notify-interval``): set below ``WATCH_IDLE_S`` (the lab
uses 10 s), a healthy stream is never silent that long, so it is not reopened either. Without it,
every quiet watch of every agent lists again after each compaction (measured: etcd 3.4.23); the
first silent stream says so in the log, once.

Auth: with a user, a token from ``auth/authenticate`` rides on every request and is fetched again
when etcd says it expired (tokens live in a member's memory). etcd refuses gateway requests from a
client certificate that carries a CN once auth is on, so the certificate authenticates the host to
the cluster (TLS) and the password names the user.

Errors name the URL and are typed: no ``requests``, etcd3gw, ``KeyError`` or ``ValueError``
leaves this module. Unreachable, timed out, or an HTTP 5xx (no leader, shutting down,
overloaded) is ``Unavailable``; a reply that is not the v3 API's JSON is ``BadResponse``; a
refused permission is ``PermissionDenied``; a TLS handshake that fails (a wrong CA or client
certificate) and any other refusal (HTTP 4xx) are a plain ``StoreError`` carrying etcd's or the
TLS library's own words.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import requests
import urllib3.exceptions
from etcd3gw.client import Etcd3Client

from tabby.store.base import (
    KV,
    AlreadyExists,
    BadResponse,
    Event,
    HistoryGone,
    Lease,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    RevisionMismatch,
    StoreError,
    StoreFull,
    Unavailable,
)

log = logging.getLogger(__name__)

CONNECT_S = 2.0  # a member that does not accept a connection in 2 s is down or cut off: try the next
RIDE_OUT_S = 3.0  # how long a call keeps trying members: an election after a leader dies is 1-3 s
WATCH_RIDE_OUT_S = 10.0  # a watch has no caller waiting on it: it rides out longer before it fails
WATCH_IDLE_S = 30.0  # a silent watch stream is opened again (a dead path sends no FIN); one request per 30 s idle
RETRY_PAUSE_S = 0.2  # between rounds over every member
PACE_WAITED_S = 0.005  # a paced watch's read that took longer waited for etcd: it had caught up
# A write waits this long for its answer, a read the store's timeout. A follower forwards a write to
# the leader it knows; if that leader has just died the proposal is lost and etcd itself answers only
# after its own request timeout (7 s with the default election timeout): 3 s, then the next member,
# is far more than a healthy cluster ever takes to commit, and bounds the stall after a leader dies.
WRITE_TIMEOUT_S = 3.0
# etcd's words for a request it refused before doing anything (gRPC Unavailable): safe to send elsewhere
_NOT_APPLIED = ("no leader", "too many requests", "not capable", "server is not ready", "not enough started members",
                "proposal dropped")


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_end(prefix: str) -> bytes:
    """etcd's range end for a prefix: the prefix with its last byte incremented."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # empty prefix: every key


def _key(data: str | None) -> str:
    """A key as text. Not UTF-8 (only another program writes such a key): its bytes kept as lone
    surrogates, so it is one corrupt record named by its reader, not a listing or watch that fails."""
    return _unb64(data).decode("utf-8", "surrogateescape")


def _kv(d: dict[str, Any]) -> KV:
    return KV(_key(d["key"]), _unb64(d.get("value")), int(d.get("mod_revision", 0)),
              int(d.get("create_revision", 0)))


_DETAIL_MAX = 300  # characters of an error body kept in a message


def _short(text: object) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= _DETAIL_MAX else t[:_DETAIL_MAX] + "..."


class _Failed(Exception):
    """One member failed one request. sent: etcd may have acted on it; transient: trying again
    (there or elsewhere) can succeed; final: etcd's own refusal, which every member would repeat;
    error: what the caller gets if nothing else works."""

    def __init__(self, error: StoreError, *, sent: bool, transient: bool, final: bool = False) -> None:
        super().__init__(str(error))
        self.error, self.sent, self.transient, self.final = error, sent, transient, final


class _TokenExpired(Exception):
    """etcd no longer knows the token (a member restarted, the TTL passed, permissions changed)."""


PROBE_READ_S = 0.5  # how long a TLS probe waits for a member's alert after its handshake


def _ssl_cause(e: BaseException) -> ssl.SSLError | None:
    """The ssl module's own error under requests' and urllib3's wrappings, if there is one."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ssl.SSLError):
            return x
        todo += [x.__cause__, x.__context__, getattr(x, "reason", None),
                 *(a for a in x.args if isinstance(a, BaseException))]
    return None


def _is_eof(e: ssl.SSLError) -> bool:
    """The peer closed without a word. Which class and text that gets differs between builds of
    one Python version (3.11.7: SSLEOFError "UNEXPECTED_EOF_WHILE_READING"; Debian's 3.11.2:
    SSLZeroReturnError in a handshake, a bare SSLEOFError after one), so all are taken."""
    return isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or "UNEXPECTED_EOF" in str(e)


def _tls_probe(m: _Member) -> str | None:
    """Why member m's TLS failed, asked on a connection of our own that sends nothing: the
    member's refusal (its alert, or our verdict on its certificate) as text, or None when the
    member never finished a handshake (nothing answers behind a forwarder) or took ours.

    Needed because an EOF alone says neither: under TLS 1.3 a member refuses a client certificate
    after the handshake has finished on our side, and the request we had written by then races
    its alert (the alert is lost to a reset, and the EOF looks like a member that is down)."""
    ctx = ssl.create_default_context(cafile=m.ca or requests.certs.where())
    if m.cert and m.key:
        ctx.load_cert_chain(m.cert, m.key)
    try:
        with socket.create_connection((m.host, m.port), timeout=CONNECT_S) as raw, \
                ctx.wrap_socket(raw, server_hostname=m.host) as tls:
            tls.settimeout(PROBE_READ_S)
            try:
                tls.recv(1)  # a member that took our certificate says nothing until asked
            except TimeoutError:
                return None
            except ssl.SSLError as e:
                return None if _is_eof(e) else str(e)
            return None
    except ssl.SSLError as e:
        return None if _is_eof(e) else str(e)
    except OSError:
        return None


def _transport_failure(m: _Member, e: Exception) -> _Failed:
    """A requests/urllib3 failure talking to one member, typed."""
    url = m.url
    reason = getattr(e.args[0], "reason", None) if e.args else None  # urllib3's own, without its wrapping
    cause = _ssl_cause(e) if isinstance(e, requests.exceptions.SSLError) else None
    refusal = (str(cause) if cause is not None and not _is_eof(cause) else
               _tls_probe(m) if cause is not None else None)
    if refusal is not None:
        # refused: a certificate the member would not take, or one we would not
        return _Failed(StoreError(f"store {url}: TLS handshake failed, check the CA, client certificate and key "
                                  f"({_short(refusal)})"), sent=False, transient=False)
    never_sent = isinstance(e, requests.exceptions.ConnectTimeout) or isinstance(
        reason, urllib3.exceptions.NewConnectionError)
    return _Failed(Unavailable(f"store {url}: unreachable ({_short(reason or e)})"), sent=not never_sent,
                   transient=True)


def _http_failure(url: str, status: int, text: str) -> _Failed | _TokenExpired:
    """A reply other than 200 from one member, typed (etcd's own message kept)."""
    try:
        body = json.loads(text)
        msg = str(body.get("error") or body.get("message") or text) if isinstance(body, dict) else text
        code = int(body.get("code", 0)) if isinstance(body, dict) else 0
    except ValueError:
        msg, code = text, 0
    detail = _short(msg)
    if code == 16 or "invalid auth token" in msg or "revision of auth store is old" in msg:
        return _TokenExpired(detail)
    if code == 7 or status == 403 or "authentication failed" in msg:
        return _Failed(PermissionDenied(url, detail), sent=False, transient=False, final=True)
    if "user name is empty" in msg:
        return _Failed(PermissionDenied(url, f"{detail}: etcd has auth on; give the store URL a user and "
                                              "password_file"), sent=False, transient=False, final=True)
    if "database space exceeded" in msg:  # etcd's NOSPACE alarm: every member refuses writes, reads work
        return _Failed(StoreFull(url, detail), sent=False, transient=False, final=True)
    if status == 429 or code == 8 or "too many requests" in msg:  # overloaded: not applied, another member may
        return _Failed(Unavailable(f"store {url}: overloaded, HTTP {status} ({detail})"), sent=False, transient=True)
    if status >= 500 or code == 14:
        return _Failed(Unavailable(f"store {url}: unavailable, HTTP {status} ({detail})"),
                       sent=not any(w in msg for w in _NOT_APPLIED), transient=True)
    return _Failed(StoreError(f"store {url}: HTTP {status}: {detail}"), sent=False, transient=False, final=True)


class _Member:
    """One member: its etcd3gw client (session with TLS, base URL, API path)."""

    def __init__(self, host: str, port: int, *, tls: bool, ca: str | None, cert: str | None, key: str | None,
                 timeout: float) -> None:
        # the API path is fixed: /v3/ is etcd 3.4's and later's (discovery would be one more request
        # per member, and its failures lose the difference between a refused TLS handshake and a
        # member that is down)
        self.client = Etcd3Client(host=host, port=port, protocol="https" if tls else "http", ca_cert=ca,
                                  cert_cert=cert, cert_key=key, timeout=(CONNECT_S, timeout), api_path="/v3/")
        # the environment's CA bundle (REQUESTS_CA_BUNDLE) would replace the store's CA in requests,
        # and an HTTP proxy from the environment has no business carrying the fabric's state
        self.client.session.trust_env = False
        self.url = self.client.base_url
        self.host, self.port, self.ca, self.cert, self.key = host, port, ca, cert, key


class EtcdStore:
    def __init__(self, host: str = "127.0.0.1", port: int = 2379, *, members: Sequence[tuple[str, int]] = (),
                 tls: bool = False, ca: str | None = None, cert: str | None = None, key: str | None = None,
                 user: str | None = None, password: str | None = None, timeout: float = 10.0) -> None:
        """members: every member's (host, port); default the one host:port."""
        self.timeout = timeout
        self._members = [_Member(h, p, tls=tls, ca=ca, cert=cert, key=key, timeout=timeout)
                         for h, p in (members or [(host, port)])]
        # riding out is for a cluster's election; one member has none, and fails at once as it always did
        self.ride_out_s = min(RIDE_OUT_S, timeout) if len(self._members) > 1 else 0.0
        self.watch_ride_out_s = WATCH_RIDE_OUT_S if len(self._members) > 1 else 0.0
        self._silence_told = False
        self._tls = (ca, (cert, key) if cert and key else None)
        self._current = random.randrange(len(self._members))  # agents spread over the members
        self._user, self._password = user, password
        self._token: str | None = None
        self._auth_lock = threading.Lock()
        eps = ",".join(m.url.split("://", 1)[1] for m in self._members)
        self.url = f"{'etcds' if tls else 'etcd'}://{eps}" + (f" (user {user})" if user else "")

    def __repr__(self) -> str:
        return f"EtcdStore({self.url})"

    def _rotation(self) -> list[_Member]:
        """Every member, the one that answered last first."""
        i = self._current
        return self._members[i:] + self._members[:i]

    def _answered(self, m: _Member) -> None:
        self._current = self._members.index(m)

    def _silent_stream(self, url: str) -> None:
        """A watch stream said nothing for WATCH_IDLE_S, not even a progress notification: said
        once, as it costs a listing per quiet watch after every compaction (module docstring)."""
        if not self._silence_told:
            self._silence_told = True
            log.warning("etcd %s sent a watch nothing for %.0f s, not even a progress notification: set its "
                        "--experimental-watch-progress-notify-interval (etcd 3.6: --watch-progress-notify-interval) "
                        "below %.0f s, or every quiet watch lists its range again after each compaction",
                        url, WATCH_IDLE_S, WATCH_IDLE_S)

    def session(self) -> requests.Session:
        """A new session configured like the members' (for a watch's own connection)."""
        s = requests.Session()
        s.trust_env = False
        s.verify = self._tls[0] or True
        if self._tls[1]:
            s.cert = self._tls[1]
        return s

    def headers(self, m: _Member) -> dict[str, str]:
        """Every request's: require a leader (a member without one refuses at once), and the token."""
        h = {"Grpc-Metadata-hasleader": "true"}
        if self._user:
            h["Authorization"] = self._token or self._authenticate(m)
        return h

    def _authenticate(self, m: _Member, stale: str | None = None) -> str:
        """A token for our user from member m, one per store (a member that does not know it says so:
        then a new one)."""
        with self._auth_lock:
            if self._token is not None and self._token != stale:
                return self._token  # another thread got a new one meanwhile
            resp = self._send(m, "/auth/authenticate", {"name": self._user, "password": self._password or ""},
                              auth=False)
            if isinstance(resp, _TokenExpired):
                raise _Failed(PermissionDenied(m.url, str(resp)), sent=False, transient=False)
            token = resp.get("token")
            if not isinstance(token, str) or not token:
                raise _Failed(BadResponse(m.url, f"auth/authenticate: no token in {_short(resp)}"), sent=False,
                              transient=False)
            self._token = token
            return token

    def _send(self, m: _Member, path: str, payload: dict[str, Any], *, auth: bool = True,
              write: bool = False) -> dict[str, Any] | _TokenExpired:
        """One request to one member: its JSON object, _TokenExpired, or _Failed raised."""
        try:
            headers = self.headers(m) if auth else {"Grpc-Metadata-hasleader": "true"}
            resp = m.client.session.post(m.client.get_url(path), json=payload, headers=headers,
                                         timeout=(CONNECT_S, min(self.timeout, WRITE_TIMEOUT_S) if write
                                                  else self.timeout))
        except requests.exceptions.RequestException as e:
            raise _transport_failure(m, e) from e
        if resp.status_code != 200:
            failure = _http_failure(m.url, resp.status_code, resp.text)
            if isinstance(failure, _TokenExpired):
                return failure
            raise failure
        try:
            body = resp.json()
        except ValueError as e:
            raise _Failed(BadResponse(m.url, f"not JSON: {_short(resp.text)}"), sent=True, transient=False) from e
        if not isinstance(body, dict):
            raise _Failed(BadResponse(m.url, f"{path}: expected a JSON object, got {_short(body)}"), sent=True,
                          transient=False)
        return body

    def _post(self, path: str, payload: dict[str, Any], *, write: str = "", mutates: bool = False) -> dict[str, Any]:
        """The request on the first member that does it, trying each in turn for up to ride_out_s.
        write: the key of a write whose outcome matters (not idempotent): it is never sent twice
        once a member may have acted on it (OutcomeUnknown). mutates: any other write (put, lease):
        sent again if need be, but with a write's timeout."""
        deadline = time.monotonic() + self.ride_out_s
        failures: dict[str, _Failed] = {}
        while True:
            for m in self._rotation():
                try:
                    resp = self._send(m, path, payload, write=bool(write) or mutates)
                    if isinstance(resp, _TokenExpired):  # a second time, with a new token
                        self._authenticate(m, stale=self._token)
                        resp = self._send(m, path, payload, write=bool(write) or mutates)
                        if isinstance(resp, _TokenExpired):
                            raise _Failed(PermissionDenied(m.url, f"a new token was refused too: {resp}"),
                                          sent=False, transient=False, final=True)
                except _Failed as f:
                    if isinstance(f.error, PermissionDenied):
                        raise self._denied(m, f.error, path, payload) from None
                    if f.final:
                        raise f.error from None
                    if f.sent and write and f.transient:
                        self._current = (self._members.index(m) + 1) % len(self._members)
                        raise OutcomeUnknown(write, str(f.error)) from None
                    failures[m.url] = f
                    continue
                self._answered(m)
                return resp
            if not all(f.transient for f in failures.values()):  # TLS refused, a bad reply: waiting won't help
                raise self._refused(failures)
            if time.monotonic() >= deadline:
                raise Unavailable(f"store {self.url}: no member answered: "
                                  + "; ".join(str(f.error) for f in failures.values()))
            time.sleep(RETRY_PAUSE_S)

    def _refused(self, failures: dict[str, _Failed]) -> StoreError:
        """A member refused for a reason waiting does not mend (TLS, a bad reply) and none answered:
        that error for one member, every member's for several."""
        errors = [f.error for f in failures.values()]
        if len(errors) == 1:
            return errors[0]
        return StoreError(f"store {self.url}: every member refused: " + "; ".join(str(e) for e in errors))

    def _denied(self, m: _Member, e: PermissionDenied, path: str, payload: dict[str, Any]) -> PermissionDenied:
        """The refusal, naming the member, the user and what was asked."""
        key = payload.get("key") or next((op.get("request_put", op.get("request_delete_range", {})).get("key")
                                          for op in payload.get("success") or []), None)
        asked = path + (f" {_unb64(key).decode(errors='replace')}" if isinstance(key, str) else "")
        return PermissionDenied(f"{m.url} (user {self._user or 'none'})", f"{e.detail}; {asked}")

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn a reply without the fields the v3 API always sends into BadResponse."""
        try:
            yield
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise BadResponse(self._members[self._current].url, f"{what}: {type(e).__name__}: {_short(e)}") from e

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        resp = self._post("/kv/range", {"key": b64(key)})
        with self._reading("range"):
            kvs = resp.get("kvs") or []
            return _kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[KV], int]:
        resp = self._post("/kv/range", {"key": b64(prefix or b"\0"), "range_end": b64(prefix_end(prefix)),
                                        "sort_order": "ASCEND", "sort_target": "KEY"})
        with self._reading("range"):
            return [_kv(d) for d in resp.get("kvs") or []], int(resp["header"]["revision"])

    def revision(self) -> int:
        # an empty transaction: a linearizable read of the revision that needs no permission on any
        # key (a user that may read only its own prefix can still ask)
        resp = self._post("/kv/txn", {})
        with self._reading("txn"):
            return int(resp["header"]["revision"])

    # -- writes --------------------------------------------------------------------------

    def _txn(self, key: str, compare: list[dict[str, Any]], op: dict[str, Any]) -> tuple[bool, int, KV | None]:
        resp = self._post("/kv/txn", {
            "compare": compare,
            "success": [op],
            "failure": [{"request_range": {"key": b64(key)}}],
        }, write=key)
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
            [{"key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            {"request_put": {"key": b64(key), "value": b64(value)}},
        )
        if not ok:
            raise AlreadyExists(key)
        return rev

    def update(self, key: str, value: bytes, expected_revision: int) -> int:
        ok, rev, current = self._txn(
            key,
            [{"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": expected_revision}],
            {"request_put": {"key": b64(key), "value": b64(value)}},
        )
        if not ok:
            if current is None:
                raise NotFound(key)
            raise RevisionMismatch(key, expected_revision, current.mod_revision)
        return rev

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        payload = {"key": b64(key), "value": b64(value)}
        if lease is not None:
            if not isinstance(lease, EtcdLease):
                raise StoreError(f"store {self.url}: not a lease of this store: {lease!r}")
            payload["lease"] = str(lease.id)
        # a put is idempotent (the same value again): sent to the next member whatever happened
        resp = self._post("/kv/put", payload, mutates=True)
        with self._reading("put"):
            return int(resp["header"]["revision"])

    def grant_lease(self, ttl_s: float) -> EtcdLease:
        # a lease granted twice expires unused: sent again like a put
        resp = self._post("/lease/grant", {"TTL": max(1, round(ttl_s))}, mutates=True)
        with self._reading("lease grant"):
            return EtcdLease(self, int(resp["ID"]))

    def delete(self, key: str, expected_revision: int | None = None) -> int:
        if expected_revision is None:
            compare = [{"key": b64(key), "result": "GREATER", "target": "CREATE", "create_revision": 0}]
        else:
            compare = [{"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": expected_revision}]
        ok, rev, current = self._txn(key, compare, {"request_delete_range": {"key": b64(key)}})
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

    def watch(self, prefix: str, after_revision: int, exclude: tuple[str, ...] = (),
              pace_s: float = 0.0) -> EtcdWatch:
        return EtcdWatch(self, prefix, after_revision, exclude, pace_s)

    def admin(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """An etcd API call the Store contract has no verb for (``/auth/...``: users, roles,
        enable), as this store's user, with the same failover and typed errors."""
        return self._post(path, payload, write=path)

    def close(self) -> None:
        for m in self._members:
            m.client.session.close()


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


class _StreamEnded(Exception):
    """The watch stream stopped without an error of etcd's (silent for WATCH_IDLE_S, or closed)."""


class EtcdWatch:
    """One watch, one streaming request at a time; on another member from the last revision
    delivered when its member fails. ``close`` shuts the socket down so a blocked read returns."""

    def __init__(self, store: EtcdStore, prefix: str, after_revision: int, exclude: tuple[str, ...] = (),
                 pace_s: float = 0.0) -> None:
        self._store = store
        self._prefix = prefix
        self._exclude = exclude  # etcd's watch is one key range: these are dropped here
        self._pace_s = pace_s
        self._after = after_revision
        self._closed = threading.Event()
        self._resp: requests.Response | None = None
        self._session = store.session()
        self._reauth = False  # etcd cancelled the watch for a token it no longer knows

    @property
    def revision(self) -> int:
        return self._after

    def close(self) -> None:
        self._closed.set()
        self._shut()
        self._session.close()

    def _shut(self) -> None:
        resp = self._resp
        if resp is not None:
            try:
                fd = resp.raw._fp.fp.raw._sock.fileno()  # type: ignore[union-attr]
                socket.socket(fileno=socket.dup(fd)).shutdown(socket.SHUT_RDWR)
            except (AttributeError, OSError, ValueError):
                pass
            resp.close()

    def __iter__(self) -> Iterator[Event]:
        store = self._store
        deadline = time.monotonic() + store.watch_ride_out_s
        failures: dict[str, _Failed] = {}
        while not self._closed.is_set():
            for m in store._rotation():
                try:
                    for ev in self._stream(m):
                        if ev is None:  # the stream is open: this member serves us
                            store._answered(m)
                            failures.clear()
                            deadline = time.monotonic() + store.watch_ride_out_s
                            continue
                        yield ev
                except _StreamEnded:
                    break  # open it again, on the member that answered last first
                except _Failed as f:
                    if self._closed.is_set():
                        return
                    if f.final:
                        raise f.error from None
                    failures[m.url] = f
                    continue
                if self._closed.is_set():
                    return
            else:
                if not all(f.transient for f in failures.values()):
                    raise store._refused(failures)
                if time.monotonic() >= deadline:
                    raise Unavailable(f"store {store.url}: watch: no member answered: "
                                      + "; ".join(str(f.error) for f in failures.values()))
                self._closed.wait(RETRY_PAUSE_S)

    def _stream(self, m: _Member) -> Iterator[Event | None]:
        """The events from one member (None first, once the watch is created); _Failed or _StreamEnded."""
        create = {
            "key": b64(self._prefix or b"\0"),
            "range_end": b64(prefix_end(self._prefix)),
            "start_revision": self._after + 1,
            "progress_notify": True,
        }
        store = self._store
        if self._reauth:
            self._reauth = False
            store._authenticate(m, stale=store._token)
        for _ in range(2):  # a second time only with a new token
            try:
                self._resp = self._session.post(m.client.get_url("/watch"), json={"create_request": create},
                                                headers=store.headers(m), stream=True,
                                                timeout=(CONNECT_S, WATCH_IDLE_S))
            except requests.exceptions.RequestException as e:
                raise _transport_failure(m, e) from e
            if self._closed.is_set():
                return
            if self._resp.status_code == 200:
                break
            failure = _http_failure(m.url, self._resp.status_code, _short(self._resp.text))
            if not isinstance(failure, _TokenExpired):
                raise failure
            store._authenticate(m, stale=store._token)
        try:
            lines = self._resp.iter_lines(chunk_size=None)
            while True:
                asked = time.monotonic()
                line = next(lines, None)
                if self._closed.is_set():
                    return
                if line is None:
                    break
                if line.strip():
                    yield from self._events(m.url, line)
                    self._pace(asked)
        except requests.exceptions.ConnectionError as e:
            if self._closed.is_set():
                return
            if e.args and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError):
                store._silent_stream(m.url)
                raise _StreamEnded() from e
            raise _transport_failure(m, e) from e
        except (requests.exceptions.RequestException, OSError, AttributeError) as e:
            if self._closed.is_set():
                return
            raise _Failed(Unavailable(f"store {m.url}: watch: {_short(e)}"), sent=True, transient=True) from e
        finally:
            self._shut()
        raise _StreamEnded()

    def _pace(self, asked: float) -> None:
        """Paced: once a read had to wait for its line (we had caught up), pause, so that what
        comes meanwhile is read at once; a line already buffered is read without a pause, so the
        watch never falls behind. Every wait is followed by a pause: with a pause at most once
        per ``pace_s`` (until 2026-12-02), the lines that came in the half second after one were
        read as they came, one wake-up each (measured: 148 reads for 400 events in 20 s)."""
        if self._pace_s and time.monotonic() - asked > PACE_WAITED_S:
            self._closed.wait(self._pace_s)

    def _events(self, url: str, line: bytes) -> Iterator[Event | None]:
        """The events of one line of the watch stream; a line that is not etcd's is BadResponse."""
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise TypeError(f"expected a JSON object, got {type(msg).__name__}")
            if "error" in msg:
                err = msg["error"]
                if isinstance(err, dict) and (err.get("grpc_code") == 14 or err.get("http_code") == 503):
                    # no leader (this member is cut off from the others), shutting down, restarting
                    raise _Failed(Unavailable(f"store {url}: watch: {_short(err.get('message', err))}"), sent=True,
                                  transient=True)
                raise _Failed(StoreError(f"store {url}: watch: {_short(err)}"), sent=True, transient=False, final=True)
            result = msg.get("result", {})
            compact = int(result.get("compact_revision", 0) or 0)
            if compact:
                raise HistoryGone(self._after + 1, compact)
            if result.get("canceled"):
                reason = str(result.get("cancel_reason", ""))
                if "invalid auth token" in reason or "auth store is old" in reason:
                    self._reauth = True  # the member forgot our token (it restarted): a new one, then again
                    raise _Failed(Unavailable(f"store {url}: watch: {_short(reason)}"), sent=True, transient=True)
                raise _Failed(StoreError(f"store {url}: etcd cancelled the watch: "
                                         f"{_short(result.get('cancel_reason', ''))}"), sent=True, transient=False,
                              final=True)
            if result.get("created"):
                yield None
            elif not result.get("events"):
                # a progress notification (clientv3's IsProgressNotify: no events, not created,
                # cancelled or compacted): every event of the range up to its revision was sent
                header = result.get("header")
                if isinstance(header, dict) and header.get("revision") is not None:
                    self._after = max(self._after, int(header["revision"]))
                return
            events = []
            for ev in result.get("events") or []:
                kv = ev["kv"]
                typ = "delete" if ev.get("type") == "DELETE" else "put"  # PUT may carry no "type"
                value = None if typ == "delete" else _unb64(kv.get("value"))
                events.append(Event(typ, _key(kv["key"]), value, int(kv.get("mod_revision", 0))))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise _Failed(BadResponse(url, f"watch: {type(e).__name__}: {_short(e)}"), sent=True,
                          transient=False) from e
        for event in events:
            self._after = event.revision
            if not event.key.startswith(self._exclude):
                yield event
