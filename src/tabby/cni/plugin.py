"""The CNI verbs. ADD allocates from tabby IPAM, makes the veth pair, configures the container
side, and writes the Endpoint; the agent programs host routes, neighbours and policy.

Kernel work is netlink from this process (``nl.py``): the pair is created from the host's
namespace with the container end made directly in the container's namespace (an address set
before a move would be lost), the host end gets MAC ee:ee:ee:ee:ee:ee and DAD off before it goes
up (so its link-local fe80::ecee:eeff:feee:eeee works at once), and the container side is set
up by a thread that entered the container's namespace. No input string reaches a command line,
a batch script or a path unchecked (``inputs.py``); no process is started.

Attachments (SPEC.md: network name, container id, ifname) and their invariants:
- the IPAM handle of an attachment is ``<network>.<container id>/<ifname>`` and records
  ``attachment = <host>/<container id>/<ifname>``; it is created before any address is taken,
  so two ADDs can never both allocate for one attachment;
- ADD, DEL and GC of one attachment hold its lock (``lock.py``), across processes;
- ADD of an attachment that exists and is intact returns its result and touches nothing; one
  that exists but is broken (its namespace was replaced, its veth deleted) is rebuilt with the
  addresses it has; one whose ADD died half way is removed entirely first. A failed ADD removes
  what that call made and releases only what that call allocated;
- DEL and GC remove all three: allocation, Endpoint and veth. What is gone already counts as
  removed.
"""

from __future__ import annotations

import _socket  # socket.py would import selectors for nothing: only gethostname is used
import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from tabby.cni import nl
from tabby.cni.config import SUPPORTED_VERSIONS, ConfError, NetConf, Request, request
from tabby.cni.errors import (
    INCOMPATIBLE,
    INVALID_CONF,
    INVALID_ENV,
    IO_FAILURE,
    NOT_AVAILABLE,
    TRY_AGAIN,
    UNKNOWN_CONTAINER,
    CniError,
)
from tabby.cni.inputs import Env
from tabby.cni.lock import AttachmentLock, LockTimeout, sha256
from tabby.cni.result import Plumbed, at_least, build
from tabby.model.names import check_name

__all__ = ["HOST_LL", "HOST_MAC", "INVALID_CONF", "INVALID_ENV", "IO_FAILURE", "TRY_AGAIN", "V4_GATEWAY",
           "CniError", "Context", "Env", "add", "check", "delete", "endpoint_name", "gc", "handle_of", "host_ifname",
           "lock_key", "status", "version"]

HOST_MAC = "ee:ee:ee:ee:ee:ee"
HOST_LL = "fe80::ecee:eeff:feee:eeee"
V4_GATEWAY = "169.254.1.1"


class Phases:
    """Milliseconds per phase of one call, for the server's log line and the bench."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.ms: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self.t) * 1000
        self.t = now

    def __str__(self) -> str:
        return " ".join(f"{k}={v:.1f}" for k, v in self.ms.items())


class Context:
    """Stores and IPAM objects for calls. The warm server keeps one (stores are shared: SQLite's
    one connection under a lock, etcd's sessions and auth token, so a call costs no TLS handshake
    and no authenticate request, which is a raft write; the pool cache and block hints of IPAM
    carry over); a plugin process makes its own."""

    def __init__(self, keep: bool = False, background: bool = False) -> None:
        self.keep = keep
        self.background = background  # may work go on after the answer (a server: yes; a process: no)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Any, Any]] = {}
        self._pending: set[threading.Thread] = set()
        self._local = threading.local()

    def later(self, fn: Any) -> None:
        """Run fn after the call has answered: queued for the caller when it ``deferred()``
        (the server runs it itself once the answer is out: no thread to start and switch to while
        the answer waits), else in a thread the interpreter waits for at exit."""
        queue = getattr(self._local, "queue", None)
        if queue is not None:
            queue.append(fn)
            return
        t = threading.Thread(target=self.run_later, args=([fn],), name="tabby-cni-later")
        with self._lock:
            self._pending.add(t)
        t.start()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[list[Any]]:
        """While active, ``later`` in this thread queues its work in the list yielded."""
        self._local.queue = queue = []
        try:
            yield queue
        finally:
            self._local.queue = None

    def run_later(self, work: list[Any]) -> None:
        """Run queued work in this thread (``drain`` waits for it), logging what fails."""
        me = threading.current_thread()
        with self._lock:
            self._pending.add(me)
        try:
            for fn in work:
                try:
                    fn()
                except Exception:
                    import logging

                    logging.getLogger(__name__).exception("CNI background work failed")
        finally:
            with self._lock:
                self._pending.discard(me)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for background work (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending or time.monotonic() > deadline:
                return
            pending[0].join(max(0.0, deadline - time.monotonic()))

    def open(self, url: str | None) -> tuple[Any, Any]:
        """(store, IPAM) for the config's store URL; CniError 11 if it cannot be opened."""
        from tabby.ipam import IPAM
        from tabby.store import StoreError, open_store, store_url

        try:
            url = store_url(url or None)  # "" (an empty TABBY_STORE) is unset, as before
        except ValueError as e:
            raise CniError(INVALID_CONF, "invalid store URL", str(e)) from None
        with self._lock:
            if url in self._cache:
                return self._cache[url]
            try:
                store = open_store(url)
            except (ValueError, StoreError, OSError) as e:
                raise CniError(TRY_AGAIN, "store unavailable", str(e)) from None
            pair = (store, IPAM(store))
            if self.keep:
                self._cache[url] = pair
            return pair


