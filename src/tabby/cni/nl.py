"""The CNI plugin's own netlink: a veth pair, its addresses, routes and a neighbour, in two
namespaces, without a process and without a string that a command would parse.

Standard library only (``struct``, ``socket``), messages packed by hand: the plugin is on a
latency path where pyroute2's import (~160 ms) and message objects cost more than the work.

Namespaces: a netlink socket belongs to the network namespace of the thread that created it.
The host side uses a socket made in the calling thread's namespace (the server's, or the
in-process plugin's). The container side runs in a short-lived thread that enters the
container's namespace with ``setns(2)`` on an already opened and type-checked namespace fd
(``in_netns``), makes its socket and writes its ``/proc/sys/net`` files there: on this kernel
(6.x) ``/proc/sys/net`` shows the namespace of the thread that opens the file (checked: a thread
after setns lists only the container's ``lo`` under ``/proc/sys/net/ipv6/conf``, the other
threads still the host's interfaces), while ``/proc/self/net`` follows the process's main thread.
The thread ends after its work, so no thread of the caller is ever left in another namespace.

Every request asks for an ack; errors come back as ``NetlinkError`` with the kernel's errno and
extended-ack message, naming what was being done.
"""

from __future__ import annotations

# the C module, not socket.py: the wrapper (and the selectors it imports, ~4 ms) adds nothing for raw
# netlink sockets, and a CNI plugin process pays every import
import _socket as socket
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x200, 0x400, 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH = 28
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 5, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_METRICS, RTA_TABLE = 1, 4, 5, 8, 15
RTAX_MTU = 2
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTNH_F_ONLINK = 0x4
NLA_F_NESTED = 0x8000
SOL_NETLINK, NETLINK_EXT_ACK, NETLINK_CAP_ACK = 270, 11, 10
NLMSGERR_ATTR_MSG = 1
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on a namespace fd: its CLONE_NEW* type (Linux 4.11)

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BBHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BBHiHBB")
_RTA = struct.Struct("=HH")

AF = {4: socket.AF_INET, 6: socket.AF_INET6}


class NetlinkError(OSError):
    def __init__(self, err: int, what: str, detail: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}{f' ({detail})' if detail else ''}")
        self.what = what


