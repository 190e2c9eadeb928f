"""Host liveness on each backend: an etcd lease renewed without writes, or (SQLite, which has
no leases) a record rewritten with its own expiry. Either way nothing an agent watches moves."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tabby.agent.status import StatusWriter
from tabby.lab.netns import wait_for
from tabby.model.keys import host_status_key
from tabby.model.status import decode_status
from tabby.store import Store, StoreError


def test_a_lease_holds_a_key_and_renewing_it_writes_nothing(store: Store, prefix: str) -> None:
    lease = store.grant_lease(30)
    if lease is None:  # SQLite: no leases, and a put that names one is refused, not ignored
        with pytest.raises(StoreError, match="no leases"):
            store.put(prefix + "k", b"v", lease=object())  # type: ignore[arg-type]
        assert store.get(prefix + "k") is None
        return
    store.put(prefix + "k", b"v", lease=lease)
    rev = store.revision()
    assert lease.keep_alive() and lease.keep_alive()
    assert store.revision() == rev  # renewals are not writes: no watcher hears of them
    assert store.get(prefix + "k").value == b"v"  # type: ignore[union-attr]
    lease.revoke()
    assert store.get(prefix + "k") is None  # the key went with its lease
    assert not lease.keep_alive()


def test_heartbeat_on_each_backend(store: Store) -> None:
    host = f"lv{uuid.uuid4().hex[:8]}"
    key = host_status_key(host)
    writer = StatusWriter(store, host, ttl_s=3.0)  # a beat every second
    writer.host_info = {"started": 1.0}
    writer.start()
    try:
        wait_for(lambda: store.get(key) is not None, 10, what="the first heartbeat")
        first = store.get(key)
        assert first is not None
        time.sleep(3.5)  # three beats
        now = time.time()
        record = decode_status(key, store.get(key).value)  # type: ignore[union-attr]
        assert record.alive(now) and record.started == 1.0
        if store.grant_lease(3) is None:  # SQLite: rewritten with a fresh expiry at each beat
            assert store.get(key).mod_revision > first.mod_revision  # type: ignore[union-attr]
            assert record.expires is not None and record.expires > now
        else:  # etcd: written once, then only renewed
            assert store.get(key).mod_revision == first.mod_revision  # type: ignore[union-attr]
            assert record.expires is None and record.age(now) is None
        writer.host_info = {"started": 1.0, "degraded": "something"}  # what it says changed: written again
        wait_for(lambda: json.loads(store.get(key).value).get("degraded") == "something", 5,  # type: ignore[union-attr]
                 what="the changed record")
    finally:
        writer.stop()
    stopped = decode_status(key, store.get(key).value)  # type: ignore[union-attr]
    assert not stopped.alive(time.time())  # says "stopped" at once, lease or not
    time.sleep(1.5)
    assert store.get(key) is not None  # revoking the lease did not take the last word along
    store.delete(key)