def host_ifname(container_id: str, ifname: str) -> str:
    """Deterministic, at most 15 characters, from what DEL is also given."""
    return "tby" + sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def handle_of(conf: NetConf, env: Env) -> str:
    return f"{conf.name}.{env.container_id}/{env.ifname}"


def _legacy_handle(conf: NetConf, env: Env) -> str:
    """What tabby before attachments called the handle (no ifname): DEL still releases it."""
    return f"{conf.name}.{env.container_id}"


def endpoint_name(conf: NetConf, env: Env) -> str:
    cid = env.container_id
    if len(cid) > 40:  # keep names short, and unique: a 64-character id is shortened with its hash
        cid = f"{cid[:31]}-{sha256(cid.encode()).hexdigest()[:8]}"
    return f"{conf.name}.{cid}.{env.ifname}"


def host_name(conf: NetConf) -> str:
    """The network config's host (checked by its parser), else $TABBY_HOST, else the hostname;
    refused (naming where it came from) unless it can name a Host: it goes into Store keys."""
    if conf.host:
        return conf.host
    env = os.environ.get("TABBY_HOST")
    name, source = (env, "TABBY_HOST") if env else (_socket.gethostname(), "this machine's hostname")
    try:
        return check_name(name)
    except ValueError:
        raise CniError(INVALID_ENV if env else INVALID_CONF, f"{source} cannot name a tabby Host",
                       f"{name[:80]!r}: set host in the network configuration") from None


def _attachment(conf: NetConf, env: Env) -> str:
    return f"{host_name(conf)}/{env.container_id}/{env.ifname}"


def lock_key(host_netns_inode: int, container_id: str, ifname: str) -> str:
    """An attachment's lock key. It has the host's network namespace in it: the veth names that
    ADD makes are unique per host namespace, and two hosts of a lab share one /run."""
    return f"{host_netns_inode}/{container_id}/{ifname}"


@contextlib.contextmanager
def _locked(env: Env) -> Iterator[AttachmentLock]:
    here = os.stat("/proc/thread-self/ns/net").st_ino
    try:
        with AttachmentLock(lock_key(here, env.container_id, env.ifname)) as lock:
            yield lock
    except LockTimeout as e:
        raise CniError(TRY_AGAIN, "attachment busy", str(e)) from None


# -- ADD -----------------------------------------------------------------------------------