def _attr(kind: int, payload: bytes) -> bytes:
    n = _RTA.size + len(payload)
    return _RTA.pack(n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= len(data):
        n, kind = _RTA.unpack_from(data, offset)
        if n < 4:
            return
        yield kind & 0x3FFF, data[offset + 4: offset + n]
        offset += (n + 3) & ~3


def _name(name: str) -> bytes:
    return _attr(IFLA_IFNAME, name.encode() + b"\0")


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _u32(v: int) -> bytes:
    return struct.pack("=I", v)


class Netlink:
    """One NETLINK_ROUTE socket in the namespace of the thread that made it; one owner thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.bind((0, 0))
        except OSError:
            self.sock.close()
            raise
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _msg(self, mtype: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self.seq += 1
        return self.seq, _HDR.pack(_HDR.size + len(body), mtype, NLM_F_REQUEST | flags, self.seq, 0) + body

    def run(self, requests: list[tuple[str, int, int, bytes]], ok: tuple[int, ...] = ()) -> None:
        """Send (what, type, flags, body) requests in one write, each with an ack, and wait for all
        acks; raise NetlinkError for the first that failed (errnos in ``ok`` count as success).
        The kernel handles one socket's messages in order, so a later one sees the earlier ones."""
        pending: dict[int, str] = {}
        buf = b""
        for what, mtype, flags, body in requests:
            seq, msg = self._msg(mtype, flags | NLM_F_ACK, body)
            pending[seq] = what
            buf += msg
        self.sock.send(buf)
        first: NetlinkError | None = None
        while pending:
            data = self.sock.recv(65536)
            off = 0
            while off + _HDR.size <= len(data):
                length, mtype, _, seq, _ = _HDR.unpack_from(data, off)
                if mtype == NLMSG_ERROR and seq in pending:
                    what = pending.pop(seq)
                    err = -struct.unpack_from("=i", data, off + 16)[0]
                    if err and err not in ok and first is None:
                        first = NetlinkError(err, what, _extack(data[off + 16 + 20: off + length]))
                off += (length + 3) & ~3
                if length < _HDR.size:
                    break
        if first is not None:
            raise first

    def dump(self, mtype: int, body: bytes) -> Iterator[bytes]:
        seq, msg = self._msg(mtype, NLM_F_DUMP, body)
        self.sock.send(msg)
        while True:
            data = self.sock.recv(1 << 18)
            off = 0
            while off + _HDR.size <= len(data):
                length, t, _, s, _ = _HDR.unpack_from(data, off)
                if s == seq:
                    if t == NLMSG_DONE:
                        return
                    if t == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, off + 16)[0]
                        if err:
                            raise NetlinkError(err, "dump")
                    else:
                        yield data[off + 16: off + length]
                if length < _HDR.size:
                    break
                off += (length + 3) & ~3

    # -- links ---------------------------------------------------------------------------

    def add_veth(self, name: str, mac: str, peer: str, peer_ns_fd: int, peer_mac: str | None = None,
                 mtu: int | None = None) -> None:
        """A veth pair: ``name`` here (down, with mac), ``peer`` made directly in the namespace of
        ``peer_ns_fd`` (no move afterwards, which would drop its addresses). Fails with EEXIST if
        either name is taken."""
        mtu_attr = _attr(IFLA_MTU, _u32(mtu)) if mtu else b""
        peer_body = (_IFINFO.pack(0, 0, 0, 0, 0, 0) + _name(peer) + _attr(IFLA_NET_NS_FD, _u32(peer_ns_fd))
                     + (_attr(IFLA_ADDRESS, _mac(peer_mac)) if peer_mac else b"") + mtu_attr)
        body = (_IFINFO.pack(0, 0, 0, 0, 0, 0) + _name(name) + _attr(IFLA_ADDRESS, _mac(mac)) + mtu_attr
                + _nested(IFLA_LINKINFO, _attr(IFLA_INFO_KIND, b"veth\0"),
                          _nested(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_body))))
        self.run([(f"create veth {name} (peer {peer})", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)])

    def set_up(self, name: str) -> tuple[str, int, int, bytes]:
        return (f"set {name} up", RTM_SETLINK, 0, _IFINFO.pack(0, 0, 0, 0, IFF_UP, IFF_UP) + _name(name))

    def delete_link(self, name: str) -> bool:
        """Delete a link by name; False if there was none."""
        try:
            self.run([(f"delete {name}", RTM_DELLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0, 0) + _name(name))])
        except NetlinkError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    def link(self, name: str) -> dict[str, Any] | None:
        """index, mac, mtu, flags, kind and peer (IFLA_LINK) of a link, None if there is none."""
        seq, msg = self._msg(RTM_GETLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0, 0) + _name(name))
        self.sock.send(msg)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + _HDR.size <= len(data):
                length, t, _, s, _ = _HDR.unpack_from(data, off)
                if s == seq:
                    if t == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, off + 16)[0]
                        if err in (errno.ENODEV, errno.ENOENT):
                            return None
                        raise NetlinkError(err, f"read link {name}")
                    if t == RTM_NEWLINK:
                        return _parse_link(data[off + 16: off + length])
                if length < _HDR.size:
                    break
                off += (length + 3) & ~3

    # -- addresses, routes, neighbours ---------------------------------------------------

    @staticmethod
    def add_address(ifindex: int, ip: str, plen: int) -> tuple[str, int, int, bytes]:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        packed = socket.inet_pton(fam, ip)
        body = _IFADDR.pack(fam, plen, IFA_F_NODAD, RT_SCOPE_UNIVERSE, ifindex) + _attr(IFA_LOCAL, packed)
        body += _attr(IFA_ADDRESS, packed) + _attr(IFA_FLAGS, _u32(IFA_F_NODAD))
        return (f"add address {ip}/{plen}", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    @staticmethod
    def add_route(ifindex: int, dst: str, gateway: str | None = None, mtu: int | None = None,
                  onlink: bool = False) -> tuple[str, int, int, bytes]:
        """dst "addr/len" on ifindex, via gateway when given (else a link-scope device route);
        ``onlink``: the gateway counts as on this link whatever other routes say."""
        ip, _, plen = dst.partition("/")
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        dst_len = int(plen)
        body = _RTMSG.pack(fam, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                           RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK, RTN_UNICAST, RTNH_F_ONLINK if onlink else 0)
        if dst_len:
            body += _attr(RTA_DST, socket.inet_pton(fam, ip))
        if gateway:
            body += _attr(RTA_GATEWAY, socket.inet_pton(fam, gateway))
        body += _attr(RTA_OIF, struct.pack("=i", ifindex))
        if mtu:
            body += _nested(RTA_METRICS, _attr(RTAX_MTU, _u32(mtu)))
        return (f"add route {dst}" + (f" via {gateway}" if gateway else ""), RTM_NEWROUTE,
                NLM_F_CREATE | NLM_F_EXCL, body)

    @staticmethod
    def add_neighbour(ifindex: int, ip: str, mac: str) -> tuple[str, int, int, bytes]:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        body = _NDMSG.pack(fam, 0, 0, ifindex, NUD_PERMANENT, 0, 0)
        body += _attr(NDA_DST, socket.inet_pton(fam, ip)) + _attr(NDA_LLADDR, _mac(mac))
        return (f"add neighbour {ip}", RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_EXCL, body)

    def addresses(self, ifindex: int) -> set[str]:
        """"addr/len" of every address on ifindex, both families."""
        out = set()
        for msg in self.dump(RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, 0)):
            fam, plen, _, _, index = _IFADDR.unpack_from(msg)
            if index != ifindex:
                continue
            for kind, val in _attrs(msg, _IFADDR.size):
                if kind == IFA_ADDRESS:
                    out.add(f"{socket.inet_ntop(fam, val)}/{plen}")
        return out

    def routes(self, ifindex: int) -> set[tuple[str, str]]:
        """(dst "addr/len", gateway or "") of main-table routes out of ifindex, both families."""
        out = set()
        for fam in (socket.AF_INET, socket.AF_INET6):
            for msg in self.dump(RTM_GETROUTE, _RTMSG.pack(fam, 0, 0, 0, 0, 0, 0, 0, 0)):
                _, dst_len, _, _, table, _, _, rtype, _ = _RTMSG.unpack_from(msg)
                dst, gw, oif = "", "", 0
                for kind, val in _attrs(msg, _RTMSG.size):
                    if kind == RTA_DST:
                        dst = socket.inet_ntop(fam, val)
                    elif kind == RTA_GATEWAY:
                        gw = socket.inet_ntop(fam, val)
                    elif kind == RTA_OIF:
                        oif = struct.unpack("=i", val)[0]
                    elif kind == RTA_TABLE:
                        table = struct.unpack("=I", val)[0]
                if oif == ifindex and table == RT_TABLE_MAIN and rtype == RTN_UNICAST:
                    out.add((f"{dst or ('::' if fam == socket.AF_INET6 else '0.0.0.0')}/{dst_len}", gw))
        return out


