"""A real container runtime: Debian's podman 4.3 with its CNI backend runs a busybox container on a
lab host through tabby-cni, and the container reaches a container on another host over IPv6."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from lablib import all_ok, lab

from tabby.cni.install import install
from tabby.ipam import IPAM
from tabby.lab import lab as L
from tabby.lab import netns
from tabby.store import open_store

ROOT = Path(__file__).resolve().parents[1]


def podman_env(d: Path, the_lab: L.Lab, host: int = 0, chained: tuple[dict[str, Any], ...] = (),
               version: str = "1.0.0") -> dict[str, str]:
    """containers.conf and storage.conf of this test's own, and a CNI network of type tabby-cni
    (for lab host number ``host``), with ``chained`` reference plugins after it."""
    (d / "bin").mkdir()
    (d / "net.d").mkdir()
    install(d / "bin")  # tabby-cni: this checkout's shim, run lean
    for plugin in chained:
        (d / "bin" / plugin["type"]).symlink_to(f"/usr/lib/cni/{plugin['type']}")
    h = the_lab.topo.hosts[host]
    (d / "net.d" / "tabbynet.conflist").write_text(json.dumps({
        "cniVersion": version, "name": "tabbynet",
        "plugins": [{"type": "tabby-cni", "store": the_lab.store_url, "host": h.name, "profiles": [L.OPEN_PROFILE],
                     "labels": {"runtime": "podman"}, "server_socket": str(the_lab.cni_socket(h)),
                     "capabilities": {"mac": True, "ips": True}}, *chained]}))
    # runc, not crun (cgroup v1 hybrid here); cgroupfs and file events (no systemd); vfs storage
    (d / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
        f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{d / "bin"}"]\n'
        f'network_config_dir = "{d / "net.d"}"\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'tmp_dir = "{d / "tmp"}"\nvolume_path = "{d / "volumes"}"\n')
    (d / "storage.conf").write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{d / "graph"}"\n'
                                    f'runroot = "{d / "runroot"}"\n')
    return {"CONTAINERS_CONF": str(d / "containers.conf"), "CONTAINERS_STORAGE_CONF": str(d / "storage.conf")}


def busybox_tar(d: Path) -> Path:
    """A root file system of one static busybox, as a tar."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is installed by scripts/setup.sh"
    rootfs = d / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(d / "busybox.tar"), "."], check=True)
    return d / "busybox.tar"


def podman_import(d: Path, env: dict[str, str]) -> None:
    r = subprocess.run(["podman", "import", str(busybox_tar(d)), "tabby-busybox"],
                       capture_output=True, text=True, env={**env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert r.returncode == 0, r.stderr


def in_host(host_ns: str, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run as a node's runtime would, inside the host's network namespace. Not `ip netns exec` (it
    remounts /sys and hides cgroups): nsenter, and a private mount namespace whose tmpfs over
    /run/netns and /var/lib/cni keeps podman's namespaces and CNI cache out of this machine's."""
    wrapped = "mount -t tmpfs tmpfs /run/netns && mkdir -p /var/lib/cni && mount -t tmpfs tmpfs /var/lib/cni && " \
              + script
    return subprocess.run(["nsenter", f"--net=/run/netns/{host_ns}", "unshare", "-m", "--propagation", "private",
                           "sh", "-c", wrapped], capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env})


def leftovers(the_lab: L.Lab, host_ns: str, network: str = "tabbynet") -> list[str]:
    """What the runtime's containers on this network left: handles, Endpoints, host ends other
    than the lab's own containers'."""
    store = open_store(the_lab.store_url)
    out = [f"handle {h.handle}" for h in IPAM(store).handles() if h.handle.startswith(f"{network}.")]
    out += [f"endpoint {kv.key}" for kv in store.list("/tabby/v1/endpoints/")[0]
            if kv.key.rsplit("/", 1)[-1].startswith(f"{network}.")]
    lab_ends = {json.loads(kv.value)["spec"]["interface"] for kv in store.list("/tabby/v1/endpoints/")[0]
                if kv.key.rsplit("/", 1)[-1].startswith(f"{the_lab.CNI_NETWORK}.")}
    ends = [line.split(":")[1].strip().split("@")[0] for line in netns.ip("-o", "link", "show", ns=host_ns).splitlines()
            if ": tby" in line]
    return out + [f"veth {e}" for e in ends if e not in lab_ends]


def test_podman_container_reaches_a_container_on_another_host(tmp_path: Path) -> None:
    with lab(2, 1) as the_lab:
        assert L.wait_until(lambda: all_ok(the_lab), 60)
        h1 = the_lab.topo.hosts[0]
        target = the_lab.addresses()["h2-c1"]["v6"][0]
        env = podman_env(tmp_path, the_lab)
        podman_import(tmp_path, env)
        try:
            run = in_host(h1.ns, "podman run --rm --network tabbynet localhost/tabby-busybox /bin/busybox sh -c "
                                 "'/bin/busybox ip -6 addr show dev eth0; /bin/busybox ip -6 route; "
                                 f"/bin/busybox ping -6 -c 3 -W 2 {target}'", env)
            assert run.returncode == 0, run.stdout + run.stderr
            assert "3 packets received" in run.stdout, run.stdout
            assert "default via fe80::ecee:eeff:feee:eeee" in run.stdout
            assert "inet6 fd00:e::" in run.stdout and "/128" in run.stdout
            # podman's DEL after --rm released everything: no allocation, no record, no veth (the
            # server finishes a DEL's veth and addresses just after answering it)
            assert netns.wait_for(lambda: leftovers(the_lab, h1.ns) == [], 10, 0.05, "DEL to finish")
        finally:
            subprocess.run(["podman", "rmi", "-a", "-f"], capture_output=True,
                           env={**env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
