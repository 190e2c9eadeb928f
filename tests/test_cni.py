"""tabby-cni called exactly as a runtime calls it: CNI_* environment, config on stdin, in the host's
namespace, for a container namespace; the agent then makes traffic flow."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentlib import AgentProc, apply, namespace

from tabby.cni.install import install
from tabby.cni.lock import wait_idle
from tabby.cni.plugin import lock_key
from tabby.ipam import IPAM
from tabby.lab import netns
from tabby.lab.netns import wait_for
from tabby.model import validate
from tabby.model.ipam import decode_ipam, encode_ipam
from tabby.model.keys import ipam_handle_key
from tabby.model.plain import replace
from tabby.store import open_store


def _plugin_binary() -> str:
    """tabby-cni as a runtime finds it in CNI_PATH, written by tabby.cni.install (this
    interpreter, this checkout's code)."""
    d = tempfile.mkdtemp(prefix="tbyt-cnibin-")
    atexit.register(shutil.rmtree, d, True)
    return str(install(d))


def settle(host_ns: str, cid: str, ifname: str = "eth0") -> None:
    """Wait until the attachment's lock is free: the server's DEL finishes (veth, addresses)
    after it has answered, under that lock."""
    wait_idle(lock_key(os.stat(f"/run/netns/{host_ns}").st_ino, cid, ifname))


CNI = _plugin_binary()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def conf(store_url: str, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "name": "net1", "type": "tabby-cni", "store": store_url, "host": "h1",
            "profiles": ["open"], **extra}


def cni(host_ns: str, command: str, config: dict[str, Any] | str, container: str = "", cid: str = "c0ffee",
        ifname: str = "eth0", **extra_env: str) -> tuple[int, dict[str, Any] | None]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_PATH": "/opt/cni/bin",
           "CNI_NETNS": f"/run/netns/{container}" if container else "", **extra_env}
    stdin = config if isinstance(config, str) else json.dumps(config)
    pythonpath = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run(["nsenter", f"--net=/run/netns/{host_ns}", CNI], input=stdin, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": pythonpath, **env}, timeout=60)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[str, str, Any]]:
    url = f"sqlite://{tmp_path}/store.db"
    store = open_store(url)
    apply(store, validate({"kind": "Host", "metadata": {"name": "h1"}, "spec": {"ipv6_address": "fd00:f::1"}}),
          validate({"kind": "IPPool", "metadata": {"name": "v6"}, "spec": {"cidr": "fd00:e::/112"}}),
          validate({"kind": "IPPool", "metadata": {"name": "v4"}, "spec": {"cidr": "10.65.0.0/16"}}),
          validate({"kind": "Profile", "metadata": {"name": "open"},
                    "spec": {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]}}))
    with namespace("h") as host_ns:
        yield host_ns, url, store


def test_add_check_del_and_traffic(env: tuple[str, str, Any], tmp_path: Path) -> None:
    host_ns, url, store = env
    agent = AgentProc(host_ns, url, "h1", tmp_path / "agent.log").start()
    try:
        with namespace("c") as c1, namespace("c") as c2:
            code, res = cni(host_ns, "ADD", conf(url), c1, cid="aaaa1111")
            assert code == 0, res
            assert [ip["address"] for ip in res["ips"]] == ["fd00:e::1/128", "10.65.0.1/32"]
            assert res["routes"][0] == {"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"}
            hostif = res["interfaces"][0]["name"]
            assert len(hostif) <= 15 and res["interfaces"][0]["mac"] == "ee:ee:ee:ee:ee:ee"
            assert "fd00:e::1/128" in netns.ip("-6", "addr", "show", "dev", "eth0", ns=c1)
            assert "default via fe80::ecee:eeff:feee:eeee" in netns.ip("-6", "route", ns=c1)
            code, res2 = cni(host_ns, "ADD", conf(url), c2, cid="bbbb2222")
            assert code == 0, res2
            assert cni(host_ns, "CHECK", conf(url), c1, cid="aaaa1111")[0] == 0
            ep = store.get("/tabby/v1/endpoints/h1/net1.aaaa1111.eth0")
            assert ep is not None and json.loads(ep.value)["spec"]["interface"] == hostif
            # the agent programs the host side; then traffic flows both families
            for fam, dst in (("-6", "fd00:e::2"), ("-4", "10.65.0.2")):
                wait_for(lambda fam=fam, dst=dst: netns.nsexec(c1, ["ping", fam, "-c", "1", "-W", "1", dst])
                         .returncode == 0, 15, 0.2, f"ping {dst}")
            # DEL, twice: nothing left
            for _ in range(2):
                assert cni(host_ns, "DEL", conf(url), "", cid="aaaa1111")[0] == 0
            assert hostif not in netns.ip("link", "show", ns=host_ns)
            assert store.get("/tabby/v1/endpoints/h1/net1.aaaa1111.eth0") is None
            assert IPAM(store).handle("net1.aaaa1111/eth0") is None
            assert cni(host_ns, "CHECK", conf(url), c1, cid="aaaa1111")[0] == 1
    finally:
        agent.stop()