def add(conf: NetConf, env: Env, ctx: Context | None = None, phases: Phases | None = None) -> dict[str, Any]:
    ctx = ctx or Context()
    ph = phases or Phases()
    try:
        req = request(conf)
    except ConfError as e:
        raise CniError(INVALID_CONF, "invalid network configuration", str(e)) from None
    try:
        ns_fd = nl.open_netns(env.netns)
    except ValueError as e:
        raise CniError(INVALID_ENV, f"CNI_NETNS: {e}") from None
    try:
        if os.fstat(ns_fd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
            raise CniError(INVALID_ENV, "CNI_NETNS: is the plugin's own network namespace, not a container's")
        store, ipam = ctx.open(conf.store)
        ph.mark("setup")
        with _locked(env) as lock:
            ph.mark("lock")
            return _add_locked(conf, env, req, store, ipam, lock, ns_fd, ph)
    finally:
        os.close(ns_fd)


def _add_locked(conf: NetConf, env: Env, req: Request, store: Any, ipam: Any, lock: AttachmentLock, ns_fd: int,
                ph: Phases) -> dict[str, Any]:
    from tabby.ipam import Contention, CorruptRecord, IpamError, NoPool, PoolExhausted
    from tabby.ipam.allocator import HandleExists
    from tabby.store import StoreError

    handle, attachment, hostif = handle_of(conf, env), _attachment(conf, env), host_ifname(env.container_id,
                                                                                            env.ifname)
    state = lock.read()
    try:
        rec = ipam.handle(handle)
    except CorruptRecord as e:  # never overwritten: an operator's to look at, and a retry won't do
        raise CniError(IO_FAILURE, "this attachment's IPAM handle record is corrupt", str(e)) from None
    except (StoreError, ValueError) as e:
        raise CniError(TRY_AGAIN, "store unavailable", str(e)) from None
    ph.mark("read")
    if rec is not None and rec.attachment not in (None, attachment):
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID/CNI_IFNAME: attachment {env.container_id}/{env.ifname} of "
                                    f"network {conf.name} is held by {rec.attachment}")
    if rec is not None and state.get("state") not in ("adding", "deleting") and rec.addresses:
        existing = _intact(conf, env, store, rec, hostif, ns_fd)
        if existing is None:
            # there, but broken (a new namespace, a deleted veth): rebuilt on the addresses it has
            v6 = [a.ip for a in rec.addresses if ":" in a.ip]
            v4 = [a.ip for a in rec.addresses if ":" not in a.ip]
            _unplumb(hostif)
            existing = _plumb_and_record(conf, env, req, store, ns_fd, hostif, handle, v6, v4, ph)
        lock.remove()
        return build(conf.cni_version, existing, conf.prev_result, conf.mtu, _nameservers(conf, ipam, existing))
    if rec is not None or state:
        _teardown(conf, env, store, ipam, handle, hostif, deep=True)  # what an ADD that died left
    lock.write({"state": "adding", "handle": handle})
    try:
        want6 = int(conf.ipv6 and not any(ip.version == 6 for ip in req.ips))
        want4 = int(conf.ipv4 and not any(ip.version == 4 for ip in req.ips))
        got = ipam.assign_attachment(handle, host_name(conf), attachment, ipv6=want6, ipv4=want4,
                                     addresses=req.ips, endpoint=endpoint_name(conf, env),
                                     pools={6: conf.ipv6_pool, 4: conf.ipv4_pool})
    except HandleExists as e:  # another host's ADD of the same attachment, this instant
        lock.remove()
        raise CniError(TRY_AGAIN, "attachment is being added elsewhere", str(e)) from None
    except (PoolExhausted, CorruptRecord) as e:  # exhausted, or a record in the way is corrupt: final
        lock.remove()
        raise CniError(IO_FAILURE, "address allocation failed", str(e)) from None
    except Contention as e:
        lock.remove()
        raise CniError(TRY_AGAIN, "address allocation failed", str(e)) from None
    except NoPool as e:
        lock.remove()
        if conf.ipv6_pool or conf.ipv4_pool:  # a pool the config names is absent or disabled
            raise CniError(INVALID_CONF, "ipv6_pool/ipv4_pool: no such enabled pool", str(e)) from None
        raise CniError(TRY_AGAIN, "address allocation failed", str(e)) from None  # none yet: may come
    except (IpamError, ValueError) as e:
        lock.remove()
        raise CniError(INVALID_CONF if req.ips else TRY_AGAIN, "address allocation failed", str(e)) from None
    except StoreError as e:
        lock.remove()
        raise CniError(TRY_AGAIN, "store unavailable", str(e)) from None
    ph.mark("ipam")
    try:
        v6 = [str(a.ip) for a in got if a.ip.version == 6]
        v4 = [str(a.ip) for a in got if a.ip.version == 4]
        plumbed = _plumb_and_record(conf, env, req, store, ns_fd, hostif, handle, v6, v4, ph)
    except BaseException as e:
        with contextlib.suppress(Exception):
            # the addresses and the Endpoint go back; an interface of the veth's name that was there
            # before (_Exists) is not this attachment's, and stays
            _teardown(conf, env, store, ipam, handle, hostif, deep=False, veth=not isinstance(e, _Exists))
            lock.remove()
        raise
    lock.remove()  # done: nothing is in flight for this attachment
    return build(conf.cni_version, plumbed, conf.prev_result, conf.mtu, _nameservers(conf, ipam, plumbed))


