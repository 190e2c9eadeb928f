"""A second real runtime: Debian's containerd 1.6, started by the test with its own root, state,
socket and config in a temp dir; ``ctr run --cni`` (go-cni, libcni 1.1) runs busybox containers
through tabby-cni on a lab host. The container reaches a podman container on another host over
IPv6 and IPv4; the podman container's conflist chains the reference ``portmap`` and ``tuning``
plugins after tabby, and its mapped port answers on its host's fabric addresses. Each cniVersion
libcni 1.1 knows is run through it and the result it cached checked against that version's
shape. Removing the task and container (``ctr run --rm``) leaves no allocation, Endpoint or veth.

ctr reads its CNI configuration only from /etc/cni/net.d and /opt/cni/bin (no flags for them in
1.6): each ctr runs in a private mount namespace where this test's directories are bound over
those paths (and over /var/lib/cni, libcni's result cache), so nothing of the machine's is used
or changed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lablib import all_ok, lab
from test_podman import busybox_tar, in_host, leftovers, podman_env, podman_import

from tabby.cni.install import install
from tabby.lab import lab as L
from tabby.lab import netns
from tabby.store import open_store

IMAGE = "docker.io/library/tabby-busybox:latest"
PATH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
CHAINED = ({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
           {"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}})
# Everything containerd 1.6 would load that this test does not need is off: CRI (it has its own
# CNI and wants /etc/containerd), the snapshotters other than "native" (overlay on this machine's
# overlay root does not mount), tracing; the opt plugin's path is the test's own.
CONFIG = """version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.gc.v1.scheduler"]
  startup_delay = "100ms"
"""


def oci_archive(d: Path) -> Path:
    """An OCI image archive by hand: one layer (the busybox rootfs tar), its config, a manifest,
    and an index naming it, as ``ctr image import`` takes it."""
    import hashlib

    img = d / "oci"
    (img / "blobs" / "sha256").mkdir(parents=True)

    def blob(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (img / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer = blob(busybox_tar(d).read_bytes())
    config = blob(json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/busybox", "sh"]},
                              "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode())
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}]}
                               ).encode())
    (img / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
         "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "latest"}}]}))
    (img / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    subprocess.run(["tar", "-C", str(img), "-cf", str(d / "image.tar"), "."], check=True)
    return d / "image.tar"


class Containerd:
    """containerd in a lab host's network namespace, with everything of its own under d."""

    def __init__(self, d: Path, host_ns: str) -> None:
        self.d, self.host_ns = d, host_ns
        self.sock = d / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("net.d", "bin", "cache"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        install(d / "bin")
        for plugin in ("portmap", "tuning", "loopback"):
            (d / "bin" / plugin).symlink_to(f"/usr/lib/cni/{plugin}")

    def __enter__(self) -> Containerd:
        (self.d / "config.toml").write_text(CONFIG.format(d=self.d))
        log = open(self.d / "containerd.log", "wb")
        try:
            self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.host_ns}", "containerd", "--config",
                                          str(self.d / "config.toml")], stdout=log, stderr=subprocess.STDOUT,
                                         env=PATH_ENV, start_new_session=True)
        finally:
            log.close()
        netns.wait_for(self.sock.exists, 30, 0.05, "containerd's socket")
        r = self.ctr("image", "import", "--snapshotter", "native", str(oci_archive(self.d)))
        assert r.returncode == 0, r.stdout + r.stderr
        return self

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "-a", str(self.sock), *args], capture_output=True, text=True, env=PATH_ENV,
                              timeout=120)

    def conflist(self, doc: dict[str, Any]) -> None:
        for old in (self.d / "net.d").iterdir():
            old.unlink()
        (self.d / "net.d" / "10-tabby.conflist").write_text(json.dumps(doc))

    def run(self, name: str, script: str) -> subprocess.Popen[str]:
        """``ctr run --rm --cni`` of busybox running script, in the host's network namespace and a
        private mount namespace with this test's CNI directories over the ones ctr reads."""
        mounts = (f"mkdir -p /etc/cni/net.d && mount --bind {self.d}/net.d /etc/cni/net.d && "
                  f"mount -t tmpfs tmpfs /opt && mkdir -p /opt/cni/bin && mount --bind {self.d}/bin /opt/cni/bin && "
                  f"mkdir -p /var/lib/cni && mount --bind {self.d}/cache /var/lib/cni && "
                  f'exec ctr -a {self.sock} run --rm --cni --snapshotter native {IMAGE} "$@"')
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.host_ns}", "unshare", "-m", "--propagation",
                                 "private", "sh", "-c", mounts, "sh", name, "/bin/busybox", "sh", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=PATH_ENV)

    def cached_result(self, name: str, timeout: float = 30) -> dict[str, Any]:
        """The result libcni cached for the container (in the version of its conflist)."""
        results = self.d / "cache" / "results"

        def find() -> Path | None:
            return next((p for p in results.glob(f"*{name}*")), None) if results.exists() else None

        path = netns.wait_for(find, timeout, 0.02, f"libcni's cached result for {name}")
        return json.loads(Path(str(path)).read_text())["result"]  # type: ignore[no-any-return]

    def shim_pids(self) -> set[int]:
        """The shims our containerd started, by the pid files it keeps in each task's bundle."""
        pids = set()
        for f in (self.d / "state").glob("io.containerd.runtime.v2.task/*/*/shim.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.add(int(f.read_text().strip()))
        return pids

    def __exit__(self, *_: object) -> None:
        shims = self.shim_pids()  # read first: removing a task removes its bundle
        for c in self.ctr("container", "ls", "-q").stdout.split():
            self.ctr("task", "kill", "-s", "KILL", c)
            time.sleep(0.2)
            self.ctr("task", "rm", "-f", c)
            self.ctr("container", "rm", c)
        if self.proc is not None:
            netns.stop(self.proc)
        # a shim left running (its task would not go) is ended by the pid its bundle named, if that
        # pid still runs a shim of ours (its arguments name our socket)
        for pid in shims | self.shim_pids():
            with contextlib.suppress(OSError):
                if str(self.sock).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    netns.kill_pid(pid, signal.SIGKILL)
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            mountpoint = line.split()[4]
            if mountpoint.startswith(str(self.d)):
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[L.Lab, Containerd, Path]]:
    """A two-host lab, containerd on h1, podman's configuration for h2."""
    if not shutil.which("containerd") or not shutil.which("ctr"):
        pytest.fail("containerd is installed by scripts/setup.sh")
    d = tmp_path_factory.mktemp("tbyt-ctd")
    with lab(2, 1) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60)
        with Containerd(d / "containerd", the_lab.topo.hosts[0].ns) as ctd:
            yield the_lab, ctd, d


