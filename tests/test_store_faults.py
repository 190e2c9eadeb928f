"""The Store's own failures (locked, full, read-only, corrupt, unreachable, garbage) are typed,
name the file or URL, and kill nothing: not the status writer, not the watch loop, not an agent.

Filesystems are real: a small tmpfs per test (filled with dd, remounted read-only), and an ext4
image on a loop device that the kernel turns read-only under an open database, as a failing
disk does. Every mount, loop device, namespace and process is removed at the end.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from agentlib import AgentProc, apply, endpoint, namespace, neighbours, routes, status, unique

from tabby.agent.status import StatusWriter
from tabby.lab import netns
from tabby.lab.etcd import free_port
from tabby.lab.netns import wait_for
from tabby.model import encode, key_of, validate
from tabby.store import (
    BadResponse,
    StoreCorrupt,
    StoreError,
    StoreFault,
    StoreFull,
    StoreIOError,
    StoreLocked,
    StoreReadOnly,
    Unavailable,
    open_store,
)
from tabby.store.etcd import EtcdStore
from tabby.store.sqlite import SqliteStore, fault
from tabby.syncer import InSync, ResourceSyncer, Update

# -- real filesystems ----------------------------------------------------------------------


@contextmanager
def tmpfs(size: str = "4m") -> Iterator[Path]:
    """A tmpfs of its own on a fresh directory under /tmp; unmounted and removed at the end."""
    d = Path(tempfile.mkdtemp(prefix="tbyt-fs-", dir="/tmp"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", unique("fs"), str(d)],
                       check=True, capture_output=True)
        try:
            yield d
        finally:
            if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(d)], capture_output=True)  # a process of ours still in it
    finally:
        d.rmdir()


def fill(d: Path) -> Path:
    """Fill the filesystem at d to the last block (dd stops at ENOSPC)."""
    filler = d / "filler"
    r = subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, text=True)
    assert "No space left" in r.stderr, r.stderr
    assert os.statvfs(d).f_bavail == 0
    return filler


def remount(d: Path, mode: str, pid: int | None = None) -> subprocess.CompletedProcess[str]:
    """``mount -o remount,MODE``, here or in the mount namespace of process pid."""
    ns = ["nsenter", f"--mount=/proc/{pid}/ns/mnt"] if pid is not None else []
    return subprocess.run([*ns, "mount", "-o", f"remount,{mode}", str(d)], capture_output=True, text=True)


def mode_of(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def store_key(name: str) -> str:
    return f"/tabby/v1/hosts/{name}"


def host(name: str) -> Any:
    return validate({"kind": "Host", "metadata": {"name": name}, "spec": {"ipv6_address": "fd00::1"}})


# -- the mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "typed", "transient"), [
    (sqlite3.OperationalError("database is locked"), StoreLocked, True),
    (sqlite3.OperationalError("database or disk is full"), StoreFull, True),
    (sqlite3.OperationalError("attempt to write a readonly database"), StoreReadOnly, True),
    (sqlite3.DatabaseError("file is not a database"), StoreCorrupt, False),
    (sqlite3.DatabaseError("database disk image is malformed"), StoreCorrupt, False),
    (sqlite3.OperationalError("disk I/O error"), StoreIOError, True),
    (OSError(errno.ENOSPC, "No space left on device"), StoreFull, True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), StoreFull, True),
    (OSError(errno.EROFS, "Read-only file system"), StoreReadOnly, True),
    (OSError(errno.EIO, "Input/output error"), StoreIOError, True),
])
def test_sqlite_and_os_errors_become_typed_errors_naming_the_file(
        tmp_path: Path, exc: BaseException, typed: type, transient: bool) -> None:
    path = str(tmp_path / "tabby.db")
    err = fault(path, exc)
    assert type(err) is typed and isinstance(err, StoreFault)
    assert isinstance(err, Unavailable) is transient
    assert err.where == path and path in str(err)


def test_a_misuse_is_a_plain_store_error() -> None:
    err = fault("/x/tabby.db", sqlite3.ProgrammingError("Cannot operate on a closed database."))
    assert type(err) is StoreError and "/x/tabby.db" in str(err)


def test_locked_past_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "tabby.db"
    store = SqliteStore(path, busy_timeout_s=0.2)
    store.put("/a", b"1")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's writer that does not let go
        with pytest.raises(StoreLocked) as e:
            store.put("/b", b"2")
        assert str(path) in str(e.value) and "SQLITE_BUSY" in str(e.value)
        assert store.get("/a").value == b"1"  # WAL: readers are not blocked
        holder.execute("ROLLBACK")
        assert store.put("/b", b"2") > 1
    finally:
        holder.close()
        store.close()


def test_corrupt_file_and_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is no database " * 500)
    store = SqliteStore(junk)  # opening does not raise: an agent must come up and say what is wrong
    with pytest.raises(StoreCorrupt) as e:
        store.list("/")
    assert str(junk) in str(e.value) and not isinstance(e.value, Unavailable)
    store.close()

    damaged = tmp_path / "damaged.db"
    store = SqliteStore(damaged)
    for i in range(300):
        store.put(f"/k{i}", os.urandom(500))
    store.close()
    with open(damaged, "r+b") as f:  # overwrite some b-tree pages
        f.seek(2 * 4096)
        f.write(os.urandom(3 * 4096))
    store = SqliteStore(damaged)
    with pytest.raises(StoreCorrupt, match="malformed"):
        store.list("/")
    store.close()


def test_full_filesystem_then_space_back() -> None:
    with tmpfs("2m") as d:
        path = d / "tabby.db"
        store = SqliteStore(path)
        store.put("/a", b"1")
        watch = store.watch("/", 0)
        events = iter(watch)
        assert next(events).key == "/a"
        filler = fill(d)
        with pytest.raises(StoreFull) as e:
            for i in range(50):
                store.put(f"/big{i}", b"x" * 3000)
        assert str(path) in str(e.value) and isinstance(e.value, Unavailable)
        assert store.get("/a").value == b"1" and store.list("/")[1] >= 1  # reads go on
        filler.unlink()
        store.put("/after", b"2")  # the same store object writes again, and its watch sees it
        seen: list[str] = []

        def until_after() -> None:
            for ev in events:
                seen.append(ev.key)
                if ev.key == "/after":
                    return

        reader = threading.Thread(target=until_after, daemon=True)
        reader.start()
        reader.join(5)
        assert seen and seen[-1] == "/after", seen  # the watch polled through it all
        watch.close()
        events.close()
        store.close()


def test_read_only_filesystem_then_read_write() -> None:
    with tmpfs() as d:
        path = d / "tabby.db"
        store = SqliteStore(path)
        store.put("/a", b"1")
        store.close()
        assert remount(d, "ro").returncode == 0
        store = SqliteStore(path)  # no error on a read-only filesystem: the first call says it
        for call in (lambda: store.get("/a"), lambda: store.put("/b", b"2"), lambda: next(iter(store.watch("/", 0)))):
            with pytest.raises(StoreReadOnly) as e:
                call()
            assert str(path) in str(e.value) and "read-only" in str(e.value)
        with pytest.raises(StoreReadOnly):
            SqliteStore(d / "new" / "tabby.db").put("/a", b"1")  # cannot even make its directory
        assert remount(d, "rw").returncode == 0
        assert store.put("/b", b"2") == 2 and store.get("/a").value == b"1"  # opened again, read-write
        store.close()


def test_read_only_with_the_wal_left_by_a_crash_reads_then_writes_again() -> None:
    """A process died holding the file, so its -wal and -shm stay: on a read-only filesystem
    the store reads and cannot write, and once read-write it writes again without a restart
    (the watch's connection, which mapped the -shm read-only, is opened again as well)."""
    with tmpfs() as d:
        path = d / "tabby.db"
        crash = ("import os\nfrom tabby.store.sqlite import SqliteStore\n"
                 f"SqliteStore({str(path)!r}).put('/a', b'1')\nos._exit(0)")  # dies without closing
        subprocess.run([sys.executable, "-c", crash], check=True)
        assert Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()
        assert remount(d, "ro").returncode == 0
        store = SqliteStore(path)
        seen: list[str] = []
        watch = store.watch("/", 0)
        t = threading.Thread(target=lambda: [seen.append(ev.key) for ev in watch], daemon=True)
        try:
            t.start()
            wait_for(lambda: seen == ["/a"], 5, what="the watch reading a read-only store")
            with pytest.raises(StoreReadOnly, match="SQLITE_READONLY"):
                store.put("/b", b"2")
            assert remount(d, "rw").returncode == 0

            def put() -> bool:
                try:
                    store.put("/b", b"2")
                    return True
                except StoreReadOnly:
                    return False

            wait_for(put, 5, 0.2, "a write once read-write")
            wait_for(lambda: seen == ["/a", "/b"], 5, what="the watch following")
        finally:
            watch.close()
            t.join(5)
            store.close()


@contextmanager
def ext4(tmp: Path) -> Iterator[tuple[Path, str]]:
    """A 16 MiB ext4 (no journal, errors=remount-ro) on a loop device of its own."""
    img, mnt = tmp / "ext4.img", tmp / "ext4"
    subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-O", "^has_journal", str(img)], check=True)
    mnt.mkdir()
    loop = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                          text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "errors=remount-ro", loop, str(mnt)], check=True, capture_output=True)
        try:
            yield mnt, Path(loop).name
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_ext4_gone_read_only_under_an_open_store(tmp_path: Path) -> None:
    """What a failing disk does: the kernel turns the filesystem read-only while the file is
    open. SQLite only says "disk I/O error"; the store asks the filesystem and says read-only."""
    with ext4(tmp_path) as (mnt, dev):
        trigger = Path(f"/sys/fs/ext4/{dev}/trigger_fs_error")
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger}")
        path = mnt / "tabby.db"
        store = SqliteStore(path)
        try:
            store.put("/a", b"1")
            trigger.write_text("tbyt test: pretend the disk failed")
            with pytest.raises(StoreReadOnly) as e:
                for i in range(20):
                    store.put(f"/b{i}", b"y" * 5000)
            assert str(path) in str(e.value) and "read-only" in str(e.value)
            assert store.get("/a").value == b"1"  # opened again, read-only: reads still served
        finally:
            store.close()


