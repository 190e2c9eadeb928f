"""The route/neighbour writer's pipelined path and the link index, against the real kernel.

``Netlink.apply`` hands its chunks to a writer thread once a first chunk is full: failures must
still come back per message (never lost between chunks), deletes of what is gone count as success,
an exception from the caller's generator ends the writer and reaches the caller, and the socket
is usable again afterwards. The ctypes ``if_nameindex`` must agree with ``socket.if_nameindex``.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator

import pytest
from agentlib import namespace

from tabby.cni.nl import in_netns
from tabby.dataplane import netlink as nl
from tabby.dataplane.links import LinkIndex, _if_nameindex
from tabby.dataplane.routes import CREATE
from tabby.lab import netns

N = 3000  # routes: ~0.2 MB of messages, several SEND_CHUNKs


def _v6(i: int) -> str:
    return f"2001:db8:77::{i:x}/128"


def _v4(i: int) -> str:
    return f"192.0.2.{i % 256}/32" if i < 256 else f"198.51.100.{i % 256}/32"


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace("nlw") as name:
        netns.ip("-batch", "-", ns=name, input="link add tbw0 type veth peer name tbw1\nlink set tbw0 up\n")
        yield name


def _fd(name: str) -> int:
    return os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)


def _in(name: str, fn):  # type: ignore[no-untyped-def]
    fd = _fd(name)
    try:
        return in_netns(fd, fn)
    finally:
        os.close(fd)


def test_link_index_matches_socket_if_nameindex(ns: str) -> None:
    got = _in(ns, lambda: (sorted(_if_nameindex()), sorted(socket.if_nameindex())))
    assert got[0] == got[1] and len(got[0]) == 3  # lo, tbw0, tbw1
    links = LinkIndex()
    _in(ns, links.refresh)
    assert set(links.by_name) == {"lo", "tbw0", "tbw1"}
    assert {i: n for n, i in links.by_name.items()} == links.by_index


def test_pipelined_writes_report_every_failure_and_only_those(ns: str) -> None:
    def run() -> tuple[list[nl.Failure], list[nl.Failure], int, set[str]]:
        ifindex = socket.if_nametoindex("tbw0")
        sock = nl.Netlink()
        bad = {*range(0, N, 97), N - 1}  # spread over every chunk, the first and the last too
        ops = []
        for i in range(N):
            dst = _v6(i)
            ops.append(("add-route", dst, nl.route_msg(nl.RTM_NEWROUTE, dst, 999_999 if i in bad else ifindex, CREATE)))
        ops += [("add-route", _v4(i), nl.route_msg(nl.RTM_NEWROUTE, _v4(i), ifindex, CREATE)) for i in range(300)]
        assert sum(len(m) for *_, m in ops) > 4 * sock.SEND_CHUNK
        failures = sock.apply(ops)
        # deleting what never was (and what was just refused) succeeds
        deletes = sock.apply([("del-route", _v6(i), nl.route_msg(nl.RTM_DELROUTE, _v6(i), 0)) for i in sorted(bad)])
        routes = {r.dst for r in sock.routes()}
        sock.close()
        return failures, deletes, len(bad), routes

    failures, deletes, n_bad, routes = _in(ns, run)
    bad = {*range(0, N, 97), N - 1}
    assert {f.obj for f in failures} == {_v6(i) for i in bad}
    assert len(failures) == n_bad and all(f.errno == errno.ENODEV and f.op == "add-route" for f in failures)
    assert deletes == []
    assert routes == {_v6(i) for i in range(N) if i not in bad} | {_v4(i) for i in range(300)}
    assert not [t for t in threading.enumerate() if t.name == "netlink-writer"]


def test_a_failing_generator_stops_the_writer_and_the_socket_still_works(ns: str) -> None:
    class Boom(Exception):
        pass

    def run() -> tuple[bool, int]:
        ifindex = socket.if_nametoindex("tbw0")
        sock = nl.Netlink()

        def ops() -> Iterator[tuple[str, object, bytes]]:
            for i in range(N):
                yield "add-route", _v6(i), nl.route_msg(nl.RTM_NEWROUTE, _v6(i), ifindex, CREATE)
            raise Boom

        raised = False
        try:
            sock.apply(ops())
        except Boom:
            raised = True
        writers = [t for t in threading.enumerate() if t.name == "netlink-writer"]
        assert not writers
        # what was handed to the writer before the failure is in; the socket answers as before
        again = sock.apply([("add-route", "2001:db8:78::1/128",
                             nl.route_msg(nl.RTM_NEWROUTE, "2001:db8:78::1/128", ifindex, CREATE))])
        assert again == []
        n = len(sock.routes())
        sock.close()
        return raised, n

    raised, n = _in(ns, run)
    assert raised
    assert 1 < n <= N + 1