def _nameservers(conf: NetConf, ipam: Any, p: Plumbed) -> tuple[str, ...]:
    """The DNS64 resolver (Config dns64_server) for an attachment with an address in a nat64
    pool: the runtime writes it into the container's resolv.conf. A Store that fails here costs
    the result its resolver, never the ADD (the container has its addresses already)."""
    import ipaddress

    from tabby.ipam import IpamError
    from tabby.store import StoreError

    try:
        nat = [pl.spec.cidr for pl in ipam.pools() if getattr(pl.spec, "nat64", False)]
        if not any(ipaddress.ip_address(a.partition("/")[0]) in net for a, _ in p.ips if ":" in a for net in nat):
            return ()
        server = ipam.config_value(host_name(conf), "dns64_server")
    except (StoreError, IpamError, ValueError, AttributeError, TypeError) as e:  # the Store, a record it can't read
        import logging

        logging.getLogger(__name__).warning("no DNS64 resolver in the result: %s", e)
        return ()
    return () if server is None else (str(server),)


def _gateway6(conf: NetConf, store: Any) -> str:
    if conf.ipv6_gateway != "proxy-ndp":
        return HOST_LL
    from tabby.client import ResourceClient

    host = ResourceClient(store).get("Host", host_name(conf))
    if host is None or host.spec.ipv6_address is None:
        raise CniError(INVALID_CONF, "ipv6_gateway: proxy-ndp needs this Host's IPv6 fabric address")
    return str(host.spec.ipv6_address)


def _plumb_and_record(conf: NetConf, env: Env, req: Request, store: Any, ns_fd: int, hostif: str, handle: str,
                      v6: list[str], v4: list[str], ph: Phases) -> Plumbed:
    """The veth, the container side and the Endpoint; on failure the veth is removed again."""
    from tabby.store import StoreError

    gw6 = _gateway6(conf, store) if v6 else ""
    try:
        plumbed = _plumb(env, ns_fd, hostif, v6, v4, gw6, req.mac, conf.mtu, ph)
    except _Exists:
        raise  # the interface of that name is not ours to remove: another network's, of this container
    except nl.NetlinkError as e:
        _unplumb(hostif)
        raise CniError(IO_FAILURE, "interface setup failed", str(e)) from None
    except BaseException:
        _unplumb(hostif)
        raise
    try:
        _write_endpoint(conf, env, req, store, handle, plumbed, gw6)
    except BaseException as e:
        _unplumb(hostif)
        if isinstance(e, StoreError):
            raise CniError(TRY_AGAIN, "store unavailable", str(e)) from None
        if isinstance(e, ValueError):
            raise CniError(INVALID_CONF, "invalid endpoint", str(e)) from None
        raise
    ph.mark("endpoint")
    return plumbed


class _Exists(CniError):
    """The veth could not be made: an interface of its name is there already."""


