"""The embedded Store: one SQLite file, safe for many processes on one machine.

Concurrency: WAL mode lets readers run beside one writer; every write is one ``BEGIN
IMMEDIATE`` transaction (the write lock is taken up front, so two writers never deadlock on a
lock upgrade) and waits up to ``busy_timeout`` for another process's write. Within a process,
one connection is shared under a lock; each watch opens its own.

History: every write appends to ``log`` with the next store revision, which is what watches
replay. The log is trimmed to the last ``retain`` revisions; a watch from before that gets
``HistoryGone``. ``synchronous=NORMAL``: a process crash loses nothing, a power cut can lose
the last transactions but never corrupts the file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tabby.store.base import KV, AlreadyExists, Event, HistoryGone, NotFound, RevisionMismatch

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


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    return conn


class SqliteStore:
    def __init__(self, path: str | os.PathLike[str], *, retain: int = DEFAULT_RETAIN,
                 busy_timeout_s: float = 30.0, poll_interval_s: float = 0.002) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.retain = retain
        self.busy_timeout_s = busy_timeout_s
        self.poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._conn = _connect(self.path, busy_timeout_s)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT key, value, mod_rev, create_rev FROM kv WHERE key = ?", (key,)
            ).fetchone()
        return KV(row[0], bytes(row[1]), row[2], row[3]) if row else None

    def list(self, prefix: str) -> tuple[list[KV], int]:
        lo, hi = _range(prefix)
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                rows = self._conn.execute(
                    "SELECT key, value, mod_rev, create_rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                    (lo, hi),
                ).fetchall()
                rev = self._conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]
            finally:
                self._conn.execute("COMMIT")
        return [KV(r[0], bytes(r[1]), r[2], r[3]) for r in rows], rev

    def revision(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0]

    # -- writes --------------------------------------------------------------------------

    def _write(self, key: str, value: bytes | None, *, must_exist: bool | None,
               expected: int | None) -> int:
        """One write transaction; value None deletes. must_exist: None = don't care."""
        with self._lock:
            c = self._conn
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
                    self._trim(rev - self.retain)
                c.execute("COMMIT")
                return rev
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def _trim(self, upto: int) -> None:
        current = self._conn.execute("SELECT value FROM meta WHERE name='compacted'").fetchone()[0]
        if upto > current:
            self._conn.execute("DELETE FROM log WHERE rev <= ?", (upto,))
            self._conn.execute("UPDATE meta SET value = ? WHERE name='compacted'", (upto,))

    def create(self, key: str, value: bytes) -> int:
        return self._write(key, bytes(value), must_exist=False, expected=None)

    def update(self, key: str, value: bytes, expected_revision: int) -> int:
        return self._write(key, bytes(value), must_exist=True, expected=expected_revision)

    def put(self, key: str, value: bytes) -> int:
        return self._write(key, bytes(value), must_exist=None, expected=None)

    def delete(self, key: str, expected_revision: int | None = None) -> int:
        return self._write(key, None, must_exist=True, expected=expected_revision)

    def compact(self, revision: int) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._trim(revision)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # -- watch ---------------------------------------------------------------------------

    def watch(self, prefix: str, after_revision: int) -> SqliteWatch:
        return SqliteWatch(self, prefix, after_revision)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteWatch:
    """Polls the revision log on its own connection; ``PRAGMA data_version`` makes an idle
    poll a cheap no-op, so a short interval costs little CPU."""

    def __init__(self, store: SqliteStore, prefix: str, after_revision: int) -> None:
        self._store = store
        self._lo, self._hi = _range(prefix)
        self._after = after_revision
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()

    def __iter__(self) -> Iterator[Event]:
        conn = _connect(self._store.path, self._store.busy_timeout_s)
        try:
            last_version = None
            while not self._closed.is_set():
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version == last_version:
                    time.sleep(self._store.poll_interval_s)
                    continue
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
                finally:
                    conn.execute("COMMIT")
                if len(rows) < 1000:
                    last_version = version  # drained up to head; wait for the next commit
                for rev, typ, key, value in rows:
                    if self._closed.is_set():
                        return
                    self._after = rev
                    yield Event(typ, key, bytes(value) if value is not None else None, rev)
                if len(rows) < 1000:
                    self._after = max(self._after, head)
        finally:
            conn.close()
