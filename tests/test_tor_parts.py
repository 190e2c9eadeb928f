"""The pure parts of the routed lab and of BFD: gobgpd's config (checked by gobgpd itself), the
GoBGP FIB calculation, ToR 2's BIRD config (checked by bird -p), and the BFD watcher's decisions."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from tabby.agent.fabric import bfd_actions, password_why
from tabby.lab import gobgp, tor

NEIGHBOURS = [
    {"conf": {"neighbor_interface": "d1"}, "state": {"neighbor_address": "fe80::1%d1", "session_state": 6}},
    {"conf": {"neighbor_interface": "d2"}, "state": {"neighbor_address": "fe80::2%d2", "session_state": 3}},
]
RIB = {
    "2001:db8:e::/122": [{"best": True, "neighbor-ip": "fe80::1"}],
    "192.0.2.0/26": [{"best": False, "neighbor-ip": "fe80::2"}, {"best": True, "neighbor-ip": "fe80::1"}],
    "2001:db8:e::40/122": [{"best": True, "neighbor-ip": "fe80::2"}],  # its session is down: not routed
}


def test_gobgp_fib_routes_best_paths_of_established_neighbours() -> None:
    links = gobgp.neighbour_links(NEIGHBOURS)
    assert links == {"fe80::1": "d1"}
    assert gobgp.fib(RIB, links) == {"2001:db8:e::/122": ("fe80::1", "d1"), "192.0.2.0/26": ("fe80::1", "d1")}


def test_gobgp_fib_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        gobgp.neighbour_links([{"state": {"neighbor_address": "fe80::1%d1; rm -rf /", "session_state": 6}}])
    with pytest.raises(ValueError):
        gobgp.fib({"0.0.0.0/0 dev x": [{"best": True, "neighbor-ip": "fe80::1"}]}, {"fe80::1": "d1"})


def test_gobgpd_accepts_its_config(tmp_path: Path) -> None:
    # gobgpd's dry run resolves each neighbor-interface's link-local (the interfaces must exist): the
    # neighbours are checked by the running ToR in test_lab_tor; here the rest, and the same text
    conf = tmp_path / "gobgpd.toml"
    conf.write_text(gobgp.render(65501, "192.0.2.1", []))
    r = subprocess.run(["gobgpd", "-d", "-f", str(conf)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    text = gobgp.render(65501, "192.0.2.1", ["d1", "d2"])
    assert text.count('neighbor-interface = "d') == 2 and text.count('afi-safi-name = "ipv4-unicast"') == 2
    with pytest.raises(ValueError):
        gobgp.render(65501, "192.0.2.1", ['d1"\n[global]'])


def test_tor_bird_config_parses(tmp_path: Path) -> None:
    conf = tmp_path / "bird.conf"
    conf.write_text(tor.render_bird(65502, [("d1", 64601), ("d2", 64602)], True,
                                    [("fd00:f::1", "fe80::a", "d1"), ("fd00:f::2", "fe80::b", "d2")]))
    r = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with pytest.raises(ValueError):
        tor.render_bird(65502, [('d1"; }', 64601)], True)


TARGETS = {"2001:db8:f::2": ("host_h2",), "fe80::2%up2": ("peer_tor2",)}


def test_bfd_disables_only_what_it_once_saw_up_and_enables_it_again() -> None:
    was_up: set[str] = set()
    disabled: set[str] = set()
    # never up (the peer runs no BFD yet): nothing disabled
    assert bfd_actions(TARGETS, {"2001:db8:f::2": "Down"}, was_up, disabled) == (set(), set())
    assert bfd_actions(TARGETS, {"2001:db8:f::2": "Up", "fe80::2%up2": "Up"}, was_up, disabled) == (set(), set())
    off, on = bfd_actions(TARGETS, {"2001:db8:f::2": "Down", "fe80::2%up2": "Up"}, was_up, disabled)
    assert (off, on) == ({"host_h2"}, set())
    disabled |= off
    assert bfd_actions(TARGETS, {"fe80::2%up2": "Up"}, was_up, disabled) == (set(), set())  # session gone: still off
    assert bfd_actions(TARGETS, {"2001:db8:f::2": "Up", "fe80::2%up2": "Up"}, was_up, disabled) == (set(), {"host_h2"})


def test_bfd_decisions_depend_on_the_last_view_only_once_seen_up() -> None:
    views = [{"2001:db8:f::2": "Up"}, {"2001:db8:f::2": "Down"}, {"2001:db8:f::2": "Init"}, {}]
    for order in itertools.permutations(views):
        was_up: set[str] = {"2001:db8:f::2"}
        disabled: set[str] = set()
        for v in order:
            off, on = bfd_actions(TARGETS, v, was_up, disabled)
            disabled = (disabled | off) - on
        assert disabled == (set() if order[-1] == {"2001:db8:f::2": "Up"} else {"host_h2"}), order


def test_password_why_only_on_password_sessions_not_established() -> None:
    sessions = [{"name": "peer_tor2_abc123", "state": "Active"}, {"name": "peer_tor1_def456_1", "state": "Connect"},
                {"name": "host_h2_v6_aaaaaa", "state": "Active"}, {"name": "peer_x_bbbbbb", "state": "Established"}]
    password_why(sessions, frozenset({"peer_tor2_abc123", "peer_tor1_def456", "peer_x_bbbbbb"}), md5_rising=True)
    assert [("why" in s) for s in sessions] == [True, True, False, False]
    assert "password differs" in sessions[0]["why"]
