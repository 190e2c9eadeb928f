"""etcd users and roles on a 3-member TLS cluster: each writer may write what it owns and nothing
else (etcd refuses, the error names the URL); wrong certificates and passwords are refused
naming the URL; the agent's status writer, denied, says so once and goes on."""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabby.agent.status import StatusWriter
from tabby.etcd_auth import NEUTRON_USER, ROOT_USER, agent_user, cni_user, provision, roles
from tabby.lab.etcd import EtcdCluster, Pki
from tabby.model.keys import (
    endpoint_key,
    endpoint_status_key,
    host_status_key,
    ipam_affinity_key,
    ipam_block_key,
    resource_key,
)
from tabby.store import PermissionDenied, Store, StoreError, Unavailable, open_store
from tabby.store.etcd import EtcdStore

HOSTS = ["h1", "h2"]


class AuthCluster:
    def __init__(self, cluster: EtcdCluster, pw_dir: Path) -> None:
        self.cluster, self.pw_dir = cluster, pw_dir

    def url(self, user: str, client: str = "root") -> str:
        return self.cluster.url(client, user=user, password_file=str(self.pw_dir / user))

    def open(self, user: str) -> Store:
        return open_store(self.url(user))


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthCluster]:
    d = tmp_path_factory.mktemp("etcd-auth")
    cluster = EtcdCluster.create(3, tls=True, name=f"tbya-{uuid.uuid4().hex[:6]}", directory=d / "cluster")
    grants = roles(HOSTS, neutron=True)
    passwords = {u: secrets.token_urlsafe(12) for u in [ROOT_USER, *grants]}
    for user, pw in passwords.items():
        (d / user).write_text(pw + "\n")
        (d / user).chmod(0o600)
    with cluster:
        admin = open_store(cluster.url())
        assert isinstance(admin, EtcdStore)
        provision(admin, passwords, grants)
        admin.close()
        root = open_store(cluster.url(user=ROOT_USER, password_file=str(d / ROOT_USER)))
        assert isinstance(root, EtcdStore)
        provision(root, passwords, grants)  # again, with auth on: idempotent
        root.close()
        yield AuthCluster(cluster, d)


def denied(store: Store, call: object, key: str) -> None:
    """call is refused by etcd, and the error names the member's URL, the user and the key."""
    with pytest.raises(PermissionDenied) as e:
        call()  # type: ignore[operator]
    assert re.search(r"store https://127\.0\.0\.1:\d+ \(user [a-z0-9-]+\): permission denied", str(e.value)), e.value
    assert key in str(e.value), e.value
    assert not isinstance(e.value, Unavailable)


def test_agent_reads_resources_and_writes_only_its_own_status(auth_cluster: AuthCluster) -> None:
    root = auth_cluster.open(ROOT_USER)
    ep_key = endpoint_key("h1", f"e{uuid.uuid4().hex[:6]}")
    root.put(ep_key, b"{}")
    agent = auth_cluster.open(agent_user("h1"))
    try:
        kvs, rev = agent.list("/tabby/v1/")
        assert ep_key in [kv.key for kv in kvs] and agent.revision() >= rev
        lease = agent.grant_lease(10)
        agent.put(host_status_key("h1"), b"{}", lease=lease)  # liveness with its lease
        assert lease is not None and lease.keep_alive()
        agent.put(endpoint_status_key("h1", "e"), b"{}")
        agent.delete(endpoint_status_key("h1", "e"))
        lease.revoke()
        w = agent.watch("/tabby/v1/", rev)
        root.put(ep_key, b'{"changed": 1}')
        assert next(iter(w)).key == ep_key
        w.close()
        denied(agent, lambda: agent.put(ep_key, b"{}"), ep_key)  # an Endpoint: not the agent's to write
        denied(agent, lambda: agent.create(resource_key("Host", "h9"), b"{}"), resource_key("Host", "h9"))
        denied(agent, lambda: agent.put(host_status_key("h2"), b"{}"), host_status_key("h2"))  # another host's
        denied(agent, lambda: agent.put(endpoint_status_key("h2", "e"), b"{}"), endpoint_status_key("h2", "e"))
        denied(agent, lambda: agent.get(host_status_key("h2")), host_status_key("h2"))
        assert root.get(host_status_key("h2")) is None
    finally:
        agent.close()
        root.close()


def test_cni_and_neutron_write_what_they_own(auth_cluster: AuthCluster) -> None:
    cni = auth_cluster.open(cni_user("h1"))
    neutron = auth_cluster.open(NEUTRON_USER)
    name = f"c{uuid.uuid4().hex[:6]}"
    try:
        cni.create(endpoint_key("h1", name), b"{}")
        denied(cni, lambda: cni.put(endpoint_key("h2", name), b"{}"), endpoint_key("h2", name))  # another host's
        cni.put(ipam_block_key(f"fd00:{uuid.uuid4().hex[:4]}::/122"), b"{}")
        cni.put(ipam_affinity_key("h1", "fd00:e::/122"), b"{}")
        theirs = ipam_affinity_key("h2", "fd00:e::/122")
        denied(cni, lambda: cni.put(theirs, b"{}"), theirs)
        denied(cni, lambda: cni.put(resource_key("IPPool", name), b"{}"), resource_key("IPPool", name))
        denied(cni, lambda: cni.put(host_status_key("h1"), b"{}"), host_status_key("h1"))
        neutron.put(resource_key("Profile", name), b"{}")
        neutron.put(resource_key("IPPool", name), b"{}")
        neutron.delete(endpoint_key("h1", name))
        neutron.put(endpoint_key("h2", name), b"{}")  # the driver writes every host's Endpoints
        neutron.delete(endpoint_key("h2", name))
        denied(neutron, lambda: neutron.put(resource_key("Host", name), b"{}"), resource_key("Host", name))
        denied(neutron, lambda: neutron.put(ipam_block_key("fd00:e::/122"), b"{}"), ipam_block_key("fd00:e::/122"))
    finally:
        cni.close()
        neutron.close()