def _plumb(env: Env, ns_fd: int, hostif: str, v6: list[str], v4: list[str], gw6: str, mac: str | None,
           mtu: int | None, ph: Phases) -> Plumbed:
    ifname = env.ifname
    with nl.Netlink() as host:
        try:
            host.add_veth(hostif, HOST_MAC, ifname, ns_fd, peer_mac=mac, mtu=mtu)
        except nl.NetlinkError as e:
            if e.errno == errno.EEXIST:  # nothing was made (a veth is made whole or not at all)
                raise _Exists(IO_FAILURE, f"CNI_IFNAME: {ifname} exists in CNI_NETNS (or host interface {hostif} "
                                          "exists)", str(e)) from None
            raise
        # DAD off on the host end before it is up: its link-local must work at once
        nl.write_sysctl(f"ipv6/conf/{hostif}/accept_dad", "0")
        host.run([host.set_up(hostif)])
    ph.mark("veth")

    def container_side() -> dict[str, Any]:
        if v6:
            nl.write_sysctl(f"ipv6/conf/{ifname}/accept_dad", "0")
        with nl.Netlink() as c:
            link = c.link(ifname)
            if link is None:
                raise CniError(IO_FAILURE, f"{ifname} vanished from CNI_NETNS")
            i = link["index"]
            reqs = [c.set_up(ifname)]
            reqs += [c.add_address(i, a, 128) for a in v6]
            reqs += [c.add_address(i, a, 32) for a in v4]
            if v4:
                reqs.append(c.add_neighbour(i, V4_GATEWAY, HOST_MAC))
            c.run(reqs)
            # the gateway and default routes: a second attachment in one container finds the first
            # one's there, and leaves them to it (the first network keeps the default route)
            routes = []
            if v6:
                if gw6 != HOST_LL:
                    routes.append(c.add_route(i, f"{gw6}/128"))
                routes.append(c.add_route(i, "::/0", gw6, mtu))
            if v4:
                routes += [c.add_route(i, f"{V4_GATEWAY}/32"),
                           c.add_route(i, "0.0.0.0/0", V4_GATEWAY, mtu, onlink=True)]
            c.run(routes, ok=(errno.EEXIST,))
            return link

    link = nl.in_netns(ns_fd, container_side)
    ph.mark("container")
    ips = tuple((f"{a}/128", gw6) for a in v6) + tuple((f"{a}/32", V4_GATEWAY) for a in v4)
    routes = ((("::/0", gw6),) if v6 else ()) + ((("0.0.0.0/0", V4_GATEWAY),) if v4 else ())
    return Plumbed(hostif, HOST_MAC, ifname, link["mac"], env.netns, link["mtu"], ips, routes)


def _unplumb(hostif: str) -> None:
    """Delete the veth by its host end (which takes the container end with it); gone is fine."""
    with nl.Netlink() as host:
        host.delete_link(hostif)


def _write_endpoint(conf: NetConf, env: Env, req: Request, store: Any, handle: str, p: Plumbed, gw6: str) -> None:
    """Create the Endpoint; one already there is replaced only if it is this attachment's."""
    from tabby.model import light
    from tabby.model.keys import endpoint_key
    from tabby.store import AlreadyExists, NotFound, RevisionMismatch

    spec: dict[str, Any] = {"host": host_name(conf), "orchestrator": "container", "workload_id": handle,
                            "interface": p.host_if, "mac": p.mac,
                            # "addr/128": the form the model writes, so light.endpoint_record's fast path takes it
                            "ipv6_addresses": [a for a, _ in p.ips if ":" in a],
                            "ipv4_addresses": [a for a, _ in p.ips if ":" not in a]}
    if gw6 and gw6 != HOST_LL:
        spec["ipv6_gateway"] = gw6
    if conf.profiles:
        spec["profiles"] = conf.profiles
    labels = {**conf.labels, **req.labels, "cni.network": conf.name}
    name = endpoint_name(conf, env)
    key = endpoint_key(spec["host"], name)
    value = light.endpoint_record({"kind": "Endpoint", "metadata": {"name": name, "labels": labels}, "spec": spec})
    for _ in range(5):
        try:
            store.create(key, value)
            return
        except AlreadyExists:
            pass
        kv = store.get(key)
        if kv is None:
            continue
        try:
            mine = light.read(kv.key, kv.value, "Endpoint").spec.workload_id == handle
        except ValueError:
            mine = False
        if not mine:
            raise CniError(INVALID_ENV, f"CNI_CONTAINERID: Endpoint {endpoint_name(conf, env)} belongs to another "
                                        "workload")
        try:
            store.update(key, value, kv.mod_revision)
            return
        except (RevisionMismatch, NotFound):
            continue
    raise CniError(TRY_AGAIN, f"Endpoint {endpoint_name(conf, env)} keeps changing")