# -- file modes ----------------------------------------------------------------------------


def test_database_file_0600_and_created_directories_0700(tmp_path: Path) -> None:
    old = os.umask(0)  # the modes must not depend on the umask
    try:
        path = tmp_path / "made" / "by-us" / "tabby.db"
        store = SqliteStore(path)
        store.put("/a", b"1")
        assert mode_of(tmp_path / "made") == mode_of(tmp_path / "made" / "by-us") == 0o700
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert mode_of(p) == 0o600, p
        store.close()

        theirs = tmp_path / "operator"  # e.g. /var/lib/tabby made by a package: left as it is
        theirs.mkdir(mode=0o755)
        old_file = theirs / "tabby.db"
        legacy = sqlite3.connect(old_file)  # a file some older version made 0644
        legacy.execute("CREATE TABLE x (y)")
        legacy.close()
        os.chmod(old_file, 0o644)
        store = SqliteStore(old_file)
        store.put("/a", b"1")
        assert mode_of(theirs) == 0o755
        assert mode_of(old_file) == mode_of(Path(f"{old_file}-wal")) == 0o600
        store.close()
    finally:
        os.umask(old)


# -- etcd ----------------------------------------------------------------------------------


def test_etcd_unreachable_is_unavailable_naming_the_url() -> None:
    port = free_port()  # nothing listens there
    store = EtcdStore("127.0.0.1", port, timeout=1.0)
    for call in (lambda: store.get("/a"), lambda: store.put("/a", b"1"), lambda: next(iter(store.watch("/", 0)))):
        with pytest.raises(Unavailable, match=f"http://127.0.0.1:{port}"):
            call()
    store.close()