def test_proxy_ndp_mode_routes_via_the_host_address(env: tuple[str, str, Any], tmp_path: Path) -> None:
    host_ns, url, store = env
    agent = AgentProc(host_ns, url, "h1", tmp_path / "agent.log").start()
    try:
        with namespace("c") as c1, namespace("c") as c2:
            assert cni(host_ns, "ADD", conf(url, ipv6_gateway="proxy-ndp", ipv4=False), c1, cid="pp01")[0] == 0
            assert cni(host_ns, "ADD", conf(url, ipv4=False), c2, cid="pp02")[0] == 0
            assert "default via fd00:f::1" in netns.ip("-6", "route", ns=c1)
            ep = json.loads(store.get("/tabby/v1/endpoints/h1/net1.pp01.eth0").value)
            assert ep["spec"]["ipv6_gateway"] == "fd00:f::1"
            wait_for(lambda: netns.nsexec(c1, ["ping", "-6", "-c", "1", "-W", "1", "fd00:e::2"]).returncode == 0,
                     15, 0.2, "ping through the proxied gateway")
            assert "fd00:f::1" in netns.ip("-6", "neigh", "show", "proxy", ns=host_ns)
    finally:
        agent.stop()


def test_failed_add_leaves_nothing_and_errors_have_codes(env: tuple[str, str, Any]) -> None:
    host_ns, url, store = env
    apply(store, validate({"kind": "IPPool", "metadata": {"name": "v4"},
                           "spec": {"cidr": "10.65.0.0/16", "disabled": True}}))
    with namespace("c") as c1:
        links_before = netns.ip("link", "show", ns=host_ns)
        code, res = cni(host_ns, "ADD", conf(url), c1, cid="dead0001")  # no enabled IPv4 pool
        assert code == 1 and res["code"] in (5, 11) and "IPv4" in res["details"]
        assert netns.ip("link", "show", ns=host_ns) == links_before
        assert "eth0" not in netns.ip("link", "show", ns=c1)
        assert IPAM(store).handle("net1.dead0001/eth0") is None
        assert store.get("/tabby/v1/endpoints/h1/net1.dead0001.eth0") is None
        code, res = cni(host_ns, "ADD", '{"cniVersion": "1.1.0", "type": "tabby-cni"}', c1)
        assert code == 1 and res["code"] == 7 and "name" in res["details"]
        code, res = cni(host_ns, "ADD", conf(url, cniVersion="0.2.0"), c1)
        assert code == 1 and res["code"] == 7 and "cniVersion" in res["details"]
        code, res = cni(host_ns, "VERSION", conf(url))
        assert code == 0 and "1.1.0" in res["supportedVersions"]
        assert cni(host_ns, "STATUS", conf(url))[0] == 0
        code, res = cni(host_ns, "STATUS", conf("etcd://127.0.0.1:1"))
        assert code == 1 and res["code"] == 50


def test_gc_removes_allocation_endpoint_and_veth_of_attachments_not_listed(env: tuple[str, str, Any]) -> None:
    host_ns, url, store = env
    ipam = IPAM(store)
    ipam.assign("other.x", "h1", ipv6=1)  # another network's handle: never GC's business
    with namespace("c") as c1, namespace("c") as c2:
        assert cni(host_ns, "ADD", conf(url), c1, cid="keep01")[0] == 0
        code, res = cni(host_ns, "ADD", conf(url), c2, cid="stale01")
        assert code == 0, res
        stale_if = res["interfaces"][0]["name"]
        # just made, it may be an ADD the runtime's list was made before: left to a later GC
        valid = {"cni.dev/valid-attachments": [{"containerID": "keep01", "ifname": "eth0"}]}
        assert cni(host_ns, "GC", conf(url, **valid))[0] == 0
        assert ipam.handle("net1.stale01/eth0") is not None
        for handle in ("net1.stale01/eth0", "net1.keep01/eth0"):  # as if made ten minutes ago
            kv = store.get(ipam_handle_key(handle))
            old = decode_ipam(kv.key, kv.value)
            store.update(kv.key, encode_ipam(replace(old, created=old.created - 600)), kv.mod_revision)
        for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):  # 1.1, and libcni's older name
            valid = {key: [{"containerID": "keep01", "ifname": "eth0"}]}
            assert cni(host_ns, "GC", conf(url, **valid))[0] == 0
        assert ipam.handle("net1.keep01/eth0") and ipam.handle("other.x")
        assert ipam.handle("net1.stale01/eth0") is None
        assert store.get("/tabby/v1/endpoints/h1/net1.stale01.eth0") is None
        assert store.get("/tabby/v1/endpoints/h1/net1.keep01.eth0") is not None
        assert stale_if not in netns.ip("link", "show", ns=host_ns)
        assert "eth0" not in netns.ip("link", "show", ns=c2)
        assert "eth0" in netns.ip("link", "show", ns=c1)
        assert cni(host_ns, "GC", conf(url))[0] == 0  # no list at all: nothing is removed
        assert ipam.handle("net1.keep01/eth0")
        assert cni(host_ns, "DEL", conf(url), c1, cid="keep01")[0] == 0
    ipam.release_handle("other.x")
    assert IPAM(store).check() == []


