"""The embedded Store: one SQLite file, safe for many processes on one machine.

Concurrency: WAL mode lets readers run beside one writer; every write is one ``BEGIN
IMMEDIATE`` transaction (the write lock is taken up front, so two writers never deadlock on a
lock upgrade) and waits up to ``busy_timeout`` for another process's write. Within a process,
one connection is shared under a lock; each watch opens its own, and one change feed per
process and file tells them when to look (``ChangeFeed``: a bounded poll rate).

History: every write appends to ``log`` with the next store revision, which is what watches
replay. The log is trimmed to the last ``retain`` revisions; a watch from before that gets
``HistoryGone``. ``synchronous=NORMAL``: a process crash loses nothing, a power cut can lose
the last transactions but never corrupts the file.

Failures of the file itself are typed (``tabby.store.base``) and name the path: the busy
timeout expiring is ``StoreLocked``, no space ``StoreFull``, a read-only file or filesystem
``StoreReadOnly``, a damaged file ``StoreCorrupt``, any other I/O failure ``StoreIOError``; no
``sqlite3`` exception leaves this module. SQLite reports most errno values as a bare "disk I/O
error", so for those the filesystem is asked (read-only flag, free blocks, and a nameless
``O_TMPFILE`` that tells an ext4 gone read-only after an error) to say which it is. After a
read-only, I/O or corruption failure the connection is dropped and the next call opens the
file again: a connection SQLite opened read-only never writes, even once the filesystem is
read-write again, and a file restored from a backup is a new file. Watches drop theirs too
(they follow the store's ``generation``): SQLite shares one ``-shm`` mapping per file among a
process's connections, and while any of them holds one mapped read-only, no new connection in
the process can write either.

Modes: the database file (and so its ``-wal`` and ``-shm``, which SQLite creates with the
file's mode) is 0600; directories this module creates are 0700; a directory that already
exists is left as its owner made it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tabby.store.base import (
    KV,
    AlreadyExists,
    Event,
    HistoryGone,
    Lease,
    NotFound,
    RevisionMismatch,
    StoreCorrupt,
    StoreError,
    StoreFault,
    StoreFull,
    StoreIOError,
    StoreLocked,
    StoreReadOnly,
)

log = logging.getLogger(__name__)
# inotify_simple's class, imported by the first ChangeFeed: it loads ctypes.util (~15 ms), which
# only watches need, and a CNI plugin process opens the Store without watching it
INotify: Any = None

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER PRIMARY KEY, type TEXT NOT NULL, key TEXT NOT NULL, value BLOB);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
"""

DEFAULT_RETAIN = 100_000  # revisions of history kept for watches that fall behind
_TRIM_EVERY = 1000


def _range(prefix: str) -> tuple[str, str]:
    if not prefix:
        return "", "\U0010ffff"
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


CHANGED_SUFFIX = "-changed"  # touched after every commit: what other processes' change feeds wake on
# Keys whose commits touch a signal file of their own (``<file>-changed-quiet``), which only a
# watch overlapping them listens on: status and liveness, rewritten by every agent every few
# seconds and watched by none. On the shared signal every heartbeat of a 100-host fabric woke
# every process on the machine (the store cannot import tabby.model: this is its STATUS_PREFIX,
# and a test holds the two equal).
QUIET_PREFIXES = ("/tabby/status/",)
# IPAM's own records (blocks, handles, the collector's state; tabby.model.keys): every workload
# add and delete writes two or three of them, and the agents' watch excludes them (it needs the
# block affinities alone). Quiet too, so an add wakes the agents once, for its Endpoint.
QUIET_PREFIXES += ("/tabby/v1/ipam/blocks/", "/tabby/v1/ipam/handles/", "/tabby/v1/ipam/gc")
QUIET_SUFFIX = "-changed-quiet"
# Endpoints (tabby.model.keys: /tabby/v1/endpoints/<host>/<name>): a commit touches a signal of
# its host (``-changed-ep-<host>``), which that host's agent listens on, and one of every
# endpoint (``-changed-ep``) for whole-range watches; so no agent wakes for another host's
# workload add. A test holds the prefix equal to the model's.
ENDPOINTS_PREFIX = "/tabby/v1/endpoints/"
ENDPOINTS_SUFFIX = "-changed-ep"
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_MODE = 0o600  # the database holds every workload's addresses: root's business only
DIR_MODE = 0o700