class FakeEtcd:
    """Not a test of etcd: something at an etcd URL answering what etcd never would (a proxy's
    HTML page, an empty object, a 5xx, a watch stream of junk), to check each becomes a typed
    error naming the URL. Serves only on 127.0.0.1."""

    def __init__(self) -> None:
        self.mode = "ok"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting ("hang")
                    pass

            def do_GET(self) -> None:
                self._send(200, b'{"etcdserver": "3.5.0", "etcdcluster": "3.5.0"}')

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                m = fake.mode
                if m == "hang":
                    time.sleep(2)
                    return self._send(200, b"{}")
                if m == "watch-junk":
                    return self._send(200, b'{"result": {"events": [{"kv": {"value": "eA=="}}]}}\n')
                self._send(*{
                    "html": (200, b"<html><body>Bad gateway, try later</body></html>", "text/html"),
                    "empty": (200, b"{}"),
                    "list": (200, b"[1, 2, 3]"),
                    "503": (503, b'{"error": "etcdserver: no leader", "code": 14}'),
                    "500": (500, b'{"error": "etcdserver: unknown", "code": 2}'),
                    "400": (400, b'{"error": "etcdserver: too many operations in txn request", "code": 3}'),
                }[m])

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeEtcd:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_etcd_garbage_5xx_and_timeouts_are_typed_errors_naming_the_url() -> None:
    with FakeEtcd() as fake:
        store = EtcdStore("127.0.0.1", fake.port, timeout=0.5)
        url = f"http://127.0.0.1:{fake.port}"
        cases: list[tuple[str, Any, type, bool]] = [
            ("html", lambda: store.get("/a"), BadResponse, False),
            ("list", lambda: store.get("/a"), BadResponse, False),
            ("empty", lambda: store.list("/"), BadResponse, False),  # no header.revision
            ("empty", lambda: store.put("/a", b"1"), BadResponse, False),
            ("empty", lambda: store.update("/a", b"1", 3), BadResponse, False),
            ("503", lambda: store.get("/a"), Unavailable, True),
            ("500", lambda: store.create("/a", b"1"), Unavailable, True),
            ("400", lambda: store.delete("/a"), StoreError, False),
            ("hang", lambda: store.revision(), Unavailable, True),
            ("html", lambda: next(iter(store.watch("/", 0))), BadResponse, False),
            ("watch-junk", lambda: next(iter(store.watch("/", 0))), BadResponse, False),
            ("503", lambda: next(iter(store.watch("/", 0))), Unavailable, True),
        ]
        for mode, call, typed, transient in cases:
            fake.mode = mode
            with pytest.raises(StoreError) as e:
                call()
            assert isinstance(e.value, typed), (mode, e.value)
            assert isinstance(e.value, Unavailable) is transient, (mode, e.value)
            assert url in str(e.value), (mode, e.value)
        fake.mode = "400"
        with pytest.raises(StoreError, match="too many operations"):  # etcd's own words are kept
            store.delete("/a")
        store.close()


