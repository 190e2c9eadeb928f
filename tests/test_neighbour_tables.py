"""Issue 16 item 2: the kernel's neighbour tables fit the load.

The sizing is pure; the rest runs against this machine's real kernel: inside a namespace the
thresholds cannot be set (the agent says so once, and its host status carries it), in the root
namespace they are only raised, and the lab gives the machine its old values back. Every test
that changes the root namespace's thresholds puts them back in ``finally``."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lablib import lab

from tabby.cni.nl import in_netns
from tabby.dataplane.links import (
    NEIGH_FLOORS,
    NEIGH_KEYS,
    NeighbourTables,
    host_neigh_entries,
    neigh_thresholds,
    read_neigh_thresholds,
    write_neigh_thresholds,
)
from tabby.dataplane.netlink import neigh_tables
from tabby.lab import lab as L
from tabby.lab import netns
from tabby.model.keys import host_status_key
from tabby.model.status import decode_status
from tabby.store import open_store


@pytest.fixture
def machine_thresholds() -> Iterator[dict[str, dict[str, int]]]:
    """The root namespace's values before the test, written back after it whatever happened."""
    before = read_neigh_thresholds()
    assert before is not None, "tests run in the root network namespace"
    try:
        yield before
    finally:
        write_neigh_thresholds(before)
        assert read_neigh_thresholds() == before


def test_thresholds_have_headroom_and_order() -> None:
    last = None
    for entries in [0, 1, 100, 1023, 1024, 1025, 5000, 10_764, 100_000]:
        t = neigh_thresholds(entries)
        assert list(t) == list(NEIGH_KEYS)
        assert t["gc_thresh1"] <= t["gc_thresh2"] <= t["gc_thresh3"]
        assert all(t[k] >= f for k, f in zip(NEIGH_KEYS, NEIGH_FLOORS, strict=True))
        assert t["gc_thresh1"] >= entries  # the steady state is never collected
        assert t["gc_thresh3"] >= 4 * entries  # the hard limit leaves room for a burst
        assert all(v % 1024 == 0 for v in t.values())
        if last is not None:
            assert all(t[k] >= last[k] for k in NEIGH_KEYS)  # more entries never shrink it
        last = t
    assert neigh_thresholds(0) == dict(zip(NEIGH_KEYS, NEIGH_FLOORS, strict=True))
    assert host_neigh_entries(1000) > 2000  # a gateway entry and a link-local entry per endpoint


