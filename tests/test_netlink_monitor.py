"""The agent's netlink monitor in a real namespace: the kernel drops BIRD's route events before
they reach it (a remote workload is a route BIRD installs on every host), and every other event
still arrives: ours, other programs' routes, their deletes, links."""

from __future__ import annotations

import errno
import os
import select
import time

import pytest
from agentlib import namespace

from tabby.dataplane import netlink as nl
from tabby.lab import netns, probe

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def _drain(mon: nl.Monitor, settle_s: float = 0.3) -> list[tuple[str, bool, int, str]]:
    """Everything the monitor got until it has been quiet for settle_s."""
    out: list[tuple[str, bool, int, str]] = []
    while select.select([mon.sock], [], [], settle_s)[0]:
        out += [(c.kind, c.deleted, c.proto, c.key) for c in mon.read() if c.kind != "neigh"]
    return out


def test_bird_routes_are_dropped_in_the_kernel_and_the_rest_arrive() -> None:
    with namespace("m") as ns:
        netns.ip("link", "add", "tbm0", "type", "veth", "peer", "name", "tbm1", ns=ns)
        netns.ip("link", "set", "tbm0", "up", ns=ns)
        netns.ip("link", "set", "tbm1", "up", ns=ns)
        filtered = probe.in_ns(ns, lambda: nl.Monitor(ignore_route_protos=(nl.RTPROT_BIRD,)))
        plain = probe.in_ns(ns, nl.Monitor)
        try:
            time.sleep(0.1)
            _drain(filtered, 0.1), _drain(plain, 0.1)  # the links coming up
            script = "\n".join([
                f"route add fd00:77::1/128 dev tbm0 proto {nl.RTPROT_BIRD} metric 32",
                f"route add fd00:77::2/128 dev tbm0 proto {nl.TABBY_PROTO} metric 10",
                "route add fd00:77::3/128 dev tbm0 proto static",
                f"route add 10.77.0.1/32 dev tbm0 proto {nl.RTPROT_BIRD} metric 32",
                f"route add 10.77.0.2/32 dev tbm0 proto {nl.TABBY_PROTO} metric 10",
                f"route del fd00:77::1/128 dev tbm0 proto {nl.RTPROT_BIRD} metric 32",
                f"route del fd00:77::2/128 dev tbm0 proto {nl.TABBY_PROTO} metric 10",
                "link add tbm2 type veth peer name tbm3"]) + "\n"
            netns.ip("-batch", "-", ns=ns, input=script)
            got, everything = _drain(filtered), _drain(plain)
        finally:
            filtered.close()
            plain.close()
    want = [("route", False, nl.TABBY_PROTO, "fd00:77::2/128"), ("route", False, 4, "fd00:77::3/128"),
            ("route", False, nl.TABBY_PROTO, "10.77.0.2/32"), ("route", True, nl.TABBY_PROTO, "fd00:77::2/128")]
    assert [c for c in got if c[0] == "route"] == want
    assert {c[3] for c in got if c[0] == "link"} == {"tbm2", "tbm3"}
    # the plain monitor (the bench's) sees BIRD's routes, added and deleted
    bird = [(c[1], c[3]) for c in everything if c[0] == "route" and c[2] == nl.RTPROT_BIRD]
    assert bird == [(False, "fd00:77::1/128"), (False, "10.77.0.1/32"), (True, "fd00:77::1/128")]


def test_a_storm_is_read_in_one_batch_in_order_and_close_ends_a_read() -> None:
    """Events that queued while the thread was busy come back from one read, in the kernel's
    order (a neighbour storm cost one wake-up and one GIL handover per event before); a read
    after close() raises instead of spinning on the shut socket."""
    n = 600
    with namespace("s") as ns:
        netns.ip("link", "add", "tbs0", "type", "veth", "peer", "name", "tbs1", ns=ns)
        netns.ip("link", "set", "tbs0", "up", ns=ns)
        mon = probe.in_ns(ns, nl.Monitor)
        try:
            time.sleep(0.1)
            _drain(mon, 0.1)
            netns.ip("-batch", "-", ns=ns, input="".join(
                f"route add fd00:78::{i:x}/128 dev tbs0 proto {nl.TABBY_PROTO} metric 10\n" for i in range(1, n + 1)))
            got = [c.key for c in mon.read() if c.kind == "route"]
        finally:
            mon.close()
        with pytest.raises(OSError):
            mon.read()
    assert got == [f"fd00:78::{i:x}/128" for i in range(1, n + 1)]


class _Overflowing:
    """A socket whose queue holds some datagrams and then overflows (ENOBUFS): the moment of an
    overflow inside one drain cannot be chosen on a real socket."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = list(datagrams)

    def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if not self.datagrams:
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        d = self.datagrams.pop(0)
        buf[:len(d)] = d
        return len(d)


def test_an_overflow_in_the_middle_of_a_drain_keeps_the_events_read_before_it() -> None:
    mon = nl.Monitor.__new__(nl.Monitor)  # no kernel socket: the fake's queue instead
    mon._buf = bytearray(1 << 20)
    mon._view = memoryview(mon._buf)
    mon.sock = _Overflowing([nl.route_msg(nl.RTM_NEWROUTE, f"fd00:79::{i}/128", 7) for i in (1, 2)])  # type: ignore[assignment]
    got = [(c.kind, c.key) for c in mon.read()]
    assert got == [("route", "fd00:79::1/128"), ("route", "fd00:79::2/128"), ("overflow", "")]


def test_a_message_whose_length_is_shorter_than_its_header_ends_the_parse() -> None:
    good = nl.route_msg(nl.RTM_NEWROUTE, "fd00:79::3/128", 7)
    assert [c.key for c in nl.Monitor._parse(good + bytes(16))] == ["fd00:79::3/128"]