# -- the loops, in-process -----------------------------------------------------------------


WATCH_RETRY = r"store (?:unavailable|watch failed) \(watch of \S+\), attempt (\d+)"  # the syncer's line per retry


def attempts_logged(records: list[logging.LogRecord], pattern: str) -> list[int]:
    return [int(m.group(1)) for r in records if (m := re.search(pattern, r.getMessage()))]


def test_status_writer_retries_with_back_off_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tabby.db"
    store = SqliteStore(path, busy_timeout_s=0.05)
    reader = SqliteStore(path)
    writer = StatusWriter(store, "h1", ttl_s=0.6, retry_s=0.05, max_retry_s=0.4)
    holder = sqlite3.connect(path, isolation_level=None)
    caplog.set_level(logging.INFO, logger="tabby.agent.status")
    try:
        writer.start()
        writer.set("ep", "up")
        wait_for(lambda: status(reader, "h1", "ep"), 5, what="first status")
        holder.execute("BEGIN IMMEDIATE")  # from here every write is StoreLocked
        writer.set("ep", "down", "interface gone")
        wait_for(lambda: len(attempts_logged(caplog.records, r"not written, attempt (\d+)")) >= 5, 10,
                 what="five retries")
        assert writer.failing is not None and str(path) in writer.failing and "locked" in writer.failing
        assert "host heartbeat not written" in caplog.text  # the heartbeat is retried with the rest
        tries = [r.created for r in caplog.records if "not written, attempt" in r.getMessage()]
        assert tries[4] - tries[3] > tries[1] - tries[0]  # backing off, not hammering
        assert writer.alive()
        holder.execute("ROLLBACK")
        released = time.time()
        wait_for(lambda: (status(reader, "h1", "ep") or {}).get("state") == "down", 5, what="queued status written")
        wait_for(lambda: writer.failing is None, 5, what="failing cleared")
        wait_for(lambda: json.loads(reader.get("/tabby/status/hosts/h1").value)["heartbeat"] > released, 5,
                 what="heartbeat after the lock")
        assert "work again" in caplog.text
    finally:
        holder.close()
        writer.stop()
        store.close()
        reader.close()


