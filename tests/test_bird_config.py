"""The BIRD config of unnumbered, extended-next-hop, BFD and password sessions: what the text says,
and that a real ``bird -p`` accepts it (documentation prefixes only)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tabby.agent.agent import read_passwords
from tabby.agent.fabric import bird_inputs, password_files
from tabby.dataplane.bird import BirdReconciler
from tabby.dataplane.bird_config import BirdInputs, bfd_targets, families, render, render_bfd
from tabby.model import effective_config, validate
from tabby.model.resources import ConfigSpec


def host(name: str, v6: str, asn: int | None = None, v4: str | None = None) -> object:
    spec: dict[str, object] = {"ipv6_address": v6}
    if asn:
        spec["asn"] = asn
    if v4:
        spec["ipv4_address"] = v4
    return validate({"kind": "Host", "metadata": {"name": name}, "spec": spec})


def peer(name: str, **spec: object) -> object:
    return validate({"kind": "BGPPeer", "metadata": {"name": name}, "spec": spec})


POOLS = (validate({"kind": "IPPool", "metadata": {"name": "p6"}, "spec": {"cidr": "2001:db8:e::/112"}}),
         validate({"kind": "IPPool", "metadata": {"name": "p4"}, "spec": {"cidr": "192.0.2.0/24"}}))


def bird_accepts(text: str, tmp_path: Path) -> None:
    conf = tmp_path / "bird.conf"
    conf.write_text(text)
    r = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + text


def test_unnumbered_extended_next_hop_bfd_and_password(tmp_path: Path) -> None:
    me = host("h1", "2001:db8:f::1", asn=65001)
    pw = tmp_path / "tor2.pw"
    pw.write_text("s3cret pass\n")
    peers = (peer("tor1", interface="up1", asn=65101, extended_next_hop=True, fabric=True),
             peer("tor2", peer_ip="fe80::2", interface="up2", asn=65102, extended_next_hop=True, bfd=True,
                  fabric=True, password_file=str(pw)))
    inp = BirdInputs(host=me, hosts=(me,), peers=peers, pools=POOLS, blocks=("2001:db8:e::/122", "192.0.2.0/26"),
                     mesh=False)
    assert families(inp) == [6, 4]  # IPv4 routed though the host has no IPv4 address at all
    passwords, errors = read_passwords(password_files(inp), tmp_path)
    assert errors == [] and passwords == {str(pw): "s3cret pass"}
    text = render(BirdInputs(**{**inp.__dict__, "passwords": passwords}))
    tor1 = text[text.index('description "peer tor1"'):text.index('description "peer tor2"')]
    assert "neighbor range fe80::/10 as 65101;" in tor1 and 'interface "up1";' in tor1
    assert "local as 65001;" in tor1  # no address: the link-local of the link is the source
    assert "ipv4 { import filter fabric_in4; export filter bgp_out4; next hop self; gateway direct; " \
           "extended next hop on; };" in tor1
    tor2 = text[text.index('description "peer tor2"'):]
    assert 'neighbor fe80::2 as 65102;\n  interface "up2";' in tor2 and 'password "s3cret pass";' in tor2
    assert "bfd" not in text  # BFD is the liveness BIRD's, apart from the BGP speaker
    assert "route 192.0.2.0/26 blackhole;" in text
    bird_accepts(text, tmp_path)
    assert bfd_targets(inp) == {"fe80::2%up2": ("peer_tor2_" + text.split("protocol bgp peer_tor2_")[1][:16],)}
    live = render_bfd(inp)
    assert live is not None and 'neighbor fe80::2 dev "up2";' in live
    assert "min rx interval 100 ms" in live and "multiplier 3" in live and "protocol bgp" not in live
    bird_accepts(live, tmp_path)


def test_link_local_peers_on_any_interface_name_a_host_may_have(tmp_path: Path) -> None:
    """As a bare symbol after '%', BIRD refused a VLAN's "eth0.100", "1up", "up-1" and a keyword
    ("bfd"): both configs failed to parse, and BGP froze on every host (a global peer)."""
    me = host("h1", "2001:db8:f::1", asn=65001)
    names = ("eth0.100", "1up", "up-1", "bfd", "as", "_x")
    peers = tuple(peer(f"p{i}", peer_ip=f"fe80::{i + 2}", interface=n, asn=65100 + i, bfd=True)
                  for i, n in enumerate(names))
    inp = BirdInputs(host=me, hosts=(me,), peers=peers, pools=POOLS, mesh=False)
    text = render(inp)
    bird_accepts(text, tmp_path)
    live = render_bfd(inp)
    assert live is not None
    bird_accepts(live, tmp_path)
    for i, n in enumerate(names):
        assert f'neighbor fe80::{i + 2} as {65100 + i};\n  interface "{n}";' in text
        assert f'neighbor fe80::{i + 2} dev "{n}";' in live
    assert set(bfd_targets(inp)) == {f"fe80::{i + 2}%{n}" for i, n in enumerate(names)}


def test_an_ipv4_link_local_peer_needs_no_interface(tmp_path: Path) -> None:
    """169.254/16 peers (a cloud's interconnect) are on-link by the kernel's route: the model asks no
    interface of them, and the config named none ('interface "None";', a session that never came up)."""
    me = host("h1", "2001:db8:f::1", asn=65001)  # no IPv4 fabric address: the session speaks from the link's
    inp = BirdInputs(host=me, hosts=(me,), pools=POOLS, mesh=False, peers=(
        peer("dx", peer_ip="169.254.255.1", asn=65100, bfd=True),
        peer("dy", peer_ip="169.254.254.1", interface="eth1", asn=65101, bfd=True)))
    text = render(inp)
    bird_accepts(text, tmp_path)
    assert "None" not in text and families(inp) == [6, 4]
    dx = text[text.index('description "peer dx"'):text.index('description "peer dy"')]
    assert "neighbor 169.254.255.1 as 65100;" in dx and "interface" not in dx and "local as 65001;" in dx
    assert 'neighbor 169.254.254.1 as 65101;\n  interface "eth1";' in text
    live = render_bfd(inp)
    assert live is not None and "None" not in live
    bird_accepts(live, tmp_path)
    assert "neighbor 169.254.255.1;" in live and 'neighbor 169.254.254.1 dev "eth1";' in live
    # keyed as the liveness BIRD's "show bfd sessions" is read back (bird.bfd_sessions)
    assert set(bfd_targets(inp)) == {"169.254.255.1", "169.254.254.1%eth1"}


def test_one_link_local_ipv4_peer_address_on_two_uplinks_is_two_bfd_sessions(tmp_path: Path) -> None:
    """A common per-link pattern: the same 169.254.0.1 on each uplink. One BFD session (no dev)
    followed one link, and its going down disabled both BGP sessions."""
    me = host("h1", "2001:db8:f::1", asn=65001)
    inp = BirdInputs(host=me, hosts=(me,), pools=POOLS, mesh=False, peers=(
        peer("up1", peer_ip="169.254.0.1", interface="eth1", asn=65100, bfd=True),
        peer("up2", peer_ip="169.254.0.1", interface="eth2", asn=65100, bfd=True)))
    targets = bfd_targets(inp)
    assert set(targets) == {"169.254.0.1%eth1", "169.254.0.1%eth2"}
    assert all(len(protocols) == 1 for protocols in targets.values())
    live = render_bfd(inp)
    assert live is not None
    assert 'neighbor 169.254.0.1 dev "eth1";' in live and 'neighbor 169.254.0.1 dev "eth2";' in live
    bird_accepts(live, tmp_path)

    class Shown(BirdReconciler):  # "show bfd sessions" as BIRD 2.0.12 prints it
        def control(self, command: str, timeout: float = 10.0) -> str:
            assert command == "show bfd sessions"
            return ("bfd1:\nIP address                Interface  State      Since         Interval  Timeout\n"
                    "169.254.0.1               eth1       Up         21:00:00.000    0.100    0.300\n"
                    "169.254.0.1               eth2       Down       21:00:05.000    1.000    0.000\n"
                    "169.254.9.9               eth3       Up         21:00:00.000    0.100    0.300\n")
    states = Shown(tmp_path).bfd_sessions()
    assert states["169.254.0.1%eth1"] == "Up" and states["169.254.0.1%eth2"] == "Down"
    assert states["169.254.9.9"] == "Up"  # a peer that names no link is found by its address


def test_a_reflector_makes_no_rr_client_of_a_host_in_another_as(tmp_path: Path) -> None:
    """BIRD refuses the whole file ("Only internal neighbor can be RR client"): the reflector kept
    its old config, or never started, and every client lost its routes."""
    rr = validate({"kind": "Host", "metadata": {"name": "rr"},
                   "spec": {"ipv6_address": "2001:db8:f::1", "route_reflector_cluster_id": "1.1.1.1"}})
    same, other = host("c1", "2001:db8:f::2"), host("c2", "2001:db8:f::3", asn=65001)
    text = render(BirdInputs(host=rr, hosts=(rr, same, other), peers=(), pools=POOLS))
    bird_accepts(text, tmp_path)
    c1 = text[text.index('description "host c1 v6"'):text.index('description "host c2 v6"')]
    c2 = text[text.index('description "host c2 v6"'):]
    assert "rr client" in c1 and "rr client" not in c2 and "neighbor 2001:db8:f::3 as 65001;" in c2


def test_protocol_names_of_long_alike_hosts_stay_distinct_and_within_birds_limit(tmp_path: Path) -> None:
    """The pair a helper found colliding under a 24-bit hash, and the longest unnumbered peer name."""
    from tabby.dataplane.bird_config import _ident

    a, b = "compute-node-production-eu-west-1a-rack-002226", "compute-node-production-eu-west-1a-rack-004265"
    assert _ident(f"host {a} v6") != _ident(f"host {b} v6")
    me = host("h1", "2001:db8:f::1", asn=65001)
    hosts = (me, host(a, "2001:db8:f::2"), host(b, "2001:db8:f::3"))
    long_peer = peer("x" * 253, interface="up1", asn=65101)  # unnumbered: a dynamic name from it
    text = render(BirdInputs(host=me, hosts=hosts, peers=(long_peer,), pools=POOLS))
    bird_accepts(text, tmp_path)  # "already defined" with the 24-bit hash; "too long" past 47
    assert text.count(f'description "host {a} v6"') == 1 and text.count(f'description "host {b} v6"') == 1


def test_unreadable_password_disables_the_session_and_says_which_file(tmp_path: Path) -> None:
    me = host("h1", "2001:db8:f::1")
    allowed = tmp_path / "pw"  # the agent's --bgp-password-dir
    allowed.mkdir()
    missing = str(allowed / "nope")
    bad = allowed / "bad"
    bad.write_text('quote"inside')
    fifo = allowed / "fifo"  # opening it blocked until a writer came: the agent's loop hung
    os.mkfifo(fifo)
    (allowed / "zero").symlink_to("/dev/zero")  # an operator's symlink is followed: still no device
    beside = tmp_path / "pw-beside"  # a good password, but not in the directory (a prefix of its name)
    beside.mkdir()
    (beside / "x").write_text("fine\n")
    p = (peer("a", peer_ip="2001:db8:f::fe", asn=65100, password_file=missing),
         peer("b", peer_ip="2001:db8:f::fd", asn=65100, password_file=str(bad)),
         peer("c", peer_ip="2001:db8:f::fc", asn=65100, password_file=str(fifo)),
         peer("d", peer_ip="2001:db8:f::fb", asn=65100, password_file=str(allowed / "zero")),
         peer("e", peer_ip="2001:db8:f::fa", asn=65100, password_file="/dev/zero"),
         peer("f", peer_ip="2001:db8:f::f9", asn=65100, password_file=str(beside / "x")))
    inp = BirdInputs(host=me, hosts=(me,), peers=p, pools=POOLS[:1])
    got, errors = read_passwords(password_files(inp), allowed)
    assert got == {} and len(errors) == 6
    assert any(missing in e for e in errors) and any(str(bad) in e and "quote" not in e.replace(str(bad), "")
                                                      for e in errors)
    assert sum("not a regular file" in e for e in errors) == 2, errors
    outside = [e for e in errors if f"not in the agent's --bgp-password-dir {allowed}" in e]
    assert len(outside) == 2 and any("/dev/zero" in e for e in outside) and any(str(beside) in e for e in outside)
    text = render(inp)
    assert text.count("disabled;") == 6 and "  password " not in text
    bird_accepts(text, tmp_path)


def test_mesh_bfd_and_password_by_config(tmp_path: Path) -> None:
    me, other = host("h1", "2001:db8:f::1"), host("h2", "2001:db8:f::2")
    pw = tmp_path / "mesh.pw"
    pw.write_text("meshpw")
    assert effective_config(None, None).mesh_bfd is False  # off by default: see ConfigSpec
    cfg = effective_config(ConfigSpec(mesh_password_file=str(pw), mesh_bfd=True), None)
    inp = bird_inputs("h1", [me, other], {}, cfg)
    assert inp is not None
    passwords, _ = read_passwords(password_files(inp), tmp_path)
    text = render(BirdInputs(**{**inp.__dict__, "passwords": passwords}))
    mesh = text[text.index('description "host h2 v6"'):]
    assert 'password "meshpw";' in mesh and "neighbor 2001:db8:f::2 as 64512;" in mesh
    bird_accepts(text, tmp_path)
    assert list(bfd_targets(inp)) == ["2001:db8:f::2"]
    live = render_bfd(inp)
    assert live is not None and "  neighbor 2001:db8:f::2;" in live
    bird_accepts(live, tmp_path)
    off = bird_inputs("h1", [me, other], {}, effective_config(ConfigSpec(mesh_bfd=False), None))
    assert off is not None and render_bfd(off) is None


def test_multihop_peer(tmp_path: Path) -> None:
    me = host("h1", "2001:db8:f::1")
    inp = BirdInputs(host=me, hosts=(me,), peers=(peer("rr", peer_ip="2001:db8:99::1", asn=65100, multihop=2),),
                     pools=POOLS[:1])
    text = render(inp)
    assert "multihop 2;" in text and "gateway recursive;" in text and "direct;" not in text
    bird_accepts(text, tmp_path)


@pytest.mark.parametrize("spec, field", [
    ({"asn": 65100}, "peer_ip"),
    ({"interface": "up1", "asn": 65100, "multihop": 2}, "multihop"),
    ({"peer_ip": "192.0.2.1", "asn": 65100, "extended_next_hop": True}, "extended_next_hop"),
    ({"peer_ip": "2001:db8::1", "asn": 65100, "password_file": "relative/pw"}, "password_file"),
    ({"peer_ip": "2001:db8::1", "asn": 65100, "password_file": "/etc/../shadow"}, "password_file"),
    ({"peer_ip": "2001:db8::1", "asn": 65100, "password_file": '/x"; }'}, "password_file"),
    ({"interface": 'up1"; }', "asn": 65100}, "interface"),
    ({"peer_ip": "2001:db8::1", "asn": 65100, "multihop": 1}, "multihop"),
    ({"peer_ip": "2001:db8::1", "asn": 65100, "multihop": 2, "bfd": True}, "bfd"),
    ({"interface": "up1", "asn": 65100, "bfd": True}, "bfd"),
])
def test_bad_peers_are_refused_naming_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(Exception) as e:
        peer("p", **spec)
    assert field in str(e.value)


def test_config_secret_is_kept_by_the_store_and_redacted_everywhere_else(tmp_path: Path) -> None:
    from tabby.agent.fabric import missing_secrets
    from tabby.model.codec import decode, encode, to_plain
    from tabby.model.keys import resource_key

    cfg = validate({"kind": "Config", "metadata": {"name": "global"},
                    "spec": {"mesh_password_secret": "mesh", "bgp_secrets": {"mesh": "Top-secret 1", "tor": "t0r"}}})
    assert "Top-secret 1" not in str(to_plain(cfg)) and to_plain(cfg)["spec"]["bgp_secrets"]["mesh"] == "<redacted>"
    assert "Top-secret 1" not in repr(cfg) and "Top-secret 1" not in str(cfg)
    again = decode(resource_key("Config", "global"), encode(cfg))
    assert again == cfg and again.spec.bgp_secrets["mesh"].get_secret_value() == "Top-secret 1"
    eff = effective_config(cfg.spec, None)
    assert eff.bgp_secrets is not None and eff.bgp_secrets["tor"].get_secret_value() == "t0r"
    me, other = host("h1", "2001:db8:f::1"), host("h2", "2001:db8:f::2")
    p = peer("tor", peer_ip="2001:db8:f::fe", asn=65100, password_secret="tor")
    gone = peer("gone", peer_ip="2001:db8:f::fd", asn=65100, password_secret="nope")
    inp = bird_inputs("h1", [me, other, p, gone], {}, eff)
    assert inp is not None
    text = render(inp)
    assert 'password "Top-secret 1";' in text and 'password "t0r";' in text
    assert text[text.index('description "peer gone"'):].splitlines()[1].strip().startswith("disabled;")
    assert missing_secrets(inp) == ["Config bgp_secrets has no 'nope'; its sessions are disabled"]
    bird_accepts(text, tmp_path)


@pytest.mark.parametrize("spec, field", [
    ({"bgp_secrets": {"a": "<redacted>"}}, "bgp_secrets"),
    ({"bgp_secrets": {"a": 'x"y'}}, "bgp_secrets"),
    ({"bgp_secrets": {"a": ""}}, "bgp_secrets"),
    ({"bgp_secrets": {"Bad Name": "x"}}, "bgp_secrets"),
    ({"mesh_password_secret": "a", "mesh_password_file": "/etc/pw"}, "mesh_password_secret"),
])
def test_bad_secrets_refused_naming_the_field_never_the_value(spec: dict[str, object], field: str) -> None:
    with pytest.raises(Exception) as e:
        validate({"kind": "Config", "metadata": {"name": "global"}, "spec": spec})
    assert field in str(e.value) and 'x"y' not in str(e.value)


def test_a_host_password_source_replaces_the_global_one() -> None:
    glob = ConfigSpec(mesh_password_secret="mesh", bgp_secrets={"mesh": "s1"})
    host_cfg = ConfigSpec(mesh_password_file="/etc/tabby/h2.pw")
    eff = effective_config(glob, host_cfg)  # a valid pair of records: never an exception
    assert eff.mesh_password_file == "/etc/tabby/h2.pw" and eff.mesh_password_secret is None
    back = effective_config(ConfigSpec(mesh_password_file="/etc/tabby/all.pw"), ConfigSpec(mesh_password_secret="m"))
    assert back.mesh_password_secret == "m" and back.mesh_password_file is None


def test_only_this_hosts_confirmed_blocks_inside_a_pool_become_blackholes_and_announcements() -> None:
    """Whoever can write this host's affinities (its CNI plugin's credential) could otherwise have
    it blackhole and announce any prefix, e.g. the subnet the Store's members are on."""
    from tabby.model.ipam import Affinity

    me = host("h1", "2001:db8:f::1")
    pool = validate({"kind": "IPPool", "metadata": {"name": "v6"}, "spec": {"cidr": "fd00:e::/112"}})
    affs = [Affinity(host="h1", cidr=c, state=st, since=1.0) for c, st in (
        ("fd00:e::40/122", "confirmed"), ("fd00:e::80/122", "pending"), ("10.1.2.0/26", "confirmed"),
        ("fd00:f::/122", "confirmed"))] + [Affinity(host="h2", cidr="fd00:e::c0/122", state="confirmed", since=1.0)]
    inp = bird_inputs("h1", [me, pool, *affs], {}, effective_config(None, None))
    assert inp is not None and inp.blocks == ("fd00:e::40/122",)


