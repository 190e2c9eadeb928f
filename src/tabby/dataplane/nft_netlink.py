"""nf_tables over raw nfnetlink: set-element patches (the policy's incremental path), whole
transactions (the replace that ``nft_encode`` builds), and the ruleset generation id.

Why not libnftables here: every libnftables command first reads the ruleset into its cache, which
with 10,000 endpoints and 1,000 rules costs ~30 ms per command and grows with the table. An
endpoint's arrival changes only set elements, and one NEWSETELEM/DELSETELEM batch does that in
well under a millisecond whatever the table holds. The generation id tells the drift check when
anyone else wrote. This module sends; what a table's messages hold is ``nft_encode``'s business.

A batch is one nf_tables transaction: if any element fails (say, deleting one that is not there)
the kernel applies none of it, and the caller falls back to replacing the table.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable

from tabby.dataplane.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_GETGEN = 12, 14, 16
NFPROTO_INET, AF_UNSPEC = 1, 0
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE, NFTA_GEN_ID = 1, 1, 1, 1
ELEMENTS_PER_MESSAGE = 800  # an attribute's length is 16 bits: keep each nest well under 64 KiB

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")

SO_SNDBUFFORCE = 32  # socket.h: SO_SNDBUF past net.core.wmem_max, for CAP_NET_ADMIN

class NftError(Exception):
    pass


def nla(kind: int, payload: bytes) -> bytes:
    n = _NLA.size + len(payload)
    return _NLA.pack(n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def _field(typ: str, value: str) -> bytes:
    if typ == "ifname":
        raw = value.encode()
        if len(raw) > 15:
            raise NftError(f"interface name {value!r} is longer than 15 bytes")
        return raw.ljust(16, b"\0")
    if typ == "ipv6_addr":
        return socket.inet_pton(socket.AF_INET6, value)
    if typ == "ipv4_addr":
        return socket.inet_pton(socket.AF_INET, value)
    if typ == "ether_addr":
        return bytes.fromhex(value.replace(":", "")).ljust(8, b"\0")  # padded to 4 bytes in a concat
    raise NftError(f"no key encoding for set type {typ}")


def key_bytes(typ: str | list[str], elem: tuple[str, ...]) -> bytes:
    """A set element's key as the kernel stores it; concatenated fields are each 4-byte aligned."""
    if isinstance(typ, str):
        raw = _field(typ, elem[0])
        return raw[:6] if typ == "ether_addr" else raw  # the padding is only for a concatenation
    return b"".join(_field(t, v) for t, v in zip(typ, elem, strict=True))


