"""The Store contract on a 3-member etcd cluster over TLS, and what members dying does to it:
compare-and-swap loses no update while the leader is killed and restarted, a watch sees every
event once while the member serving it is killed, reads and writes fail over."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Iterator

import pytest

# The contract suite, collected again here: with this module's store_url, on the cluster (its 8-writer
# compare-and-swap test in the stronger form below, with the leader killed and restarted mid-run).
from test_store_contract import (  # noqa: F401
    test_create_then_get_and_create_again_fails,
    test_delete_plain_and_by_revision,
    test_get_missing,
    test_list_by_prefix_sorted_and_consistent,
    test_revisions_strictly_increase,
    test_update_is_compare_and_swap,
    test_values_are_bytes_and_keys_unicode,
    test_watch_close_ends_a_blocked_iteration,
    test_watch_from_compacted_history_says_resync,
    test_watch_replays_then_follows_in_order,
    test_watch_resumed_from_last_revision_sees_every_event_once,
)

from tabby.lab.etcd import EtcdCluster
from tabby.store import Event, OutcomeUnknown, RevisionMismatch, Store, Unavailable, open_store


@pytest.fixture
def store_url(etcd_cluster: EtcdCluster) -> str:
    return etcd_cluster.url()


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The module's cluster, every member running again afterwards whatever the test killed."""
    yield etcd_cluster
    for m in etcd_cluster.members:
        if m.proc is None:
            m.start()


def test_url_names_every_member_and_tls(store: Store, etcd_cluster: EtcdCluster) -> None:
    assert etcd_cluster.url().startswith("etcds://")
    assert repr(store) == f"EtcdStore(etcds://{','.join(m.endpoint for m in etcd_cluster.members)})"


def _cas_writer(url: str, key: str, n: int, tag: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    """n increments of the shared counter by compare-and-swap. The value carries the writer's tag
    and a sequence number, so an increment whose outcome the store could not tell (OutcomeUnknown:
    the member died with it) is settled by the history: the key's first write after the revision
    it was based on is either this one or another writer's."""
    store = open_store(url)
    done = conflicts = unknown = refused = seq = 0
    while done < n:
        try:
            kv = store.get(key)
        except Unavailable:
            refused += 1
            continue
        seq += 1
        value = b"%d %s %d" % (int(kv.value.split()[0]) + 1, tag.encode(), seq)
        try:
            store.update(key, value, kv.mod_revision)
            done += 1
        except RevisionMismatch:
            conflicts += 1
        except OutcomeUnknown:
            unknown += 1
            done += _applied(store, key, kv.mod_revision, value)
        except Unavailable:  # no member took it: certainly not applied
            refused += 1
    out.put((tag, done, conflicts, unknown, refused))
    store.close()


def _applied(store: Store, key: str, based_on: int, value: bytes) -> bool:
    """Whether the first write of key after revision based_on wrote value (asked until answered)."""
    while True:
        try:
            if store.get(key).mod_revision == based_on:
                return False  # nothing was written after it
            w = store.watch(key, based_on)
            try:
                return next(iter(w)).value == value
            finally:
                w.close()
        except Unavailable:
            time.sleep(0.1)


def _count(store: Store, key: str) -> int:
    """The counter, asked until a member answers (an election may be under way)."""
    while True:
        try:
            return int(store.get(key).value.split()[0])
        except Unavailable:
            time.sleep(0.1)


def test_cas_under_leader_kill_and_restart_loses_no_update(cluster: EtcdCluster, store: Store, prefix: str) -> None:
    key, n, writers = prefix + "counter", 100, 8
    store.create(key, b"0 - 0")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_cas_writer, args=(cluster.url(), key, n, f"w{i}", out)) for i in range(writers)]
    for p in procs:
        p.start()
    try:
        total = n * writers
        while _count(store, key) < total // 4:
            time.sleep(0.05)
        leader = cluster.leader()
        leader.kill()
        at_kill = _count(store, key)  # answered by the survivors, once they elected
        new = cluster.leader()
        assert new is not leader
        leader.start()
        at_restart = _count(store, key)
        results = [out.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    final = _count(store, key)
    print(f"count at kill {at_kill}, at restart {at_restart}, final {final}; per writer (tag, done, conflicts, "
          f"unknown outcome, refused): {sorted(results)}")
    assert at_restart < total, "the run ended before the killed leader was back: nothing was tested after it"
    assert all(done == n for _, done, *_ in results)
    assert final == total  # every increment a writer counted is there, and none twice


def test_watch_sees_every_event_once_while_members_die_in_turn(cluster: EtcdCluster, store: Store,
                                                                 prefix: str) -> None:
    """Each member is killed once with a watch open, so whichever member serves the watch dies under
    it: the watch goes on on another from the revision after its last event."""
    _, start = store.list(prefix)
    w = store.watch(prefix, start)
    got: list[Event] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            for ev in w:
                got.append(ev)
        except Exception as e:
            failed.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    written = 0
    try:
        for m in cluster.members:
            for _ in range(5):
                store.put(prefix + f"k{written}", b"%d" % written)
                written += 1
            m.kill()
            for _ in range(5):
                while True:
                    try:
                        store.put(prefix + f"k{written}", b"%d" % written)
                        break
                    except Unavailable:  # the election after a leader died
                        time.sleep(0.1)
                written += 1
            m.start()
        deadline = time.monotonic() + 30
        while len(got) < written and not failed and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        w.close()
        t.join(10)
    assert not failed, failed
    assert [e.value for e in got] == [b"%d" % i for i in range(written)]
    assert [e.revision for e in got] == sorted({e.revision for e in got})


def test_reads_and_writes_go_on_with_one_member_down(cluster: EtcdCluster, store: Store, prefix: str) -> None:
    victim = cluster.members[0] if cluster.leader() is not cluster.members[0] else cluster.members[1]
    victim.kill()  # a follower: no election, nothing should even pause
    stores = [open_store(cluster.url()) for _ in range(6)]  # each starts at a random member
    try:
        for i, s in enumerate(stores):
            rev = s.create(prefix + f"k{i}", b"v")
            assert s.get(prefix + f"k{i}").mod_revision == rev
        assert [kv.key for kv in store.list(prefix)[0]] == [prefix + f"k{i}" for i in range(6)]
    finally:
        for s in stores:
            s.close()