def _intact(conf: NetConf, env: Env, store: Any, rec: Any, hostif: str, ns_fd: int) -> Plumbed | None:
    """The attachment as it is, if everything is there: Endpoint, host end, container end paired
    with it, all addresses. None if anything is missing or different."""
    from tabby.model import light
    from tabby.model.keys import endpoint_key

    kv = store.get(endpoint_key(host_name(conf), endpoint_name(conf, env)))
    if kv is None:
        return None
    try:
        ep = light.read(kv.key, kv.value, "Endpoint")
    except ValueError:
        return None
    want = {a.ip for a in rec.addresses}
    have = {str(a.ip) for a in (*ep.spec.ipv6_addresses, *ep.spec.ipv4_addresses)}
    if ep.spec.workload_id != rec.handle or ep.spec.interface != hostif or want != have:
        return None
    with nl.Netlink() as host:
        hlink = host.link(hostif)
    if hlink is None or hlink["kind"] != "veth" or hlink["mac"] != HOST_MAC:
        return None

    def look() -> tuple[dict[str, Any] | None, set[str]]:
        with nl.Netlink() as c:
            link = c.link(env.ifname)
            return link, (c.addresses(link["index"]) if link else set())

    link, addrs = nl.in_netns(ns_fd, look)
    if link is None or link["peer"] != hlink["index"]:
        return None
    v6 = sorted(a for a in want if ":" in a)
    v4 = sorted(a for a in want if ":" not in a)
    wanted = {f"{a}/128" for a in v6} | {f"{a}/32" for a in v4}
    if not wanted <= addrs:
        return None
    gw6 = str(ep.spec.ipv6_gateway) if ep.spec.ipv6_gateway else HOST_LL
    ips = tuple((f"{a}/128", gw6) for a in v6) + tuple((f"{a}/32", V4_GATEWAY) for a in v4)
    routes = ((("::/0", gw6),) if v6 else ()) + ((("0.0.0.0/0", V4_GATEWAY),) if v4 else ())
    return Plumbed(hostif, HOST_MAC, env.ifname, link["mac"], env.netns, link["mtu"], ips, routes)


# -- DEL, GC -------------------------------------------------------------------------------

# GC leaves an attachment made this recently (by its handle record's ``created``): the runtime's
# list of valid attachments is made before it calls GC, so an ADD in flight then is not in it.
# Longer than an ADD can take (its lock wait is bounded at 120 s, lock.py).
GC_GRACE_S = 300.0

def _teardown(conf: NetConf, env: Env, store: Any, ipam: Any, handle: str, hostif: str, deep: bool,
              veth: bool = True) -> None:
    """Veth, Endpoint (if it is this attachment's) and allocation; ``deep`` also frees what a
    dead ADD left in this host's blocks without recording it in the handle."""

    from tabby.ipam import CorruptRecord

    try:
        rec, corrupt = ipam.handle(handle), False
    except CorruptRecord:
        rec, corrupt = None, True  # the Endpoint and veth go all the same; release_handle below reports it
    if veth and (rec is not None or corrupt or deep):
        # an attachment's veth lives only while its handle record does (ADD assigns before it plumbs;
        # every rollback and teardown unplumbs before it releases): with no record, a veth of that
        # name is another network's attachment of the same container and ifname, and stays
        _unplumb(hostif)
    _delete_endpoints(conf, env, store, handle, rec)
    ipam.release_handle(handle)
    if deep:
        cidrs = {a.cidr for a in ipam.claims(host_name(conf))}
        if rec is not None:
            cidrs |= {a.block for a in rec.addresses}
        ipam.release_strays(handle, sorted(cidrs))


