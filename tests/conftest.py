"""Shared fixtures: a real etcd for the session, and a fresh Store per test on each backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tabby.lab.etcd import EtcdCluster, EtcdServer
from tabby.store import Store, open_store

# No per-example deadline: it is a timing assertion (speed is measured in bench/), and on a
# loaded 2-core machine it failed correct code with DeadlineExceeded.
settings.register_profile("tabby", deadline=None)
settings.load_profile("tabby")


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer(name=f"tbyt-{uuid.uuid4().hex[:6]}") as server:
        yield server


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three etcd members on loopback with TLS (certificates made for this module), auth off; one
    per module (tests that kill members leave every member running again)."""
    cluster = EtcdCluster.create(3, tls=True, name=f"tbyc-{uuid.uuid4().hex[:6]}",
                                 directory=tmp_path_factory.mktemp("etcd-cluster"))
    with cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/store.db"
    return request.getfixturevalue("etcd_server").url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own: tests share one etcd."""
    return f"/t/{uuid.uuid4().hex[:10]}/"
