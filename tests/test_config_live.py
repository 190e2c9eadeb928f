"""Every Config field the agent accepts changes what it does, live, without a restart."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlib import apply, namespace

from tabby.agent.agent import Agent
from tabby.dataplane.bird_config import BirdInputs, render
from tabby.lab import netns
from tabby.lab.etcd import free_port
from tabby.model import validate
from tabby.model.keys import PREFIX, endpoint_key, resource_key
from tabby.store import open_store


def host(name: str, v6: str, asn: int | None = None) -> object:
    spec: dict[str, object] = {"ipv6_address": v6}
    if asn is not None:
        spec["asn"] = asn
    return validate({"kind": "Host", "metadata": {"name": name}, "spec": spec})


def test_hosts_without_an_asn_take_the_configured_default() -> None:
    me, other, own = host("h1", "2001:db8::1"), host("h2", "2001:db8::2"), host("h3", "2001:db8::3", asn=65003)
    text = render(BirdInputs(host=me, hosts=(me, other, own), default_asn=65010))
    assert "local 2001:db8::1 as 65010;" in text
    assert re.search(r"neighbor 2001:db8::2 as 65010;", text)
    assert re.search(r"neighbor 2001:db8::3 as 65003;", text)


def config(**spec: object) -> object:
    return validate({"kind": "Config", "metadata": {"name": "global"}, "spec": spec})


@pytest.fixture
def agent_ns() -> Iterator[str]:
    with namespace("cfg") as ns:
        yield ns


def _metrics(ns: str, port: int) -> str | None:
    r = netns.nsexec(ns, [sys.executable, "-c", "import urllib.request,sys\n"
                          f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics',timeout=1).read().decode())"])
    return r.stdout if r.returncode == 0 else None


def _resyncs(text: str | None) -> float:
    m = re.search(r"^tabby_resyncs_total (\S+)$", text or "", re.M)
    return float(m.group(1)) if m else -1.0


def test_log_level_resync_interval_and_metrics_port_follow_config(agent_ns: str, tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/store.db"
    store = open_store(url)
    log = tmp_path / "agent.log"
    # no --log-level, --resync-s or --metrics-port: the Store's Config decides
    proc = netns.spawn(agent_ns, [sys.executable, "-m", "tabby.cli", "--store", url, "agent", "--host", "h1",
                                  "--no-bgp", "--run-dir", str(tmp_path / "run")], log)
    try:
        netns.wait_for(lambda: _metrics(agent_ns, 9091), 20, 0.1, "metrics on the default port")
        netns.wait_for(lambda: "in sync with the store" in log.read_text(), 20, 0.1, "in sync")
        time.sleep(1.0)
        assert " DEBUG " not in log.read_text()
        first = _resyncs(_metrics(agent_ns, 9091))
        port = free_port()
        apply(store, config(log_level="debug", resync_interval_s=0.5, metrics_port=port))
        netns.wait_for(lambda: _metrics(agent_ns, port), 10, 0.1, "metrics on the configured port")
        assert _metrics(agent_ns, 9091) is None  # the old port is closed
        netns.wait_for(lambda: " DEBUG " in log.read_text(), 10, 0.1, "debug lines after the change")
        netns.wait_for(lambda: _resyncs(_metrics(agent_ns, port)) >= first + 3, 10, 0.2, "resyncs every 0.5 s")
        apply(store, config(log_level="warning", resync_interval_s=600, metrics_port=port))
        netns.wait_for(lambda: "log level warning (Config)" in log.read_text(), 10, 0.1, "log level warning")
        time.sleep(1.0)
        quiet = log.read_text()
        count = _resyncs(_metrics(agent_ns, port))
        time.sleep(2.0)
        assert _resyncs(_metrics(agent_ns, port)) <= count + 1  # at most the one already due
        tail = log.read_text()[len(quiet):]
        assert " DEBUG " not in tail and " INFO " not in tail
    finally:
        netns.stop(proc)
        print(log.read_text()[-3000:])


def test_a_command_line_flag_wins_over_config(tmp_path: Path) -> None:
    store = open_store(f"sqlite://{tmp_path}/store.db")
    a = Agent(store, "h1", resync_s=42.0, metrics_port=None, bgp=False, policy=False, run_dir=tmp_path / "run",
              overrides=frozenset({"resync_interval_s"}))
    try:
        a.fabric["/tabby/v1/config/global"] = config(resync_interval_s=1.0, default_asn=65020)
        a._configure()
        assert a.resync_s == 42.0  # the flag
        assert a.config.default_asn == 65020 and a.bgp_dirty  # the rest follows Config
    finally:
        a.netlink.close()
        a.monitor.close()


def test_node_to_node_mesh_off_leaves_only_the_explicit_peers() -> None:
    from tabby.agent.fabric import bird_inputs
    from tabby.model import effective_config

    me, other = host("h1", "2001:db8::1"), host("h2", "2001:db8::2")
    on = bird_inputs("h1", [me, other], {}, effective_config(None, None))
    off = bird_inputs("h1", [me, other], {}, effective_config(config(node_to_node_mesh=False).spec, None))
    assert on is not None and off is not None and on.mesh and not off.mesh
    assert "neighbor 2001:db8::2" in render(on) and "neighbor 2001:db8::2" not in render(off)


def test_the_agents_watches_carry_only_what_it_uses_and_an_own_block_re_renders_bgp(tmp_path: Path) -> None:
    """Each watch's range holds only what it uses (etcd's watch is one key range: whatever else
    it holds, etcd sends and the agent drops). Another host's block affinity reaches no watch (at
    100 hosts every claim anywhere re-rendered every agent's BIRD config: measured, docs); an own
    one marks BGP dirty."""
    from tabby.model import encode, key_of
    from tabby.model.ipam import Affinity, encode_ipam
    from tabby.model.keys import host_status_key, ipam_affinity_key, ipam_block_key, ipam_handle_key
    from tabby.syncer import Update

    store = open_store(f"sqlite://{tmp_path}/store.db")
    a = Agent(store, "h1", resync_s=90.0, metrics_port=None, bgp=False, policy=False, run_dir=tmp_path / "run")
    try:
        mine = ipam_affinity_key("h1", "fd00:e::40/122")
        writes = {mine: encode_ipam(Affinity(host="h1", cidr="fd00:e::40/122", state="confirmed", since=1.0)),
                  ipam_affinity_key("h2", "fd00:e::/122"):
                      encode_ipam(Affinity(host="h2", cidr="fd00:e::/122", state="confirmed", since=1.0)),
                  ipam_block_key("fd00:e::/122"): b"{}", ipam_handle_key("c1"): b"{}", f"{PREFIX}ipam/gc": b"{}",
                  host_status_key("h2"): b"{}", f"{PREFIX}widgets/x": b"{}"}
        for r in (host("h2", "2001:db8::2"), config(log_level="debug"), *(
                validate({"kind": "Endpoint", "metadata": {"name": f"e{h}"},
                          "spec": {"host": h, "orchestrator": "container", "workload_id": f"e{h}",
                                   "interface": f"tb{h}", "mac": "52:54:00:00:00:01",
                                   "ipv6_addresses": [f"fd00:e::{i + 1}"]}})
                for i, h in enumerate(("h1", "h2")))):
            writes[key_of(r)] = encode(r)
        for key, value in writes.items():
            store.put(key, value)
        listed: dict[str, set[str]] = {}
        for tag, syncer in a.syncers.items():
            listed[tag] = {u.key for u in syncer._resync() if isinstance(u, Update)}
            assert not syncer.exclude or tag == "remote", f"{tag}: a range that needs exclusion"
        assert listed.pop("local") == {endpoint_key("h1", "eh1")}
        assert listed.pop("remote") == {endpoint_key("h2", "eh2")}
        assert listed.pop("affinities") == {mine}
        assert listed.pop("hosts") == {resource_key("Host", "h2")}
        assert listed.pop("config") == {resource_key("Config", "global")}
        assert listed == {"ippools": set(), "profiles": set(), "policies": set(), "bgppeers": set()}

        a.bgp_dirty = False
        a._fold("store", Update(mine, Affinity(host="h1", cidr="fd00:e::40/122", state="confirmed", since=1.0), 6))
        assert mine in a.fabric and a.bgp_dirty
        a.bgp_dirty = False
        a._fold("store", Update(mine, None, 7))
        assert mine not in a.fabric and a.bgp_dirty
    finally:
        a.netlink.close()
        a.monitor.close()


def test_a_workload_prefix_that_covers_the_uplink_never_cuts_the_host_off(tmp_path: Path) -> None:
    """Config workload_interface_prefixes ["up"] on hosts whose uplink is up0 made every host drop
    all it received there (the Store's answers, BGP), so the Config could not even be mended. The
    host's own links (those holding its fabric address, its peers', lo) are exempt; an unknown
    up-named link is still dropped."""
    with namespace("upl") as ns, namespace("upr") as peer:
        def run(where: str, *cmd: str) -> None:
            r = netns.nsexec(where, list(cmd))
            assert r.returncode == 0, (cmd, r.stderr)

        for mine, theirs in (("up0", "zz0"), ("up9", "zz9")):
            run(ns, "ip", "link", "add", mine, "type", "veth", "peer", "name", theirs, "netns", peer)
        for where, dev, addr in ((ns, "up0", "fd00:c1::1/64"), (peer, "zz0", "fd00:c1::2/64"),
                                 (ns, "up9", "fd00:c9::1/64"), (peer, "zz9", "fd00:c9::2/64")):
            run(where, "ip", "addr", "add", addr, "dev", dev, "nodad")
            run(where, "ip", "link", "set", dev, "up")
        run(ns, "ip", "link", "set", "lo", "up")
        url = f"sqlite://{tmp_path}/store.db"
        apply(open_store(url), host("h1", "fd00:c1::1"), config(workload_interface_prefixes=["up"]))
        log = tmp_path / "agent.log"
        proc = netns.spawn(ns, [sys.executable, "-m", "tabby.cli", "--store", url, "agent", "--host", "h1",
                                "--no-bgp", "--metrics-port", "0", "--run-dir", str(tmp_path / "run")], log)
        try:
            def rule() -> str:
                r = netns.nsexec(ns, ["nft", "list", "chain", "inet", "tabby", "prerouting"])
                return r.stdout if r.returncode == 0 and "up*" in r.stdout else ""

            netns.wait_for(rule, 20, 0.1, "the policy table with the up* rule")
            assert 'iifname != "up0"' in rule(), rule()
            ok = netns.nsexec(peer, ["ping", "-6", "-c", "2", "-W", "2", "fd00:c1::1"])  # the fabric address
            assert ok.returncode == 0, ok.stdout
            bad = netns.nsexec(peer, ["ping", "-6", "-c", "2", "-W", "1", "fd00:c9::1"])  # the unknown up9
            assert bad.returncode != 0, bad.stdout
            # a BGP peer by address alone (no interface): the link whose subnet holds it is the host's,
            # also when that link comes, and gets its address, after the agent started (the
            # kernel's address event, not the next full check 90 s later, says so)
            apply(open_store(url), validate({"kind": "BGPPeer", "metadata": {"name": "tor5"},
                                             "spec": {"peer_ip": "fd00:c5::2", "asn": 65100}}))
            run(ns, "ip", "link", "add", "up5", "type", "veth", "peer", "name", "zz5", "netns", peer)
            for where, dev, addr in ((ns, "up5", "fd00:c5::1/64"), (peer, "zz5", "fd00:c5::2/64")):
                run(where, "ip", "link", "set", dev, "up")
                time.sleep(0.5)  # the link first, its address a moment later (as DHCP would)
                run(where, "ip", "addr", "add", addr, "dev", dev, "nodad")
            netns.wait_for(lambda: '"up5"' in rule(), 20, 0.1, "up5 exempt once it holds the peer's subnet")
            ok = netns.nsexec(peer, ["ping", "-6", "-c", "2", "-W", "2", "fd00:c5::1"])
            assert ok.returncode == 0, ok.stdout
            assert '"up9"' not in rule()
        finally:
            netns.stop(proc)
            print(log.read_text()[-3000:])