@pytest.mark.parametrize("v4", ["240.0.0.1", "255.255.255.255", "224.0.0.5"])
def test_a_host_whose_ipv4_address_could_be_no_router_id_is_refused_by_the_model(v4: str) -> None:
    """Accepted, it raised in every agent's conflict check (which then froze fabric-wide) and in its
    own BGP config, at every turn."""
    with pytest.raises(ValueError, match="ipv4_address"):
        host("h9", "2001:db8:f::9", v4=v4)


@pytest.mark.parametrize("reply", ["Reconfiguration already in progress, queueing new config", "Nothing to do"])
def test_a_configure_bird_queues_or_finds_the_same_is_no_error(tmp_path: Path, reply: str) -> None:
    """Sent while another reconfiguration runs, BIRD queues the config (and reads it when that one
    ends): it was reported as an error and sent again 5 s later."""
    me = host("h1", "2001:db8:f::1", asn=65001)
    text = render(BirdInputs(host=me, hosts=(me,), peers=(), pools=POOLS, mesh=False))

    class Running(BirdReconciler):  # a BIRD that runs (its pid) and answers configure so
        def pid(self) -> int | None:
            return 1

        def control(self, command: str, timeout: float = 10.0) -> str:
            assert command == "configure"
            return reply

    bird = Running(tmp_path)
    bird.set_config(text)
    assert bird.apply() is True and bird.last_error is None and bird.loaded == text


