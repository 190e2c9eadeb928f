"""The SQLite store's change feed: watches wake on commits from any process, not on a timer,
and still work where inotify is refused (they poll at a bounded rate)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tabby.store import Event
from tabby.store import sqlite as sq
from tabby.store.sqlite import SqliteStore

SRC = str(Path(__file__).resolve().parents[1] / "src")


IPAM_OWN = ("/tabby/v1/ipam/blocks/", "/tabby/v1/ipam/handles/", "/tabby/v1/ipam/gc")  # what agents exclude


def _follow(store: SqliteStore, prefix: str, exclude: tuple[str, ...] = (),
            pace_s: float = 0.0) -> tuple[list[Event], threading.Thread, object]:
    seen: list[Event] = []
    watch = store.watch(prefix, store.revision(), exclude=exclude, pace_s=pace_s)
    t = threading.Thread(target=lambda: [seen.append(ev) for ev in watch], daemon=True)
    t.start()
    return seen, t, watch


def _write_elsewhere(path: Path, key: str) -> None:
    code = f"from tabby.store.sqlite import SqliteStore\nSqliteStore({str(path)!r}).put({key!r}, b'x')"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": SRC})


def _wait(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_a_commit_from_another_process_wakes_the_watch(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    seen, t, watch = _follow(store, "/a/")
    try:
        assert store.feed() is not None  # inotify works here
        time.sleep(0.3)  # the watch is asleep in the feed now (its own fallback look is 30 s away)
        _write_elsewhere(tmp_path / "s.db", "/b/outside")
        _write_elsewhere(tmp_path / "s.db", "/a/inside")
        # well inside the watch's 30 s fallback: it was woken by the commit
        assert _wait(lambda: [e.key for e in seen] == ["/a/inside"], 5), seen
        store.put("/a/mine", b"y")  # the process's own write wakes it without the feed
        assert _wait(lambda: [e.key for e in seen] == ["/a/inside", "/a/mine"], 5), seen
    finally:
        watch.close()  # type: ignore[attr-defined]
        t.join(5)
        store.close()
    assert not t.is_alive()


def test_without_inotify_watches_poll(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    def refused() -> None:
        raise OSError(24, "Too many open files")  # what inotify_init says at max_user_instances

    monkeypatch.setattr(sq, "INotify", refused)
    store = SqliteStore(tmp_path / "s.db", idle_poll_interval_s=0.05)
    seen, t, watch = _follow(store, "/a/")
    try:
        assert store.feed() is None
        assert "no inotify" in caplog.text
        time.sleep(0.3)
        _write_elsewhere(tmp_path / "s.db", "/a/polled")
        assert _wait(lambda: [e.key for e in seen] == ["/a/polled"], 5), seen
    finally:
        watch.close()  # type: ignore[attr-defined]
        t.join(5)
        store.close()
    assert not t.is_alive()


_PING_PONG = """
import select, sys
from tabby.store.sqlite import SqliteStore
store = SqliteStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    store.put(f"/a/{i}", b"x")
    # the watcher answers each write; 5 s is well inside its 30 s fallback look
    if not select.select([sys.stdin], [], [], 5.0)[0] or not sys.stdin.readline():
        sys.exit(f"write {i} was not seen within 5 s: the watch slept through its commit")
