"""tabby-cni under hostile input and unlucky timing: injection attempts in every CNI variable,
a second ADD of a live attachment, ADD racing DEL, and the warm server SIGKILLed mid-ADD.
Afterwards every live container's addresses are its own, and nothing is left behind."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agentlib import namespace
from test_cni import CNI, SRC, cni, conf, env, settle  # noqa: F401  (env is a fixture)

from tabby.cni.plugin import host_ifname
from tabby.ipam import IPAM
from tabby.lab import netns
from tabby.lab.netns import wait_for


def snapshot(*nss: str) -> list[str]:
    """Links, addresses and routes of each namespace, less what the kernel changes by itself after
    an ADD (carrier coming up, the link-local address that follows it)."""
    out = []
    for ns in nss:
        text = netns.ip("-o", "link", ns=ns) + netns.ip("-o", "addr", ns=ns) + netns.ip("-o", "route", ns=ns)
        lines = [re.sub(r"NO-CARRIER,|state \w+ ", "", line) for line in text.splitlines() if "fe80::" not in line]
        out.append("\n".join(lines))
    return out


def test_injection_in_every_variable_is_refused_before_anything_is_made(env: tuple[str, str, Any],  # noqa: F811
                                                                        tmp_path: Path) -> None:
    host_ns, url, store = env
    marker = tmp_path / "pwned"
    with namespace("c") as c1:
        payloads = [
            f"x0 type veth peer name y0\nnetns exec {c1} touch {marker}\nlink add x1",  # the issue's
            f"eth0;touch {marker}", f"$(touch {marker})", f"`touch {marker}`", "eth 0", "eth0\tx",
            "a" * 16, "ethé0", "eth0\x00", "eth/0", "eth:0", "..", "-", "",
        ]
        # the kernel takes these, but an Endpoint name cannot end so (a "try again" for ever, once)
        bad_ifnames = ["eth0-", "eth0."]
        before = snapshot(host_ns, c1)
        for p in [*payloads, *bad_ifnames]:
            code, res = cni(host_ns, "ADD", conf(url), c1, ifname=p) if "\x00" not in p else (1, None)
            if "\x00" in p:
                continue  # no environment can carry a NUL
            assert code == 1 and res["code"] == 4 and "CNI_IFNAME" in res["msg"], (p, res)
        # 16 characters are fine for a container id; 256 are not
        for p in [*(p for p in payloads if p != "a" * 16), "-leading-dash", ".dot", "a" * 256]:
            if "\x00" in p:
                continue
            code, res = cni(host_ns, "ADD", conf(url), c1, cid=p)
            assert code == 1 and res["code"] == 4 and "CNI_CONTAINERID" in res["msg"], (p, res)
        # the same through DEL and CHECK
        for verb in ("DEL", "CHECK"):
            code, res = cni(host_ns, verb, conf(url), c1, ifname=f"eth0;touch {marker}")
            assert code == 1 and res["code"] == 4 and "CNI_IFNAME" in res["msg"], res
        # CNI_NETNS: nothing that is not a network namespace file is ever used or opened as one
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        for bad in ("relative/path", str(tmp_path / "missing"), str(marker.parent), "/etc/hostname", str(fifo),
                    "/dev/null", "/proc/self/ns/uts", "/proc/self/ns/net", f"/run/netns/{c1}\n;touch {marker}"):
            code, res = cni(host_ns, "ADD", conf(url), CNI_NETNS=bad, cid="ns0001")
            assert code == 1 and res["code"] == 4 and "CNI_NETNS" in res["msg"], (bad, res)
        for bad_args in ("K8S_POD_NAME", "A=1;A=2", "A=$(x) y", "K=\n", "=v"):
            code, res = cni(host_ns, "ADD", conf(url), c1, cid="args0001", CNI_ARGS=bad_args)
            assert code == 1 and res["code"] == 4 and "CNI_ARGS" in res["msg"], (bad_args, res)
        assert cni(host_ns, "ADD", conf(url), c1, CNI_COMMAND="ADD;x")[1]["code"] == 4
        # stdin: size, depth, duplicates, NaN, control characters -> 7 naming what
        deep: Any = {}
        for _ in range(40):
            deep = {"a": deep}
        for raw, field in ((json.dumps({**conf(url), "pad": "x" * 300_000}), "bytes"),
                           (json.dumps({**conf(url), "deep": deep}), "deeper"),
                           (json.dumps(conf(url))[:-1] + ', "name": "net2"}', "duplicate"),
                           (json.dumps(conf(url))[:-1] + ', "mtu": NaN}', "NaN"),
                           (json.dumps({**conf(url), "name": "net\n1"}), "name"),
                           (json.dumps({**conf(url), "name": "n" * 64}), "label value"),  # the cni.network label's
                           (json.dumps({**conf(url), "runtimeConfig": {"mac": "01:00:00:00:00:01"}}), "mac"),
                           (json.dumps({**conf(url), "runtimeConfig": {"ips": ["fd00:e::1; x"]}}), "ips"),
                           (json.dumps({**conf(url), "args": {"cni": {"labels": [{"key": "a b", "value": "v"}]}}}),
                            "labels"),
                           ("[]", "object")):
            code, res = cni(host_ns, "ADD", raw, c1, cid="stdin0001")
            assert code == 1 and res["code"] == 7 and field in res["details"], (field, res)
        assert snapshot(host_ns, c1) == before
    assert not marker.exists()
    assert IPAM(store).handles() == [] and store.list("/tabby/v1/endpoints/")[0] == []


def attachment_state(store: Any, host_ns: str, c: str, cid: str) -> str:
    """'live' or 'gone', asserting that the handle, the Endpoint, the veth and the container's
    addresses agree (no half of an attachment without the other), once work on it has settled."""
    settle(host_ns, cid)
    handle = IPAM(store).handle(f"net1.{cid}/eth0")
    kv = store.get(f"/tabby/v1/endpoints/h1/net1.{cid}.eth0")
    hostif = host_ifname(cid, "eth0")
    host_links = netns.ip("-o", "link", ns=host_ns)
    caddrs = netns.ip("-o", "addr", "show", ns=c)
    if handle is None:
        assert kv is None, f"{cid}: an Endpoint without its allocation"
        assert hostif not in host_links and "eth0" not in caddrs, f"{cid}: an interface without its allocation"
        return "gone"
    ips = {a.ip for a in handle.addresses}
    assert len(ips) == 2 and kv is not None, f"{cid}: allocation {ips} without its Endpoint"
    spec = json.loads(kv.value)["spec"]
    assert {a.split("/")[0] for a in (*spec["ipv6_addresses"], *spec["ipv4_addresses"])} == ips
    assert hostif in host_links
    for ip in ips:
        assert f" {ip}/" in caddrs, f"{cid}: {ip} allocated but not on eth0"
    return "live"


def leftovers(store: Any, host_ns: str, *cids: str) -> list[str]:
    for cid in cids:
        settle(host_ns, cid)
    out = [f"handle {h.handle}" for h in IPAM(store).handles()]
    out += [f"endpoint {kv.key}" for kv in store.list("/tabby/v1/endpoints/")[0]]
    out += [f"veth {line.split(':')[1].strip()}" for line in netns.ip("-o", "link", ns=host_ns).splitlines()
            if ": tby" in line]
    return out + [f"ipam: {p}" for p in IPAM(store).check()]


def test_a_second_add_of_a_live_attachment_returns_it_untouched(env: tuple[str, str, Any]) -> None:  # noqa: F811
    host_ns, url, store = env
    with namespace("c") as c1:
        code, first = cni(host_ns, "ADD", conf(url), c1, cid="again01")
        assert code == 0, first
        handle = IPAM(store).handle("net1.again01/eth0")
        before = snapshot(host_ns, c1)
        for _ in range(3):
            code, again = cni(host_ns, "ADD", conf(url), c1, cid="again01")
            assert code == 0 and again == first, again
        assert IPAM(store).handle("net1.again01/eth0") == handle  # same addresses, same seqs
        assert snapshot(host_ns, c1) == before
        # broken underneath (the veth deleted by hand): ADD rebuilds it on the same addresses
        netns.ip("link", "del", first["interfaces"][0]["name"], ns=host_ns)
        code, rebuilt = cni(host_ns, "ADD", conf(url), c1, cid="again01")
        assert code == 0 and [i["address"] for i in rebuilt["ips"]] == [i["address"] for i in first["ips"]]
        assert attachment_state(store, host_ns, c1, "again01") == "live"
        # the same container id with another ifname is another attachment
        code, second = cni(host_ns, "ADD", conf(url), c1, cid="again01", ifname="eth1")
        assert code == 0 and second["ips"][0]["address"] != first["ips"][0]["address"]
        assert IPAM(store).check() == []
        for ifname in ("eth0", "eth1"):
            assert cni(host_ns, "DEL", conf(url), c1, cid="again01", ifname=ifname)[0] == 0
        assert leftovers(store, host_ns) == []


def _popen(host_ns: str, verb: str, url: str, c: str, cid: str, server: str | None) -> subprocess.Popen[str]:
    penv = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
            "CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_NETNS": f"/run/netns/{c}",
            "CNI_PATH": "/opt/cni/bin"}
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{host_ns}", CNI], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=penv)
    assert p.stdin is not None
    p.stdin.write(json.dumps(conf(url, server_socket=server) if server else conf(url)))
    p.stdin.close()
    p.stdin = None  # written and closed: communicate() only reads
    return p


def _serve(host_ns: str, url: str, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    """The warm server without the CLI around it (quicker to restart), stopped by its pid."""
    code = ("import sys\nfrom pathlib import Path\nfrom tabby.cni.server import serve\n"
            "s = serve(Path(sys.argv[1]), {'TABBY_STORE': sys.argv[2], 'TABBY_HOST': 'h1'})\ns.serve_forever()\n")
    penv = {"PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}
    sock.unlink(missing_ok=True)  # a killed server leaves its socket file: wait for the new one
    proc = netns.spawn(host_ns, [sys.executable, "-c", code, str(sock), url], log, penv)
    wait_for(lambda: _listening(sock), 30, 0.02, "cni server socket")
    return proc


def _listening(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_add_racing_del_of_one_attachment(env: tuple[str, str, Any], tmp_path: Path) -> None:  # noqa: F811
    host_ns, url, store = env
    sock = tmp_path / "race.sock"
    server = _serve(host_ns, url, sock, tmp_path / "server.log")
    outcomes = {"live": 0, "gone": 0}
    try:
        with namespace("c") as c1:
            for i in range(100):
                # every 10th round one of the two runs in a plugin process of its own, not in the
                # server: the lock holds across processes
                in_proc = i % 10 == 0
                add = _popen(host_ns, "ADD", url, c1, "race01", None if in_proc and i % 20 == 0 else str(sock))
                time.sleep(random.uniform(0, 0.01))
                dele = _popen(host_ns, "DEL", url, c1, "race01", None if in_proc and i % 20 == 10 else str(sock))
                add_out, add_err = add.communicate(timeout=60)
                dele.communicate(timeout=60)
                assert dele.returncode == 0
                assert add.returncode == 0, add_out + add_err  # serialised: ADD never fails for DEL's sake
                outcomes[attachment_state(store, host_ns, c1, "race01")] += 1
                assert IPAM(store).check() == []
                if i % 2:  # and ADD after DEL after ADD... leaves a whole attachment or none
                    assert _popen(host_ns, "DEL", url, c1, "race01", str(sock)).wait(60) == 0
            assert cni(host_ns, "DEL", conf(url, server_socket=str(sock)), c1, cid="race01")[0] == 0
            assert leftovers(store, host_ns, "race01") == []
    finally:
        netns.stop(server)
    print(f"ADD racing DEL, 100 rounds: {outcomes}")
    assert outcomes["live"] and outcomes["gone"], outcomes  # both orders happened


def test_server_sigkilled_mid_add_leaves_nothing_behind(env: tuple[str, str, Any], tmp_path: Path) -> None:  # noqa: F811
    host_ns, url, store = env
    sock, log = tmp_path / "kill.sock", tmp_path / "server.log"
    killed, rounds = 0, 0
    late = 0.012  # the latest a kill lands after the call reached the server; shrinks when kills miss
    with namespace("c") as keeper, namespace("c") as victim:
        server = _serve(host_ns, url, sock, log)
        try:
            # a neighbour that lives through all of it, and must keep exactly its own addresses
            code, kept = cni(host_ns, "ADD", conf(url, server_socket=str(sock)), keeper, cid="keeper01")
            assert code == 0, kept
            # rounds go on until ten kills have landed mid-ADD (the ADD's length varies by machine
            # and load, so a fixed delay would hit or miss wholesale)
            while (killed < 10 or rounds < 20) and rounds < 100:
                i, rounds = rounds, rounds + 1
                cid = f"victim{i:02d}"
                tasks = f"/proc/{server.pid}/task"
                idle = 1  # the server's main thread; each call has a thread of its own
                wait_for(lambda tasks=tasks, idle=idle: len(os.listdir(tasks)) == idle, 10, 0.001, "the server idle")
                add = _popen(host_ns, "ADD", url, victim, cid, str(sock))
                # the call has reached the server when a handler thread appears; kill it a little later
                # (or the ADD is over already: a round whose kill lands after it)
                wait_for(lambda tasks=tasks, idle=idle, add=add: len(os.listdir(tasks)) > idle or
                         add.poll() is not None, 10, 0.0005, "the call")
                time.sleep(random.uniform(0, late))
                server.kill()
                server.wait()
                out, _ = add.communicate(timeout=60)
                if add.returncode != 0:
                    killed += 1
                    assert json.loads(out)["code"] == 11, out
                else:
                    late *= 0.7
                server = _serve(host_ns, url, sock, log)
                # what a runtime does after a failed ADD: retry it (even rounds) or DEL (odd)
                if i % 2 == 0:
                    code, res = cni(host_ns, "ADD", conf(url, server_socket=str(sock)), victim, cid=cid)
                    assert code == 0, res
                    assert attachment_state(store, host_ns, victim, cid) == "live"
                assert cni(host_ns, "DEL", conf(url, server_socket=str(sock)), victim, cid=cid)[0] == 0
                assert attachment_state(store, host_ns, victim, cid) == "gone"
                assert attachment_state(store, host_ns, keeper, "keeper01") == "live"
                assert IPAM(store).check() == [], f"round {i}"
            assert [i["address"] for i in cni(host_ns, "ADD", conf(url, server_socket=str(sock)), keeper,
                                              cid="keeper01")[1]["ips"]] == [i["address"] for i in kept["ips"]]
            assert cni(host_ns, "DEL", conf(url, server_socket=str(sock)), keeper, cid="keeper01")[0] == 0
            settle(host_ns, "keeper01")  # the server finishes a DEL after answering; let it
        finally:
            netns.stop(server)
        assert leftovers(store, host_ns, "keeper01", *(f"victim{i:02d}" for i in range(rounds))) == []
    print(f"server SIGKILLed during {rounds} ADDs: {killed} died mid-call")
    assert killed >= 10, f"only {killed} of {rounds} kills landed mid-ADD"


def test_another_network_of_the_same_container_and_ifname_never_removes_a_live_veth(
        env: tuple[str, str, Any]) -> None:  # noqa: F811
    """The host veth's name comes from the container id and ifname alone: an ADD for a second network
    with both the same (a renamed network, a runtime's mistake) found the live one's veth there
    and removed it on its way out, and a DEL for that network removed it too. Now the live
    attachment keeps its veth, its addresses and its Endpoint through both."""
    host_ns, url, store = env
    with namespace("c") as c1:
        code, res = cni(host_ns, "ADD", conf(url), c1, cid="twonets1")
        assert code == 0, res
        before = snapshot(host_ns, c1)
        other = conf(url, name="net2")
        code, res = cni(host_ns, "ADD", other, c1, cid="twonets1")
        assert code == 1 and res is not None and res["code"] == 5 and "exists" in res["msg"], res
        settle(host_ns, "twonets1")
        assert snapshot(host_ns, c1) == before
        assert IPAM(store).handle("net2.twonets1/eth0") is None  # its addresses went back
        code, res = cni(host_ns, "DEL", other, c1, cid="twonets1")
        assert code == 0, res
        settle(host_ns, "twonets1")
        assert snapshot(host_ns, c1) == before
        assert attachment_state(store, host_ns, c1, "twonets1") == "live"
        assert cni(host_ns, "CHECK", conf(url), c1, cid="twonets1")[0] == 0
        assert cni(host_ns, "DEL", conf(url), c1, cid="twonets1")[0] == 0
        assert attachment_state(store, host_ns, c1, "twonets1") == "gone"


HANG_UP = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from tabby.cni.shim import encode_request
env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": sys.argv[3], "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
       "CNI_NETNS": sys.argv[4]}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[2])
s.sendall(encode_request(env, sys.argv[5].encode()))
s.close()  # gone before the answer, as a runtime that timed the call out
"""


def test_a_del_whose_caller_hung_up_still_finishes_and_frees_the_lock(env: tuple[str, str, Any],  # noqa: F811
                                                                      tmp_path: Path) -> None:
    """The server answers DEL first and frees the veth and addresses after, under the attachment's
    lock: when the answer could not be sent (the caller gone), that work was skipped and the lock
    kept for the server's life (every later call of the attachment: 120 s, then 'try again')."""
    host_ns, url, store = env
    sock = tmp_path / "hangup.sock"
    server = _serve(host_ns, url, sock, tmp_path / "server.log")
    try:
        with namespace("c") as c1:
            assert cni(host_ns, "ADD", conf(url, server_socket=str(sock)), c1, cid="hangup01")[0] == 0
            r = netns.nsexec(host_ns, [sys.executable, "-c", HANG_UP, SRC, str(sock), "hangup01", f"/run/netns/{c1}",
                                       json.dumps(conf(url, server_socket=str(sock)))])
            assert r.returncode == 0, r.stderr

            def gone() -> bool:
                try:
                    return attachment_state(store, host_ns, c1, "hangup01") == "gone"
                except AssertionError:  # its work under way: the server may take the lock after it looked free
                    return False
            wait_for(gone, 30, 0.1, "the DEL's work done, its caller gone")
            assert attachment_state(store, host_ns, c1, "hangup01") == "gone"  # and all of it agrees
            t0 = time.monotonic()
            code, res = cni(host_ns, "ADD", conf(url, server_socket=str(sock)), c1, cid="hangup01")
            assert code == 0 and time.monotonic() - t0 < 60, res  # the lock was free (held: 120 s, code 11)
            assert cni(host_ns, "DEL", conf(url, server_socket=str(sock)), c1, cid="hangup01")[0] == 0
            assert leftovers(store, host_ns, "hangup01") == []
    finally:
        netns.stop(server)
