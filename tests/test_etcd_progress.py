"""A quiet etcd watch survives a compaction of other keys' history: etcd's progress notifications
move its resume point (tabby.store.etcd's docstring). Real etcd on loopback."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

import tabby.store.etcd as etcd_store
from tabby.lab.etcd import EtcdServer
from tabby.store import open_store
from tabby.store.base import Event
from tabby.syncer import InSync, ResourceSyncer, Update

IDLE_S = 2.0  # WATCH_IDLE_S for these tests: a silent stream is opened again after it


@pytest.fixture
def quick_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_store, "WATCH_IDLE_S", IDLE_S)


def _server(progress_s: float) -> EtcdServer:
    return EtcdServer(name=f"tbyt-p{uuid.uuid4().hex[:6]}", progress_notify_s=progress_s)


def _quiet_then_compacted(url: str) -> tuple[list[Event | str], Any]:
    """A watch on /a/ that sees nothing while /b/ is written and compacted, for three idle
    periods, then one put on /a/: what the watch gave (an exception as its repr)."""
    store = open_store(url)
    store.put("/a/x", b"1")
    w = store.watch("/a/", store.revision())
    got: list[Event | str] = []

    def run() -> None:
        try:
            got.extend(w)
        except Exception as e:  # what the watch raised is the result
            got.append(repr(e))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        time.sleep(0.5)
        for i in range(5):
            store.put(f"/b/{i}", b"y")
        time.sleep(IDLE_S * 1.5)  # a notification comes, then the compaction, then the stream is reopened
        store.compact(store.revision())
        time.sleep(IDLE_S * 2)
        store.put("/a/y", b"2")
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        return got, w
    finally:
        w.close()
        t.join(5)
        store.close()


def test_a_quiet_watch_is_not_sent_to_a_listing_by_a_compaction_of_other_keys(quick_idle: None) -> None:
    with _server(progress_s=0.5) as server:
        got, w = _quiet_then_compacted(server.url)
    assert [(e.type, e.key, e.value) for e in got if isinstance(e, Event)] == [("put", "/a/y", b"2")], got
    assert w.revision >= 7  # moved past its last event (revision 1) by the notifications


def test_without_notifications_the_quiet_watch_must_list_again_and_the_log_says_why(
        quick_idle: None, caplog: pytest.LogCaptureFixture) -> None:
    """The counterpart: etcd's default interval (10 min) is longer than the watch's silence."""
    with _server(progress_s=600) as server:
        got, _ = _quiet_then_compacted(server.url)
    assert len(got) == 1 and "HistoryGone" in str(got[0]), got
    assert "progress-notify-interval" in caplog.text


def test_a_syncer_resumes_after_the_notified_revision(quick_idle: None) -> None:
    """Its watch failing (the member restarted) after a compaction, the syncer resumes from the
    revision the notifications gave, not from its last event: no listing."""
    with _server(progress_s=0.5) as server:
        store = open_store(server.url)
        try:
            store.put("/a/x", b"1")
            syncer = ResourceSyncer(store, "/a/", decoder=lambda key, value: value.decode())
            items: list[Any] = []
            lists = [0]

            def run() -> None:
                for item in syncer:
                    if isinstance(item, InSync):
                        lists[0] += 1
                    items.append(item)
            threading.Thread(target=run, daemon=True).start()
            deadline = time.monotonic() + 10
            while lists[0] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            for i in range(5):
                store.put(f"/b/{i}", b"y")
            time.sleep(1.5)  # notifications: the watch is at the head
            store.compact(store.revision())
            server.kill()  # the watch fails; the data stays
            server.start()
            store.put("/a/y", b"2")
            deadline = time.monotonic() + 15
            while not any(isinstance(i, Update) and i.key == "/a/y" for i in items) and time.monotonic() < deadline:
                time.sleep(0.05)
            syncer.stop()
            assert any(isinstance(i, Update) and i.key == "/a/y" and i.resource == "2" for i in items), items
            assert lists[0] == 1, f"listed {lists[0]} times"
        finally:
            store.close()
