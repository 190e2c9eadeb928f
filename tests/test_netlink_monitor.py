"""The agent's netlink monitor in a real namespace: the kernel drops BIRD's route events before
they reach it (a remote workload is a route BIRD installs on every host), and every other event
still arrives: ours, other programs' routes, their deletes, links. An overflow keeps what was read
before it, and in a running agent brings the full check that repairs what the lost events undid."""

from __future__ import annotations

import errno
import json
import os
import select
import sys
import time
from pathlib import Path

import pytest
from agentlib import namespace

from tabby.dataplane import netlink as nl
from tabby.lab import netns, probe
from tabby.model import encode, key_of, validate
from tabby.store import open_store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def _drain(mon: nl.Monitor, settle_s: float = 0.3) -> list[tuple[str, bool, int, str]]:
    """Everything the monitor got until it has been quiet for settle_s."""
    out: list[tuple[str, bool, int, str]] = []
    while select.select([mon.sock], [], [], settle_s)[0]:
        out += [(c.kind, c.deleted, c.proto, c.key) for c in mon.read() if c.kind != "neigh"]
    return out


RTPROT_KERNEL = 2


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
                "link add tbm2 type veth peer name tbm3",
                "address add 10.77.9.1/24 dev tbm1",
                "address del 10.77.9.1/24 dev tbm1",
                # (an IPv6 address is announced once its DAD work has run, even with nodad: one
                # deleted at once may never be)
                "address add fd00:77::9/64 dev tbm1 nodad"]) + "\n"
            netns.ip("-batch", "-", ns=ns, input=script)
            got, everything = _drain(filtered), _drain(plain)
        finally:
            filtered.close()
            plain.close()
    want = [("route", False, nl.TABBY_PROTO, "fd00:77::2/128"), ("route", False, 4, "fd00:77::3/128"),
            ("route", False, nl.TABBY_PROTO, "10.77.0.2/32"), ("route", True, nl.TABBY_PROTO, "fd00:77::2/128")]
    assert [c for c in got if c[0] == "route" and c[2] != RTPROT_KERNEL] == want  # (the address's own routes)
    assert {c[3] for c in got if c[0] == "link"} == {"tbm2", "tbm3"}
    assert [c for c in got if c[0] == "addr" and c[3] in ("10.77.9.1", "fd00:77::9")] == [
        ("addr", False, 0, "10.77.9.1"), ("addr", True, 0, "10.77.9.1"), ("addr", False, 0, "fd00:77::9")]
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


OVERFLOW_WORKER = """
import gc, json, random, socket, subprocess, sys, threading, time
from pathlib import Path
from tabby.agent.agent import Agent
from tabby.store import open_store
agent = Agent(open_store(sys.argv[1]), "ho", resync_s=3600, metrics_port=None, bgp=False, run_dir=Path(sys.argv[2]))
t = threading.Thread(target=agent.run, daemon=True)
t.start()
deadline = time.monotonic() + 60
while (agent.routes_programmed_at is None or not gc.isenabled()) and time.monotonic() < deadline:
    time.sleep(0.01)
assert agent.routes_programmed_at is not None, "never programmed"
ours = ["ip", "-6", "route", "show", "fd00:7b::1/128", "proto", "77"]
assert subprocess.run(ours, capture_output=True, text=True).stdout.strip(), "route not in"
agent.monitor.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's smallest queue
# 400 events that fill that queue, then our route deleted behind the agent's back
script = "".join(f"neigh add fd00:7a::{i:x} lladdr 52:54:00:00:00:01 dev tbo9 nud permanent\\n" for i in range(1, 401))
script += "route del fd00:7b::1/128 dev tbo0\\n"
data = [random.random() for _ in range(3_000_000)]
p = subprocess.Popen(["ip", "-batch", "-"], stdin=subprocess.PIPE, text=True)
p.stdin.write(script)
p.stdin.close()
sorted(data)  # holds the GIL (about a second): the monitor thread cannot read while the queue overflows
assert p.wait(10) == 0
t0 = time.monotonic()
back = None
while time.monotonic() < t0 + 10:
    if subprocess.run(ours, capture_output=True, text=True).stdout.strip():
        back = time.monotonic() - t0
        break
    time.sleep(0.05)
overflows = agent.metrics.registry.get_sample_value("tabby_netlink_overflows_total")
print(json.dumps({"back_s": back, "overflows": overflows}))
agent.stop()
t.join(10)
"""


def test_an_overflow_brings_a_full_check_that_puts_back_what_the_lost_events_undid(tmp_path: Path) -> None:
    """The agent's monitor socket overflows while its thread cannot read (the GIL held), and our
    route's delete is among the events lost: the overflow's full check puts the route back at
    once, not at the resync (an hour here), and the agent counts the overflow."""
    url = f"sqlite://{tmp_path}/store.db"
    store = open_store(url)
    ep = validate({"kind": "Endpoint", "metadata": {"name": "o1"},
                   "spec": {"host": "ho", "orchestrator": "container", "workload_id": "w1", "interface": "tbo0",
                            "mac": "52:54:00:00:7b:01", "ipv6_addresses": ["fd00:7b::1"]}})
    store.put(key_of(ep), encode(ep))
    store.close()
    with namespace("ovf") as ns:
        netns.ip("-batch", "-", ns=ns, input="link add tbo0 type veth peer name tbo1\nlink set tbo0 up\n"
                                             "link add tbo9 type veth peer name tbo8\nlink set tbo9 up\n")
        src = str(Path(__file__).resolve().parents[1] / "src")
        r = netns.nsexec(ns, [sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r})\n" + OVERFLOW_WORKER,
                              url, str(tmp_path / "run")], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["overflows"] is not None and got["overflows"] >= 1, (got, r.stderr[-3000:])
    # at the overflow, not at the resync (an hour): any bound far below that shows which
    assert got["back_s"] is not None and got["back_s"] < 60, (got, r.stderr[-3000:])
    assert "kernel events were lost" in r.stderr, r.stderr[-3000:]