class _SlowDown:
    """A store whose write of a "down" status waits until told: the window in which it is in flight."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner, self.writing, self.go, self.done = inner, threading.Event(), threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put(self, key: str, value: bytes, lease: Any = None) -> int:
        if key.startswith("/tabby/status/endpoints/") and b'"down"' in value:
            self.writing.set()
            assert self.go.wait(10)
            try:
                return self.inner.put(key, value, lease)
            finally:
                self.done.set()
        return self.inner.put(key, value, lease)


def test_status_writer_writes_a_state_that_comes_back_while_another_is_in_flight(tmp_path: Path) -> None:
    """up written, down being written, up again: set() compared "up" with what it had written last
    and dropped it, and the Store said down until the next full check."""
    store = _SlowDown(SqliteStore(tmp_path / "tabby.db"))
    writer = StatusWriter(store, "h1", retry_s=0.05, max_retry_s=0.2)  # type: ignore[arg-type]
    try:
        writer.start()
        writer.set("ep", "up")
        wait_for(lambda: (status(store.inner, "h1", "ep") or {}).get("state") == "up", 5, what="up written")
        writer.set("ep", "down", "interface gone")
        assert store.writing.wait(5)
        writer.set("ep", "up")  # while down is in flight
        store.go.set()
        assert store.done.wait(5)  # down is in the Store now: up must follow it
        wait_for(lambda: (status(store.inner, "h1", "ep") or {}).get("state") == "up", 5, what="up again")
    finally:
        store.go.set()
        writer.stop()
        store.inner.close()


class _ExpiringLeases:
    """A store with leases, whose first lease is gone by the time the writer puts with it."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner, self.granted = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def grant_lease(self, ttl_s: float) -> Any:
        self.granted += 1
        n = self.granted

        class _L:
            def keep_alive(self) -> bool:
                return True

            def revoke(self) -> None:
                pass

            number = n
        return _L()

    def put(self, key: str, value: bytes, lease: Any = None) -> int:
        if lease is not None and lease.number == 1:
            raise StoreError("store etcd://x: HTTP 404: etcdserver: requested lease not found")
        return self.inner.put(key, value)


def test_a_lease_that_expired_before_its_put_is_replaced(tmp_path: Path) -> None:
    """The put with a lease that etcd no longer knows fails for ever: the writer kept the lease and
    retried with it, and the host read as dead until its agent was restarted."""
    store = _ExpiringLeases(SqliteStore(tmp_path / "tabby.db"))
    writer = StatusWriter(store, "h1", retry_s=0.05, max_retry_s=0.2)  # type: ignore[arg-type]
    try:
        writer.start()
        wait_for(lambda: store.inner.get("/tabby/status/hosts/h1") is not None, 5, what="a heartbeat written")
        assert store.granted == 2
    finally:
        writer.stop()
        store.inner.close()


def test_etcd_overload_and_nospace_are_not_final_refusals() -> None:
    """429 (too many requests) was a final error: no other member tried, every syncer relisting, the
    status writer dropping records. etcd's NOSPACE alarm is a full store, as SQLite's disk full is."""
    from tabby.store.etcd import _http_failure

    busy = _http_failure("http://e1:2379", 429, json.dumps({"error": "etcdserver: too many requests", "code": 8}))
    assert isinstance(busy.error, Unavailable) and busy.transient and not busy.sent and not busy.final  # type: ignore[union-attr]
    full = _http_failure("http://e1:2379", 500, json.dumps({"error": "etcdserver: mvcc: database space exceeded",
                                                            "code": 8}))
    assert isinstance(full.error, StoreFull) and not full.sent  # type: ignore[union-attr]