class NftSocket:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self._sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2  # the kernel doubles it
        self.seq = int.from_bytes(os.urandom(3), "big")

    def close(self) -> None:
        self.sock.close()

    def _msg(self, mtype: int, flags: int, family: int, res_id: int, payload: bytes) -> tuple[int, bytes]:
        self.seq += 1
        body = _NFGEN.pack(family, 0, res_id) + payload
        return self.seq, _HDR.pack(_HDR.size + len(body), mtype, flags, self.seq, 0) + body

    def _room_for(self, size: int) -> None:
        """A batch is one message train the kernel takes in one sendmsg: past the socket's send
        buffer (~200 KB, a few thousand elements) it fails with EMSGSIZE. Grow the buffer to fit
        (SO_SNDBUFFORCE passes the sysctl cap; root has CAP_NET_ADMIN), as libnftables does."""
        if size > self._sndbuf:
            want = size + (1 << 16)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
            self._sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2

    def set_elements(self, table: str, changes: Iterable[tuple[bool, str, str | list[str], list[tuple[str, ...]]]]
                     ) -> None:
        """One transaction: (add?, set name, set type, elements) for each set. Raises NftError."""
        parts: list[bytes] = []
        seqs: list[int] = []
        _, begin = self._msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, AF_UNSPEC,
                             socket.htons(NFNL_SUBSYS_NFTABLES), b"")
        parts.append(begin)
        tname = nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
        for add, set_name, typ, elems in changes:
            mtype = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if add else NFT_MSG_DELSETELEM)
            flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if add else 0)
            sname = nla(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
            for i in range(0, len(elems), ELEMENTS_PER_MESSAGE):
                nest = b"".join(
                    nla(NFTA_LIST_ELEM | NLA_F_NESTED,
                         nla(NFTA_SET_ELEM_KEY | NLA_F_NESTED, nla(NFTA_DATA_VALUE, key_bytes(typ, e))))
                    for e in elems[i:i + ELEMENTS_PER_MESSAGE])
                seq, msg = self._msg(mtype, flags, NFPROTO_INET, 0,
                                     tname + sname + nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, nest))
                parts.append(msg)
                seqs.append(seq)
        if not seqs:
            return
        _, end = self._msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, AF_UNSPEC, socket.htons(NFNL_SUBSYS_NFTABLES), b"")
        parts.append(end)
        batch = b"".join(parts)
        self._room_for(len(batch))
        self.sock.sendall(batch)
        errors = self._acks(set(seqs))
        if errors:
            raise NftError("; ".join(sorted({os.strerror(e) for e in errors})))

    def transaction(self, msgs: list[tuple[int, int, bytes]]) -> None:
        """One batch of (nf_tables message type, flags, attributes), all in table family inet:
        applied whole or not at all. Raises NftError with the kernel's reasons.

        Only the last message asks for an ack: the kernel runs the batch inside sendmsg and
        reports every failing message anyway, so thousands of acks would only fill the receive
        buffer. A failed commit is reported against the batch-begin message instead."""
        if not msgs:
            return
        begin_seq, begin = self._msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, AF_UNSPEC,
                                     socket.htons(NFNL_SUBSYS_NFTABLES), b"")
        parts = [begin]
        last = len(msgs) - 1
        seq = 0
        for i, (mtype, flags, attrs) in enumerate(msgs):
            seq, msg = self._msg((NFNL_SUBSYS_NFTABLES << 8) | mtype, flags | (NLM_F_ACK if i == last else 0),
                                 NFPROTO_INET, 0, attrs)
            parts.append(msg)
        _, end = self._msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, AF_UNSPEC, socket.htons(NFNL_SUBSYS_NFTABLES), b"")
        parts.append(end)
        batch = b"".join(parts)
        self._room_for(len(batch))
        self.sock.sendall(batch)
        errors = self._acks({seq}, also=begin_seq)
        if errors:
            raise NftError("; ".join(sorted({os.strerror(e) for e in errors})))

    def _acks(self, waiting: set[int], also: int | None = None) -> list[int]:
        errors: list[int] = []
        while waiting:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise NftError("no answer from nf_tables within 5 s") from None
            off = 0
            while off + _HDR.size <= len(data):
                n, mtype, _flags, seq, _pid = _HDR.unpack_from(data, off)
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, off + _HDR.size)
                    if code:
                        errors.append(-code)
                        if seq == also:  # the commit failed: the kernel dropped the other acks
                            waiting.clear()
                    waiting.discard(seq)
                off += (n + 3) & ~3
        return errors

    def generation(self) -> int:
        """The ruleset generation: it moves on with every nf_tables transaction, anyone's."""
        seq, msg = self._msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST, AF_UNSPEC, 0, b"")
        self.sock.sendall(msg)
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise NftError("no answer to GETGEN within 5 s") from None
            n, mtype, _flags, rseq, _pid = _HDR.unpack_from(data, 0)
            if rseq != seq:
                continue
            if mtype == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, _HDR.size)
                raise NftError(f"GETGEN: {os.strerror(-code)}")
            off = _HDR.size + _NFGEN.size
            while off + 4 <= n:
                ln, kind = _NLA.unpack_from(data, off)
                if kind & 0x3FFF == NFTA_GEN_ID:
                    return int(struct.unpack_from("!I", data, off + 4)[0])
                off += (ln + 3) & ~3
            raise NftError("GETGEN: no generation id in the answer")