# SQLite's primary result codes (the low byte of an extended code)
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _PROTOCOL, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 15, 26


def _filesystem_says(path: str) -> tuple[type[StoreFault], str] | None:
    """Why the filesystem under path cannot take a write, if it can tell: SQLite turns EROFS,
    EIO and most other errno values into one "disk I/O error" and keeps the errno to itself."""
    d = os.path.dirname(path) or "."
    try:
        st = os.statvfs(d)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return StoreReadOnly, "filesystem mounted read-only"
    if st.f_bavail == 0:
        return StoreFull, "no free blocks on the filesystem"
    if st.f_files and st.f_favail == 0:
        return StoreFull, "no free inodes on the filesystem"
    try:  # an inode with no name, gone on close: ext4 after an error is read-only without saying so in statvfs
        os.close(os.open(d, os.O_TMPFILE | os.O_WRONLY, FILE_MODE))
    except OSError as e:
        if e.errno == errno.EROFS:
            return StoreReadOnly, "filesystem is read-only"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreFull, os.strerror(e.errno)
    return None


def fault(path: str, e: BaseException) -> StoreError:
    """The typed Store error for a sqlite3 or OS error on the database file at path."""
    if isinstance(e, OSError):
        detail = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreFull(path, detail)
        if e.errno == errno.EROFS:
            return StoreReadOnly(path, detail)
        return StoreIOError(path, detail)
    code = getattr(e, "sqlite_errorcode", None)
    name = getattr(e, "sqlite_errorname", None)
    detail = f"{e}; {name}" if name else str(e)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(e).lower()
    if primary in (_BUSY, _LOCKED) or "database is locked" in text:
        return StoreLocked(path, detail)
    if primary == _FULL or "disk is full" in text:
        return StoreFull(path, detail)
    if primary == _READONLY or "readonly database" in text:
        return StoreReadOnly(path, detail)
    if primary in (_CORRUPT, _NOTADB) or "malformed" in text or "not a database" in text:
        return StoreCorrupt(path, detail)
    if primary in (_IOERR, _CANTOPEN, _PROTOCOL) or "disk i/o error" in text or "unable to open" in text:
        said = _filesystem_says(path)
        if said is not None:
            return said[0](path, f"{detail}; {said[1]}")
        return StoreIOError(path, detail)
    return StoreError(f"store {path}: {detail}")  # a misuse (closed connection, bad SQL): a bug of ours


def _make_dirs(d: Path) -> None:
    """Create d and any missing parent, each 0700; leave existing directories alone."""
    missing = []
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for m in reversed(missing):
        with contextlib.suppress(FileExistsError):  # someone else made it meanwhile: theirs, not ours
            os.mkdir(m, DIR_MODE)
            os.chmod(m, DIR_MODE)  # exactly 0700 whatever the umask


# Why the database file itself is never opened here, only stat'ed and chmod'ed by its path: the
# locks SQLite coordinates its WAL with are POSIX record locks, which belong to the process, and
# the kernel drops all of a process's locks on a file when any descriptor of it is closed. A
# check that opened and closed the file (to read its header, or to create it) while another
# connection of the same process had it open dropped that connection's locks; the next process
# to close its last connection then believed itself alone, checkpointed, and deleted -wal and
# -shm, and every later write of that connection went into the deleted WAL: lost (seen: a lab's
# Config write "updated" at a revision another process also committed).


