"""Network namespaces, veths and processes for the lab, tests and benches.

Set-up here is not a hot path: it shells out to ``ip`` with argument lists (never a shell
string). Every name carries a caller-chosen prefix so that ``sweep(prefix)`` can remove
leftovers after a crash, and processes are ended only by the pid we started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tabby.dataplane.daemon import running

NETNS_DIR = Path("/run/netns")
# The shortest prefix sweep accepts: a lab's is "<3+ characters>-" (see topology.check_prefix).
MIN_SWEEP_PREFIX = 4


def ip(*args: str, ns: str | None = None, check: bool = True, input: str | None = None) -> str:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def add_netns(name: str) -> str:
    """The namespace with its lo up, or none at all: a caller's cleanup starts only once this
    returned, so a failure between the two steps must not leave the namespace behind."""
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", ns=name)
    except BaseException:
        del_netns(name)
        raise
    return name


def del_netns(name: str) -> None:
    ip("netns", "del", name, check=False)


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def sweep(prefix: str, exact: bool = False) -> list[str]:
    """Remove every namespace whose name starts with prefix (crash leftovers), and end every process
    in them first. In rounds: a process may start another while it is being stopped (an agent whose
    VMs' taps vanish restarts dnsmasq), and once a namespace is deleted its processes can no longer
    be found by it, so the namespaces go only when a round finds nobody left.

    A prefix shorter than MIN_SWEEP_PREFIX characters (the empty one matches every namespace on
    the machine) is refused with ValueError before anything is touched. exact: that one namespace
    only (its name is a prefix of others': a VM h1-v1's of h1-v10's)."""
    if len(prefix) < MIN_SWEEP_PREFIX:
        raise ValueError(f"sweep prefix {prefix!r}: at least {MIN_SWEEP_PREFIX} characters, or it matches "
                         "namespaces that are not ours")
    names = sorted(e.name for e in NETNS_DIR.iterdir() if (e.name == prefix if exact else e.name.startswith(prefix))) \
        if NETNS_DIR.exists() else []

    def members() -> set[int]:
        return {int(p) for n in names for p in
                subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True).stdout.split()}

    for attempt in range(6):
        pids = members()
        if not pids:
            break
        for pid in pids:
            kill_pid(pid, signal.SIGTERM if attempt < 3 else signal.SIGKILL)
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if running(p)}
            time.sleep(0.05)
        for pid in pids:
            kill_pid(pid, signal.SIGKILL)
    for n in names:
        del_netns(n)
    return names


def add_veth(ns: str, name: str, peer: str, peer_ns: str | None = None, *, mac: str | None = None,
             up: bool = True) -> None:
    ip("link", "add", name, *(["address", mac] if mac else []), "type", "veth", "peer", "name", peer, ns=ns)
    if peer_ns is not None:
        ip("link", "set", peer, "netns", peer_ns, ns=ns)
    if up:
        ip("link", "set", name, "up", ns=ns)
        ip("link", "set", peer, "up", ns=peer_ns or ns)


def nsexec(ns: str, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def spawn(ns: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    finally:
        out.close()


def spawn_here(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A process in this (the caller's) namespace, in a session of its own."""
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    finally:
        out.close()


def kill_pid(pid: int, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a process we started (by its pid), politely first."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def processes(prefix: str) -> dict[str, list[str]]:
    """Namespace -> "comm[pid]" of every process in it, for the namespaces named prefix-*."""
    names = sorted(e.name for e in NETNS_DIR.iterdir() if e.name.startswith(prefix + "-")) \
        if NETNS_DIR.exists() else []
    out: dict[str, list[str]] = {}
    for n in names:
        pids = subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True).stdout.split()
        procs = []
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            procs.append(f"{comm}[{pid}]")
        out[n] = sorted(procs)
    return out