def _parse_link(msg: bytes) -> dict[str, Any]:
    _, _, _, index, flags, _ = _IFINFO.unpack_from(msg)
    out: dict[str, Any] = {"index": index, "flags": flags, "mac": None, "mtu": 0, "peer": 0, "kind": ""}
    for kind, val in _attrs(msg, _IFINFO.size):
        if kind == IFLA_ADDRESS and len(val) == 6:
            out["mac"] = ":".join(f"{b:02x}" for b in val)
        elif kind == IFLA_MTU:
            out["mtu"] = struct.unpack("=I", val)[0]
        elif kind == IFLA_LINK:
            out["peer"] = struct.unpack("=i", val)[0]
        elif kind == IFLA_LINKINFO:
            for k, v in _attrs(val):
                if k == IFLA_INFO_KIND:
                    out["kind"] = v.rstrip(b"\0").decode()
    return out


def _extack(attrs: bytes) -> str:
    for kind, val in _attrs(attrs):
        if kind == NLMSGERR_ATTR_MSG:
            return val.rstrip(b"\0").decode(errors="replace")
    return ""


# -- namespaces ----------------------------------------------------------------------------

def open_netns(path: str) -> int:
    """An fd on the network namespace file at path (O_RDONLY, close-on-exec), or ValueError
    saying why not: not absolute, missing, not a regular file (a FIFO or device is never opened),
    or a file that is no network namespace (NS_GET_NSTYPE)."""
    import fcntl
    import stat

    if not path.startswith("/") or "\0" in path:
        raise ValueError("must be an absolute path")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a namespace file")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            raise ValueError(f"{path} is not a namespace file") from None
        if nstype != CLONE_NEWNET:
            raise ValueError(f"{path} is a namespace, but not a network namespace")
    except BaseException:
        os.close(fd)
        raise
    return fd


_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(fd: int, fn: Callable[[], T]) -> T:
    """fn() in a new thread that first enters the network namespace of fd; its result or exception."""
    box: list[Any] = []

    def body() -> None:
        try:
            _setns(fd)
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller
            box.append((False, e))

    t = threading.Thread(target=body, name="tabby-cni-netns")
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def write_sysctl(path: str, value: str) -> None:
    """Write a /proc/sys file (path relative to /proc/sys/net/) from the calling thread's namespace."""
    fd = os.open(f"/proc/sys/net/{path}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