def _check_existing(path: str) -> bool:
    """True if there is a file at path. A file that is there must be a regular file before tabby
    touches it (pointed at /dev/null by mistake, the store once set its mode to 0600 and only then
    failed); whether it is a database SQLite's own open says (StoreCorrupt), before any chmod."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise StoreCorrupt(path, "not a regular file: tabby neither changes nor uses it as its store")
    return True


def _ensure_file(path: str) -> None:
    """The database file exists before SQLite sees it, made 0600 (SQLite would create it 0644,
    and gives ``-wal`` and ``-shm`` the mode of the database file). A new file is made with
    O_EXCL: nobody in this process can have it open, so closing that descriptor drops no lock."""
    _make_dirs(Path(path).parent)
    if _check_existing(path):
        return
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    except FileExistsError:  # made meanwhile by someone else: theirs, checked as any existing one
        _check_existing(path)
        return
    os.chmod(path, FILE_MODE)  # exactly 0600 whatever the umask


def _fix_modes(path: str) -> None:
    """Once SQLite has taken the file as a database: it and its -wal and -shm 0600 (left wider by a
    version that made them so, or by whoever created the file), by path, never by a descriptor."""
    for p in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(OSError):
            if stat.S_IMODE(os.stat(p).st_mode) != FILE_MODE:
                os.chmod(p, FILE_MODE)


def _text(raw: bytes) -> str:
    """A TEXT cell (a key). Not UTF-8 (only another program writes one): its bytes kept as lone
    surrogates, so that it is one corrupt record its reader names, not a listing that fails."""
    return raw.decode("utf-8", "surrogateescape")


def _blob(value: object) -> bytes:
    """A value cell. tabby writes BLOBs; another program's TEXT is taken as its UTF-8 bytes, and
    anything else (an INTEGER would be read as that many zero bytes) as no bytes: a corrupt record."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return b""


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection to an existing file (``mode=rw``: SQLite never creates it with its own mode)."""
    conn = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True, timeout=busy_timeout_s, isolation_level=None,
                           check_same_thread=False)
    conn.text_factory = _text
    try:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(os.path.dirname(path) or ".").f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction; SQLite may already have rolled it back (on SQLITE_FULL, for
    one), and a failing ROLLBACK must not hide the error that made it necessary."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class SqliteStore:
    def __init__(self, path: str | os.PathLike[str], *, retain: int = DEFAULT_RETAIN,
                 busy_timeout_s: float = 30.0, poll_interval_s: float = 0.002,
                 idle_poll_interval_s: float = 0.05, create: bool = True) -> None:
        """create=False: a file that is not there is an error (a reader given a mistyped path
        would make a new, empty store and report an empty fabric as all well)."""
        self.path = str(path)
        if not create and not os.path.lexists(self.path):
            raise StoreError(f"store {self.path}: no such file: nothing was ever written to this store (check the "
                             "path; `tabby apply` makes a new one)")
        self.changed_path = self.path + CHANGED_SUFFIX
        self.quiet_path = self.path + QUIET_SUFFIX
        self.retain = retain
        self.busy_timeout_s = busy_timeout_s
        self.poll_interval_s = poll_interval_s
        self.idle_poll_interval_s = max(idle_poll_interval_s, poll_interval_s)
        self._lock = threading.Lock()
        self._feed: ChangeFeed | None = None
        self._no_feed = False  # inotify refused once: watches poll, and nobody asks again
        self._feed_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self.generation = 0  # bumped when a fault drops the connection; watches then open theirs again
        try:
            with self._session():
                pass
        except StoreFault as e:
            # not fatal: an agent must come up (and keep its dataplane) on a Store that is full,
            # read-only or locked right now; the next call opens the file again
            log.debug("%s; opening again on first use", e)

    def _open(self) -> sqlite3.Connection:
        _ensure_file(self.path)
        conn = _connect(self.path, self.busy_timeout_s)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            _fix_modes(self.path)
            if not {"kv", "log", "meta"} <= tables:  # only a new file is written to here
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in _SCHEMA.strip().split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """The shared connection under the lock, opened if needed; sqlite3 and OS errors leave
        as typed Store errors, and a fault that a new connection may cure drops this one."""
        with self._lock:
            if self._closed:
                raise StoreError(f"store {self.path}: closed")
            try:
                if self._conn is None:
                    self._conn = self._open()
                yield self._conn
            except (sqlite3.Error, OSError) as e:
                err = fault(self.path, e)
                if isinstance(err, (StoreReadOnly, StoreIOError, StoreCorrupt)):
                    if self._conn is not None:
                        with contextlib.suppress(sqlite3.Error):
                            self._conn.close()
                        self._conn = None
                    self.generation += 1
                    if self._feed is not None:  # watches asleep in the feed look at it now, not in 30 s
                        self._feed.changed()
                raise err from e

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        with self._session() as c:
            row = c.execute(
                "SELECT key, value, mod_rev, create_rev FROM kv WHERE key = ?", (key,)
            ).fetchone()
        return KV(row[0], _blob(row[1]), row[2], row[3]) if row else None

    def list(self, prefix: str) -> tuple[list[KV], int]:
        lo, hi = _range(prefix)
        with self._session() as c:
            c.execute("BEGIN")
            try:
                rows = c.execute(
                    "SELECT key, value, mod_rev, create_rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                    (lo, hi),
                ).fetchall()
                rev = c.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
                c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise
        return [KV(r[0], _blob(r[1]), r[2], r[3]) for r in rows], rev

    def revision(self) -> int:
        with self._session() as c:
            return c.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]

    # -- writes --------------------------------------------------------------------------

    def _write(self, key: str, value: bytes | None, *, must_exist: bool | None,
               expected: int | None) -> int:
        """One write transaction; value None deletes. must_exist: None = don't care."""
        with self._session() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                row = c.execute("SELECT mod_rev, create_rev FROM kv WHERE key = ?", (key,)).fetchone()
                if must_exist is False and row is not None:
                    raise AlreadyExists(key)
                if must_exist and row is None:
                    raise NotFound(key)
                if expected is not None and row[0] != expected:
                    raise RevisionMismatch(key, expected, row[0])
                rev = c.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0] + 1
                if value is None:
                    c.execute("DELETE FROM kv WHERE key = ?", (key,))
                    c.execute("INSERT INTO log VALUES (?, 'delete', ?, NULL)", (rev, key))
                else:
                    create_rev = row[1] if row else rev
                    c.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, value, create_rev, rev))
                    c.execute("INSERT INTO log VALUES (?, 'put', ?, ?)", (rev, key, value))
                c.execute("UPDATE meta SET value = ? WHERE name='revision'", (rev,))
                if rev % _TRIM_EVERY == 0 and rev > self.retain:
                    self._trim(c, rev - self.retain)
                c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise
        for signal in self.signals_for_key(key):
            self._announce(signal)
        return rev

    def _host_signal(self, segment: str) -> str:
        """The signal of one host's endpoints; a segment that cannot be a file name (any bytes
        may be a key) goes by its hash."""
        if not _SAFE_SEGMENT.fullmatch(segment):
            import hashlib  # here: the CNI plugin's in-process path must not pay for it

            segment = "h-" + hashlib.sha256(segment.encode(errors="surrogateescape")).hexdigest()[:32]
        return f"{self.path}{ENDPOINTS_SUFFIX}-{segment}"

    def signals_for_key(self, key: str) -> tuple[str, ...]:
        """The signal files a commit to key touches."""
        if key.startswith(QUIET_PREFIXES):
            return (self.quiet_path,)
        if key.startswith(ENDPOINTS_PREFIX):
            return self.path + ENDPOINTS_SUFFIX, self._host_signal(key[len(ENDPOINTS_PREFIX):].split("/", 1)[0])
        return (self.changed_path,)

    def signals_for(self, prefix: str, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The signal files a watch of prefix (less exclude) listens on: every one whose keys it
        can see."""
        if prefix.startswith(ENDPOINTS_PREFIX):
            rest = prefix[len(ENDPOINTS_PREFIX):]
            one_host = rest.endswith("/") and rest.count("/") == 1
            return (self._host_signal(rest[:-1]),) if one_host else (self.path + ENDPOINTS_SUFFIX,)
        quiet = any((q.startswith(prefix) or prefix.startswith(q)) and not q.startswith(exclude)
                    for q in QUIET_PREFIXES)
        loud = not any(prefix.startswith(q) for q in QUIET_PREFIXES)
        endpoints = ENDPOINTS_PREFIX.startswith(prefix) and not ENDPOINTS_PREFIX.startswith(exclude)
        return (self.changed_path,) * loud + (self.quiet_path,) * quiet + (self.path + ENDPOINTS_SUFFIX,) * endpoints

    def _announce(self, signal: str) -> None:
        """Tell every process's feed that a commit is visible now. The WAL write that inotify
        would see comes before the commit is visible (SQLite then updates the ``-shm`` index,
        which is memory-mapped and makes no event): a watch woken by it can find nothing new and
        sleep through the commit. So each commit touches its signal file once it returned."""
        try:
            os.utime(signal)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                os.close(os.open(signal, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        except OSError as e:  # the commit stands; other processes see it at their next wake-up
            log.debug("store %s: cannot touch %s: %s", self.path, signal, e)
        if self._feed is not None:  # this process's own watches need not wait for the feed
            self._feed.changed(signal)

    @staticmethod
    def _trim(c: sqlite3.Connection, upto: int) -> None:
        current = c.execute("SELECT value FROM meta WHERE name='compacted'").fetchone()[0]
        if upto > current:
            c.execute("DELETE FROM log WHERE rev <= ?", (upto,))
            c.execute("UPDATE meta SET value = ? WHERE name='compacted'", (upto,))

    def create(self, key: str, value: bytes) -> int:
        return self._write(key, bytes(value), must_exist=False, expected=None)

    def update(self, key: str, value: bytes, expected_revision: int) -> int:
        return self._write(key, bytes(value), must_exist=True, expected=expected_revision)

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        if lease is not None:
            raise StoreError(f"store {self.path}: has no leases (grant_lease gives none)")
        return self._write(key, bytes(value), must_exist=None, expected=None)

    def grant_lease(self, ttl_s: float) -> Lease | None:
        return None  # no expiring keys in SQLite: a liveness record carries its own expiry instead

    def delete(self, key: str, expected_revision: int | None = None) -> int:
        return self._write(key, None, must_exist=True, expected=expected_revision)

    def compact(self, revision: int) -> None:
        with self._session() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                self._trim(c, revision)
                c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise

    # -- watch ---------------------------------------------------------------------------

    def watch(self, prefix: str, after_revision: int, exclude: tuple[str, ...] = (),
              pace_s: float = 0.0) -> SqliteWatch:
        return SqliteWatch(self, prefix, after_revision, exclude, pace_s)

    def feed(self) -> ChangeFeed | None:
        """The one change feed this process's watches of this file share (started on first use;
        None without inotify: the watches poll)."""
        with self._feed_lock:
            if not self._no_feed and (self._feed is None or not self._feed.alive):
                self._feed = ChangeFeed.open(self)
                self._no_feed = self._feed is None
            return self._feed

    def close(self) -> None:
        with self._feed_lock:
            if self._feed is not None:
                self._feed.stop()
                self._feed = None
        with self._lock:
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None


class ChangeFeed:
    """Wakes this process's watches of one file when some process committed to it.

    Why: a watch that polled ``PRAGMA data_version`` every 2 ms cost 2.7% of a core while
    nothing happened, and on this machine even a bare 20 Hz timer costs ~0.2% (each wake-up is
    ~100 us of a virtual CPU; measured 2026-12-01), in every agent. So one thread per process
    and file sleeps in inotify on the signal files its watches need (``signals_for``), which
    every commit touches once it is visible (``SqliteStore._announce``): ``<file>-changed``, or
    ``-changed-quiet`` for status and liveness, which no agent listens on. Watched are the
    signal files alone, not their directory: there every ``-wal`` write (several per commit)
    woke every process on the machine, each to look at a name and drop it, and a watch woken by
    a ``-wal`` write found nothing (SQLite writes it before the commit is visible) and slept
    through the commit. A commit by a program other than tabby is seen at the next tabby
    commit, or within the watches' 30 s. The watches then ask their own connection's
    ``data_version`` whether anything is new and read only their key range. Writes through the
    store object wake them directly. The feed holds no connection of its own: one could keep
    the ``-shm`` mapped read-only after a remount (see the module docstring). Without inotify
    (``fs.inotify.max_user_instances`` reached) there is no feed, and each watch polls: every
    ``poll_interval_s`` (2 ms) after a change, doubling up to ``idle_poll_interval_s`` (50 ms)
    while none come. A signal file that cannot be watched (deleted, on a filesystem that went
    away) is watched again at the next read timeout, and its watches are woken meanwhile."""

    READ_TIMEOUT_MS = 5000  # bounds how late stop() and a lost signal file are seen

    def __init__(self, ino: Any, flags: Any) -> None:
        self._ino, self._flags = ino, flags
        self._cond = threading.Condition()
        self._stopped = False
        self._seqs: dict[str, int] = {}  # signal file -> wake-ups it caused
        self._everyone = 0  # wake-ups of every watch (stop, a lost signal file)
        self._wds: dict[int, str] = {}  # inotify watch descriptor -> signal file
        self._lost: set[str] = set()  # signal files to watch again
        self._thread = threading.Thread(target=self._run, name="sqlite-feed", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, store: SqliteStore) -> ChangeFeed | None:
        global INotify
        if INotify is None:
            from inotify_simple import INotify
        from inotify_simple import flags as iflags

        try:
            ino = INotify()
        except OSError as e:
            log.warning("store %s: no inotify (%s); watches poll every %g..%g s instead", store.path, e,
                        store.poll_interval_s, store.idle_poll_interval_s)
            return None
        return cls(ino, iflags)

    def listen(self, signals: tuple[str, ...]) -> None:
        """Watch these signal files from now on (created if missing); OSError if one cannot be."""
        with self._cond:
            for path in signals:
                if path not in self._seqs:
                    self._add(path)
                    self._seqs[path] = 0

    def _add(self, path: str, create: bool = True) -> None:
        """Watch path; create it first only for a new watch (a lost one is watched again once a
        commit has made it again: its directory may be going away)."""
        if create and not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        self._wds[self._ino.add_watch(path, self._flags.ATTRIB)] = path
        self._lost.discard(path)

    def seq(self, signals: tuple[str, ...]) -> int:
        """Moves on at every wake-up of a watch listening on signals."""
        with self._cond:
            return self._everyone + sum(self._seqs.get(p, 0) for p in signals)

    def changed(self, signal: str | None = None) -> None:
        """Wake the watches listening on signal (None: every watch)."""
        with self._cond:
            if signal is None:
                self._everyone += 1
            elif signal in self._seqs:
                self._seqs[signal] += 1
            else:
                return
            self._cond.notify_all()

    def wait(self, signals: tuple[str, ...], seen: int, timeout: float) -> int:
        """Block until ``seq(signals)`` moves past ``seen`` (or timeout); returns it."""
        with self._cond:
            if self.seq(signals) == seen and not self._stopped:
                self._cond.wait_for(lambda: self._stopped or self.seq(signals) != seen, timeout)
            return self.seq(signals)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
        self.changed()

    def _run(self) -> None:
        try:
            while not self._stopped:
                for e in self._ino.read(timeout=self.READ_TIMEOUT_MS):
                    path = self._wds.get(e.wd)
                    if path is None:
                        continue
                    if e.mask & self._flags.IGNORED:  # deleted or unmounted: watch it again later
                        with self._cond:
                            del self._wds[e.wd]
                            self._lost.add(path)
                        self.changed()
                    else:
                        self.changed(path)
                for path in list(self._lost) if not self._stopped else ():
                    with self._cond:
                        try:
                            self._add(path, create=False)
                        except OSError as err:
                            log.debug("store change feed: cannot watch %s yet: %s", path, err)
                            continue
                    self.changed()
        except OSError as e:  # the descriptor failed: wake everyone, who then poll
            log.warning("store change feed ended: %s; watches poll instead", e)
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()
            self._ino.close()

    @property
    def alive(self) -> bool:
        return not self._stopped


class SqliteWatch:
    """Reads the revision log on its own connection whenever the store's change feed says
    something was committed; ``PRAGMA data_version`` tells it whether it was this file."""

    def __init__(self, store: SqliteStore, prefix: str, after_revision: int, exclude: tuple[str, ...] = (),
                 pace_s: float = 0.0) -> None:
        self._store = store
        self._lo, self._hi = _range(prefix)
        self._exclude = exclude
        self._pace_s = pace_s
        self._after = after_revision
        self._closed = threading.Event()

    @property
    def revision(self) -> int:
        return self._after

    def close(self) -> None:
        self._closed.set()
        if self._store._feed is not None:
            self._store._feed.changed()  # wake it, so that it sees it is closed

    def __iter__(self) -> Iterator[Event]:
        path = self._store.path
        generation = self._store.generation
        try:
            conn = _connect(path, self._store.busy_timeout_s)
        except (sqlite3.Error, OSError) as e:
            raise fault(path, e) from e
        # opened on a read-only filesystem: SQLite mapped the -shm read-only, and no connection of
        # this process can write while any connection holds that mapping (it is shared, and lives
        # as long as one of them is open); so look once a second on a connection of that look
        # alone, which lets the mapping go once every watch and the store have closed theirs
        read_only_since: float | None = time.monotonic() if _read_only_fs(path) else None
        conn_: sqlite3.Connection | None = conn
        try:
            last_version = None
            signals = self._store.signals_for(self._lo, self._exclude)
            # paced: it looks every pace_s and no commit wakes it, nor this process's feed (a busy
            # range otherwise woke the feed thread, and through it every watch, at each commit)
            feed = self._store.feed() if not self._pace_s else None
            if feed is not None:
                try:
                    feed.listen(signals)
                except OSError as e:  # a signal file on a read-only filesystem, say: poll
                    log.warning("store %s: cannot watch %s (%s); this watch polls", path, signals, e)
                    feed = None
            seen = feed.seq(signals) if feed is not None else 0
            pause = self._store.poll_interval_s
            while not self._closed.is_set():
                try:
                    now = time.monotonic()
                    stale = read_only_since is not None and now - read_only_since >= 1.0
                    if stale and _read_only_fs(path):
                        read_only_since, stale = now, False
                    # none held (read-only), the filesystem read-write again, or the store dropped its own
                    if conn_ is None or stale or generation != self._store.generation:
                        generation = self._store.generation
                        if conn_ is not None:
                            conn_.close()
                        conn_ = conn = _connect(path, self._store.busy_timeout_s)
                        read_only_since = now if _read_only_fs(path) else None
                        last_version = None
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if version == last_version:
                        if read_only_since is not None:  # not held while asleep (see above)
                            conn.close()
                            conn_ = None
                            last_version = None
                        if feed is not None and feed.alive:
                            # woken by the feed, by close(), or to look at a read-only filesystem again
                            seen = feed.wait(signals, seen, 1.0 if read_only_since is not None else 30.0)
                        elif self._pace_s:
                            self._closed.wait(self._pace_s)
                        else:
                            time.sleep(pause)
                            pause = min(pause * 2, self._store.idle_poll_interval_s)
                        continue
                    pause = self._store.poll_interval_s
                    conn.execute("BEGIN")
                    try:
                        compacted = conn.execute("SELECT value FROM meta WHERE name='compacted'").fetchone()[0]
                        if self._after < compacted:
                            raise HistoryGone(self._after + 1, compacted)
                        rows = conn.execute(
                            "SELECT rev, type, key, value FROM log WHERE rev > ? AND key >= ? AND key < ? "
                            "ORDER BY rev LIMIT 1000",
                            (self._after, self._lo, self._hi),
                        ).fetchall()
                        head = conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
                        conn.execute("COMMIT")
                    except BaseException:
                        _rollback(conn)
                        raise
                except (sqlite3.Error, OSError) as e:
                    raise fault(path, e) from e
                if len(rows) < 1000:
                    last_version = version  # drained up to head; wait for the next commit
                for rev, typ, key, value in rows:
                    if self._closed.is_set():
                        return
                    self._after = rev
                    if key.startswith(self._exclude):
                        continue
                    yield Event(typ, key, _blob(value) if value is not None else None, rev)
                if len(rows) < 1000:
                    self._after = max(self._after, head)
                    if rows and self._pace_s:  # paced: what is committed meanwhile comes in one read
                        self._closed.wait(self._pace_s)
        finally:
            with contextlib.suppress(sqlite3.Error):
                if conn_ is not None:
                    conn_.close()