def test_in_a_namespace_they_cannot_be_set_and_the_agent_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """What this kernel does: no net.ipv{4,6}.neigh.default in a namespace other than the root one,
    but RTM_GETNEIGHTBL there reports the machine's (shared) tables."""
    name = netns.add_netns("tnt" + uuid.uuid4().hex[:5])
    fd = -1
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        assert in_netns(fd, lambda: read_neigh_thresholds()) is None
        assert in_netns(fd, lambda: Path("/proc/sys/net/ipv6/neigh/default").exists()) is False
        # neigh_tables closes its sockets: an open one would keep the namespace alive
        inside = {t.name: t.gc_thresh3 for t in in_netns(fd, neigh_tables)}
        root = read_neigh_thresholds()
        assert root is not None
        assert inside == {"ndisc_cache": root["ipv6"]["gc_thresh3"], "arp_cache": root["ipv4"]["gc_thresh3"]}
        tables = NeighbourTables()
        with caplog.at_level(logging.INFO, logger="tabby.dataplane.links"):
            assert in_netns(fd, lambda: tables.size(10)) is True
            assert in_netns(fd, lambda: tables.size(11)) is False  # the same wanted values: nothing to do
            in_netns(fd, lambda: tables.size(5000))  # other values, same situation: no second line
        st = tables.status()
        assert st["sized_here"] is False and "not in this network namespace" in st["note"]
        assert st["gc_thresh3"] == {"ipv6": root["ipv6"]["gc_thresh3"], "ipv4": root["ipv4"]["gc_thresh3"]}
        assert st["fits"] == (min(st["gc_thresh3"].values()) >= st["wanted_gc_thresh3"])
        lines = [r for r in caplog.records if "not in this network namespace" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    finally:
        if fd >= 0:
            os.close(fd)
        netns.del_netns(name)


def test_in_the_root_namespace_they_are_only_raised(machine_thresholds: dict[str, dict[str, int]]) -> None:
    big = 3 * max(NEIGH_FLOORS[2], machine_thresholds["ipv6"]["gc_thresh3"])
    write_neigh_thresholds({"ipv6": {"gc_thresh3": big}, "ipv4": {"gc_thresh1": 128, "gc_thresh2": 512,
                                                                  "gc_thresh3": 1024}})
    tables = NeighbourTables()
    assert tables.size(3) is True
    now = read_neigh_thresholds()
    assert now is not None
    assert now["ipv6"]["gc_thresh3"] == big  # an operator's larger value stays
    assert now["ipv4"] == dict(zip(NEIGH_KEYS, NEIGH_FLOORS, strict=True))
    st = tables.status()
    assert st["sized_here"] is True and st["fits"] is True and st["note"] == ""


def test_labs_raise_them_for_all_that_is_up_and_the_last_down_restores(
        machine_thresholds: dict[str, dict[str, int]]) -> None:
    a, b = "tna" + uuid.uuid4().hex[:5], "tnb" + uuid.uuid4().hex[:5]
    try:
        L.size_neighbour_tables(a, 20_000)
        after_a = read_neigh_thresholds()
        assert after_a is not None and after_a["ipv6"] == neigh_thresholds(20_000)
        L.size_neighbour_tables(b, 10_000)  # both up: sized for both (one shared table)
        assert read_neigh_thresholds()["ipv4"] == neigh_thresholds(30_000)  # type: ignore[index]
        L.restore_neighbour_tables(a)  # b still up: what b needs, no more
        assert read_neigh_thresholds()["ipv6"] == {  # type: ignore[index]
            k: max(machine_thresholds["ipv6"][k], v) for k, v in neigh_thresholds(10_000).items()}
        write_neigh_thresholds({"ipv4": {"gc_thresh3": 123_456}})  # an operator's change meanwhile
        notes = L.restore_neighbour_tables(b)
        now = read_neigh_thresholds()
        assert now is not None
        assert now["ipv6"] == machine_thresholds["ipv6"]
        assert now["ipv4"]["gc_thresh3"] == 123_456 and any("123456" in n for n in notes)
        assert now["ipv4"]["gc_thresh1"] == machine_thresholds["ipv4"]["gc_thresh1"]
        assert not (L.LAB_ROOT / L.NEIGH_RECORD).exists()
        assert L.restore_neighbour_tables(b) == []  # twice is harmless
    finally:
        L.restore_neighbour_tables(a)
        L.restore_neighbour_tables(b)


def test_a_lab_killed_without_down_does_not_keep_them_raised_for_ever(
        machine_thresholds: dict[str, dict[str, int]]) -> None:
    """A lab killed mid-run (SIGKILL, a CI timeout) kept its share in the record: the last `lab down`
    never brought the machine's values back. A share whose lab has no namespace left, sized longer
    ago than STALE_SHARE_S, is dropped at the next size or restore."""
    import json
    import time

    dead, live = "tnd" + uuid.uuid4().hex[:5], "tnl" + uuid.uuid4().hex[:5]
    try:
        L.size_neighbour_tables(dead, 40_000)
        rec = json.loads((L.LAB_ROOT / L.NEIGH_RECORD).read_text())
        rec["since"][dead] = time.time() - L.STALE_SHARE_S - 1  # killed long ago, nothing of it left
        (L.LAB_ROOT / L.NEIGH_RECORD).write_text(json.dumps(rec))
        L.size_neighbour_tables(live, 1_000)  # (sizing only raises: the dead share's values stay till a down)
        assert set(json.loads((L.LAB_ROOT / L.NEIGH_RECORD).read_text())["labs"]) == {live}
        L.restore_neighbour_tables(live)
        assert read_neigh_thresholds() == machine_thresholds
        assert not (L.LAB_ROOT / L.NEIGH_RECORD).exists()
    finally:
        L.restore_neighbour_tables(live)
        L.restore_neighbour_tables(dead)


def test_a_lab_sizes_them_and_its_agents_report_they_cannot(machine_thresholds: dict[str, dict[str, int]]) -> None:
    with lab(hosts=2, containers=1) as the_lab:
        now = read_neigh_thresholds()
        want = neigh_thresholds(L.lab_neigh_entries(the_lab.topo))
        assert now is not None and all(now[f][k] >= want[k] for f in now for k in want)
        rec = json.loads((L.LAB_ROOT / L.NEIGH_RECORD).read_text())
        assert the_lab.topo.prefix in rec["labs"] and rec["original"] == machine_thresholds
        store = open_store(the_lab.store_url)

        def reported() -> object:
            got = store.get(host_status_key("h1"))
            doc = decode_status(host_status_key("h1"), got.value) if got is not None else None
            return doc if doc is not None and getattr(doc, "neighbour_table", None) else None

        doc = netns.wait_for(reported, 30, 0.2, "h1's host status with neighbour_table")
        nt = doc.neighbour_table  # type: ignore[attr-defined]
        assert nt.sized_here is False and "not in this network namespace" in nt.note
        assert nt.gc_thresh3["ipv6"] == now["ipv6"]["gc_thresh3"]
        assert nt.fits is True  # the lab raised them for its agents
        log = (the_lab.dir / "agent-h1.log").read_text()
        assert log.count("not in this network namespace") == 1
    assert read_neigh_thresholds() == machine_thresholds