def test_fabric_wide_bgp_settings_come_from_the_global_config_only(tmp_path: Path) -> None:
    """default_asn is the AS of every Host that names none: a host.b override made b expect 65001
    of its peers while they expected 64512 of b, and no session came up; a mesh is two-sided."""
    from tabby.model.resources import ignored_host_settings

    a, b = host("a", "2001:db8:f::1"), host("b", "2001:db8:f::2")
    override = ConfigSpec(default_asn=65001, node_to_node_mesh=False, mesh_bfd=True)
    at_b = effective_config(ConfigSpec(default_asn=64512), override)
    at_a = effective_config(ConfigSpec(default_asn=64512), None)
    assert (at_b.default_asn, at_b.node_to_node_mesh) == (64512, True) and at_b.mesh_bfd is True  # per host
    assert ignored_host_settings(override) == ["default_asn", "node_to_node_mesh"]
    text_b = render(bird_inputs("b", [a, b, *POOLS], {}, at_b))  # type: ignore[arg-type]
    text_a = render(bird_inputs("a", [a, b, *POOLS], {}, at_a))  # type: ignore[arg-type]
    assert "local 2001:db8:f::2 as 64512;" in text_b and "neighbor 2001:db8:f::1 as 64512;" in text_b
    assert "neighbor 2001:db8:f::2 as 64512;" in text_a
    bird_accepts(text_b, tmp_path)