def test_wrong_client_certificate_or_ca_refused_naming_the_url(auth_cluster: AuthCluster, tmp_path: Path) -> None:
    other = Pki.create(tmp_path / "other", ca_name="not-the-fabric-ca")
    other.issue("intruder")
    base = auth_cluster.url(ROOT_USER)
    for what, url in [
        ("client certificate of another CA",
         base.replace(str(auth_cluster.cluster.pki.cert("root")), str(other.cert("intruder")))  # type: ignore[union-attr]
             .replace(str(auth_cluster.cluster.pki.key("root")), str(other.key("intruder")))),  # type: ignore[union-attr]
        ("members' certificates not signed by the given CA",
         base.replace(str(auth_cluster.cluster.pki.ca), str(other.ca))),  # type: ignore[union-attr]
    ]:
        store = open_store(url)
        with pytest.raises(StoreError) as e:
            store.get("/tabby/v1/x")
        assert not isinstance(e.value, Unavailable), (what, e.value)  # waiting does not mend it
        assert all(f"store https://{m.endpoint}: TLS handshake failed" in str(e.value)
                   for m in auth_cluster.cluster.members), (what, e.value)
        print(f"{what}: {e.value}")
        store.close()


def test_wrong_password_refused_naming_the_url(auth_cluster: AuthCluster, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("not-the-password\n")
    store = open_store(auth_cluster.cluster.url(user=agent_user("h1"), password_file=str(tmp_path / "pw")))
    with pytest.raises(PermissionDenied, match=r"https://127\.0\.0\.1:\d+.*authentication failed"):
        store.get("/tabby/v1/x")
    store.close()
    nobody = open_store(auth_cluster.cluster.url())  # TLS, but no user at all
    with pytest.raises(PermissionDenied, match="user and password_file"):
        nobody.get("/tabby/v1/x")
    nobody.close()


def test_token_forgotten_by_a_restarted_cluster_is_fetched_again(auth_cluster: AuthCluster) -> None:
    """Every member restarted: a member that does not know the agent's token yet (it is still
    replaying its log) refuses requests with it, or cancels a watch opened with it; requests and
    the open watch then fetch a new one and go on, and the watch misses nothing. (Which of those
    a run meets depends on timing; the lab's compaction test met the cancelled watch.)"""
    agent = auth_cluster.open(agent_user("h1"))
    root = auth_cluster.open(ROOT_USER)
    key = resource_key("Profile", f"t{uuid.uuid4().hex[:6]}")
    got: list[bytes | None] = []
    failed: list[BaseException] = []
    w = None
    try:
        _, rev = agent.list("/tabby/v1/")  # has a token now
        w = agent.watch("/tabby/v1/", rev)

        def run() -> None:
            try:
                got.extend(ev.value for ev in w if ev.key == key)
            except Exception as e:
                failed.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        root.put(key, b"before")
        for m in auth_cluster.cluster.members:
            m.kill()
        for m in auth_cluster.cluster.members:
            m.spawn()
        for m in auth_cluster.cluster.members:
            m.wait_healthy()
        deadline = time.monotonic() + 20
        while True:
            try:
                agent.put(host_status_key("h1"), b"{}")
                root.put(key, b"after")
                break
            except Unavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        agent.list("/tabby/v1/")
        while got != [b"before", b"after"] and not failed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not failed and got == [b"before", b"after"], (failed, got)
    finally:
        if w is not None:
            w.close()
        for m in auth_cluster.cluster.members:  # (a no-op for a running one) the next tests need them
            m.spawn()
        agent.close()
        root.close()


def test_status_writer_denied_says_so_once_and_goes_on(auth_cluster: AuthCluster,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """An agent for h1 started with h2's credentials: every status write is refused. The writer
    logs the refusal once (not once per retry), keeps retrying, and stays alive."""
    store = auth_cluster.open(agent_user("h2"))
    writer = StatusWriter(store, "h1", ttl_s=3, retry_s=0.05, max_retry_s=0.2)
    caplog.set_level(logging.DEBUG, logger="tabby.agent.status")
    try:
        writer.start()
        writer.set("ep", "up")
        deadline = time.monotonic() + 20
        retries = lambda: [r for r in caplog.records if "not written, attempt" in r.getMessage()]  # noqa: E731
        while len(retries()) < 5:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        warned = [r for r in retries() if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and "permission denied" in warned[0].getMessage(), caplog.text
        assert writer.alive() and writer.failing is not None and "permission denied" in writer.failing
    finally:
        writer.stop()
        store.close()
    root = auth_cluster.open(ROOT_USER)
    assert root.get(endpoint_status_key("h1", "ep")) is None
    last = root.get(host_status_key("h1"))
    assert last is None or json.loads(last.value).get("host") != "h1"
    root.close()
