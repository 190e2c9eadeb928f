"""Builds and tears down the lab described by ``topology``: namespaces, links, the Store, agents.

Containers are made as a runtime makes them: an empty namespace, then ``tabby-cni ADD`` run in
the host's namespace. VMs are namespaces whose own DHCP client, configured by ``tabby guest
render``, gets their address from the host's dnsmasq. The agents do the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tabby.client import ResourceClient
from tabby.dataplane.links import (
    neigh_thresholds,
    raise_neigh_thresholds,
    read_neigh_thresholds,
    write_neigh_thresholds,
)
from tabby.guest.render import patch_script
from tabby.guest.render import render as guest_render
from tabby.ipam import IPAM
from tabby.lab import netns, outside_bird, probe, tor
from tabby.lab.etcd import EtcdCluster, Pki
from tabby.lab.topology import (
    DNS64_SERVER,
    ETCD_V6,
    NAT64_POOL4,
    NAT64_PORT,
    NAT64_PREFIX,
    OUTSIDE_ASN,
    OUTSIDE_DNS,
    OUTSIDE_FABRIC_V4,
    OUTSIDE_FABRIC_V6,
    OUTSIDE_NAME,
    OUTSIDE_SERVICE_V4,
    OUTSIDE_V4,
    OUTSIDE_V6,
    OUTSIDE_ZONE,
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
from tabby.store import open_store, with_etcd_options

OPEN_PROFILE = "lab-open"
BLOCK_POLICY = "lab-block"
NAT64_BLOCK_POLICY = "lab-block-nat64"  # one workload may not reach the NAT64 prefix (egress, as IPv6)
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
FULL_MATRIX_HOSTS = 20  # up to this many hosts `lab check` checks every pair; above, a sample
DEFAULT_SAMPLE = 500  # pairs per family when sampled (plus every member once each way)
MATRIX_WORKERS = 16  # matrix checks at once: each is a thread that mostly waits on the network
BUILD_WORKERS = 4  # hosts and containers built at once: `ip` and the CNI ADD are processes (2 cores here)


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
    etcd_members: int = 1  # with store_kind etcd: one member over plain HTTP, or a TLS cluster of this many
    # the cluster's members, in the process that built the lab (tests kill and restart them)
    etcd: EtcdCluster | None = field(default=None, repr=False, compare=False)
    vm_kind: str = "netns"  # "qemu": VMs are real guests (lab/qemu.py)
    guests: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # qemu.Guest by VM name

    def __post_init__(self) -> None:
        self.agent_store_url = self.agent_store_url or self.store_url

    def store_url_for(self, h: LabHost, writer: str = "agent") -> str:
        """The Store as host h's agent (writer "agent") or CNI server ("cni") sees it: on a TLS
        cluster, with h's own client certificate and that writer's etcd user for h."""
        if self.etcd_members == 1:
            return self.agent_store_url
        from tabby.etcd_auth import agent_user, cni_user

        pki = Pki(self.dir / "etcd" / "pki")
        user = agent_user(h.name) if writer == "agent" else cni_user(h.name)
        return with_etcd_options(self.agent_store_url, cert=str(pki.cert(f"host-{h.name}")),
                                 key=str(pki.key(f"host-{h.name}")), user=user,
                                 password_file=str(self.dir / "etcd" / "passwords" / user))

    @property
    def dir(self) -> Path:
        return lab_dir(self.topo.prefix)

    @property
    def run_dir(self) -> Path:
        return run_dir(self.topo.prefix)

    @property
    def bgp_password_dir(self) -> Path:
        """Where the lab's agents read BGP password files (their --bgp-password-dir)."""
        return self.dir / "bgp-passwords"

    # -- building ------------------------------------------------------------------------

    def _save_state(self) -> None:
        (self.dir / "state.json").write_text(json.dumps({
            "hosts": len(self.topo.hosts), "ipv6_only": self.topo.ipv6_only, "store": self.store_url,
            "agent_store": self.agent_store_url, "store_kind": self.store_kind, "etcd_members": self.etcd_members,
            "prefix": self.topo.prefix, "route_reflectors": list(self.topo.route_reflectors), "vm_kind": self.vm_kind,
            "vms": len(self.topo.vms) // max(1, len(self.topo.hosts)), "tors": self.topo.tors, "nat64": self.topo.nat64,
            "containers": len(self.topo.workloads) // max(1, len(self.topo.hosts))}))

    def up(self, say: Say = _quiet) -> None:
        if self.topo.tors and self.store_kind != "sqlite":
            raise ValueError("--tors: the hosts have no shared fabric link to reach etcd on; use the SQLite store")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save_state()
        say("neighbour tables")
        for note in size_neighbour_tables(self.topo.prefix, lab_neigh_entries(self.topo)):
            say(note)
        say("fabric")
        fab = self.topo.fabric_ns
        netns.add_netns(fab)
        netns.ip("link", "add", "br0", "type", "bridge", ns=fab)
        netns.ip("link", "set", "br0", "up", ns=fab)
        if self.store_kind == "etcd":
            say("etcd on the fabric" + (f" ({self.etcd_members} members, TLS)" if self.etcd_members > 1 else ""))
            self._etcd() if self.etcd_members == 1 else self._etcd_cluster()
            self._save_state()
        say(f"hosts ({len(self.topo.hosts)})")
        tor.hosts(self, _parallel) if self.topo.tors else _parallel(self._host, self.topo.hosts)
        say("top-of-rack routers" if self.topo.tors else "outside router")
        tor.routers(self) if self.topo.tors else self._outside()
        say("store: hosts, pools, the outside peer")
        self._resources()
        say("agents")
        with_workloads = [h for h in self.topo.hosts if any(w.host == h for w in self.topo.workloads)]
        for h in self.topo.hosts:
            self._agent(h)
        for h in with_workloads:  # the CNI server only where containers are made
            self._start_cni_server(h)
        # all start at once; on 2 cores 100 of them beside 100 agents took ~110 s to listen
        deadline = time.monotonic() + 30 + 1.5 * len(self.topo.hosts)
        for h in with_workloads:
            netns.wait_for(self.cni_socket(h).exists, max(1.0, deadline - time.monotonic()), 0.05,
                           f"cni-server on {h.name}")
        say(f"containers ({len(self.topo.workloads)})")
        # in parallel across hosts, in order on each: two ADDs at once on one host would each claim
        # a block of their own (neither sees the other's yet), and the lab's layout would vary
        _parallel(lambda h: [self._container(w) for w in self.topo.workloads if w.host == h], with_workloads)
        for v in self.topo.vms:
            say(f"VM {v.name} ({v.client})")
            self.add_vm(v)
        for name, ns in self.members():
            if name not in self.guests:  # a qemu guest's listener is its agent's (qemu.Guest.ready)
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

    def _etcd_cluster(self) -> None:
        """etcd_members members, each in a namespace of its own on the fabric (fd00:f::fd, ::fc, ...),
        TLS for clients and peers with certificates made here (one client certificate per host, and
        root's for the lab itself), users and roles per writer, and a loopback forwarder per
        member, as for one member."""
        from tabby.lab.etcd import EtcdCluster, free_port

        members = []
        for i in range(self.etcd_members):
            ns, addr = f"{self.topo.etcd_ns}{i}", str(ipaddress.IPv6Address(ETCD_V6) - i)
            self._plug(ns, f"{self.topo.prefix}pe{i}")
            netns.ip("addr", "add", f"{addr}/64", "dev", "eth0", "nodad", ns=ns)
            netns.ip("link", "set", "eth0", "up", ns=ns)
            members.append((ns, addr))
        self.etcd = EtcdCluster.create(self.etcd_members, tls=True, name=f"{self.topo.prefix}-etcd",
                                       directory=self.dir / "etcd", hosts=members,
                                       clients=tuple(f"host-{h.name}" for h in self.topo.hosts))
        self.etcd.start()  # members end with their namespaces at `down`
        pids, ports = [], []
        for i, m in enumerate(self.etcd.members):
            port = free_port()
            script = self.dir / f"etcd-forward-{i}.sh"  # a script: socat would split an address inside EXEC at ':'
            script.write_text(f"#!/bin/sh\nexec ip netns exec {m.netns} socat STDIO 'TCP6:[{m.host}]:{m.port}'\n")
            script.chmod(0o755)
            fwd = netns.spawn_here(["socat", f"TCP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{script}"],
                                   self.dir / f"etcd-forwarder-{i}.log", {FORWARDER_MARK: self.topo.prefix})
            pids.append(fwd.pid)
            ports.append(port)
        (self.dir / "forwarder.pid").write_text("\n".join(map(str, pids)))
        self.agent_store_url = self.etcd.url()
        admin = "etcds://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "?" + urlencode(
            self.etcd.members[0].pki_query("root"), safe="/")
        netns.wait_for(lambda: _etcd_answers(admin), 20, 0.1, "etcd through the forwarders")
        self.store_url = self._etcd_users(admin)

    def _etcd_users(self, admin: str) -> str:
        """etcd's users and roles (etcd_auth): an agent and a CNI user per host, each with a password
        of its own in a 0600 file; auth on. The lab's own URL after that: as root."""
        import secrets

        from tabby.etcd_auth import ROOT_USER, provision, roles
        from tabby.store.etcd import EtcdStore

        grants = roles([h.name for h in self.topo.hosts])
        pw_dir = self.dir / "etcd" / "passwords"
        pw_dir.mkdir(mode=0o700, exist_ok=True)
        passwords = {u: secrets.token_urlsafe(16) for u in (ROOT_USER, *grants)}
        for user, pw in passwords.items():
            f = pw_dir / user
            f.touch(mode=0o600)
            f.write_text(pw + "\n")
        store = open_store(admin)
        assert isinstance(store, EtcdStore)
        provision(store, passwords, grants)
        store.close()
        return with_etcd_options(admin, user=ROOT_USER, password_file=str(pw_dir / ROOT_USER))

    def _plug(self, ns: str, port: str) -> None:
        """A new namespace with an eth0 on the fabric bridge (the other end, `port`, in br0). The peer
        is made in its namespace at once: no "eth0" ever exists in the fabric namespace, so hosts
        can be plugged in parallel."""
        fab = self.topo.fabric_ns
        netns.add_netns(ns)
        netns.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=fab)
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
        if self.topo.fabric_v4:
            netns.ip("addr", "add", f"{OUTSIDE_FABRIC_V4}/24", "dev", "eth0", ns=ns)
            netns.ip("addr", "add", f"{OUTSIDE_V4}/32", "dev", "lo", ns=ns)
        if self.topo.nat64:
            netns.ip("addr", "add", f"{OUTSIDE_DNS}/32", "dev", "lo", ns=ns)
            netns.ip("addr", "add", f"{OUTSIDE_SERVICE_V4}/32", "dev", "lo", ns=ns)
        netns.ip("link", "set", "eth0", "up", ns=ns)
        netns.nsexec(ns, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        run = self.run_dir / "outside"
        run.mkdir(parents=True, exist_ok=True)
        v4 = self.topo.fabric_v4
        (run / "bird.conf").write_text(outside_bird.render(
            OUTSIDE_FABRIC_V4, OUTSIDE_ASN, OUTSIDE_FABRIC_V6, OUTSIDE_FABRIC_V4 if v4 else None,
            [outside_bird.Neighbour(h.index, h.v6, h.v4 if v4 else None) for h in self.topo.hosts]))
        subprocess.run(["ip", "netns", "exec", ns, "bird", "-c", str(run / "bird.conf"), "-s", str(run / "bird.ctl"),
                        "-P", str(run / "bird.pid")], check=True, capture_output=True)
        self._tcp_server(ns)
        if self.topo.nat64:
            self._outside_v4_service(ns)

    def _outside_v4_service(self, ns: str) -> None:
        """The outside world NAT64 reaches: a name server for the zone (A records only) and an
        IPv4-only TCP service that answers with the address it saw the client come from."""
        netns.spawn(ns, ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                         f"--listen-address={OUTSIDE_DNS}", "--bind-interfaces", "--port=53",
                         f"--local=/{OUTSIDE_ZONE}/", f"--host-record={OUTSIDE_NAME},{OUTSIDE_SERVICE_V4}",
                         f"--pid-file={self.dir / 'outside-dns.pid'}", "--log-queries",
                         f"--log-facility={self.dir / 'outside-dns.log'}"], self.dir / "outside-dns.out")
        netns.spawn(ns, ["socat", f"TCP4-LISTEN:{NAT64_PORT},bind={OUTSIDE_SERVICE_V4},fork,reuseaddr",
                         "SYSTEM:echo $SOCAT_PEERADDR"], self.dir / "outside-v4-service.log")

    def _tcp_server(self, ns: str) -> None:
        """A TCP listener answering with its own name, both families, for the matrix's TCP checks."""
        netns.spawn(ns, ["socat", f"TCP6-LISTEN:{TCP_PORT},fork,reuseaddr,ipv6only=0",
                         f"SYSTEM:echo {ns}"], self.dir / f"tcp-{ns}.log")

    def _resources(self) -> None:
        client = ResourceClient(open_store(self.store_url))
        if self.topo.tors:
            tor.resources(self, client.apply)
        for h in () if self.topo.tors else self.topo.hosts:
            spec: dict[str, Any] = {"ipv6_address": h.v6}
            if h.index in self.topo.route_reflectors:
                spec["route_reflector_cluster_id"] = "10.255.255.1"  # 32 bits; no IPv4 needed on the fabric
            if h.v4:
                spec["ipv4_address"] = h.v4
            client.apply(validate({"kind": "Host", "metadata": {"name": h.name}, "spec": spec}))
        client.apply(validate({"kind": "IPPool", "metadata": {"name": "lab-v6"},
                               "spec": {"cidr": V6_POOL, "nat64": self.topo.nat64}}))
        if self.topo.nat64:
            client.apply(validate({"kind": "Config", "metadata": {"name": "global"}, "spec": {
                "nat64_prefix": NAT64_PREFIX, "nat64_pool4": NAT64_POOL4, "dns64_server": DNS64_SERVER,
                "dns64_upstreams": [OUTSIDE_DNS]}}))
        if not self.topo.tors:
            client.apply(validate({"kind": "BGPPeer", "metadata": {"name": "outside"},
                                   "spec": {"peer_ip": OUTSIDE_FABRIC_V6, "asn": OUTSIDE_ASN}}))
        if self.topo.fabric_v4 and not self.topo.tors:
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
        if self.topo.nat64_blocked:
            client.apply(validate({"kind": "Policy", "metadata": {"name": NAT64_BLOCK_POLICY}, "spec": {
                "order": 100, "selector": f'{WORKLOAD_LABEL} == "{self.topo.nat64_blocked}"',
                "egress": [{"action": "deny", "dst_nets": [NAT64_PREFIX]}]}}))

    def _agent(self, h: LabHost) -> None:
        log = self.dir / f"agent-{h.name}.log"
        self.bgp_password_dir.mkdir(mode=0o700, exist_ok=True)
        netns.spawn(h.ns, [sys.executable, "-m", "tabby.cli", "--store", self.store_url_for(h), "agent",
                           "--host", h.name, "--metrics-port", "9091", "--run-dir", str(self.run_dir / h.name),
                           "--bgp-password-dir", str(self.bgp_password_dir)], log)

    def cni_socket(self, h: LabHost) -> Path:
        return self.run_dir / h.name / "cni" / "cni.sock"

    def _start_cni_server(self, h: LabHost) -> None:
        """The warm CNI helper, as a node runs it: tabby-cni hands its calls to it."""
        netns.spawn(h.ns, [sys.executable, "-m", "tabby.cli", "--store", self.store_url_for(h, "cni"), "cni-server",
                           "--host", h.name, "--socket", str(self.cni_socket(h))],
                    self.dir / f"cni-server-{h.name}.log")

    CNI_NETWORK = "lab"

    def endpoint_of(self, w: LabWorkload) -> str:
        """The Endpoint the CNI plugin writes for a container."""
        from tabby.cni.config import NetConf
        from tabby.cni.plugin import Env, endpoint_name

        conf = NetConf(cni_version="1.1.0", name=self.CNI_NETWORK, type="tabby-cni")
        return endpoint_name(conf, Env("ADD", w.name, f"/run/netns/{w.ns}", "eth0"))

    def _container(self, w: LabWorkload) -> None:
        """A container made the way a runtime makes one: an empty namespace, then tabby-cni ADD."""
        netns.add_netns(w.ns)
        conf = json.dumps({"cniVersion": "1.1.0", "name": self.CNI_NETWORK, "type": "tabby-cni",
                           "store": self.store_url_for(w.host, "cni"), "host": w.host.name,
                           "ipv4": not self.topo.ipv6_only,
                           "profiles": [OPEN_PROFILE], "labels": {WORKLOAD_LABEL: w.name},
                           "server_socket": str(self.cni_socket(w.host))})
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": w.name, "CNI_NETNS": f"/run/netns/{w.ns}",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
        r = subprocess.run(["ip", "netns", "exec", w.host.ns, sys.executable, "-c",
                            "from tabby.cni.shim import main; main()"], input=conf, capture_output=True, text=True,
                           env={**os.environ, **env})
        if r.returncode != 0:
            raise RuntimeError(f"tabby-cni ADD for {w.name}: {r.stdout.strip()} {r.stderr.strip()}")
        # as a runtime does: the result's name servers become the container's resolv.conf
        servers = json.loads(r.stdout).get("dns", {}).get("nameservers", [])
        self.resolv_conf(w.name).write_text("".join(f"nameserver {a}\n" for a in servers))

    def resolv_conf(self, member: str) -> Path:
        """Where a workload's resolvers are written: a container's by the lab from the CNI result
        (as a runtime does), a VM's by its own DHCP client (its resolvconf hook)."""
        if any(v.name == member for v in self.topo.vms):
            return self.dir / f"guest-{member}" / "resolv.conf"
        return self.dir / f"resolv-{member}.conf"

    def add_vm(self, v: LabVm, *, start_client: bool = True, addresses: tuple[str, ...] = (),
               orchestrate: bool = True) -> None:
        """The tap and the VM namespace, the orchestrator's allocation and Endpoint (unless another
        orchestrator, such as Neutron, writes them: orchestrate=False), and the guest's own DHCP
        client, configured only by ``tabby guest render``. With vm_kind qemu: a real guest (lab/qemu.py)."""
        if self.vm_kind == "qemu":
            from tabby.lab import qemu

            qemu.add_vm(self, v, addresses, orchestrate)
            return
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
                # also makes it write the name servers it learned to the guest's own resolv.conf
                # in the lab directory, not this machine's /etc/resolv.conf
                script = patch_script(Path("/sbin/dhclient-script").read_text())
                own = (f'make_resolv_conf() {{ for ns in $new_dhcp6_name_servers $new_domain_name_servers; do '
                       f'echo "nameserver $ns"; done > {guest / "resolv.conf"}; return 0\n')
                target.write_text(script.replace("make_resolv_conf() {", own, 1))
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
            # its hook script writes the name servers it learned (DHCPv6, RA RDNSS, DHCPv4) to the
            # guest's resolv.conf in the lab directory, as the image's resolvconf hook would to /etc
            hook = guest / "dhcpcd-hook.sh"
            hook.write_text("#!/bin/sh\n"
                            'servers="$new_dhcp6_name_servers $nd1_rdnss1_servers $new_domain_name_servers"\n'
                            'set -- $servers; [ $# -gt 0 ] || exit 0\n'
                            f'for ns in $servers; do echo "nameserver $ns"; done > {guest / "resolv.conf"}\n')
            hook.chmod(0o755)
            netns.spawn(v.ns, [sys.executable, "-m", "tabby.lab.launch", "--tmpfs", "/run/dhcpcd",
                               "--tmpfs", "/var/lib/dhcpcd", "--", "dhcpcd", "-B", "-f", str(conf), "-c", str(hook),
                               "eth0"], log)

    def remove_vm(self, v: LabVm) -> None:
        """Delete a VM as an orchestrator does: its Endpoint and allocation, then its tap and namespace."""
        ResourceClient(open_store(self.store_url)).delete("Endpoint", v.name)
        IPAM(open_store(self.store_url)).release_handle(v.handle)
        if v.name in self.guests:
            from tabby.lab import qemu

            qemu.remove_vm(self, v)
        netns.sweep(v.ns, exact=True)  # (as a prefix, removing h1-v1 also took h1-v10..h1-v19)
        shutil.rmtree(self.dir / f"guest-{v.name}", ignore_errors=True)

    # -- looking -------------------------------------------------------------------------

    def members(self) -> list[tuple[str, str]]:
        """(name, namespace) of every workload: containers, then VMs."""
        return [(w.name, w.ns) for w in self.topo.workloads] + [(v.name, v.ns) for v in self.topo.vms]

    def addresses(self) -> dict[str, dict[str, list[str]]]:
        """Each workload's addresses, as its own eth0 has them."""
        def one(ns: str) -> dict[str, list[str]]:
            if ns in guests:
                return guests[ns].addresses()  # type: ignore[no-any-return]
            addrs = json.loads(netns.ip("-j", "addr", "show", "dev", "eth0", ns=ns))[0].get("addr_info", [])
            return {"v6": [a["local"] for a in addrs if a["family"] == "inet6" and a["scope"] == "global"],
                    "v4": [a["local"] for a in addrs if a["family"] == "inet"]}

        members = self.members()
        guests = {v.ns: self.guests[v.name] for v in self.topo.vms if v.name in self.guests}
        with ThreadPoolExecutor(BUILD_WORKERS) as ex:
            return dict(zip([m for m, _ in members], ex.map(one, [ns for _, ns in members]), strict=True))

    def routing_state(self) -> dict[str, Any]:
        """The cheap signal: agents not in sync (from /healthz), and per namespace (each host, the
        outside router, and a ToR between the hosts) the addresses of other hosts' workloads (from
        the Store's Endpoints) that its kernel has no route for.
        Costs one netlink dump and one HTTP request per host, however many pairs there are."""
        eps, _ = ResourceClient(open_store(self.store_url)).list("Endpoint")
        hosts = {h.name: h.ns for h in self.topo.hosts}
        owned: dict[str, list[str]] = {h.ns: [] for h in self.topo.hosts}
        for ep in eps:
            if ep.spec.host in hosts:
                owned[hosts[ep.spec.host]] += [str(a).partition("/")[0]
                                               for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses)]
        owned[self.topo.outside_ns] = [OUTSIDE_V6] + ([OUTSIDE_V4] if self.topo.fabric_v4 else []) + \
            ([OUTSIDE_DNS, OUTSIDE_SERVICE_V4] if self.topo.nat64 else [])
        # with NAT64: a host with workloads also needs its translator and resolver running
        translating = {ns for ns, addrs in owned.items() if addrs and ns != self.topo.outside_ns} \
            if self.topo.nat64 else set()

        def look(ns: str) -> tuple[str | None, list[str] | None]:
            # made and closed per look: an open socket would keep the namespace alive past `down`
            p = probe.NsProbe(ns, health=ns != self.topo.outside_ns)
            try:
                why = None
                if p.health:
                    h = p.healthz()
                    if h.get("status") != 200 or h.get("in_sync") is not True:
                        why = str(h.get("error") or h)
                    elif ns in translating and not (isinstance(n := h.get("nat64"), dict) and n.get("tayga") == "up"
                                                    and n.get("unbound") == "up"):
                        why = f"NAT64 not up: {h.get('nat64')}"
                return why, p.routes()
            except OSError as e:
                return f"netlink: {e}", None
            finally:
                p.close()

        def look_tor(ns: str) -> tuple[str | None, list[str] | None]:
            p = probe.NsProbe(ns, health=False)
            try:
                return None, p.routes()
            except OSError as e:
                return f"netlink: {e}", None
            finally:
                p.close()

        # in a pool: a loaded agent may take a while to answer, and 100 of them one by one add up
        with ThreadPoolExecutor(MATRIX_WORKERS) as ex:
            looks = dict(zip(owned, ex.map(look, owned), strict=True))
        not_in_sync = {ns: why for ns, (why, _) in looks.items() if why}
        routes = {ns: r for ns, (_, r) in looks.items() if r is not None}
        missing = probe.missing_routes(routes, owned)
        # The ToRs but the one playing the outside (lab/tor.py) forward between the hosts and know
        # nothing of the outside: their kernels need every workload's route. The hosts' ECMP routes
        # through ToR 1 come from gobgpd's RIB as soon as it has a path, its kernel from the FIB
        # syncer up to a poll later: a matrix run in between met "Network is unreachable" from it.
        workloads = {ns: a for ns, a in owned.items() if ns != self.topo.outside_ns}
        for t in (tor.tor_ns(self.topo.prefix, i) for i in range(1, self.topo.tors + 1)):
            if t != self.topo.outside_ns:
                why, tor_routes = look_tor(t)
                if why:
                    not_in_sync[t] = why
                else:
                    missing.update(probe.missing_routes({t: tor_routes or []}, {**workloads, t: []}))
        return {"not_in_sync": not_in_sync, "missing": missing, "endpoints": len(eps)}

    def wait_routed(self, timeout: float, interval: float = 1.0) -> dict[str, Any]:
        """Poll ``routing_state`` until every agent is in sync and every route is everywhere (or the
        timeout); returns the last state, with "ok"."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.routing_state()
            state["ok"] = not state["not_in_sync"] and not state["missing"]
            if state["ok"] or time.monotonic() > deadline:
                return state
            time.sleep(interval)

    def wait_vms_addressed(self, timeout: float) -> list[str]:
        """Until every namespace VM's DHCP client has put its Endpoint's addresses on eth0, past
        duplicate address detection (a tentative address drops what is sent to it), (and,
        with NAT64, written the resolver it was given): agents are in sync well before that.
        Returns the VMs still without them at the timeout."""
        want: dict[str, set[str]] = {}
        for ep in ResourceClient(open_store(self.store_url)).list("Endpoint")[0]:
            want[ep.metadata.name] = {str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses)}
        vms = [v for v in self.topo.vms if v.name not in self.guests]

        def missing() -> list[str]:
            out = []
            for v in vms:
                addrs = json.loads(netns.ip("-j", "addr", "show", "dev", "eth0", ns=v.ns))[0].get("addr_info", [])
                have = {a["local"] for a in addrs if not a.get("tentative")}  # DAD over: it takes packets
                if not want.get(v.name, {None}) <= have or (self.topo.nat64 and not self.resolv_conf(v.name).exists()):
                    out.append(v.name)
            return out

        wait_until(lambda: not missing(), timeout, 0.3)
        return missing()

    def matrix(self, families: tuple[str, ...] = ("v6", "v4"), tcp: bool = True, sample: int | None = None,
               seed: int | None = None, workers: int = MATRIX_WORKERS) -> list[dict[str, Any]]:
        """Workloads and the outside router to each other, per family: ping, and TCP.

        sample None: every ordered pair; else ``sample`` random pairs per family plus every member
        at least once as source and as destination, plus the blocked pair (``probe.pick_pairs``).
        Checks run in a bounded pool, in-process (``probe.ping``, ``probe.tcp``). Each row says
        what was expected ("reach", or "blocked" for the pair the lab's policy blocks), whether it
        reached, and ok when the two agree.

        Family "nat64": every workload to the outside's IPv4-only service by its name: "dns" (its
        own resolver answers with the name's AAAA in the NAT64 prefix), "ping" and "tcp" (the
        service must have seen the workload's host's IPv4 address); the workload the lab's
        NAT64 policy blocks is expected blocked (ping and TCP; its DNS still answers)."""
        addrs = self.addresses()
        blocked_host = next((w.host.ns for w in self.topo.workloads if self.topo.blocked_pair
                             and w.name == self.topo.blocked_pair[1]), None)
        drops_before = self.policy_drops(blocked_host) if blocked_host else 0
        outside = {"v6": [OUTSIDE_V6], "v4": [] if self.topo.ipv6_only else [OUTSIDE_V4]}
        members = [*self.members(), ("outside", self.topo.outside_ns)]
        ns_of = dict(members)
        addrs["outside"] = outside
        rng = random.Random(seed)
        always = [self.topo.blocked_pair] if self.topo.blocked_pair else []
        tasks = []
        nat64_addr = str(ipaddress.IPv6Network(NAT64_PREFIX)[int(ipaddress.IPv4Address(OUTSIDE_SERVICE_V4))])
        host_v4 = {**{w.name: w.host.v4 for w in self.topo.workloads}, **{v.name: v.host.v4 for v in self.topo.vms}}
        for fam in families:
            if fam == "nat64":
                for src, _ in self.members():
                    tasks += [(src, "outside", fam, nat64_addr, kind) for kind in ("dns", "ping", *(("tcp",) * tcp))]
                continue
            for src, dst in probe.pick_pairs([m for m, _ in members], sample, rng, always):
                for a in addrs[dst][fam] or ["(none)"]:  # a workload without its address yet fails
                    tasks.append((src, dst, fam, a, "ping"))
                    if tcp:
                        tasks.append((src, dst, fam, a, "tcp"))

        def run(task: tuple[str, str, str, str, str]) -> dict[str, Any]:
            src, dst, fam, a, kind = task
            if fam == "nat64":
                return self._nat64_check(src, ns_of[src], kind, a, host_v4.get(src))
            if a == "(none)":
                reached, out = False, f"{dst} has no {fam} address"
            elif src in self.guests:  # from inside a qemu guest, through its agent
                g = self.guests[src]
                reached, out = g.ping(a) if kind == "ping" else g.tcp(a, TCP_PORT)
            elif kind == "ping":
                reached, out = probe.in_ns(ns_of[src], lambda: probe.ping(a))
            else:
                reached, out = probe.in_ns(ns_of[src], lambda: probe.tcp(a, TCP_PORT))
            expect = "blocked" if (src, dst) == self.topo.blocked_pair else "reach"
            return {"src": src, "dst": dst, "family": fam, "address": a, "check": kind, "expect": expect,
                    "reached": reached, "ok": reached == (expect == "reach"),
                    "detail": out}

        nat64_host = next((h for m, h in [*((w.name, w.host.ns) for w in self.topo.workloads),
                                          *((v.name, v.host.ns) for v in self.topo.vms)]
                           if m == self.topo.nat64_blocked), None) if "nat64" in families else None
        nat64_drops = self.policy_drops(nat64_host, NAT64_BLOCK_POLICY, "eg") if nat64_host else 0
        with ThreadPoolExecutor(workers) as ex:
            rows = list(ex.map(run, tasks))
        if nat64_host is not None:
            dropped = self.policy_drops(nat64_host, NAT64_BLOCK_POLICY, "eg") - nat64_drops
            for r in rows:
                if r["family"] == "nat64" and r["expect"] == "blocked" and r["ok"] and dropped <= 0:
                    r["ok"] = False
                    r["detail"] = f"not reached, but policy {NAT64_BLOCK_POLICY} dropped nothing (another fault)"
        if blocked_host is not None:
            # blocked counts only as the policy's doing: its deny rule must have dropped packets
            dropped = self.policy_drops(blocked_host) - drops_before
            for r in rows:
                if r["family"] != "nat64" and r["expect"] == "blocked" and r["ok"] and dropped <= 0:
                    r["ok"] = False
                    r["detail"] = f"not reached, but policy {BLOCK_POLICY} dropped nothing (another fault)"
        return rows

    def _nat64_check(self, src: str, ns: str, kind: str, address: str, host_v4: str | None) -> dict[str, Any]:
        """One nat64 row: src's own resolver (its resolv.conf) asked for the outside name's AAAA,
        or a ping or TCP to its synthesized address through this host's translator."""
        if kind == "dns":
            servers = [line.split()[1] for line in self.resolv_conf(src).read_text().splitlines()
                       if line.startswith("nameserver ")] if self.resolv_conf(src).exists() else []
            if not servers:
                reached, out = False, f"{src} was given no resolver"
            else:
                got = probe.in_ns(ns, lambda: probe.resolve(OUTSIDE_NAME, servers[0]))
                reached = got[0] and got[1] == [address]
                out = f"{OUTSIDE_NAME} AAAA {got[1]} from {servers[0]}" if got[0] else str(got[1])
            expect = "reach"
        else:
            expect = "blocked" if src == self.topo.nat64_blocked else "reach"
            if kind == "ping":
                reached, out = probe.in_ns(ns, lambda: probe.ping(address))
            else:
                reached, out = probe.in_ns(ns, lambda: probe.tcp(address, NAT64_PORT))
                if reached and out != host_v4:  # the service says whom it saw: the host, masqueraded
                    reached, out = False, f"the service saw {out}, not {src}'s host address {host_v4}"
        return {"src": src, "dst": "outside", "family": "nat64", "address": address, "check": kind,
                "expect": expect, "reached": reached, "ok": reached == (expect == "reach"), "detail": out}

    @staticmethod
    def policy_drops(host_ns: str, policy: str = BLOCK_POLICY, direction: str = "in") -> int:
        """Packets a lab policy's deny rules (of one direction) have dropped on that host."""
        r = subprocess.run(["ip", "netns", "exec", host_ns, "nft", "-j", "list", "table", "inet", "tabby"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return 0
        total = 0
        for item in json.loads(r.stdout).get("nftables", []):
            rule = item.get("rule")
            if rule and f"policy {policy} {direction}" in rule.get("comment", ""):
                total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        return total


def default_sample(hosts: int) -> int | None:
    """The matrix `lab up` and `lab check` run without --sample: all pairs while that is cheap."""
    return None if hosts <= FULL_MATRIX_HOSTS else DEFAULT_SAMPLE


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
                        tuple(state.get("route_reflectors", ())), state.get("vms", 0), int(state.get("tors", 0)),
                        bool(state.get("nat64", False)))
        the_lab = Lab(topo, state["store"], state.get("agent_store", ""), state.get("store_kind", "sqlite"),
                      int(state.get("etcd_members", 1)), vm_kind=str(state.get("vm_kind", "netns")))
        if the_lab.vm_kind == "qemu":
            from tabby.lab import qemu

            the_lab.guests = qemu.load_guests(the_lab.dir)
        return the_lab
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a usable lab state file ({type(e).__name__}: {e})") from None


def down(prefix: str = PREFIX) -> list[str]:
    """Remove every namespace of this lab (ending the processes inside, by pid), and its files, and
    give the machine its neighbour table thresholds back (once no other lab needs them raised).
    The prefix is checked (``check_prefix``) before anything is touched: ValueError if refused."""
    dirs = (lab_dir(prefix), run_dir(prefix))
    from tabby.lab import qemu

    qemu.stop_all(lab_dir(prefix))  # every qemu the lab started, by its pid, before the namespaces go
    gone = netns.sweep(prefix + "-")
    restore_neighbour_tables(prefix)
    pid_file = lab_dir(prefix) / "forwarder.pid"
    if pid_file.exists():  # the etcd forwarders (one per member), the lab's only processes outside its namespaces
        for line in pid_file.read_text().split():
            with contextlib.suppress(ValueError, OSError):
                pid = int(line)
                if f"{FORWARDER_MARK}={prefix}\0" in Path(f"/proc/{pid}/environ").read_text():
                    netns.kill_pid(pid)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    for root in (LAB_ROOT, RUN_ROOT):  # the parents too, once no lab is left in them
        with contextlib.suppress(OSError):
            root.rmdir()
    return gone


# -- the machine's neighbour tables ------------------------------------------------------------
#
# Every lab namespace's neighbour entries count against the root namespace's gc_thresh3 (see
# dataplane/links.py): the agents inside cannot raise it, so the lab does, for all it builds, and
# gives the old values back at `down`. Several labs may be up at once, so the record is one per
# machine, under LAB_ROOT: the values found before the first lab raised them, what was set, and
# each lab's share; changed under a lock (flock on LAB_ROOT), restored when the last lab goes.

NEIGH_RECORD = "neighbour-tables.json"


def lab_neigh_entries(topo: Topology) -> int:
    """Dynamic neighbour entries per family the lab can make once every pair has talked: each host
    resolves every other host and the outside router (and etcd) on the fabric, the outside router
    every host; each workload its gateway, and its host the workload's link-local address."""
    n = len(topo.hosts)
    return n * (n + 2) + n + 2 * (len(topo.workloads) + len(topo.vms)) + 64


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    fd = os.open(LAB_ROOT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_record() -> dict[str, Any] | None:
    try:
        rec = json.loads((LAB_ROOT / NEIGH_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("labs"), dict) else None


def _write_record(rec: dict[str, Any]) -> None:
    tmp = LAB_ROOT / (NEIGH_RECORD + ".tmp")
    tmp.write_text(json.dumps(rec, sort_keys=True))
    tmp.replace(LAB_ROOT / NEIGH_RECORD)


STALE_SHARE_S = 600.0  # a lab sized this long ago that has no namespace left died without `lab down`


def _prune_dead(rec: dict[str, Any], keep: str) -> None:
    """Drop the shares of labs that are gone without a `lab down` (killed, a CI timeout): kept, the
    thresholds never came back to what they were. A lab is gone when none of its namespaces is
    left and it was sized more than STALE_SHARE_S ago (one just sized may not have made any yet)."""
    since = rec.setdefault("since", {})
    if not isinstance(since, dict):
        since = rec["since"] = {}
    names = [e.name for e in netns.NETNS_DIR.iterdir()] if netns.NETNS_DIR.exists() else []
    now = time.time()
    for p in [p for p in rec["labs"] if p != keep]:
        at = since.get(p)
        old = not isinstance(at, (int, float)) or now - at > STALE_SHARE_S
        if old and not any(n.startswith(f"{p}-") for n in names):
            del rec["labs"][p]
            since.pop(p, None)


def size_neighbour_tables(prefix: str, entries: int) -> list[str]:
    """Raise the root namespace's thresholds for this lab and the others up; returns notes."""
    current = read_neigh_thresholds()
    if current is None:
        return ["neighbour table thresholds: not in this namespace; run the lab from the root namespace "
                "or size them there (see docs/architecture.md)"]
    with _machine_lock():
        rec = _read_record() or {"original": current, "labs": {}}
        _prune_dead(rec, prefix)
        rec["labs"][prefix] = entries
        rec["since"][prefix] = time.time()
        want = neigh_thresholds(sum(rec["labs"].values()))
        written = raise_neigh_thresholds(want)
        rec["set"] = read_neigh_thresholds()
        _write_record(rec)
    return [f"neighbour tables raised for {entries} entries: {written}"] if written else []


def restore_neighbour_tables(prefix: str) -> list[str]:
    """Undo this lab's share: the values found before any lab once the last lab is down, else what
    the remaining labs need. A value someone changed since the lab set it is theirs and kept."""
    if not (LAB_ROOT / NEIGH_RECORD).exists():
        return []
    notes = []
    with _machine_lock():
        rec = _read_record()
        if rec is None or prefix not in rec["labs"]:
            return []
        del rec["labs"][prefix]
        _prune_dead(rec, prefix)
        rec["since"].pop(prefix, None)
        original, was_set, current = rec.get("original") or {}, rec.get("set") or {}, read_neigh_thresholds() or {}
        want = neigh_thresholds(sum(rec["labs"].values())) if rec["labs"] else None
        target: dict[str, dict[str, int]] = {}
        for fam, vals in original.items():
            for k, old in vals.items():
                now = current.get(fam, {}).get(k)
                if now is None:
                    continue
                if now != was_set.get(fam, {}).get(k):
                    notes.append(f"{fam} {k} is {now}, not the {was_set.get(fam, {}).get(k)} the lab set: left")
                    continue
                target.setdefault(fam, {})[k] = max(old, want[k]) if want else old
        write_neigh_thresholds(target)
        if rec["labs"]:
            rec["set"] = read_neigh_thresholds()
            _write_record(rec)
        else:
            (LAB_ROOT / NEIGH_RECORD).unlink()
    return notes


def _parallel(fn: Callable[[Any], None], items: Iterable[Any], workers: int = BUILD_WORKERS) -> None:
    """fn over items in a few threads; the first failure is raised once all have finished.

    Measured here (100 hosts, 5 `ip` calls each): serially 2.2 s, 4 threads 1.25 s, 8 threads 1.16 s:
    namespace and veth creation serialise on the kernel's rtnl lock, so more threads gain nothing;
    the CPU-bound part (process start-up) gains what the 2 cores give."""
    ex = ThreadPoolExecutor(workers)
    futures = [ex.submit(fn, item) for item in items]
    try:
        futures_wait(futures)
    except BaseException:  # Ctrl-C, SIGTERM: what is queued never starts, what runs ends, then the caller cleans up
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown()
    for f in futures:
        f.result()


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
