"""The CNI network configuration's checks (cni/config.py), without a kernel: every field's JSON
type strictly, errors naming the key, and the runtime's requests."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from tabby.cni.config import ConfError, parse, request

BASE = {"cniVersion": "1.1.0", "name": "net1", "type": "tabby-cni"}


def refused(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfError) as e:
        request(parse(json.dumps(doc).encode()))
    return str(e.value)


def test_a_minimal_config_takes_the_defaults() -> None:
    conf = parse(json.dumps(BASE).encode())
    assert (conf.cni_version, conf.name, conf.type) == ("1.1.0", "net1", "tabby-cni")
    assert conf.ipv6 and conf.ipv4 and conf.ipv6_gateway == "link-local" and conf.mtu is None
    assert conf.profiles == [] and conf.labels == {} and conf.runtime_config.ips == [] and conf.prev_result is None


def test_every_field_is_read_with_its_json_type() -> None:
    doc = {**BASE, "store": "sqlite:///x.db", "host": "h1", "server_socket": "/run/x.sock", "ipv6": False,
           "ipv6_pool": "v6", "ipv4_pool": "v4", "ipv6_gateway": "proxy-ndp", "mtu": 1500, "profiles": ["open"],
           "labels": {"app": "web"}, "capabilities": {"mac": True}, "args": {"x": 1},
           "runtimeConfig": {"mac": "52:54:00:12:34:56", "ips": ["10.0.0.5/32"], "other": 1},
           "prevResult": {"ips": []}, "unknown": [1]}
    conf = parse(json.dumps(doc).encode())
    assert (conf.store, conf.host, conf.server_socket, conf.ipv6, conf.ipv4) == ("sqlite:///x.db", "h1",
                                                                                 "/run/x.sock", False, True)
    assert (conf.ipv6_pool, conf.ipv4_pool, conf.ipv6_gateway, conf.mtu) == ("v6", "v4", "proxy-ndp", 1500)
    assert conf.capabilities == {"mac": True} and conf.args == {"x": 1} and conf.prev_result == {"ips": []}
    req = request(conf)
    assert req.mac == "52:54:00:12:34:56" and req.ips == (ipaddress.ip_address("10.0.0.5"),)


@pytest.mark.parametrize(("field", "value"), [
    ("cniVersion", 1.1), ("name", 5), ("type", None), ("store", 1), ("host", ["h1"]), ("ipv6", "true"),
    ("ipv4", 1), ("mtu", "1500"), ("mtu", 1500.0), ("mtu", True), ("mtu", 1279), ("mtu", 65536),
    ("ipv6_gateway", "router"), ("ipv6_gateway", ["link-local"]), ("profiles", "open"), ("profiles", [1]),
    ("labels", {"app": 1}), ("labels", []), ("capabilities", {"mac": "yes"}), ("args", []),
    ("prevResult", "x"), ("runtimeConfig", []),
    # the host goes into Store keys and the socket's name; the socket is a path
    ("host", "h1/evil"), ("host", "h1 ;x"), ("host", "-h"),
    ("server_socket", "run/x.sock"), ("server_socket", "/run/../etc/x.sock"), ("server_socket", "/run/x/"),
    ("server_socket", "/run/x\n.sock"), ("server_socket", "/" + "x" * 107),
])
def test_a_wrong_type_or_value_is_refused_naming_its_key(field: str, value: Any) -> None:
    assert refused({**BASE, field: value}).startswith(f"{field}: ")


@pytest.mark.parametrize(("doc", "named"), [
    ({"runtimeConfig": {"mac": 5}}, "runtimeConfig.mac"),
    ({"runtimeConfig": {"ips": "10.0.0.1"}}, "runtimeConfig.ips"),
    ({"runtimeConfig": {"ips": ["10.0.0.1", 7]}}, "runtimeConfig.ips.1"),
    ({"runtimeConfig": {"ips": [f"10.0.0.{i}" for i in range(9)]}}, "runtimeConfig.ips"),
    ({"runtimeConfig": {"mac": "01:00:00:00:00:01"}}, "runtimeConfig.mac"),
    ({"runtimeConfig": {"ips": ["fd00::1; x"]}}, "runtimeConfig.ips.0"),
    ({"args": {"cni": {"ips": ["10.0.0.1", "10.0.0.2"]}}}, "args.cni.ips.1"),
    ({"args": {"cni": {"labels": [{"key": "a b", "value": "v"}]}}}, "args.cni.labels"),
    ({"labels": {"a b": "v"}}, "labels"),
    ({"profiles": ["ok", "-bad"]}, "profiles.1"),
    ({"name": "net/1"}, "name"),
    ({"cniVersion": "0.2.0"}, "cniVersion"),
    ({"ipv6": False, "ipv4": False}, "ipv6/ipv4"),
])
def test_a_bad_request_or_name_is_refused_naming_where(doc: dict[str, Any], named: str) -> None:
    assert refused({**BASE, **doc}).startswith(f"{named}: ")


def test_missing_fields_are_all_named() -> None:
    with pytest.raises(ConfError) as e:
        parse(b'{"type": "tabby-cni"}')
    assert str(e.value) == "cniVersion: required; name: required"


def test_a_host_from_the_environment_is_checked_before_anything_is_touched() -> None:
    from tabby.cni.main import run

    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/nonexistent", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/opt/cni/bin", "TABBY_STORE": "sqlite:///nonexistent/x.db", "TABBY_HOST": "h1/evil"}
    code, out = run(env, json.dumps(BASE).encode())
    err = json.loads(out)
    assert code == 1 and err["code"] == 4 and "TABBY_HOST" in err["msg"], err


def test_the_shim_takes_only_a_plain_socket_path_from_the_config() -> None:
    from tabby.cni.shim import socket_path

    assert socket_path(json.dumps({**BASE, "server_socket": "/run/tabby/cni/x.sock"}).encode(), {}) == \
        "/run/tabby/cni/x.sock"
    for bad in ("x.sock", "/run/../x.sock", "/" + "x" * 107):
        assert socket_path(json.dumps({**BASE, "server_socket": bad}).encode(), {}) is None, bad


def test_an_empty_host_or_socket_is_unset_as_before() -> None:
    from tabby.cni.shim import socket_path

    conf = parse(json.dumps({**BASE, "host": "", "server_socket": ""}).encode())
    assert conf.host is None and conf.server_socket is None
    assert socket_path(json.dumps({**BASE, "host": "", "server_socket": ""}).encode(), {"TABBY_HOST": "h2"}) == \
        "/run/tabby/cni/h2.sock"


def test_a_prev_result_of_the_wrong_shape_is_left_out_of_the_result() -> None:
    """prevResult {"interfaces": 5} was taken, then the result's build raised TypeError after the
    attachment was made: ADD plumbed everything and printed no JSON."""
    from tabby.cni.result import Plumbed, build

    p = Plumbed(host_if="tby0", host_mac="ee:ee:ee:ee:ee:ee", ifname="eth0", mac="52:54:00:00:00:01",
                sandbox="/run/netns/x", mtu=1500, ips=(("fd00:e::1/128", "fe80::1"),), routes=(("::/0", "fe80::1"),))
    for prev in ({"interfaces": 5}, {"ips": "x", "routes": {"a": 1}}, {"interfaces": [5, {"name": "lo"}]}):
        out = build("1.1.0", p, prev)
        assert [i["name"] for i in out["interfaces"]][-2:] == ["tby0", "eth0"]
        assert out["ips"][-1]["address"] == "fd00:e::1/128" and out["routes"][-1]["dst"] == "::/0"


def test_every_failure_is_a_cni_error_on_stdout() -> None:
    """A Store that does not answer (GC, CHECK: StoreError is no OSError) and a bug alike come back
    as CNI error JSON, never as a traceback with an empty stdout."""
    from tabby.cni import main

    doc = {"cniVersion": "1.1.0", "name": "n", "type": "tabby", "store": "etcd://127.0.0.1:1", "host": "h1",
           "cni.dev/valid-attachments": []}
    code, out = main.run({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}, json.dumps(doc).encode())
    assert code == 1 and json.loads(out)["code"] == 11 and "store" in json.loads(out)["msg"]

    def boom(*_: object) -> None:
        raise KeyError("a bug")

    real, main.gc = main.gc, boom  # type: ignore[assignment]
    try:
        code, out = main.run({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}, json.dumps(doc).encode())
    finally:
        main.gc = real  # type: ignore[assignment]
    assert code == 1 and json.loads(out)["code"] == 999 and "KeyError" in json.loads(out)["details"]