def http_get(ns: str, addr: str, port: int) -> str:
    """The body of GET / from addr:port, sent from namespace ns ("" if it failed)."""
    code = ("import socket,sys\n"
            "try:\n"
            f"  s = socket.create_connection(({addr!r}, {port}), timeout=2)\n"
            "  s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.makefile('rb').read().decode(errors='replace'))\n"
            "except OSError as e:\n  print(e, file=sys.stderr)\n")
    return netns.nsexec(ns, [sys.executable, "-c", code]).stdout


def conflist(the_lab: L.Lab, version: str, chained: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    h1 = the_lab.topo.hosts[0]
    return {"cniVersion": version, "name": "ctrnet",
            "plugins": [{"type": "tabby-cni", "store": the_lab.store_url, "host": h1.name,
                         "profiles": [L.OPEN_PROFILE], "labels": {"runtime": "containerd"},
                         "server_socket": str(the_lab.cni_socket(h1))}, *chained]}


def check_shape(version: str, result: dict[str, Any], ifname: str = "eth0") -> None:
    """SPEC.md and libcni's pkg/types/040 and 100: what each version's result must look like."""
    assert result["cniVersion"] == version
    host_if, cont_if = result["interfaces"][:2]
    assert "sandbox" not in host_if and host_if["mac"] == "ee:ee:ee:ee:ee:ee" and len(host_if["name"]) <= 15
    assert cont_if["name"] == ifname and cont_if["sandbox"].startswith("/proc/")
    for ip in result["ips"]:
        assert ip["interface"] == 1
        fam = "6" if ":" in ip["address"] else "4"
        if version < "1.0.0":
            assert ip["version"] == fam, ip  # 0.3.x, 0.4.0: every ips entry says its version
        else:
            assert "version" not in ip, ip  # 1.0.0 dropped it
    assert {r["dst"] for r in result["routes"]} == {"::/0", "0.0.0.0/0"}


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_each_cni_version_through_containerd(fabric: tuple[L.Lab, Containerd, Path], version: str) -> None:
    the_lab, ctd, _ = fabric
    h1 = the_lab.topo.hosts[0]
    ctd.conflist(conflist(the_lab, version))
    name = f"tbyt{version.replace('.', '')}{uuid.uuid4().hex[:4]}"
    proc = ctd.run(name, "/bin/busybox ip -o addr show dev eth0; /bin/busybox sleep 1")
    result = ctd.cached_result(name)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    check_shape(version, result)
    assert [ip["address"].split("/")[0] in out for ip in result["ips"]] == [True, True], out
    assert netns.wait_for(lambda: leftovers(the_lab, h1.ns, "ctrnet") == [], 10, 0.05, "DEL to finish")


def test_cni_1_1_0_is_beyond_containerd_1_6(fabric: tuple[L.Lab, Containerd, Path]) -> None:
    """containerd 1.6 vendors libcni 1.1, which knows result versions up to 1.0.0: it refuses a
    1.1.0 result. tabby's 1.1.0 shape is checked by tests/test_cni.py as the runtime; here, that
    the refusal leaves nothing of tabby's behind once the container is removed."""
    the_lab, ctd, _ = fabric
    h1 = the_lab.topo.hosts[0]
    ctd.conflist(conflist(the_lab, "1.1.0"))
    name = f"tbyt110{uuid.uuid4().hex[:4]}"
    out, err = ctd.run(name, "/bin/busybox true").communicate(timeout=120)
    assert 'unsupported CNI result version "1.1.0"' in err, out + err
    ctd.ctr("task", "kill", "-s", "KILL", name)
    time.sleep(0.3)
    ctd.ctr("task", "rm", "-f", name)
    ctd.ctr("container", "rm", name)
    assert netns.wait_for(lambda: leftovers(the_lab, h1.ns, "ctrnet") == [], 10, 0.05, "nothing left")


def test_containerd_container_reaches_podman_container_on_another_host(
        fabric: tuple[L.Lab, Containerd, Path]) -> None:
    the_lab, ctd, d = fabric
    h1, h2 = the_lab.topo.hosts[:2]
    store = open_store(the_lab.store_url)
    # on h2: podman, chaining portmap (host port 18080 -> 8080) and tuning after tabby; busybox httpd
    pd = d / "podman"
    pd.mkdir()
    penv = podman_env(pd, the_lab, host=1, chained=CHAINED)
    podman_import(pd, penv)
    serve = ("mkdir /www && echo tabby-through-containerd > /www/index.html && "
             "/bin/busybox httpd -p 8080 -h /www && /bin/busybox nc -l -p 9999")  # ends on a knock at 9999
    podman_log = open(pd / "podman.log", "w")  # noqa: SIM115 - handed to the child
    server = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{h2.ns}", "unshare", "-m", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs tmpfs /run/netns && mkdir -p /var/lib/cni && mount -t tmpfs tmpfs /var/lib/cni && "
         "exec podman run --rm --name tbyt-srv --network tabbynet -p 18080:8080 localhost/tabby-busybox "
         f"/bin/busybox sh -c '{serve}'"], stdout=podman_log, stderr=subprocess.STDOUT, text=True,
        env={**PATH_ENV, **penv})
    try:
        def podman_endpoint() -> dict[str, Any] | None:
            for kv in store.list("/tabby/v1/endpoints/")[0]:
                if kv.key.rsplit("/", 1)[-1].startswith("tabbynet."):
                    return json.loads(kv.value)["spec"]  # type: ignore[no-any-return]
            return None

        spec: Any = netns.wait_for(podman_endpoint, 60, 0.1, "the podman container's Endpoint")
        v6, v4 = spec["ipv6_addresses"][0].split("/")[0], spec["ipv4_addresses"][0].split("/")[0]
        # portmap: h2's fabric addresses, port 18080, from h1's namespace (another host), both families
        for addr in (h2.v6, h2.v4):
            netns.wait_for(lambda addr=addr: "tabby-through-containerd" in http_get(h1.ns, addr, 18080), 30, 0.2,
                           f"portmap on {addr}:18080")
        # on h1: a containerd container, its conflist chaining portmap and tuning after tabby too
        ctd.conflist(conflist(the_lab, "1.0.0", CHAINED))
        name = f"tbytreach{uuid.uuid4().hex[:4]}"
        # (busybox's wget dies of SIGSEGV on this machine: its nc sends the request instead)
        get = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 5"
        script = (f"/bin/busybox ping -6 -c 2 -W 2 {v6} && /bin/busybox ping -c 2 -W 2 {v4} && "
                  f"{get} {v6} 8080 && {get} {v4} 8080 && /bin/busybox sysctl net.core.somaxconn")
        proc = ctd.run(name, script)
        result = ctd.cached_result(name)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        check_shape("1.0.0", result)  # the chain's final result: tabby's, through portmap and tuning
        assert out.count("2 packets received") == 2, out
        assert out.count("tabby-through-containerd") == 2, out
        assert "net.core.somaxconn = 512" in out, out  # tuning ran in the container's namespace
        # ctr run --rm removed task and container: its DEL left nothing
        assert netns.wait_for(lambda: leftovers(the_lab, h1.ns, "ctrnet") == [], 10, 0.05, "DEL to finish")
        # the podman container ends itself (so that podman's own process, which sees its netns, runs DEL)
        http_get(h2.ns, v6, 9999)
        server.wait(60)
    finally:
        if server.poll() is None:
            in_host(h2.ns, "podman stop -t 0 tbyt-srv", penv)
            server.wait(120)
        podman_log.close()
        subprocess.run(["podman", "rmi", "-a", "-f"], capture_output=True, env={**penv, **PATH_ENV})
    assert netns.wait_for(lambda: leftovers(the_lab, h2.ns) == [], 10, 0.05, "podman's DEL to finish"), \
        leftovers(the_lab, h2.ns)
