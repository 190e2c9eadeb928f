"""Hypothesis drives random assign / release / claim sequences from several hosts against IPAM on
a real SQLite Store, and checks after every step that no address is handed out twice, nothing
leaks, and ``check`` stays clean."""

from __future__ import annotations

import ipaddress
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tabby.client import ResourceClient
from tabby.ipam import IPAM, AddressInUse, NotAllocated, PoolExhausted, StaleRelease
from tabby.ipam.blocks import address
from tabby.model import validate
from tabby.store import open_store

HOSTS = ["h1", "h2", "h3"]
V6, V4 = ipaddress.ip_network("fd00:e::/121"), ipaddress.ip_network("10.65.0.0/27")  # 128 and 32 addresses


class IpamMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tabby-ipam-sm-")
        self.store = open_store(f"sqlite://{self.dir}/s.db")
        client = ResourceClient(self.store)
        client.apply(validate({"kind": "IPPool", "metadata": {"name": "v6"}, "spec": {"cidr": str(V6)}}))
        client.apply(validate({"kind": "IPPool", "metadata": {"name": "v4"},
                               "spec": {"cidr": str(V4), "block_size": 28}}))
        self.ipam = {h: IPAM(self.store) for h in HOSTS}  # one allocator (and hint cache) per host
        self.owner: dict[str, tuple[str, int]] = {}  # ip -> (handle, seq): the model
        self.handles: dict[str, set[str]] = {}
        self.released: list[tuple[str, int]] = []
        self.n = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _free(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
        # the pool's first address is reserved, and an IPv4 pool's last (its broadcast address)
        reserved = 2 if net.version == 4 else 1
        return net.num_addresses - reserved - sum(1 for ip in self.owner if ipaddress.ip_address(ip) in net)

    @rule(host=st.sampled_from(HOSTS), v6=st.integers(0, 3), v4=st.integers(0, 2))
    def assign(self, host: str, v6: int, v4: int) -> None:
        if v6 + v4 == 0:
            return
        self.n += 1
        handle = f"net.c{self.n}"
        fits = v6 <= self._free(V6) and v4 <= self._free(V4)
        try:
            got = self.ipam[host].assign(handle, host, ipv6=v6, ipv4=v4)
        except PoolExhausted:
            assert not fits, "pool exhausted while the model still has room"
            return
        assert fits
        assert len(got) == v6 + v4
        for a in got:
            assert str(a.ip) not in self.owner, f"{a.ip} handed out twice"
            self.owner[str(a.ip)] = (handle, a.seq)
        self.handles[handle] = {str(a.ip) for a in got}

    @rule(host=st.sampled_from(HOSTS), offset=st.integers(0, V6.num_addresses - 1))
    def claim_specific(self, host: str, offset: int) -> None:
        ip = str(V6[offset])
        self.n += 1
        handle = f"port-{self.n}"
        try:
            a = self.ipam[host].assign_address(handle, host, ip)
        except AddressInUse:
            assert ip in self.owner or offset == 0
            return
        assert offset != 0, "the pool's first address was handed out"
        assert ip not in self.owner
        self.owner[ip] = (handle, a.seq)
        self.handles[handle] = {ip}

    @rule(data=st.data())
    def release_handle(self, data: st.DataObject) -> None:
        if not self.handles:
            return
        handle = data.draw(st.sampled_from(sorted(self.handles)))
        host = data.draw(st.sampled_from(HOSTS))
        freed = {str(ip) for ip in self.ipam[host].release_handle(handle)}
        assert freed == self.handles.pop(handle)
        for ip in freed:
            self.released.append((ip, self.owner.pop(ip)[1]))

    @rule(data=st.data())
    def release_address(self, data: st.DataObject) -> None:
        if not self.owner:
            return
        ip = data.draw(st.sampled_from(sorted(self.owner)))
        handle, seq = self.owner[ip]
        assert self.ipam["h1"].release_address(ip, seq) == handle
        del self.owner[ip]
        self.handles[handle].discard(ip)
        if not self.handles[handle]:
            del self.handles[handle]
        self.released.append((ip, seq))

    @rule(data=st.data())
    def stale_release(self, data: st.DataObject) -> None:
        if not self.released:
            return
        ip, seq = data.draw(st.sampled_from(self.released))
        if ip in self.owner and self.owner[ip][1] == seq:
            return  # not stale
        try:
            self.ipam["h2"].release_address(ip, seq)
            raise AssertionError(f"stale release of {ip} (seq {seq}) succeeded")
        except (StaleRelease, NotAllocated):
            pass

    @invariant()
    def consistent(self) -> None:
        ipam = self.ipam["h1"]
        assert ipam.check() == []
        allocated = {str(address(b, o)) for b, _ in ipam._all_blocks() for o in b.allocations}
        assert allocated == set(self.owner)  # nothing leaked, nothing lost
        for h in ipam.handles():
            assert {a.ip for a in h.addresses} == self.handles[h.handle]


IpamMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestIpamStateful = IpamMachine.TestCase
