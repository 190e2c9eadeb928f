"""The Store contract every backend keeps. The Store knows keys, bytes and revisions only.

Revisions are one store-wide, strictly increasing counter (etcd's model): every write gets the
next one, a key remembers the revision of its last write (``mod_revision``), and
``update``/``delete`` can demand that revision (compare-and-swap). ``watch`` replays writes
after a revision, in order; when that history has been compacted away it raises
``HistoryGone`` and the caller must list again and resume from the list's revision.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, NamedTuple, Protocol


class StoreError(Exception):
    """Base of every Store failure."""


class AlreadyExists(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"{key} already exists")
        self.key = key


class NotFound(StoreError):
    def __init__(self, key: str) -> None:
        super().__init__(f"{key} not found")
        self.key = key


class RevisionMismatch(StoreError):
    """Compare-and-swap lost: someone wrote the key after the caller read it."""

    def __init__(self, key: str, expected: int, actual: int | None) -> None:
        super().__init__(f"{key}: expected revision {expected}, found {actual}")
        self.key, self.expected, self.actual = key, expected, actual


class HistoryGone(StoreError):
    """The revisions a watch asked for were compacted: list again, then watch from there."""

    def __init__(self, requested: int, compacted: int) -> None:
        super().__init__(f"history before revision {compacted} is gone (asked from {requested}); resync")
        self.requested, self.compacted = requested, compacted


class Unavailable(StoreError):
    """The backend cannot serve requests now; callers retry later (a loop backs off and goes on)."""


class OutcomeUnknown(Unavailable):
    """A write that may or may not have been applied: the etcd member that had it died or timed out
    before answering, and the cluster may still commit it. The Store does not send it again (a
    compare-and-swap sent twice could apply twice); the caller reads and decides."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{detail}; the write of {key} may or may not have been applied")
        self.key = key


class StoreFault(StoreError):
    """A failure of the backend itself (its file, disk or server), not of the request.

    ``where`` names the SQLite file or the etcd URL, and so does the message. Which faults are
    also ``Unavailable`` is the one decision callers need: those are expected to clear without
    anybody changing tabby's data (another writer lets go of the lock, an operator frees disk
    space or remounts the filesystem read-write, etcd elects a leader), so a long-running loop
    waits and tries again while a one-shot command reports them. A fault that is not
    ``Unavailable`` (a corrupt file, an answer that is not etcd's) needs an operator; loops still
    survive it (they back off and relist), but nobody should expect waiting alone to fix it.
    """

    what = "store failure"

    def __init__(self, where: str, detail: str = "") -> None:
        super().__init__(f"store {where}: {self.what}" + (f" ({detail})" if detail else ""))
        self.where, self.detail = where, detail


class StoreLocked(StoreFault, Unavailable):
    """SQLite: another writer held the database lock for longer than the busy timeout."""

    what = "locked by another writer for longer than the busy timeout"


class StoreFull(StoreFault, Unavailable):
    """No space left for the write (SQLITE_FULL, ENOSPC, EDQUOT); reads still work."""

    what = "disk full"


class StoreReadOnly(StoreFault, Unavailable):
    """The file or its filesystem is read-only (SQLITE_READONLY, EROFS); reads may still work."""

    what = "read-only"


class StoreIOError(StoreFault, Unavailable):
    """Any other I/O failure of the file (SQLITE_IOERR, SQLITE_CANTOPEN, EIO)."""

    what = "I/O error"


class StoreCorrupt(StoreFault):
    """The file is damaged or is not a tabby database (SQLITE_CORRUPT, SQLITE_NOTADB). Not
    ``Unavailable``: it does not heal by waiting, an operator restores or removes the file."""

    what = "database file is corrupt or not a database"


class BadResponse(StoreFault):
    """etcd (or whatever answers at its URL) sent something that is not a valid reply: not
    JSON, or JSON without the fields the v3 API always has."""

    what = "bad response"


class PermissionDenied(StoreFault):
    """etcd's auth refused the request: this user's roles do not allow it on that key. Not
    ``Unavailable``: an operator grants the permission, or the writer is wrong to ask."""

    what = "permission denied"


# NamedTuples, not dataclasses: importing dataclasses (and the inspect, ast and dis it pulls in)
# is ~12 ms of a CNI plugin process, which opens a Store on every call
class KV(NamedTuple):
    key: str
    value: bytes
    mod_revision: int
    create_revision: int


class Event(NamedTuple):
    type: Literal["put", "delete"]
    key: str
    value: bytes | None  # None for a delete
    revision: int


class Watch(Protocol):
    """An open watch: iterate for events (blocking); ``close`` from any thread ends iteration."""

    def __iter__(self) -> Iterator[Event]: ...

    @property
    def revision(self) -> int:
        """Every event of the range up to this revision has been delivered: a new watch resumes
        after it. It moves past the last event when the backend says nothing else happened in
        the range (etcd's progress notifications, the SQLite log read to its head), so a quiet
        range is not sent back to a listing by a compaction of other keys' history."""
        ...

    def close(self) -> None: ...


class Lease(Protocol):
    """A time-to-live the backend keeps: the keys put with it vanish when it is not renewed."""

    def keep_alive(self) -> bool:
        """Renew it (no write: no revision, no watch event); False once it has expired."""
        ...

    def revoke(self) -> None: ...


class Store(Protocol):
    def get(self, key: str) -> KV | None: ...

    def list(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under prefix, sorted, and the store revision the listing is consistent at."""
        ...

    def revision(self) -> int: ...

    def create(self, key: str, value: bytes) -> int:
        """Write a new key; AlreadyExists if present. Returns the write's revision."""
        ...

    def update(self, key: str, value: bytes, expected_revision: int) -> int:
        """Compare-and-swap on mod_revision; RevisionMismatch or NotFound otherwise."""
        ...

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Unconditional write, for records only one writer owns (status); with a lease from
        ``grant_lease`` the key lives only as long as the lease."""
        ...

    def grant_lease(self, ttl_s: float) -> Lease | None:
        """A lease, where the backend has them (etcd); None where it has not (SQLite: liveness
        is then a record rewritten with its own expiry)."""
        ...

    def delete(self, key: str, expected_revision: int | None = None) -> int:
        """Remove a key (only at that revision, if given); NotFound if absent."""
        ...

    def watch(self, prefix: str, after_revision: int, exclude: tuple[str, ...] = (), pace_s: float = 0.0) -> Watch:
        """Events under prefix with revision > after_revision, in order, then live ones; none
        under a prefix in exclude (a backend that can tells no one of them at all). pace_s > 0:
        once caught up, wait that long before reading again, so that a busy range costs one
        wake-up per pace_s instead of one per write (for news that may come late; SQLite then
        looks every pace_s, busy or not, and no commit wakes it)."""
        ...

    def compact(self, revision: int) -> None:
        """Forget history up to revision (watches from before it get HistoryGone)."""
        ...

    def close(self) -> None: ...
