"""The Store contract and its backends; ``open_store`` is how a composition root picks one."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode, urlparse

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
    "DEFAULT_STORE_URL", "ETCD_OPTIONS", "KV", "AlreadyExists", "BadResponse", "Event", "HistoryGone", "Lease",
    "NotFound", "OutcomeUnknown", "PermissionDenied", "RevisionMismatch", "Store", "StoreCorrupt", "StoreError",
    "StoreFault", "StoreFull", "StoreIOError", "StoreLocked", "StoreReadOnly", "Unavailable", "Watch", "open_store",
    "store_url", "with_etcd_options",
]


def store_url(explicit: str | None = None) -> str:
    """The URL given, else $TABBY_STORE, else the default. An empty one given is refused: taken as
    "not given", it quietly opened (and made) the default store."""
    if explicit is not None and not explicit.strip():
        raise ValueError("store URL is empty (leave the option out for $TABBY_STORE or the default)")
    return explicit or os.environ.get("TABBY_STORE") or DEFAULT_STORE_URL


# What an etcd URL's query may say, and the variable that says it when the URL does not. The
# password is never in the URL (URLs are logged and sit in argv): a file holds it.
ETCD_OPTIONS: dict[str, str] = {
    "ca": "TABBY_ETCD_CA",  # the CA that signed the members' certificates (etcds://)
    "cert": "TABBY_ETCD_CERT",  # this client's certificate (etcds://)
    "key": "TABBY_ETCD_KEY",  # and its key
    "user": "TABBY_ETCD_USER",  # etcd's auth: the user
    "password_file": "TABBY_ETCD_PASSWORD_FILE",  # and a file holding its password (one line)
}
_TLS_OPTIONS = ("ca", "cert", "key")


class _EtcdURL(NamedTuple):
    scheme: str
    netloc: str
    path: str
    query: str

    def text(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}" + (f"?{self.query}" if self.query else "")


def _split_etcd(url: str) -> _EtcdURL:
    """An etcd URL's parts, split by hand: its netloc is a member list (``a:1,[fd00::2]:2``), not
    one host, and urllib's bracket checks differ between 3.11 patch releases (Debian's 3.11.2
    refuses that list as "Invalid IPv6 URL", 3.11.7 takes it)."""
    scheme, _, rest = url.partition("://")
    rest, hash_, _ = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return _EtcdURL(scheme.lower(), netloc, slash + path + hash_, query)


def with_etcd_options(url: str, **options: str | None) -> str:
    """url with these etcd options (ETCD_OPTIONS' names) added to its query, e.g. from CLI flags;
    an option the URL names already is replaced. A sqlite URL refuses them (ValueError)."""
    empty = [k for k, v in options.items() if v is not None and not v.strip()]
    if empty:  # dropped as "not given" before, so that --etcd-user "" quietly meant no user
        raise ValueError(f"etcd option {', '.join(empty)} is empty")
    given = {k: v for k, v in options.items() if v}
    if not given:
        return url
    parsed = _split_etcd(url)
    if parsed.scheme not in ("etcd", "etcds"):
        raise ValueError(f"store URL {url!r}: {', '.join(given)} apply only to etcd:// and etcds:// URLs")
    unknown = set(given) - set(ETCD_OPTIONS)
    if unknown:
        raise ValueError(f"etcd options {sorted(unknown)}: known are {', '.join(ETCD_OPTIONS)}")
    query = {**dict(parse_qsl(parsed.query)), **given}
    return parsed._replace(query=urlencode(query, safe="/")).text()


# a member's host: a name or IPv4 address, or (in brackets) an IPv6 address; nothing that could
# change the URL it goes into (spaces, %, @, backslashes, further brackets)
_MEMBER_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_PORT = re.compile(r"[0-9]{1,5}")


def _etcd_members(url: str, netloc: str) -> list[tuple[str, int]]:
    members = []
    for part in netloc.split(","):
        host, colon, port = part.rpartition(":") if not part.endswith("]") else (part, "", "")
        if not host and not colon:  # no port
            host, port = part, ""
        good = _MEMBER_HOST.fullmatch(host) is not None and (not colon or _PORT.fullmatch(port) is not None)
        host = host.strip("[]")
        if not good or not 0 < int(port or 2379) < 65536:
            raise ValueError(f"store URL {url!r}: member {part!r} is not host:port "
                             "(e.g. etcd://10.0.0.1:2379,10.0.0.2:2379 or etcds://[fd00::1]:2379)")
        members.append((host, int(port or 2379)))
    return members


def _open_etcd(url: str, environ: Mapping[str, str]) -> Store:
    from tabby.store.etcd import EtcdStore

    parsed = _split_etcd(url)
    if not parsed.netloc or "@" in parsed.netloc:
        raise ValueError(f"store URL {url!r}: etcd needs host:port[,host:port...], e.g. etcd://127.0.0.1:2379 "
                         "(a user goes in ?user=, its password in a password_file)")
    if parsed.path not in ("", "/"):
        raise ValueError(f"store URL {url!r}: an etcd URL has no path ({parsed.path!r}); options go in its query")
    members = _etcd_members(url, parsed.netloc)
    pairs = parse_qsl(parsed.query, keep_blank_values=True)
    opts = dict(pairs)
    unknown = [k for k, _ in pairs if k not in ETCD_OPTIONS]
    if unknown or len(opts) != len(pairs):
        raise ValueError(f"store URL {url!r}: query may name each of {', '.join(ETCD_OPTIONS)} once; "
                         f"got {', '.join(k for k, _ in pairs)}")
    tls = parsed.scheme == "etcds"
    for name, var in ETCD_OPTIONS.items():
        if name not in opts and environ.get(var) and (tls or name not in _TLS_OPTIONS):
            opts[name] = environ[var]
    if not tls and any(opts.get(k) for k in _TLS_OPTIONS):
        raise ValueError(f"store URL {url!r}: ca, cert and key need etcds:// (TLS)")
    if bool(opts.get("cert")) != bool(opts.get("key")):
        raise ValueError(f"store URL {url!r}: a client certificate needs both cert and key")
    for k in (*_TLS_OPTIONS, "password_file"):
        if opts.get(k) and not os.path.isfile(opts[k]):  # os.path, not pathlib: the CNI plugin imports this
            raise ValueError(f"store URL {url!r}: {k} {opts[k]}: no such file")
    password = None
    if opts.get("password_file"):
        if not opts.get("user"):
            raise ValueError(f"store URL {url!r}: password_file without user")
        try:
            with open(opts["password_file"], encoding="utf-8") as f:
                password = f.read().rstrip("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"store URL {url!r}: password_file {opts['password_file']}: {e}") from None
    elif opts.get("user"):
        raise ValueError(f"store URL {url!r}: user {opts['user']} needs a password_file")
    return EtcdStore(members=members, tls=tls, ca=opts.get("ca") or None, cert=opts.get("cert") or None,
                     key=opts.get("key") or None, user=opts.get("user") or None, password=password)


def open_store(url: str, environ: Mapping[str, str] | None = None, *, create: bool = True) -> Store:
    """``sqlite:///abs/path.db``, ``etcd://host:port[,host:port...]`` or ``etcds://...`` (TLS), the
    etcd ones with ETCD_OPTIONS in the query or, where it says nothing, in environ (os.environ).
    create=False: a SQLite file that does not exist is a StoreError, not a new store."""
    if _split_etcd(url).scheme in ("etcd", "etcds"):
        return _open_etcd(url, os.environ if environ is None else environ)
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from tabby.store.sqlite import SqliteStore

        if parsed.netloc:  # sqlite://tabby.db made /tabby.db; sqlite://var/x.db meant /var/x.db, or var/x.db
            raise ValueError(f"store URL {url!r}: an absolute file path after sqlite:// (three slashes), e.g. "
                             "sqlite:///var/lib/tabby/tabby.db")
        path = parsed.path
        if not path or path == "/":
            raise ValueError(f"store URL {url!r}: sqlite needs a file path, e.g. sqlite:///var/lib/tabby/tabby.db")
        if not path.startswith("/"):  # sqlite:tabby.db: each process's working directory would pick its file
            raise ValueError(f"store URL {url!r}: the sqlite file path must be absolute, e.g. "
                             "sqlite:///var/lib/tabby/tabby.db")
        if parsed.query or parsed.fragment or parsed.params:  # SQLite's ?mode=ro would be taken and ignored
            raise ValueError(f"store URL {url!r}: a sqlite URL is a file path only, without ?, ; or #")
        return SqliteStore(path, create=create)
    raise ValueError(f"store URL {url!r}: scheme must be sqlite:// or etcd:// (etcds:// with TLS)")