def test_status_writer_drops_a_record_that_can_never_be_written(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteStore(tmp_path / "tabby.db")
    writer = StatusWriter(store, "h1", retry_s=0.05, max_retry_s=0.2)
    try:
        writer.start()
        writer.set_doc("/tabby/status/bgp/h1", {"sessions": object()})  # a bug: not JSON
        writer.set("ep", "up")
        wait_for(lambda: "/tabby/status/bgp/h1 dropped" in caplog.text, 5, what="the bad record dropped")
        writer.set("ep", "down", "later")
        wait_for(lambda: (status(store, "h1", "ep") or {}).get("state") == "down", 5,
                 what="records after it written all the same")
        wait_for(lambda: writer.failing is None, 5, what="not failing")
        assert writer.alive()
        assert store.get("/tabby/status/bgp/h1") is None
    finally:
        writer.stop()
        store.close()


def test_syncer_backs_off_on_a_read_only_store_and_resumes(caplog: pytest.LogCaptureFixture) -> None:
    """The watch loop on a Store it cannot open (a WAL database on a read-only filesystem cannot
    even be read): one log line per try, ``failing`` names the file, and a full view once the
    filesystem is read-write again."""
    caplog.set_level(logging.INFO, logger="tabby.syncer")
    with tmpfs() as d:
        path = d / "tabby.db"
        first = host("one")
        seed = SqliteStore(path)
        seed.put(key_of(first), encode(first))
        seed.close()
        assert remount(d, "ro").returncode == 0
        store = SqliteStore(path)
        syncer = ResourceSyncer(store, "/tabby/v1/", retry_s=0.05, max_retry_s=0.4)
        got: list[Any] = []
        t = threading.Thread(target=lambda: [got.append(x) for x in syncer], daemon=True)
        try:
            t.start()
            wait_for(lambda: len(attempts_logged(caplog.records, WATCH_RETRY)) >= 4, 10, what="four retries")
            assert attempts_logged(caplog.records, WATCH_RETRY)[:4] == [1, 2, 3, 4]
            assert syncer.failing is not None and str(path) in syncer.failing and "read-only" in syncer.failing
            assert got == [] and t.is_alive()
            assert remount(d, "rw").returncode == 0
            wait_for(lambda: any(isinstance(x, InSync) for x in got), 5, what="in sync after read-write")
            assert syncer.failing is None
            assert [x.key for x in got if isinstance(x, Update)] == [key_of(first)]
            second = host("two")
            store.put(key_of(second), encode(second))
            wait_for(lambda: any(isinstance(x, Update) and x.key == key_of(second) for x in got), 5,
                     what="a live update")
        finally:
            syncer.stop()
            t.join(5)
            store.close()
        assert not t.is_alive()


# -- a real agent --------------------------------------------------------------------------


def health(agent: AgentProc) -> tuple[int, dict[str, Any]]:
    code, body = agent.http("/healthz")
    try:
        return code, json.loads(body)
    except ValueError:
        return code, {}


def degraded(agent: AgentProc) -> str:
    return health(agent)[1].get("degraded", "")


def retries(log: str, pattern: str) -> list[int]:
    return [int(n) for n in re.findall(pattern, log)]


@pytest.fixture
def host_ns() -> Iterator[str]:
    with namespace("sf") as ns:
        yield ns


def test_agent_survives_a_full_disk(host_ns: str, tmp_path: Path) -> None:
    netns.add_veth(host_ns, "tapa", "vma")
    with tmpfs("8m") as fs:
        db = fs / "tabby" / "tabby.db"
        store = SqliteStore(db)
        agent = AgentProc(host_ns, f"sqlite://{db}", "h1", tmp_path / "agent.log")
        try:
            apply(store, endpoint("a", "h1", "tapa", v6=["fd00:e::a"], v4=["10.65.0.10"], mac="52:54:00:00:00:0a"),
                  endpoint("late", "h1", "taplate", v6=["fd00:e::b"], mac="52:54:00:00:00:0b"))
            agent.start()
            wait_for(agent.healthy, 15, 0.1, "agent healthy")
            wait_for(lambda: (status(store, "h1", "a") or {}).get("state") == "up", 10, what="a up")
            wait_for(lambda: (status(store, "h1", "late") or {}).get("state") == "down", 10, what="late down")
            programmed, neighs = routes(host_ns), neighbours(host_ns)
            assert programmed == {"fd00:e::a/128": "tapa", "10.65.0.10/32": "tapa"}

            filler = fill(fs)
            # the interface of a known endpoint appears: the agent programs it from what it has
            # read, and its status ("up") is what cannot be written now
            netns.add_veth(host_ns, "taplate", "vmlate")
            wait_for(lambda: "fd00:e::b/128" in routes(host_ns), 10, what="late programmed on a full disk")
            wait_for(lambda: len(retries(agent.output(), r"status writer: .* not written, attempt (\d+)")) >= 3, 15,
                     0.1, "three status write attempts")
            reason = degraded(agent)
            assert str(db) in reason and "disk full" in reason, reason
            assert health(agent)[0] == 200  # serving its dataplane: degraded, not down
            assert retries(agent.output(), r"status writer: .* not written, attempt (\d+)")[:3] == [1, 2, 3]
            assert {k: v for k, v in routes(host_ns).items() if v == "tapa"} == programmed
            assert all(neighbours(host_ns)[k] == v for k, v in neighs.items() if k[0] == "tapa")
            assert (status(store, "h1", "late") or {}).get("state") == "down"  # could not be updated
            with pytest.raises(StoreFull):  # and neither can the operator write
                apply(store, endpoint("new", "h1", "tapnew", v6=["fd00:e::c"]))

            filler.unlink()
            t0 = time.monotonic()
            netns.add_veth(host_ns, "tapnew", "vmnew")
            apply(store, endpoint("new", "h1", "tapnew", v6=["fd00:e::c"], v4=["10.65.0.12"]))
            wait_for(lambda: "fd00:e::c/128" in routes(host_ns), 5, what="a new endpoint programmed")
            wait_for(lambda: all((status(store, "h1", n) or {}).get("state") == "up" for n in ("a", "late", "new")),
                     20, 0.1, "statuses written again")
            wait_for(lambda: not degraded(agent), 5, what="not degraded")
            print(f"recovered {time.monotonic() - t0:.1f} s after space came back")
            assert "status writer: writes to the store work again" in agent.output()
            assert_threads_alive(agent, host_ns)
        finally:
            agent.stop()
            store.close()
            print(agent.output()[-6000:])


@pytest.mark.parametrize("crash", [True, False], ids=["after-a-crash", "after-a-clean-stop"])
def test_agent_on_a_store_remounted_read_only(host_ns: str, tmp_path: Path, crash: bool) -> None:
    """Linux refuses to remount a filesystem read-only while a process holds a file on it open
    for writing (EBUSY), and a running agent always does: so the filesystem goes read-only
    between two runs of the agent (a restart, a reboot into a read-only /var), and the agent
    must come up on it. After a crash the -wal and -shm stay and the database can still be read:
    the agent serves, and cannot write. After a clean stop they are gone, and a WAL database on
    a read-only filesystem cannot even be opened: the agent has no view, and touches nothing."""
    netns.add_veth(host_ns, "tapa", "vma")
    with tmpfs() as fs:
        db = fs / "tabby.db"  # straight in the mount's root: a directory we did not make
        store = SqliteStore(db)
        first = AgentProc(host_ns, f"sqlite://{db}", "h1", tmp_path / "agent1.log")
        second = AgentProc(host_ns, f"sqlite://{db}", "h1", tmp_path / "agent2.log")
        try:
            apply(store, endpoint("a", "h1", "tapa", v6=["fd00:e::a"], v4=["10.65.0.10"], mac="52:54:00:00:00:0a"))
            first.start()
            wait_for(first.healthy, 15, 0.1, "agent healthy")
            wait_for(lambda: (status(store, "h1", "a") or {}).get("state") == "up", 10, what="a up")
            programmed, neighs = routes(host_ns), neighbours(host_ns)
            assert programmed == {"fd00:e::a/128": "tapa", "10.65.0.10/32": "tapa"}
            assert mode_of(fs) == 0o755 and mode_of(db) == 0o600
            store.close()
            assert "busy" in remount(fs, "ro").stderr  # the running agent holds the file open
            if crash:
                first.kill()
            else:
                first.stop()
                SqliteStore(db).close()  # the last connection to close checkpoints and removes the WAL
            assert Path(f"{db}-wal").exists() is crash
            assert remount(fs, "ro").returncode == 0

            second.start()
            if crash:  # it reads, serves what it read (the same), and says it cannot write
                wait_for(second.healthy, 15, 0.1, "healthy on a read-only store")
                pattern = r"status writer: host heartbeat not written, attempt (\d+): store (\S+): read-only"
                want_code = 200
            else:  # it cannot read: no view, so nothing new is served and nothing is taken away
                # each of the agent's watches says so; the Hosts' one is counted
                pattern = r"store unavailable \(watch of /tabby/v1/hosts/\), attempt (\d+): store (\S+): read-only"
                want_code = 503
            wait_for(lambda: len(re.findall(pattern, second.output())) >= 3, 15, 0.1, "three attempts")
            assert [(int(n), p) for n, p in re.findall(pattern, second.output())][:3] == [
                (1, str(db)), (2, str(db)), (3, str(db))]
            assert retries(second.output(), r"status writer: host heartbeat not written, attempt (\d+)")[:2] == [1, 2]
            code, info = health(second)
            assert code == want_code and info["in_sync"] is crash, info
            assert str(db) in info["degraded"] and "read-only" in info["degraded"], info
            assert routes(host_ns) == programmed
            assert all(neighbours(host_ns)[k] == v for k, v in neighs.items() if k[0] == "tapa")

            assert remount(fs, "rw").returncode == 0
            # `ip netns exec` gave the agent a mount namespace of its own, copied while the mount
            # was read-only, and a mount's own read-only flag is per namespace: clear it there too
            assert second.proc is not None
            assert remount(fs, "rw", pid=second.proc.pid).returncode == 0
            t0 = time.monotonic()
            wait_for(second.healthy, 20, 0.1, "healthy after read-write")
            wait_for(lambda: not degraded(second), 20, 0.1, "not degraded")
            store = SqliteStore(db)
            netns.add_veth(host_ns, "tapnew", "vmnew")
            apply(store, endpoint("new", "h1", "tapnew", v6=["fd00:e::c"], v4=["10.65.0.12"]))
            wait_for(lambda: "fd00:e::c/128" in routes(host_ns), 5, what="a new endpoint programmed")
            wait_for(lambda: (status(store, "h1", "new") or {}).get("state") == "up", 5, what="its status written")
            print(f"recovered {time.monotonic() - t0:.1f} s after the remount")
            assert {k: v for k, v in routes(host_ns).items() if v == "tapa"} == programmed
            assert "work again" in second.output()
            assert crash or "store answers again" in second.output()
            assert_threads_alive(second, host_ns)
        finally:
            first.stop()
            second.stop()
            store.close()
            print(second.output()[-6000:])


def assert_threads_alive(agent: AgentProc, ns: str) -> None:
    """Every thread of the agent at work: the health server answers, the store syncer and the
    loop programmed the new endpoint, the status writer wrote its status, and the netlink
    monitor sees a route deleted by hand (the loop puts it back)."""
    assert agent.proc is not None and agent.proc.poll() is None
    assert health(agent)[0] == 200
    netns.ip("-6", "route", "del", "fd00:e::a/128", "dev", "tapa", ns=ns)
    wait_for(lambda: "fd00:e::a/128" in routes(ns), 3, what="drift repaired")
    assert "Traceback" not in agent.output()



def test_a_file_that_is_not_a_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """Pointed at the wrong file (/dev/null, /etc/passwd), the store set its mode to 0600 and only
    then failed; now it refuses, naming why, and changes nothing."""
    text = tmp_path / "passwd.txt"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    text.chmod(0o644)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o644)
    for path, why in ((text, "not a database"), (fifo, "not a regular file")):
        with pytest.raises(StoreError, match=why):
            SqliteStore(str(path)).list("/")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert text.read_text() == "root:x:0:0:root:/root:/bin/bash\n"
    assert not (tmp_path / "passwd.txt-journal").exists() and not (tmp_path / "passwd.txt-wal").exists()


