"""The CNI verbs. ADD allocates from tabby IPAM, builds the veth pair inside the container (an
address set before a namespace move is lost), moves the host end out (MAC ee:ee:ee:ee:ee:ee,
DAD off, so its link-local fe80::ecee:eeff:feee:eeee works at once), configures the container
side, and writes the Endpoint; the agent programs host routes, neighbours and policy. A failed
ADD removes everything it made: the veth, the allocation, the record.

Kernel work goes through ``ip -batch`` under ``nsenter``: one process per side, not one per object.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabby.cni.config import SUPPORTED_VERSIONS, NetConf

HOST_MAC = "ee:ee:ee:ee:ee:ee"
HOST_LL = "fe80::ecee:eeff:feee:eeee"
V4_GATEWAY = "169.254.1.1"

# CNI error codes (spec 1.1)
INCOMPATIBLE, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER, INVALID_ENV, IO_FAILURE, DECODE, INVALID_CONF, TRY_AGAIN = (
    1, 2, 3, 4, 5, 6, 7, 11)


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def json(self, version: str) -> dict[str, Any]:
        return {"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details}


@dataclass(frozen=True)
class Env:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: str = ""


def host_ifname(container_id: str, ifname: str) -> str:
    """Deterministic, at most 15 characters, from what DEL is also given."""
    return "tby" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def handle_of(conf: NetConf, env: Env) -> str:
    return f"{conf.name}.{env.container_id}"


def endpoint_name(conf: NetConf, env: Env) -> str:
    return f"{conf.name}.{env.container_id[:40]}.{env.ifname}".replace("/", "-")


def _batch(netns: str | None, lines: list[str]) -> None:
    argv = ["ip", "-batch", "-"]
    if netns is not None:
        argv = [shutil.which("nsenter") or "nsenter", f"--net={netns}", *argv]
    r = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if r.returncode != 0:
        raise CniError(IO_FAILURE, "interface setup failed", r.stderr.strip())


def _sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run([shutil.which("nsenter") or "nsenter", f"--net={netns}", "sysctl", "-qw", f"{key}={value}"],
                   capture_output=True)


def host_name(conf: NetConf) -> str:
    return conf.host or os.environ.get("TABBY_HOST") or socket.gethostname()


def add(conf: NetConf, env: Env) -> dict[str, Any]:
    from tabby.client import ResourceClient
    from tabby.ipam import IPAM, CorruptRecord, IpamError, PoolExhausted
    from tabby.model import validate
    from tabby.store import StoreError, open_store, store_url

    if not os.path.exists(env.netns):
        raise CniError(INVALID_ENV, f"CNI_NETNS: {env.netns} does not exist")
    try:
        store = open_store(store_url(conf.store))
    except (ValueError, StoreError) as e:
        raise CniError(TRY_AGAIN, "store unavailable", str(e)) from None
    hostif = host_ifname(env.container_id, env.ifname)
    handle = handle_of(conf, env)
    ipam = IPAM(store)
    made_link = False
    try:
        got = ipam.assign(handle, host_name(conf), ipv6=int(conf.ipv6), ipv4=int(conf.ipv4),
                          endpoint=endpoint_name(conf, env))
        v6 = [str(a.ip) for a in got if a.ip.version == 6]
        v4 = [str(a.ip) for a in got if a.ip.version == 4]
        # the pair is made inside the container, then the host end moves out to our namespace
        _batch(env.netns, [f"link add {env.ifname} type veth peer name {hostif}",
                           f"link set {hostif} netns {os.getpid()}"])
        made_link = True
        # the host end is in our own namespace: its sysctl is a file write, not a process
        Path(f"/proc/sys/net/ipv6/conf/{hostif}/accept_dad").write_text("0")
        _batch(None, [f"link set {hostif} address {HOST_MAC}", f"link set {hostif} up"])
        _sysctl(env.netns, f"net.ipv6.conf.{env.ifname}.accept_dad", "0")
        lines = [f"link set {env.ifname} up"]
        lines += [f"addr add {a}/128 dev {env.ifname} nodad" for a in v6]
        host = ResourceClient(store).get("Host", host_name(conf))
        gw6 = None
        if v6:
            if conf.ipv6_gateway == "proxy-ndp":
                if host is None or host.spec.ipv6_address is None:
                    raise CniError(INVALID_CONF, "ipv6_gateway: proxy-ndp needs this Host's IPv6 fabric address")
                gw6 = str(host.spec.ipv6_address)
                lines += [f"route add {gw6}/128 dev {env.ifname}", f"route add default via {gw6} dev {env.ifname}"]
            else:
                lines.append(f"route add default via {HOST_LL} dev {env.ifname}")
        lines += [f"addr add {a}/32 dev {env.ifname}" for a in v4]
        if v4:
            lines += [f"neigh add {V4_GATEWAY} lladdr {HOST_MAC} dev {env.ifname} nud permanent",
                      f"route add {V4_GATEWAY} dev {env.ifname} scope link",
                      f"route add default via {V4_GATEWAY} dev {env.ifname}"]
        _batch(env.netns, lines)
        mac = json.loads(subprocess.run([shutil.which("nsenter") or "nsenter", f"--net={env.netns}", "ip", "-j",
                                         "link", "show", env.ifname], capture_output=True, text=True).stdout)[0][
            "address"]
        spec: dict[str, Any] = {"host": host_name(conf), "orchestrator": "container", "workload_id": handle,
                                "interface": hostif, "mac": mac, "ipv6_addresses": v6, "ipv4_addresses": v4}
        if gw6:
            spec["ipv6_gateway"] = gw6
        if conf.profiles:
            spec["profiles"] = conf.profiles
        labels = {**conf.labels, "cni.network": conf.name}
        ResourceClient(store).apply(validate({"kind": "Endpoint", "metadata": {"name": endpoint_name(conf, env),
                                                                                "labels": labels},
                                              "spec": spec}))
    except BaseException as e:
        if made_link:
            subprocess.run(["ip", "link", "del", hostif], capture_output=True)
        try:
            ipam.release_handle(handle)
        except IpamError as release_error:  # a corrupt handle record: left as it is, the first error stands
            e.add_note(f"release of {handle}: {release_error}")
        if isinstance(e, CniError):
            raise
        if isinstance(e, IpamError):  # exhausted, or this container's handle record is corrupt: a retry won't do
            final = isinstance(e, (PoolExhausted, CorruptRecord))
            raise CniError(IO_FAILURE if final else TRY_AGAIN, "address allocation failed", str(e)) from None
        if isinstance(e, StoreError):
            raise CniError(TRY_AGAIN, "store unavailable", str(e)) from None
        if isinstance(e, ValueError):
            raise CniError(INVALID_CONF, "invalid endpoint", str(e)) from None
        raise
    ips = [{"address": f"{a}/128", "gateway": gw6 or HOST_LL, "interface": 1} for a in v6]
    ips += [{"address": f"{a}/32", "gateway": V4_GATEWAY, "interface": 1} for a in v4]
    routes = ([{"dst": "::/0", "gw": gw6 or HOST_LL}] if v6 else []) + ([{"dst": "0.0.0.0/0", "gw": V4_GATEWAY}]
                                                                         if v4 else [])
    return {"cniVersion": conf.cni_version,
            "interfaces": [{"name": hostif, "mac": HOST_MAC},
                           {"name": env.ifname, "mac": mac, "sandbox": env.netns}],
            "ips": ips, "routes": routes}


def delete(conf: NetConf, env: Env) -> None:
    """Idempotent: whatever is already gone counts as removed."""
    import contextlib

    from tabby.client import ResourceClient
    from tabby.ipam import IPAM, IpamError
    from tabby.store import NotFound, StoreError, open_store, store_url

    try:
        store = open_store(store_url(conf.store))
        with contextlib.suppress(NotFound):
            ResourceClient(store).delete("Endpoint", endpoint_name(conf, env))
        IPAM(store).release_handle(handle_of(conf, env))
    except IpamError as e:  # the handle's record is corrupt: nothing freed, the record left for an operator
        raise CniError(IO_FAILURE, "address release failed", str(e)) from None
    except (ValueError, StoreError) as e:
        raise CniError(TRY_AGAIN, "store unavailable", str(e)) from None
    subprocess.run(["ip", "link", "del", host_ifname(env.container_id, env.ifname)], capture_output=True)


def check(conf: NetConf, env: Env) -> None:
    from tabby.client import ResourceClient
    from tabby.store import open_store, store_url

    ep = ResourceClient(open_store(store_url(conf.store))).get("Endpoint", endpoint_name(conf, env))
    if ep is None:
        raise CniError(UNKNOWN_CONTAINER, f"no Endpoint {endpoint_name(conf, env)} in the store")
    out = subprocess.run([shutil.which("nsenter") or "nsenter", f"--net={env.netns}", "ip", "-j", "addr", "show",
                          "dev", env.ifname], capture_output=True, text=True)
    if out.returncode != 0:
        raise CniError(IO_FAILURE, f"{env.ifname} missing in {env.netns}", out.stderr.strip())
    have = {a["local"] for a in json.loads(out.stdout)[0]["addr_info"]}
    want = {str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses)}
    if not want <= have:
        raise CniError(IO_FAILURE, f"addresses missing on {env.ifname}: {', '.join(sorted(want - have))}")
    routes = subprocess.run([shutil.which("nsenter") or "nsenter", f"--net={env.netns}", "ip", "-j", "-6", "route"],
                            capture_output=True, text=True).stdout
    if ep.spec.ipv6_addresses and '"default"' not in routes:
        raise CniError(IO_FAILURE, f"no IPv6 default route in {env.netns}")


def gc(conf: NetConf, raw: dict[str, Any]) -> None:
    from tabby.ipam import IPAM
    from tabby.store import open_store, store_url

    valid = {f"{conf.name}.{a.get('containerID')}" for a in raw.get("cni.dev/valid-attachments", [])}
    ipam = IPAM(open_store(store_url(conf.store)))
    for h in ipam.handles():
        if h.handle.startswith(conf.name + ".") and h.handle not in valid:
            ipam.release_handle(h.handle)


def status(conf: NetConf) -> None:
    from tabby.store import StoreError, open_store, store_url

    try:
        open_store(store_url(conf.store)).revision()
    except (ValueError, StoreError) as e:
        raise CniError(50, "the tabby store is not reachable", str(e)) from None  # 50: plugin not available


def version() -> dict[str, Any]:
    return {"cniVersion": SUPPORTED_VERSIONS[-1], "supportedVersions": list(SUPPORTED_VERSIONS)}
