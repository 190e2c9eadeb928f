"""Builds and tears down the lab described by ``topology``: namespaces, links, the Store, agents.

Containers are made as a runtime makes them: an empty namespace, then ``tabby-cni ADD`` run in
the host's namespace. VMs are namespaces whose own DHCP client, configured by ``tabby guest
render``, gets their address from the host's dnsmasq. The agents do the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabby.client import ResourceClient
from tabby.guest.render import patch_script
from tabby.guest.render import render as guest_render
from tabby.ipam import IPAM
from tabby.lab import netns, outside_bird
from tabby.lab.topology import (
    ETCD_V6,
    OUTSIDE_ASN,
    OUTSIDE_FABRIC_V4,
    OUTSIDE_FABRIC_V6,
    OUTSIDE_V4,
    OUTSIDE_V6,
    PREFIX,
    TCP_PORT,
    V4_POOL,
    V6_POOL,
    LabHost,
    LabVm,
    LabWorkload,
    Topology,
    check_prefix,
    topology,
)
from tabby.model import validate
from tabby.store import open_store

OPEN_PROFILE = "lab-open"
BLOCK_POLICY = "lab-block"
WORKLOAD_LABEL = "lab.workload"
FORWARDER_MARK = "TABBY_LAB_FORWARDER"  # in the forwarder's environment: `down` ends it only if it is ours
LAB_ROOT = Path("/var/lib/tabby/lab")  # one directory per lab prefix: state, store, agent logs
RUN_ROOT = Path("/run/tabby/lab")  # one directory per lab prefix: BIRD's config and socket per host


def _under(root: Path, prefix: str) -> Path:
    """root/prefix for a checked prefix, and refused (ValueError) unless it resolves strictly inside
    root: a symlink planted at root/prefix must not point ``lab down``'s rmtree elsewhere."""
    path = root / check_prefix(prefix)
    real, base = path.resolve(), root.resolve()
    if real == base or not real.is_relative_to(base):
        raise ValueError(f"lab directory {path} resolves to {real}, outside {base}: refused")
    return path


def lab_dir(prefix: str = PREFIX) -> Path:
    return _under(LAB_ROOT, prefix)


def run_dir(prefix: str = PREFIX) -> Path:
    return _under(RUN_ROOT, prefix)