def _delete_endpoints(conf: NetConf, env: Env, store: Any, handle: str, rec: Any) -> None:
    """The attachment's Endpoint (under its name, and the one its handle names), if it is its."""
    from tabby.model import light
    from tabby.model.keys import endpoint_key
    from tabby.store import NotFound, RevisionMismatch

    names = {endpoint_name(conf, env)} | ({rec.endpoint} if rec is not None and rec.endpoint else set())
    for name in sorted(names):
        kv = store.get(endpoint_key(host_name(conf), name))
        if kv is None:
            continue
        try:
            mine = light.read(kv.key, kv.value, "Endpoint").spec.workload_id == handle
        except ValueError:
            mine = True  # a corrupt record under this attachment's name: ours to remove
        if mine:
            with contextlib.suppress(NotFound, RevisionMismatch):
                store.delete(kv.key, expected_revision=kv.mod_revision)


def delete(conf: NetConf, env: Env, ctx: Context | None = None, phases: Phases | None = None) -> None:
    """Idempotent: whatever is already gone counts as removed. A corrupt handle record is never
    rewritten: the Endpoint and veth go, the record stays (code 5, naming it).

    In the warm server (``ctx.background``) DEL answers once the Endpoint is gone (the agent
    withdraws the routes at once) and the attachment is marked "deleting"; the veth deletion
    (~15-25 ms in the kernel: it waits for an RCU grace period) and then the address release
    go on after the answer, still holding the attachment's lock, so any next ADD, DEL, CHECK
    or GC of it waits for them. Addresses are freed only once no interface has them. Should
    the server die in between, the "deleting" mark makes the next caller finish the job."""
    from tabby.ipam import CorruptRecord, IpamError
    from tabby.store import StoreError

    ctx = ctx or Context()
    ph = phases or Phases()
    store, ipam = ctx.open(conf.store)
    handle, hostif = handle_of(conf, env), host_ifname(env.container_id, env.ifname)
    try:
        with _locked(env) as lock:
            ph.mark("lock")
            state = lock.read()
            try:
                rec = ipam.handle(handle)
            except CorruptRecord:
                rec, state = None, {"state": "deleting"}  # the slow path, which reports the record
            if rec is not None and rec.attachment not in (None, _attachment(conf, env)):
                _unplumb(hostif)  # another host's attachment of the same name: only our veth is ours
                lock.remove()
                return
            deep = state.get("state") in ("adding", "deleting")
            if ctx.background and not deep:
                _delete_endpoints(conf, env, store, handle, rec)
                lock.write({"state": "deleting", "handle": handle})
                ph.mark("endpoint")
                fd = os.dup(lock.fd)  # the lock goes on with the background work

                def rest() -> None:
                    try:
                        _teardown(conf, env, store, ipam, handle, hostif, deep=False)
                        _release_legacy(conf, env, store, ipam, hostif)
                        lock.remove()
                    finally:
                        os.close(fd)

                ctx.later(rest)
                return
            _teardown(conf, env, store, ipam, handle, hostif, deep=deep)
            _release_legacy(conf, env, store, ipam, hostif)
            lock.remove()
            ph.mark("teardown")
    except IpamError as e:  # the handle's record is corrupt: nothing freed, the record left for an operator
        raise CniError(IO_FAILURE, "address release failed", str(e)) from None
    except (StoreError, ValueError) as e:
        raise CniError(TRY_AGAIN, "store unavailable", str(e)) from None


def _release_legacy(conf: NetConf, env: Env, store: Any, ipam: Any, hostif: str) -> None:
    legacy = ipam.handle(_legacy_handle(conf, env))
    if legacy is not None and legacy.attachment is None and legacy.endpoint == endpoint_name(conf, env):
        _teardown(conf, env, store, ipam, legacy.handle, hostif, deep=False)