READ_AND_CLOSE = """
import sys
sys.path.insert(0, sys.argv[1])
from tabby.store import open_store
s = open_store(sys.argv[2])
print(len(s.list("/")[0]))
s.close()
"""


def test_a_second_store_on_the_same_file_loses_no_write_of_the_first(tmp_path: Path) -> None:
    """SQLite's WAL locks are POSIX locks, dropped for the whole process when any descriptor of the
    file is closed. Opening a second store on the file (as the lab, a CLI or a driver does) read
    the file's header and closed it: the first store's locks were gone, the next process to close
    its connection deleted -wal and -shm as if alone, and the first store's writes after that went
    into the deleted WAL, lost, though each write said it had committed."""
    url = f"sqlite://{tmp_path}/s.db"
    src = str(Path(__file__).resolve().parents[1] / "src")
    first = open_store(url)
    first.put("/t/a", b"1")
    second = open_store(url)
    assert second.get("/t/a") is not None  # its own connection opened: the old checks closed a descriptor
    r = subprocess.run([sys.executable, "-c", READ_AND_CLOSE, src, url], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first.put("/t/b", b"2")
    second.put("/t/c", b"3")
    r = subprocess.run([sys.executable, "-c", READ_AND_CLOSE, src, url], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "3", (r.stdout, r.stderr)  # every write is in the file
    first.close()
    second.close()