def default_store(prefix: str = PREFIX) -> str:
    return f"sqlite://{lab_dir(prefix)}/store.db"

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class Lab:
    """store_url: the Store as seen from this (the root) namespace, for the lab's own writes, the
    CLI and tests; agent_store_url: as the hosts see it (they differ only for etcd, below)."""

    topo: Topology
    store_url: str
    agent_store_url: str = ""
    store_kind: str = "sqlite"

    def __post_init__(self) -> None:
        self.agent_store_url = self.agent_store_url or self.store_url

    @property
    def dir(self) -> Path:
        return lab_dir(self.topo.prefix)

    @property
    def run_dir(self) -> Path:
        return run_dir(self.topo.prefix)

    # -- building ------------------------------------------------------------------------

    def _save_state(self) -> None:
        (self.dir / "state.json").write_text(json.dumps({
            "hosts": len(self.topo.hosts), "ipv6_only": self.topo.ipv6_only, "store": self.store_url,
            "agent_store": self.agent_store_url, "store_kind": self.store_kind,
            "prefix": self.topo.prefix, "route_reflectors": list(self.topo.route_reflectors),
            "vms": len(self.topo.vms) // max(1, len(self.topo.hosts)),
            "containers": len(self.topo.workloads) // max(1, len(self.topo.hosts))}))

    def up(self, say: Say = _quiet) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save_state()
        say("fabric")
        fab = self.topo.fabric_ns
        netns.add_netns(fab)
        netns.ip("link", "add", "br0", "type", "bridge", ns=fab)
        netns.ip("link", "set", "br0", "up", ns=fab)
        if self.store_kind == "etcd":
            say("etcd on the fabric")
            self._etcd()
            self._save_state()
        for h in self.topo.hosts:
            say(f"host {h.name}")
            self._host(h)
        say("outside router")
        self._outside()
        say("store: hosts, pools, the outside peer")
        self._resources()
        for h in self.topo.hosts:
            say(f"agent on {h.name}")
            self._agent(h)
            if any(w.host == h for w in self.topo.workloads):
                self._cni_server(h)
        for w in self.topo.workloads:
            say(f"container {w.name}")
            self._container(w)
        for v in self.topo.vms:
            say(f"VM {v.name} ({v.client})")
            self.add_vm(v)
        for _, ns in self.members():
            self._tcp_server(ns)

    def _etcd(self) -> None:
        """etcd in a namespace of its own on the fabric, where every host reaches it, and a loopback
        forwarder in this namespace (socat, one `ip netns exec` per connection) for the lab's own
        writes and the CLI: this namespace has no link to the fabric, and gets none."""
        from tabby.lab.etcd import EtcdServer, free_port

        ns = self.topo.etcd_ns
        self._plug(ns, f"{self.topo.prefix}pe")
        netns.ip("addr", "add", f"{ETCD_V6}/64", "dev", "eth0", "nodad", ns=ns)
        netns.ip("link", "set", "eth0", "up", ns=ns)
        netns.ip("link", "set", "lo", "up", ns=ns)
        (self.dir / "etcd").mkdir(exist_ok=True)
        etcd = EtcdServer(name=f"{self.topo.prefix}-etcd", data_dir=str(self.dir / "etcd"), netns=ns, host=ETCD_V6)
        etcd.start()  # ends with the namespace at `down`
        port = free_port()
        script = self.dir / "etcd-forward.sh"  # a script: socat would split an address inside EXEC at ':'
        script.write_text(f"#!/bin/sh\nexec ip netns exec {ns} socat STDIO 'TCP6:[{ETCD_V6}]:{etcd.port}'\n")
        script.chmod(0o755)
        fwd = netns.spawn_here(["socat", f"TCP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{script}"],
                               self.dir / "etcd-forwarder.log", {FORWARDER_MARK: self.topo.prefix})
        (self.dir / "forwarder.pid").write_text(str(fwd.pid))
        self.agent_store_url = etcd.url
        self.store_url = f"etcd://127.0.0.1:{port}"
        netns.wait_for(lambda: _etcd_answers(self.store_url), 20, 0.1, "etcd through the forwarder")

    def _plug(self, ns: str, port: str) -> None:
        """A new namespace with an eth0 on the fabric bridge (the other end, `port`, in br0)."""
        fab = self.topo.fabric_ns
        netns.add_netns(ns)
        netns.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", ns=fab)
        netns.ip("link", "set", "eth0", "netns", ns, ns=fab)
        netns.ip("link", "set", port, "master", "br0", "up", ns=fab)

    def _host(self, h: LabHost) -> None:
        self._plug(h.ns, h.bridge_port)
        netns.ip("addr", "add", f"{h.v6}/64", "dev", "eth0", "nodad", ns=h.ns)
        if h.v4:
            netns.ip("addr", "add", f"{h.v4}/24", "dev", "eth0", ns=h.ns)
        netns.ip("link", "set", "eth0", "up", ns=h.ns)

    def _outside(self) -> None:
        """A router outside the data center: on the fabric, peering eBGP with every host, with an
        outside address on its loopback that workloads reach and that reaches them."""
        ns = self.topo.outside_ns
        self._plug(ns, f"{self.topo.prefix}po")
        netns.ip("addr", "add", f"{OUTSIDE_FABRIC_V6}/64", "dev", "eth0", "nodad", ns=ns)
        netns.ip("addr", "add", f"{OUTSIDE_V6}/128", "dev", "lo", ns=ns)
        if not self.topo.ipv6_only:
            netns.ip("addr", "add", f"{OUTSIDE_FABRIC_V4}/24", "dev", "eth0", ns=ns)
            netns.ip("addr", "add", f"{OUTSIDE_V4}/32", "dev", "lo", ns=ns)
        netns.ip("link", "set", "eth0", "up", ns=ns)
        netns.nsexec(ns, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        run = self.run_dir / "outside"
        run.mkdir(parents=True, exist_ok=True)
        v4 = not self.topo.ipv6_only
        (run / "bird.conf").write_text(outside_bird.render(
            OUTSIDE_FABRIC_V4, OUTSIDE_ASN, OUTSIDE_FABRIC_V6, OUTSIDE_FABRIC_V4 if v4 else None,
            [outside_bird.Neighbour(h.index, h.v6, h.v4 if v4 else None) for h in self.topo.hosts]))
        subprocess.run(["ip", "netns", "exec", ns, "bird", "-c", str(run / "bird.conf"), "-s", str(run / "bird.ctl"),
                        "-P", str(run / "bird.pid")], check=True, capture_output=True)
        self._tcp_server(ns)

    def _tcp_server(self, ns: str) -> None:
        """A TCP listener answering with its own name, both families, for the matrix's TCP checks."""
        netns.spawn(ns, ["socat", f"TCP6-LISTEN:{TCP_PORT},fork,reuseaddr,ipv6only=0",
                         f"SYSTEM:echo {ns}"], self.dir / f"tcp-{ns}.log")

    def _resources(self) -> None:
        client = ResourceClient(open_store(self.store_url))
        for h in self.topo.hosts:
            spec: dict[str, Any] = {"ipv6_address": h.v6}
            if h.index in self.topo.route_reflectors:
                spec["route_reflector_cluster_id"] = "10.255.255.1"  # 32 bits; no IPv4 needed on the fabric
            if h.v4:
                spec["ipv4_address"] = h.v4
            client.apply(validate({"kind": "Host", "metadata": {"name": h.name}, "spec": spec}))
        client.apply(validate({"kind": "IPPool", "metadata": {"name": "lab-v6"}, "spec": {"cidr": V6_POOL}}))
        client.apply(validate({"kind": "BGPPeer", "metadata": {"name": "outside"},
                               "spec": {"peer_ip": OUTSIDE_FABRIC_V6, "asn": OUTSIDE_ASN}}))
        if not self.topo.ipv6_only:
            client.apply(validate({"kind": "BGPPeer", "metadata": {"name": "outside-v4"},
                                   "spec": {"peer_ip": OUTSIDE_FABRIC_V4, "asn": OUTSIDE_ASN}}))
        if not self.topo.ipv6_only:
            client.apply(validate({"kind": "IPPool", "metadata": {"name": "lab-v4"}, "spec": {"cidr": V4_POOL}}))
        # policy: every workload carries the open profile; one pair is blocked by a policy, which
        # comes before profiles, to show that policy is enforced
        client.apply(validate({"kind": "Profile", "metadata": {"name": OPEN_PROFILE},
                               "spec": {"ingress": [{"action": "allow"}], "egress": [{"action": "allow"}]}}))
        if self.topo.blocked_pair:
            src, dst = self.topo.blocked_pair
            client.apply(validate({"kind": "Policy", "metadata": {"name": BLOCK_POLICY}, "spec": {
                "order": 100, "selector": f'{WORKLOAD_LABEL} == "{dst}"',
                "ingress": [{"action": "deny", "src_selector": f'{WORKLOAD_LABEL} == "{src}"'}]}}))

    def _agent(self, h: LabHost) -> None:
        log = self.dir / f"agent-{h.name}.log"
        netns.spawn(h.ns, [sys.executable, "-m", "tabby.cli", "--store", self.agent_store_url, "agent",
                           "--host", h.name, "--metrics-port", "9091", "--run-dir", str(self.run_dir / h.name)], log)

    def cni_socket(self, h: LabHost) -> Path:
        return self.run_dir / h.name / "cni" / "cni.sock"

    def _cni_server(self, h: LabHost) -> None:
        """The warm CNI helper, as a node runs it: tabby-cni hands its calls to it."""
        sock = self.cni_socket(h)
        netns.spawn(h.ns, [sys.executable, "-m", "tabby.cli", "--store", self.agent_store_url, "cni-server",
                           "--host", h.name, "--socket", str(sock)], self.dir / f"cni-server-{h.name}.log")
        netns.wait_for(sock.exists, 20, 0.05, f"cni-server on {h.name}")

    CNI_NETWORK = "lab"

    def endpoint_of(self, w: LabWorkload) -> str:
        """The Endpoint the CNI plugin writes for a container."""
        from tabby.cni.config import NetConf
        from tabby.cni.plugin import Env, endpoint_name

        conf = NetConf(cniVersion="1.1.0", name=self.CNI_NETWORK, type="tabby-cni")
        return endpoint_name(conf, Env("ADD", w.name, f"/run/netns/{w.ns}", "eth0"))

    def _container(self, w: LabWorkload) -> None:
        """A container made the way a runtime makes one: an empty namespace, then tabby-cni ADD."""
        netns.add_netns(w.ns)
        conf = json.dumps({"cniVersion": "1.1.0", "name": self.CNI_NETWORK, "type": "tabby-cni",
                           "store": self.agent_store_url, "host": w.host.name, "ipv4": not self.topo.ipv6_only,
                           "profiles": [OPEN_PROFILE], "labels": {WORKLOAD_LABEL: w.name},
                           "server_socket": str(self.cni_socket(w.host))})
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": w.name, "CNI_NETNS": f"/run/netns/{w.ns}",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
        r = subprocess.run(["ip", "netns", "exec", w.host.ns, sys.executable, "-c",
                            "from tabby.cni.shim import main; main()"], input=conf, capture_output=True, text=True,
                           env={**os.environ, **env})
        if r.returncode != 0:
            raise RuntimeError(f"tabby-cni ADD for {w.name}: {r.stdout.strip()} {r.stderr.strip()}")

    def add_vm(self, v: LabVm, *, start_client: bool = True, addresses: tuple[str, ...] = (),
               orchestrate: bool = True) -> None:
        """The tap and the VM namespace, the orchestrator's allocation and Endpoint (unless another
        orchestrator, such as Neutron, writes them: orchestrate=False), and the guest's own DHCP
        client, configured only by ``tabby guest render``."""
        ns, host_ns = v.ns, v.host.ns
        netns.add_netns(ns)
        netns.ip("link", "add", "eth0", "address", v.mac, "type", "veth", "peer", "name", v.tap, ns=ns)
        netns.ip("link", "set", v.tap, "netns", host_ns, ns=ns)
        netns.ip("link", "set", v.tap, "up", ns=host_ns)
        if orchestrate:
            self._orchestrate_vm(v, addresses)
        self._guest(v, start_client)

    def _orchestrate_vm(self, v: LabVm, addresses: tuple[str, ...]) -> None:
        ipam = IPAM(open_store(self.store_url))
        if addresses:  # as an orchestrator asking for fixed IPs (a re-created VM keeping its address)
            got = [ipam.assign_address(v.handle, v.host.name, a, endpoint=v.name) for a in addresses]
        else:
            got = ipam.assign(v.handle, v.host.name, ipv6=1, ipv4=int(self._v4(v)), endpoint=v.name)
        ResourceClient(open_store(self.store_url)).apply(validate({
            "kind": "Endpoint", "metadata": {"name": v.name, "labels": {"lab": "vm", WORKLOAD_LABEL: v.name}},
            "spec": {"host": v.host.name, "orchestrator": "vm", "workload_id": v.handle, "interface": v.tap,
                     "profiles": [OPEN_PROFILE],
                     "mac": v.mac, "ipv6_addresses": [str(a.ip) for a in got if a.ip.version == 6],
                     "ipv4_addresses": [str(a.ip) for a in got if a.ip.version == 4]}}))

    def _v4(self, v: LabVm) -> bool:
        return (not self.topo.ipv6_only) if v.ipv4 is None else v.ipv4

    def _guest(self, v: LabVm, start_client: bool) -> None:
        ns = v.ns
        guest = self.dir / f"guest-{v.name}"
        guest.mkdir(parents=True, exist_ok=True)
        for f in guest_render("debian", ("eth0",), self._v4(v)):
            target = guest / f.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.mode == "replace":
                target.write_text(f.text)
            else:
                # the image's own dhclient-script, patched as `tabby guest render` patches it; the lab
                # also makes it leave this machine's /etc/resolv.conf alone
                script = patch_script(Path("/sbin/dhclient-script").read_text())
                target.write_text(script.replace("make_resolv_conf() {", "make_resolv_conf() { return 0\n", 1))
                target.chmod(0o755)
        netns.nsexec(ns, ["sysctl", "-q", "-p", str(guest / "etc/sysctl.d/30-eth0-rs-delay.conf")])
        netns.ip("link", "set", "eth0", "up", ns=ns)
        if start_client:
            self.start_dhcp_client(v)

    def start_dhcp_client(self, v: LabVm) -> None:
        guest = self.dir / f"guest-{v.name}"
        log = self.dir / f"dhcp-{v.name}.log"
        if v.client == "dhclient":
            # as ifupdown does at boot: dhclient -6 binds to the link-local address, so wait for its DAD
            def link_local_ready() -> bool:
                out = netns.ip("-6", "-o", "addr", "show", "dev", "eth0", "scope", "link", ns=v.ns)
                return "fe80" in out and "tentative" not in out

            wait_until(link_local_ready, 5, 0.02)
            script = str(guest / "sbin/dhclient-script")
            # dhclient -6 exits when its link-local is not usable yet; a boot service would restart it
            netns.spawn(v.ns, [sys.executable, "-m", "tabby.lab.launch", "--retry", "30", "--every", "0.3", "--",
                               "dhclient", "-6", "-d", "-sf", script, "-lf", str(guest / "lease6"),
                               "-pf", str(guest / "dhclient6.pid"), "eth0"], log)
            if self._v4(v):
                netns.spawn(v.ns, ["dhclient", "-4", "-d", "-sf", script, "-lf", str(guest / "lease4"),
                                   "-pf", str(guest / "dhclient4.pid"), "eth0"], log)
        else:
            # the rendered /etc/dhcpcd.conf, plus one lab-only line: leave this machine's resolv.conf be
            conf = guest / "etc/dhcpcd.conf"
            if "nohook resolv.conf" not in conf.read_text():
                conf.write_text(conf.read_text() + "nohook resolv.conf\n")
            # dhcpcd keeps state in /run/dhcpcd and /var/lib/dhcpcd, which are not per network namespace
            netns.spawn(v.ns, [sys.executable, "-m", "tabby.lab.launch", "--tmpfs", "/run/dhcpcd",
                               "--tmpfs", "/var/lib/dhcpcd", "--", "dhcpcd", "-B", "-f", str(conf), "-c", "/bin/true",
                               "eth0"], log)

    def remove_vm(self, v: LabVm) -> None:
        """Delete a VM as an orchestrator does: its Endpoint and allocation, then its tap and namespace."""
        ResourceClient(open_store(self.store_url)).delete("Endpoint", v.name)
        IPAM(open_store(self.store_url)).release_handle(v.handle)
        netns.sweep(v.ns)
        shutil.rmtree(self.dir / f"guest-{v.name}", ignore_errors=True)

    # -- looking -------------------------------------------------------------------------

    def members(self) -> list[tuple[str, str]]:
        """(name, namespace) of every workload: containers, then VMs."""
        return [(w.name, w.ns) for w in self.topo.workloads] + [(v.name, v.ns) for v in self.topo.vms]

    def addresses(self) -> dict[str, dict[str, list[str]]]:
        out: dict[str, dict[str, list[str]]] = {}
        for name, ns in self.members():
            addrs = json.loads(netns.ip("-j", "addr", "show", "dev", "eth0", ns=ns))[0].get("addr_info", [])
            out[name] = {"v6": [a["local"] for a in addrs if a["family"] == "inet6" and a["scope"] == "global"],
                         "v4": [a["local"] for a in addrs if a["family"] == "inet"]}
        return out

    def matrix(self, families: tuple[str, ...] = ("v6", "v4"), tcp: bool = True) -> list[dict[str, Any]]:
        """Every workload to every other and to/from the outside router, per family: ping, and TCP.

        Each row says what was expected ("reach", or "blocked" for the pair the lab's policy
        blocks), whether it reached, and ok when the two agree."""
        addrs = self.addresses()
        blocked_host = next((w.host.ns for w in self.topo.workloads if self.topo.blocked_pair
                             and w.name == self.topo.blocked_pair[1]), None)
        drops_before = self.policy_drops(blocked_host) if blocked_host else 0
        outside = {"v6": [OUTSIDE_V6], "v4": [] if self.topo.ipv6_only else [OUTSIDE_V4]}
        members = [*self.members(), ("outside", self.topo.outside_ns)]
        addrs["outside"] = outside
        rows = []
        for src, src_ns in members:
            procs = []
            for dst, _ in members:
                if dst == src:
                    continue
                for fam in families:
                    for a in addrs[dst][fam] or ["(none)"]:  # a workload without its address yet fails
                        checks = [("ping", ["ping", "-6" if fam == "v6" else "-4", "-c", "2", "-i", "0.2", "-W", "1",
                                            a])]
                        if tcp:
                            target = f"[{a}]" if fam == "v6" else a
                            checks.append(("tcp", ["socat", "-T", "2", "-u",
                                                   f"TCP:{target}:{TCP_PORT},connect-timeout=2", "-"]))
                        for kind, argv in checks:
                            p = subprocess.Popen(["ip", "netns", "exec", src_ns, *argv], stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True)
                            procs.append((dst, fam, a, kind, p))
            for dst_name, fam, a, kind, p in procs:
                out, _ = p.communicate(timeout=30)
                reached = p.returncode == 0 and (kind != "tcp" or bool(out.strip()))
                expect = "blocked" if (src, dst_name) == self.topo.blocked_pair else "reach"
                rows.append({"src": src, "dst": dst_name, "family": fam, "address": a, "check": kind,
                             "expect": expect, "reached": reached, "ok": reached == (expect == "reach"),
                             "detail": out.strip().splitlines()[-1] if out.strip() else ""})
        if blocked_host is not None:
            # blocked counts only as the policy's doing: its deny rule must have dropped packets
            dropped = self.policy_drops(blocked_host) - drops_before
            for r in rows:
                if r["expect"] == "blocked" and r["ok"] and dropped <= 0:
                    r["ok"] = False
                    r["detail"] = f"not reached, but policy {BLOCK_POLICY} dropped nothing (another fault)"
        return rows

    @staticmethod
    def policy_drops(host_ns: str) -> int:
        """Packets the lab's blocking policy's deny rules have dropped on that host."""
        r = subprocess.run(["ip", "netns", "exec", host_ns, "nft", "-j", "list", "table", "inet", "tabby"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return 0
        total = 0
        for item in json.loads(r.stdout).get("nftables", []):
            rule = item.get("rule")
            if rule and f"policy {BLOCK_POLICY} in" in rule.get("comment", ""):
                total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        return total


def load(prefix: str = PREFIX) -> Lab:
    """The lab that is up under prefix. ValueError for a refused prefix or a state file that is not
    this lab's; OSError when there is none."""
    path = lab_dir(prefix) / "state.json"
    text = path.read_text()
    try:
        state = json.loads(text)
        if state.get("prefix", prefix) != prefix:
            raise ValueError(f"it is the state of lab {state.get('prefix')!r}")
        topo = topology(state["hosts"], state["containers"], state["ipv6_only"], prefix,
                        tuple(state.get("route_reflectors", ())), state.get("vms", 0))
        return Lab(topo, state["store"], state.get("agent_store", ""), state.get("store_kind", "sqlite"))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a usable lab state file ({type(e).__name__}: {e})") from None


def down(prefix: str = PREFIX) -> list[str]:
    """Remove every namespace of this lab (ending the processes inside, by pid), and its files.
    The prefix is checked (``check_prefix``) before anything is touched: ValueError if refused."""
    dirs = (lab_dir(prefix), run_dir(prefix))
    gone = netns.sweep(prefix + "-")
    pid_file = lab_dir(prefix) / "forwarder.pid"
    if pid_file.exists():  # the etcd forwarder, the one lab process outside the lab's namespaces
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            if f"{FORWARDER_MARK}={prefix}\0" in Path(f"/proc/{pid}/environ").read_text():
                netns.kill_pid(pid)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    for root in (LAB_ROOT, RUN_ROOT):  # the parents too, once no lab is left in them
        with contextlib.suppress(OSError):
            root.rmdir()
    return gone


def _etcd_answers(url: str) -> bool:
    try:
        open_store(url).revision()
        return True
    except Exception:
        return False


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """``netns.wait_for`` that answers False instead of raising."""
    try:
        return bool(netns.wait_for(cond, timeout, interval))
    except TimeoutError:
        return False
