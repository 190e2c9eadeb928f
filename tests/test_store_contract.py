"""The Store contract, run against the SQLite file and a real etcd."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

from tabby.store import AlreadyExists, Event, HistoryGone, NotFound, RevisionMismatch, Store, open_store


def collect(store: Store, prefix: str, after: int, n: int, timeout: float = 10.0) -> list[Event]:
    """The first n events of a watch, or fail after timeout."""
    w = store.watch(prefix, after)
    got: list[Event] = []
    failed: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            for ev in w:
                got.append(ev)
                if len(got) >= n:
                    break
        except Exception as e:
            failed.append(e)
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    done.wait(timeout)
    w.close()
    t.join(5)
    if failed:
        raise failed[0]
    assert len(got) >= n, f"saw {len(got)} of {n} events: {got}"
    return got


def test_get_missing(store: Store, prefix: str) -> None:
    assert store.get(prefix + "nothing") is None


def test_create_then_get_and_create_again_fails(store: Store, prefix: str) -> None:
    rev = store.create(prefix + "a", b"one")
    kv = store.get(prefix + "a")
    assert kv is not None
    assert (kv.value, kv.mod_revision, kv.create_revision) == (b"one", rev, rev)
    with pytest.raises(AlreadyExists):
        store.create(prefix + "a", b"two")
    assert store.get(prefix + "a").value == b"one"


def test_update_is_compare_and_swap(store: Store, prefix: str) -> None:
    r1 = store.create(prefix + "k", b"1")
    r2 = store.update(prefix + "k", b"2", r1)
    assert r2 > r1
    with pytest.raises(RevisionMismatch) as exc:
        store.update(prefix + "k", b"stale", r1)
    assert exc.value.actual == r2
    kv = store.get(prefix + "k")
    assert (kv.value, kv.mod_revision, kv.create_revision) == (b"2", r2, r1)
    with pytest.raises(NotFound):
        store.update(prefix + "missing", b"x", r1)
    assert store.get(prefix + "missing") is None


def test_delete_plain_and_by_revision(store: Store, prefix: str) -> None:
    r1 = store.create(prefix + "d", b"x")
    r2 = store.update(prefix + "d", b"y", r1)
    with pytest.raises(RevisionMismatch):
        store.delete(prefix + "d", expected_revision=r1)
    assert store.get(prefix + "d").value == b"y"
    assert store.delete(prefix + "d", expected_revision=r2) > r2
    assert store.get(prefix + "d") is None
    with pytest.raises(NotFound):
        store.delete(prefix + "d")
    store.put(prefix + "e", b"z")
    store.delete(prefix + "e")
    assert store.get(prefix + "e") is None


def test_list_by_prefix_sorted_and_consistent(store: Store, prefix: str) -> None:
    for k in ["b", "a", "a/x", "ab", "c/d"]:
        store.put(prefix + k, k.encode())
    store.put(prefix[:-1] + "-sibling", b"not under the prefix")
    kvs, rev = store.list(prefix + "a")
    assert [kv.key for kv in kvs] == [prefix + "a", prefix + "a/x", prefix + "ab"]
    kvs, rev = store.list(prefix)
    assert [kv.key for kv in kvs] == [prefix + k for k in ["a", "a/x", "ab", "b", "c/d"]]
    assert rev >= max(kv.mod_revision for kv in kvs)
    assert rev == store.revision()


def test_revisions_strictly_increase(store: Store, prefix: str) -> None:
    revs = [store.put(prefix + f"k{i % 3}", b"%d" % i) for i in range(20)]
    assert revs == sorted(set(revs))


def test_values_are_bytes_and_keys_unicode(store: Store, prefix: str) -> None:
    blob = bytes(range(256))
    store.put(prefix + "bïn", blob)
    assert store.get(prefix + "bïn").value == blob


def test_watch_replays_then_follows_in_order(store: Store, prefix: str) -> None:
    _, start = store.list(prefix)
    r1 = store.create(prefix + "w", b"1")
    r2 = store.update(prefix + "w", b"2", r1)
    store.put(prefix[:-1] + "-other", b"not watched")

    def later() -> None:
        time.sleep(0.3)
        store.delete(prefix + "w")
        store.put(prefix + "z", b"live")

    threading.Thread(target=later).start()
    evs = collect(store, prefix, start, 4)
    assert [(e.type, e.key, e.value) for e in evs] == [
        ("put", prefix + "w", b"1"), ("put", prefix + "w", b"2"),
        ("delete", prefix + "w", None), ("put", prefix + "z", b"live"),
    ]
    assert evs[0].revision == r1 and evs[1].revision == r2
    assert [e.revision for e in evs] == sorted({e.revision for e in evs})


def test_a_paced_watch_misses_nothing_and_keeps_the_order(store: Store, prefix: str) -> None:
    """pace_s only delays reads: writes that come while it waits, in bursts and one by one,
    all arrive, in revision order, and close() ends a watch that is pausing."""
    _, start = store.list(prefix)

    def writes() -> None:
        for i in range(30):
            store.put(f"{prefix}p{i:02d}", b"x")
            time.sleep(0.001 if i % 10 else 0.3)

    t = threading.Thread(target=writes)
    t.start()
    w = store.watch(prefix, start, pace_s=0.4)
    got: list[Event] = []

    def follow() -> None:
        for ev in w:
            got.append(ev)

    f = threading.Thread(target=follow, daemon=True)
    f.start()
    t.join()
    deadline = time.monotonic() + 10
    while len(got) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    w.close()
    f.join(5)
    assert not f.is_alive()
    assert [e.key for e in got] == [f"{prefix}p{i:02d}" for i in range(30)]
    assert [e.revision for e in got] == sorted(e.revision for e in got)


def test_a_paced_watch_reads_a_steady_stream_in_few_rounds(store: Store, prefix: str) -> None:
    """pace_s: every read that had to wait is followed by a pause, so 20 writes spread over ~0.6 s
    come in a handful of reads (one each without pacing): how an agent's view of other hosts'
    endpoints costs it a wake-up per pace_s, not one per workload add anywhere. (etcd's watch
    used to pause at most once per pace_s, and read what came in the half second after as it
    came, one wake-up each.)"""
    w = store.watch(prefix, store.revision(), pace_s=0.5)
    rounds: list[list[str]] = []
    last = [0.0]

    def follow() -> None:
        for ev in w:
            now = time.monotonic()
            if now - last[0] > 0.2:  # a new read: the lines of one read come within milliseconds
                rounds.append([])
            last[0] = now
            rounds[-1].append(ev.key)

    f = threading.Thread(target=follow, daemon=True)
    f.start()
    try:
        time.sleep(0.3)  # the watch is waiting
        for i in range(20):
            store.put(f"{prefix}s{i:02d}", b"x")
            time.sleep(0.03)
        want = [f"{prefix}s{i:02d}" for i in range(20)]
        deadline = time.monotonic() + 5
        while [k for r in rounds for k in r] != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [k for r in rounds for k in r] == want, rounds
        assert len(rounds) <= 4, [len(r) for r in rounds]
    finally:
        w.close()
        f.join(5)


def test_watch_resumed_from_last_revision_sees_every_event_once(store: Store, prefix: str) -> None:
    _, start = store.list(prefix)
    for i in range(10):
        store.put(prefix + f"k{i}", b"%d" % i)
    first = collect(store, prefix, start, 4)[:4]
    # disconnected: more writes happen meanwhile
    for i in range(10, 20):
        store.put(prefix + f"k{i}", b"%d" % i)
    rest = collect(store, prefix, first[-1].revision, 16)
    seen = [e.value for e in first + rest]
    assert seen == [b"%d" % i for i in range(20)]


def test_watch_close_ends_a_blocked_iteration(store: Store, prefix: str) -> None:
    w = store.watch(prefix, store.revision())
    finished = threading.Event()
    t = threading.Thread(target=lambda: (list(w), finished.set()), daemon=True)
    t.start()
    time.sleep(0.3)
    w.close()
    assert finished.wait(5), "a closed watch must stop blocking"


def test_watch_from_compacted_history_says_resync(store: Store, prefix: str) -> None:
    old = store.put(prefix + "h", b"1")
    store.put(prefix + "h", b"2")
    head = store.put(prefix + "h", b"3")
    store.compact(head)
    with pytest.raises(HistoryGone) as exc:
        collect(store, prefix, old, 1, timeout=5)
    assert exc.value.compacted >= old
    # resuming from the list revision works again
    _, rev = store.list(prefix)
    store.put(prefix + "h", b"4")
    assert collect(store, prefix, rev, 1)[0].value == b"4"


def _increment(url: str, key: str, n: int, conflicts: mp.Queue) -> None:  # type: ignore[type-arg]
    store = open_store(url)
    lost = 0
    for _ in range(n):
        while True:
            kv = store.get(key)
            try:
                store.update(key, b"%d" % (int(kv.value) + 1), kv.mod_revision)
                break
            except RevisionMismatch:
                lost += 1
    conflicts.put(lost)
    store.close()


def test_eight_processes_cas_increments_lose_nothing(store: Store, store_url: str, prefix: str) -> None:
    key, n, writers = prefix + "counter", 150, 8
    store.create(key, b"0")
    ctx = mp.get_context("spawn")
    conflicts = ctx.Queue()
    procs = [ctx.Process(target=_increment, args=(store_url, key, n, conflicts)) for _ in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert int(store.get(key).value) == n * writers
    total_conflicts = sum(conflicts.get(timeout=5) for _ in procs)  # reported for the log; the count is the proof
    print(f"{store_url.split(':')[0]}: {total_conflicts} compare-and-swap conflicts retried")


def _foreign_put(store: Store, store_url: str, key: bytes, value: object) -> None:
    """What another program (not tabby) may write: a key that is not UTF-8, a value that is not a BLOB."""
    if store_url.startswith("sqlite://"):
        import sqlite3

        c = sqlite3.connect(store_url.removeprefix("sqlite://"), isolation_level=None)
        try:
            c.execute("BEGIN IMMEDIATE")
            rev = c.execute("SELECT value FROM meta WHERE name='revision'").fetchone()[0] + 1
            c.execute("UPDATE meta SET value=? WHERE name='revision'", (rev,))
            c.execute("INSERT OR REPLACE INTO kv VALUES (CAST(? AS TEXT), ?, ?, ?)", (key, value, rev, rev))
            c.execute("INSERT INTO log VALUES (?, 'put', CAST(? AS TEXT), ?)", (rev, key, value))
            c.execute("COMMIT")
        finally:
            c.close()
    else:
        import base64

        assert isinstance(value, bytes)
        store._post("/kv/put", {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()},  # type: ignore[attr-defined]
                    mutates=True)


def test_a_key_that_is_not_utf8_is_one_record_not_a_failed_listing_or_watch(store: Store, store_url: str,
                                                                           prefix: str) -> None:
    """It was a UnicodeDecodeError for the whole range (a listing lost every good key with it, and
    a watch failed on it for ever): now its bytes are kept as lone surrogates, and its reader names
    it as one corrupt record."""
    rev = store.put(f"{prefix}a", b"good")
    _foreign_put(store, store_url, prefix.encode() + b"b\xff", b"{}")
    store.put(f"{prefix}c", b"good too")
    kvs, _ = store.list(prefix)
    assert [kv.key for kv in kvs] == [f"{prefix}a", f"{prefix}b\udcff", f"{prefix}c"]
    assert [ev.key for ev in collect(store, prefix, rev, 2)] == [f"{prefix}b\udcff", f"{prefix}c"]


def test_a_sqlite_value_that_is_not_a_blob_is_read_as_bytes(tmp_path: Path) -> None:
    """(etcd's values are bytes by construction.) An INTEGER 5 was read as five zero bytes, a
    TEXT value was a TypeError out of the Store."""
    url = f"sqlite://{tmp_path}/s.db"
    store = open_store(url)
    try:
        _foreign_put(store, url, b"/t/t", "text")
        _foreign_put(store, url, b"/t/i", 5)
        assert {kv.key: kv.value for kv in store.list("/t/")[0]} == {"/t/t": b"text", "/t/i": b""}
    finally:
        store.close()
