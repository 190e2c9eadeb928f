"""The lab prefix is validated text before it becomes a namespace name or a path: every lab command
refuses a hostile or over-broad one with a clear message, and nothing is deleted."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabby.lab import lab as L
from tabby.lab import netns
from tabby.lab.topology import check_prefix, topology
from tabby.model import validate
from tabby.store import open_store

HOSTILE = ["", "..", ".", "/", "../../x", "a/b", "tb", "TBL", "tbl-", "tbl;rm", "tbl\n", " tbl", "1abc",
           "abcdefghi", "cni", "netns", "qrouter", "-rf", "tbl/../.."]


@pytest.mark.parametrize("prefix", ["tbl", "t1a2b3", "abcdefgh", "lab2"])
def test_good_prefixes(prefix: str) -> None:
    assert check_prefix(prefix) == prefix
    assert topology(1, 0, prefix=prefix).prefix == prefix


@pytest.mark.parametrize("prefix", HOSTILE)
def test_hostile_prefixes_are_refused_by_the_lab_itself(prefix: str) -> None:
    with pytest.raises(ValueError, match="lab prefix"):
        check_prefix(prefix)
    with pytest.raises(ValueError, match="lab prefix"):
        topology(1, 0, prefix=prefix)
    for call in (L.lab_dir, L.run_dir, L.load, L.down, L.default_store):
        with pytest.raises(ValueError, match="lab prefix"):
            call(prefix)


def test_sweep_refuses_a_prefix_that_matches_everything() -> None:
    for prefix in ("", "-", "ab", "tb-"):
        with pytest.raises(ValueError, match="sweep prefix"):
            netns.sweep(prefix)


def test_a_lab_directory_that_resolves_outside_the_lab_root_is_refused(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root, run, sentinel = tmp_path / "lab", tmp_path / "run", tmp_path / "precious"
    for d in (root, run, sentinel):
        d.mkdir()
    (sentinel / "keep").write_text("x")
    (root / "evil").symlink_to(sentinel, target_is_directory=True)
    monkeypatch.setattr(L, "LAB_ROOT", root)
    monkeypatch.setattr(L, "RUN_ROOT", run)
    with pytest.raises(ValueError, match="outside"):
        L.lab_dir("evil")
    with pytest.raises(ValueError, match="outside"):
        L.down("evil")
    assert (sentinel / "keep").read_text() == "x" and (root / "evil").is_symlink()
    assert L.lab_dir("good") == root / "good"


def tabby(*args: str, store: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", **({"TABBY_STORE": store} if store else {})}
    return subprocess.run([sys.executable, "-m", "tabby.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.fixture
def sentinels() -> Iterator[tuple[str, list[Path]]]:
    """A directory where `../../NAME` from each lab root lands (/var/lib/NAME, /run/NAME), with a file."""
    name = f"tbysent{uuid.uuid4().hex[:8]}"
    dirs = [(L.LAB_ROOT / ".." / ".." / name).resolve(), (L.RUN_ROOT / ".." / ".." / name).resolve()]
    try:
        for d in dirs:
            d.mkdir(parents=True)
            (d / "keep").write_text("x")
        yield name, dirs
    finally:
        for d in dirs:
            (d / "keep").unlink(missing_ok=True)
            if d.exists():
                d.rmdir()


@pytest.mark.parametrize("command", [["lab", "down"], ["lab", "check"], ["lab", "status"],
                                     ["lab", "up", "--hosts", "1"]])
def test_every_lab_command_refuses_a_hostile_prefix_and_deletes_nothing(
        command: list[str], sentinels: tuple[str, list[Path]]) -> None:
    name, dirs = sentinels
    for prefix in [f"../../{name}", "../../x", "", "..", "tb", "cni", "a/b"]:
        r = tabby(*command, "--prefix", prefix)
        assert r.returncode != 0, (prefix, r.stdout)
        assert "lab prefix" in r.stderr and "Traceback" not in r.stderr, (prefix, r.stderr)
        assert all((d / "keep").read_text() == "x" for d in dirs)


def test_diagnose_refuses_a_hostile_lab_prefix(tmp_path: Path, sentinels: tuple[str, list[Path]]) -> None:
    name, dirs = sentinels
    url = f"sqlite://{tmp_path}/s.db"
    store = open_store(url)
    from tabby.client import ResourceClient

    for n, ip in (("a", "fd00:e::1"), ("b", "fd00:e::2")):
        ResourceClient(store).apply(validate({
            "kind": "Endpoint", "metadata": {"name": n},
            "spec": {"host": "h1", "orchestrator": "container", "workload_id": n, "interface": "tby0",
                     "mac": "ee:ee:ee:ee:ee:ee", "ipv6_addresses": [ip]}}))
    for prefix in (f"../../{name}", "..", "-n", "tb", ""):  # refused before anything is read (exit 2)
        r = tabby("diagnose", "a", "b", "--lab", prefix, store=url)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "lab prefix" in r.stderr, r.stderr
    assert all((d / "keep").read_text() == "x" for d in dirs)