@pytest.fixture
def server(env: tuple[str, str, Any], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A warm `tabby cni-server` in the host's namespace, stopped at the end."""
    host_ns, url, _ = env
    sock, log = tmp_path / "srv" / "cni.sock", tmp_path / "cni-server.log"
    proc = netns.spawn(host_ns, [sys.executable, "-m", "tabby.cli", "--store", url, "cni-server", "--host", "h1",
                                 "--socket", str(sock)], log)
    try:
        wait_for(sock.exists, 20, 0.05, "cni-server socket")
        yield str(sock), log
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_warm_server_runs_the_calls_and_the_same_errors_come_back(
        env: tuple[str, str, Any], server: tuple[str, Path], tmp_path: Path) -> None:
    host_ns, url, store = env
    sock, log = server
    assert oct(Path(sock).stat().st_mode & 0o777) == "0o600"  # only root may ask for interfaces
    with namespace("c") as c1:
        code, res = cni(host_ns, "ADD", conf(url, server_socket=sock), c1, cid="warm0001")
        assert code == 0, res
        assert [ip["address"] for ip in res["ips"]] == ["fd00:e::1/128", "10.65.0.1/32"]
        assert "fd00:e::1/128" in netns.ip("-6", "addr", "show", "dev", "eth0", ns=c1)
        assert res["interfaces"][0]["name"] in netns.ip("link", "show", ns=host_ns)  # made in the server's netns
        assert cni(host_ns, "CHECK", conf(url, server_socket=sock), c1, cid="warm0001")[0] == 0
        # errors keep their codes through the server
        code, res = cni(host_ns, "ADD", conf(url, server_socket=sock, cniVersion="0.2.0"), c1, cid="warm0002")
        assert code == 1 and res["code"] == 7
        assert cni(host_ns, "DEL", conf(url, server_socket=sock), "", cid="warm0001")[0] == 0
        assert store.get("/tabby/v1/endpoints/h1/net1.warm0001.eth0") is None  # before DEL answers
        settle(host_ns, "warm0001")
        assert IPAM(store).handle("net1.warm0001/eth0") is None  # then the rest, under the lock
        assert "tby" not in netns.ip("-o", "link", "show", ns=host_ns)
    served = log.read_text()
    assert "ADD warm0001 eth0 -> 0" in served and "DEL warm0001 eth0 -> 0" in served


def test_a_call_from_another_namespace_runs_itself(env: tuple[str, str, Any], server: tuple[str, Path]) -> None:
    """The server would make the veth in its own namespace: a caller elsewhere is told to run in-process."""
    _, url, _ = env
    sock, log = server
    with namespace("h") as other_host, namespace("c") as c1:
        code, res = cni(other_host, "ADD", conf(url, server_socket=sock), c1, cid="else0001")
        assert code == 0, res
        assert res["interfaces"][0]["name"] in netns.ip("link", "show", ns=other_host)
        assert cni(other_host, "DEL", conf(url, server_socket=sock), "", cid="else0001")[0] == 0
    assert "else0001" not in log.read_text()


def test_every_spec_version_capability_args_and_prev_result(env: tuple[str, str, Any]) -> None:
    """tabby-cni as the runtime: each cniVersion's result shape (SPEC.md, libcni pkg/types/040 and
    100), CHECK from 0.4.0, GC and STATUS only at 1.1.0; runtimeConfig.mac and .ips, the older
    args.cni.ips and args.cni.labels; a prevResult kept ahead of tabby's own; 1.1.0's mtu."""
    host_ns, url, store = env
    with namespace("c") as c1:
        for i, version in enumerate(("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")):
            cid = f"ver{i}"
            code, res = cni(host_ns, "ADD", conf(url, cniVersion=version, mtu=1400), c1, cid=cid, ifname=f"eth{i}")
            assert code == 0, res
            assert res["cniVersion"] == version
            for ip in res["ips"]:
                assert ip["interface"] == 1
                if version < "1.0.0":
                    assert ip["version"] == ("6" if ":" in ip["address"] else "4")
                else:
                    assert "version" not in ip
            mtus = [i.get("mtu") for i in res["interfaces"]] + [r.get("mtu") for r in res["routes"]]
            assert mtus == ([1400] * 4 if version == "1.1.0" else [None] * 4), res
            assert "mtu 1400" in netns.ip("link", "show", f"eth{i}", ns=c1)
            check = cni(host_ns, "CHECK", conf(url, cniVersion=version, prevResult=res), c1, cid=cid,
                        ifname=f"eth{i}")
            assert check[0] == (0 if version >= "0.4.0" else 1), check
            if version < "0.4.0":
                assert check[1]["code"] == 1  # incompatible: CHECK came with 0.4.0
            for verb in ("GC", "STATUS"):
                assert cni(host_ns, verb, conf(url, cniVersion=version))[0] == (0 if version == "1.1.0" else 1)
        # the capability arguments a runtime injects, and the older args.cni convention
        code, res = cni(host_ns, "ADD", conf(url, runtimeConfig={"mac": "52:54:00:AB:CD:EF",
                                                                 "ips": ["fd00:e::99/64"]},
                                             args={"cni": {"ips": ["10.65.7.7"],
                                                           "labels": [{"key": "app", "value": "web"}]}}),
                        c1, cid="caps01", ifname="eth9")
        assert code == 0, res
        assert res["interfaces"][1]["mac"] == "52:54:00:ab:cd:ef"
        assert [ip["address"] for ip in res["ips"]] == ["fd00:e::99/128", "10.65.7.7/32"]
        assert "52:54:00:ab:cd:ef" in netns.ip("link", "show", "eth9", ns=c1)
        ep = json.loads(store.get("/tabby/v1/endpoints/h1/net1.caps01.eth9").value)
        assert ep["metadata"]["labels"]["app"] == "web" and ep["spec"]["mac"] == "52:54:00:ab:cd:ef"
        assert IPAM(store).handle("net1.caps01/eth9").attachment == "h1/caps01/eth9"
        # a requested address someone else holds: refused, and nothing of the caller's is left
        code, res2 = cni(host_ns, "ADD", conf(url, runtimeConfig={"ips": ["fd00:e::99"]}), c1, cid="caps02",
                         ifname="eth8")
        assert code == 1 and res2["code"] == 7, res2
        assert IPAM(store).handle("net1.caps02/eth8") is None and "eth8" not in netns.ip("link", ns=c1)
        # chained after another plugin: its interfaces, ips and dns come first
        prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo0"}], "ips": [{"address": "192.0.2.1/24",
                "interface": 0}], "dns": {"nameservers": ["2001:db8::53"]}}
        code, res3 = cni(host_ns, "ADD", conf(url, cniVersion="1.0.0", prevResult=prev), c1, cid="prev01",
                         ifname="eth7")
        assert code == 0, res3
        assert res3["interfaces"][0] == {"name": "lo0"} and res3["ips"][0]["address"] == "192.0.2.1/24"
        assert res3["ips"][1]["interface"] == 2 and res3["dns"] == prev["dns"]
        code, ver = cni(host_ns, "VERSION", "")
        assert ver["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        for i in range(5):
            assert cni(host_ns, "DEL", conf(url), c1, cid=f"ver{i}", ifname=f"eth{i}")[0] == 0
        for cid, ifname in (("caps01", "eth9"), ("prev01", "eth7")):
            assert cni(host_ns, "DEL", conf(url), c1, cid=cid, ifname=ifname)[0] == 0
    assert IPAM(store).handles() == [] and IPAM(store).check() == []


def test_the_pools_a_network_names_are_the_ones_it_gets(env: tuple[str, str, Any]) -> None:
    host_ns, url, store = env
    apply(store, validate({"kind": "IPPool", "metadata": {"name": "v6b"}, "spec": {"cidr": "fd00:b::/112"}}),
          validate({"kind": "IPPool", "metadata": {"name": "v4b"}, "spec": {"cidr": "10.66.0.0/16"}}))
    with namespace("c") as c1:
        code, res = cni(host_ns, "ADD", conf(url, ipv6_pool="v6b", ipv4_pool="v4b"), c1, cid="pool0001")
        assert code == 0, res
        got = [ip["address"].split("/")[0] for ip in res["ips"]]
        assert got[0].startswith("fd00:b::") and got[1].startswith("10.66."), got
        assert cni(host_ns, "DEL", conf(url, ipv6_pool="v6b", ipv4_pool="v4b"), "", cid="pool0001")[0] == 0
        code, res = cni(host_ns, "ADD", conf(url, ipv6_pool="nope"), c1, cid="pool0002")
        assert code == 1 and res is not None and res["code"] == 7 and "ipv6_pool" in res["msg"], res
        assert IPAM(store).handle("net1.pool0002/eth0") is None