"""


def test_no_commit_from_another_process_is_slept_through(tmp_path: Path) -> None:
    """One write at a time, each waiting for the watch to see it: a wake-up that came before the
    commit was visible (SQLite writes the -wal first) and none after would leave it unseen."""
    store = SqliteStore(tmp_path / "s.db")
    rounds = 1000
    watch = store.watch("/a/", store.revision())
    writer = subprocess.Popen([sys.executable, "-c", _PING_PONG, str(tmp_path / "s.db"), str(rounds)],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    seen = 0

    def answer() -> None:
        nonlocal seen
        assert writer.stdin is not None
        for _ev in watch:
            seen += 1
            writer.stdin.write("seen\n")
            writer.stdin.flush()
            if seen == rounds:
                return

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        writer.wait(timeout=120)  # not communicate(): it would close the writer's stdin
        assert writer.stderr is not None
        assert writer.returncode == 0, writer.stderr.read()
        t.join(5)
        assert seen == rounds
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        watch.close()  # type: ignore[attr-defined]
        t.join(5)
        store.close()


def test_status_commits_wake_only_watches_that_see_status(tmp_path: Path) -> None:
    """Heartbeats and status (every agent, every few seconds) touch a signal of their own: a watch
    of the resources is not woken by them at all, a watch that sees status is."""
    store = SqliteStore(tmp_path / "s.db")
    loud, lt, lw = _follow(store, "/tabby/v1/", IPAM_OWN)
    quiet, qt, qw = _follow(store, "/tabby/status/")
    everything, et, ew = _follow(store, "/tabby/")
    try:
        feed = store.feed()
        assert feed is not None
        time.sleep(0.3)
        resources = store.signals_for("/tabby/v1/", IPAM_OWN)
        before = feed.seq(resources)
        _write_elsewhere(tmp_path / "s.db", "/tabby/status/hosts/h1")
        assert _wait(lambda: [e.key for e in quiet] == ["/tabby/status/hosts/h1"], 5), quiet
        assert _wait(lambda: [e.key for e in everything] == ["/tabby/status/hosts/h1"], 5), everything
        time.sleep(0.3)
        assert feed.seq(resources) == before and not loud  # not even woken
        _write_elsewhere(tmp_path / "s.db", "/tabby/v1/hosts/h1")
        assert _wait(lambda: [e.key for e in loud] == ["/tabby/v1/hosts/h1"], 5), loud
        assert _wait(lambda: len(everything) == 2, 5) and len(quiet) == 1
    finally:
        for w in (lw, qw, ew):
            w.close()  # type: ignore[attr-defined]
        for t in (lt, qt, et):
            t.join(5)
        store.close()


def test_a_deleted_signal_file_is_watched_again(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    seen, t, watch = _follow(store, "/a/")
    try:
        time.sleep(0.3)
        os.unlink(store.changed_path)  # an operator's cleanup, say: the watch is woken, and goes on
        time.sleep(0.2)
        _write_elsewhere(tmp_path / "s.db", "/a/one")
        assert _wait(lambda: [e.key for e in seen] == ["/a/one"], 8), seen  # within the feed's 5 s re-watch
        time.sleep(sq.ChangeFeed.READ_TIMEOUT_MS / 1000 + 0.5)
        _write_elsewhere(tmp_path / "s.db", "/a/two")
        assert _wait(lambda: [e.key for e in seen] == ["/a/one", "/a/two"], 3), seen
    finally:
        watch.close()  # type: ignore[attr-defined]
        t.join(5)
        store.close()


def test_quiet_prefixes_are_the_models_status_and_ipam_prefixes() -> None:
    from tabby.model.keys import ENDPOINTS_PREFIX, IPAM_BLOCKS_PREFIX, IPAM_GC_KEY, IPAM_HANDLES_PREFIX, STATUS_PREFIX

    assert sq.QUIET_PREFIXES == (STATUS_PREFIX, IPAM_BLOCKS_PREFIX, IPAM_HANDLES_PREFIX, IPAM_GC_KEY)
    assert sq.ENDPOINTS_PREFIX == ENDPOINTS_PREFIX


def test_a_watch_that_excludes_ipam_records_is_not_woken_by_them(tmp_path: Path) -> None:
    """The agents' watch: /tabby/v1/ without IPAM's blocks, handles and collector state (an add
    writes two or three of those): not woken by them, and never given one; without the
    exclusion the same watch gets them."""
    store = SqliteStore(tmp_path / "s.db")
    ipam = ("/tabby/v1/endpoints/", *IPAM_OWN)  # the endpoints, too, come by watches of their own
    agent_like, at, aw = _follow(store, "/tabby/v1/", ipam)
    everything, et, ew = _follow(store, "/tabby/v1/")
    try:
        feed = store.feed()
        assert feed is not None
        time.sleep(0.3)
        signals = store.signals_for("/tabby/v1/", ipam)
        assert signals == (store.changed_path,)
        before = feed.seq(signals)
        _write_elsewhere(tmp_path / "s.db", "/tabby/v1/ipam/handles/h1")
        _write_elsewhere(tmp_path / "s.db", "/tabby/v1/ipam/blocks/b1")
        assert _wait(lambda: len(everything) == 2, 5), everything
        time.sleep(0.3)
        assert feed.seq(signals) == before and not agent_like
        _write_elsewhere(tmp_path / "s.db", "/tabby/v1/ipam/affinities/a1")  # the agents need these
        assert _wait(lambda: [e.key for e in agent_like] == ["/tabby/v1/ipam/affinities/a1"], 5), agent_like
    finally:
        for w in (aw, ew):
            w.close()  # type: ignore[attr-defined]
        for t in (at, et):
            t.join(5)
        store.close()


def test_an_endpoint_commit_wakes_only_its_hosts_watch_and_whole_range_watches(tmp_path: Path) -> None:
    """The agents' three watches (agent.py): resources less endpoints, this host's endpoints, and
    every endpoint. A workload add on h2 wakes neither h1's own-endpoints watch nor the resource
    watch; it reaches the whole-range one. A host segment that is no file name still has a signal."""
    store = SqliteStore(tmp_path / "s.db")
    agent_exclude = ("/tabby/v1/endpoints/", *IPAM_OWN)
    resources, rt, rw = _follow(store, "/tabby/v1/", agent_exclude)
    mine, mt, mw = _follow(store, "/tabby/v1/endpoints/h1/")
    every, et, ew = _follow(store, "/tabby/v1/endpoints/", ("/tabby/v1/endpoints/h1/",))
    try:
        feed = store.feed()
        assert feed is not None
        time.sleep(0.3)
        quiet = (store.signals_for("/tabby/v1/", agent_exclude), store.signals_for("/tabby/v1/endpoints/h1/"))
        before = [feed.seq(sig) for sig in quiet]
        _write_elsewhere(tmp_path / "s.db", "/tabby/v1/endpoints/h2/c1")
        _write_elsewhere(tmp_path / "s.db", "/tabby/v1/endpoints/h10/c2")  # h1's prefix, not its host
        assert _wait(lambda: [e.key for e in every] == ["/tabby/v1/endpoints/h2/c1", "/tabby/v1/endpoints/h10/c2"],
                     5), every
        time.sleep(0.3)
        assert [feed.seq(sig) for sig in quiet] == before and not resources and not mine  # not even woken
        _write_elsewhere(tmp_path / "s.db", "/tabby/v1/endpoints/h1/c3")
        assert _wait(lambda: [e.key for e in mine] == ["/tabby/v1/endpoints/h1/c3"], 5), mine
        time.sleep(0.2)
        assert len(every) == 2 and not resources  # excluded there, and not the resource watch's
        odd = store.signals_for_key("/tabby/v1/endpoints/../x")
        assert len(odd) == 2 and all(os.path.dirname(s) == str(tmp_path) for s in odd), odd
    finally:
        for w in (rw, mw, ew):
            w.close()  # type: ignore[attr-defined]
        for t in (rt, mt, et):
            t.join(5)
        store.close()


def test_a_paced_watch_is_woken_by_no_commit_and_still_reads_every_one(tmp_path: Path) -> None:
    """The agents' view of other hosts' endpoints: it looks every pace_s on its own, so a commit
    there wakes neither it nor the process's feed thread (20 adds a second woke both, and through
    the feed every other watch of the process, in every agent: measured in docs/architecture.md)."""
    store = SqliteStore(tmp_path / "s.db")
    mine, mt, mw = _follow(store, "/tabby/v1/endpoints/h1/")  # an unpaced watch: the feed runs
    others, ot, ow = _follow(store, "/tabby/v1/endpoints/", ("/tabby/v1/endpoints/h1/",), pace_s=0.3)
    try:
        feed = store.feed()
        assert feed is not None
        time.sleep(0.3)
        paced = store.signals_for("/tabby/v1/endpoints/", ("/tabby/v1/endpoints/h1/",))
        before = feed.seq(paced)
        for i in range(3):
            _write_elsewhere(tmp_path / "s.db", f"/tabby/v1/endpoints/h2/c{i}")
        assert _wait(lambda: [e.key for e in others] == [f"/tabby/v1/endpoints/h2/c{i}" for i in range(3)], 5), others
        assert feed.seq(paced) == before and not mine  # no wake-up was counted for it
        _write_elsewhere(tmp_path / "s.db", "/tabby/v1/endpoints/h1/c9")
        assert _wait(lambda: [e.key for e in mine] == ["/tabby/v1/endpoints/h1/c9"], 5), mine
    finally:
        for w in (mw, ow):
            w.close()  # type: ignore[attr-defined]
        for t in (mt, ot):
            t.join(5)
        store.close()