def gc(conf: NetConf, raw: dict[str, Any], ctx: Context | None = None) -> list[str]:
    """Remove every attachment of this network on this host that the runtime does not list in
    ``cni.dev/valid-attachments`` (or libcni's older ``cni.dev/attachments``): allocation,
    Endpoint and veth. Without either list nothing is removed. Returns the handles removed."""
    from tabby.cni.inputs import check_container_id, check_ifname
    from tabby.ipam import IpamError

    listed = raw.get("cni.dev/valid-attachments", raw.get("cni.dev/attachments"))
    if listed is None:
        return []
    if not isinstance(listed, list):
        raise CniError(INVALID_CONF, "invalid network configuration", "cni.dev/valid-attachments: must be a list")
    valid = set()
    for i, a in enumerate(listed):
        if not isinstance(a, dict) or not isinstance(a.get("containerID"), str) or not isinstance(a.get("ifname"),
                                                                                                  str):
            raise CniError(INVALID_CONF, "invalid network configuration",
                           f"cni.dev/valid-attachments.{i}: must be {{containerID, ifname}}")
        valid.add(f"{a['containerID']}/{a['ifname']}")
    ctx = ctx or Context()
    store, ipam = ctx.open(conf.store)
    host = host_name(conf)
    removed = []
    started = ipam.clock()
    for h in ipam.handles():
        att = h.attachment
        if att is None or not att.startswith(f"{host}/"):
            continue
        pair = att[len(host) + 1:]
        if h.handle != f"{conf.name}.{pair}" or pair in valid:
            continue
        cid, _, ifname = pair.rpartition("/")
        try:
            env = Env("GC", check_container_id(cid), "", check_ifname(ifname))
        except CniError:
            continue  # not something our ADD wrote
        with _locked(env) as lock:
            # read again under its lock: an ADD that was running when the runtime made its list (so
            # the list could not name it) has finished by now; such a young attachment is left to
            # a later GC, where a list made after it names it if it is live
            try:
                rec = ipam.handle(h.handle)
            except IpamError:  # turned corrupt meanwhile: skipped, as the listing skips one
                continue
            if rec is None:  # a DEL took it meanwhile
                lock.remove()
                continue
            if rec.created is not None and rec.created > started - GC_GRACE_S:
                import logging

                logging.getLogger(__name__).info("GC: %s was made %.0f s before this GC: left to a later one",
                                                 h.handle, max(0.0, started - rec.created))
                continue
            _teardown(conf, env, store, ipam, h.handle, host_ifname(cid, ifname), deep=True)
            lock.remove()
        removed.append(h.handle)
    return removed


# -- CHECK, STATUS, VERSION ----------------------------------------------------------------

def check(conf: NetConf, env: Env, ctx: Context | None = None) -> None:
    if not at_least(conf.cni_version, "0.4.0"):
        raise CniError(INCOMPATIBLE, f"CHECK needs cniVersion 0.4.0 or later, not {conf.cni_version}")
    ctx = ctx or Context()
    store, ipam = ctx.open(conf.store)
    rec = ipam.handle(handle_of(conf, env))
    if rec is None:
        raise CniError(UNKNOWN_CONTAINER, f"no attachment {env.container_id}/{env.ifname} in network {conf.name}")
    try:
        ns_fd = nl.open_netns(env.netns)
    except ValueError as e:
        raise CniError(INVALID_ENV, f"CNI_NETNS: {e}") from None
    try:
        got = _intact(conf, env, store, rec, host_ifname(env.container_id, env.ifname), ns_fd)
    finally:
        os.close(ns_fd)
    if got is None:
        raise CniError(IO_FAILURE, f"attachment {env.container_id}/{env.ifname} is not intact",
                       "its Endpoint, veth or addresses are missing or changed")
    prev = conf.prev_result or {}
    ours = {a for a, _ in got.ips}
    for ip in prev.get("ips", []) if isinstance(prev.get("ips"), list) else []:
        addr = ip.get("address") if isinstance(ip, dict) else None
        if isinstance(addr, str) and addr not in ours and any(i.get("name") == env.ifname for i in
                                                               prev.get("interfaces", []) if isinstance(i, dict)):
            raise CniError(IO_FAILURE, f"prevResult address {addr} is not on {env.ifname}")


def status(conf: NetConf, ctx: Context | None = None) -> None:
    from tabby.store import StoreError

    try:
        store, _ = (ctx or Context()).open(conf.store)
        store.revision()
    except (CniError, ValueError, StoreError) as e:
        raise CniError(NOT_AVAILABLE, "the tabby store is not reachable", str(e)) from None


def version() -> dict[str, Any]:
    return {"cniVersion": SUPPORTED_VERSIONS[-1], "supportedVersions": list(SUPPORTED_VERSIONS)}
