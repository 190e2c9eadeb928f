"""Runs this host's NAT64 translator (tayga) and DNS64 resolver (unbound), and keeps the tun
device, its routes and the resolver's address in place.

Both run detached with pid files, like dnsmasq and BIRD, so an agent restart adopts them; each is
restarted when its config changes, and started again when it dies (``ExitWatch`` says so at once:
a pidfd per process, no polling). The tun device is persistent (``tayga --mktun``): a dead tayga
leaves it and its routes, so a restarted one carries on where it stopped; packets meanwhile are
dropped by the kernel's tun queue, which only this host's workloads use.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tabby.dataplane.daemon import adopted_pid
from tabby.dataplane.daemon import running as _running
from tabby.dataplane.nat64_config import TUN, Nat64Rendered

log = logging.getLogger(__name__)

TUN_METRIC = 10  # the tun's routes (see Nat64Reconciler's plumbing)


class Nat64Error(Exception):
    pass


QUICK_EXIT_S = 10.0  # a daemon that dies sooner than this after its start is crash-looping
STEADY_S = 60.0  # up this long: its crash count starts again from nothing
MAX_BACKOFF_S = 60.0


class _Daemon:
    """One detached daemon: its config file and pid file, adopted when the pid file's process
    has our config on its command line. One that keeps dying right after its start is started
    again after 1, 2, 4 ... 60 s, not at once (a hot loop of starts helps nobody)."""

    def __init__(self, name: str, conf: Path, pidfile: Path, argv: Callable[[Path], list[str]]) -> None:
        self.name, self.conf, self.pidfile, self.argv = name, conf, pidfile, argv
        self.revived = 0  # started again with an unchanged config: it had died
        self._ran = False  # this agent started it (or adopted it) with the config on disk
        self._started_at = 0.0
        self._quick_exits = 0
        self.not_before = 0.0  # crash-looping: no start before this (monotonic)

    def pid(self) -> int | None:
        return adopted_pid(self.pidfile, self.conf, self.name)

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        for sig, wait in ((signal.SIGTERM, 200), (signal.SIGKILL, 200)):  # a hung one is killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            for _ in range(wait):
                if not _running(pid):
                    break
                time.sleep(0.01)
            else:
                continue
            break
        with contextlib.suppress(OSError):
            self.pidfile.unlink()
        self._ran = False

    def ensure(self, text: str) -> bool:
        """Running with this config: True if it was (re)started."""
        same = self.conf.exists() and self.conf.read_text() == text
        pid = self.pid()
        now = time.monotonic()
        if pid is not None and same:
            self._ran = True  # running with this config (adopted after an agent restart, too)
            if self._quick_exits and now - self._started_at > STEADY_S:
                self._quick_exits = 0
            return False
        if pid is not None:
            self.stop()
        elif same and self._ran:  # ours, and gone: it died
            self._ran = False
            self.revived += 1
            if now - self._started_at < QUICK_EXIT_S:
                self._quick_exits += 1
                self.not_before = self._started_at + min(2.0 ** (self._quick_exits - 1), MAX_BACKOFF_S)
            log.warning("%s was not running (its config unchanged): starting it again", self.name)
        if now < self.not_before:
            raise Nat64Error(f"{self.name} keeps dying right after its start ({self._quick_exits} times): "
                             f"next start in {self.not_before - now:.0f} s (see its log)")
        self.conf.write_text(text)
        with contextlib.suppress(OSError):
            self.pidfile.unlink()
        r = subprocess.run(self.argv(self.conf), capture_output=True, text=True, start_new_session=True,
                           timeout=30)
        if r.returncode != 0:
            raise Nat64Error(f"{self.name} did not start: {(r.stderr or r.stdout).strip()[:500]}")
        for _ in range(300):
            if self.pid() is not None:
                break
            time.sleep(0.01)
        else:
            raise Nat64Error(f"{self.name} started but wrote no pid file {self.pidfile}")
        self._ran, self._started_at = True, time.monotonic()
        log.info("%s %s (pid %s)", self.name, "restarted" if pid else "started", self.pid())
        return True



class Nat64Reconciler:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        tayga = shutil.which("tayga") or "/usr/sbin/tayga"
        unbound = shutil.which("unbound") or "/usr/sbin/unbound"
        self.tayga = _Daemon("tayga", run_dir / "tayga.conf", run_dir / "tayga.pid",
                             lambda c: [tayga, "-c", str(c), "-p", str(run_dir / "tayga.pid")])
        self.unbound = _Daemon("unbound", run_dir / "unbound.conf", run_dir / "unbound.pid",
                               lambda c: [unbound, "-c", str(c)])
        self.desired: Nat64Rendered | None = None
        self.last_error: str | None = None
        self._plumbed: tuple[tuple[str, ...], str | None] | None = None
        # the resolver address this host put on lo, on disk: a restarted agent must find it to remove it
        self._address_file = run_dir / "dns64.address"

    def recheck(self) -> None:
        """Look at the tun, its routes and the address again at the next apply (a full check, or
        the tun's link changed)."""
        self._plumbed = None

    def set_desired(self, rendered: Nat64Rendered | None) -> None:
        self.desired = rendered

    def pids(self) -> dict[str, int]:
        return {d.name: pid for d in (self.tayga, self.unbound) if (pid := d.pid()) is not None}

    def status(self) -> dict[str, object] | None:
        """Read from the health server's thread too: one look at desired."""
        desired = self.desired
        if desired is None:
            return None
        pids = self.pids()
        return {"tayga": "up" if "tayga" in pids else "down",
                "unbound": None if desired.unbound is None else ("up" if "unbound" in pids else "down"),
                "restarts": self.tayga.revived + self.unbound.revived, "error": self.last_error}

    def apply(self) -> bool:
        """Make it so; True if anything was started or stopped. Nat64Error says what failed."""
        r = self.desired
        if r is None:
            return self._remove()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "tayga").mkdir(exist_ok=True)
        changed = False
        try:
            self._tun(r)
            changed |= self.tayga.ensure(r.tayga)
            if r.unbound is not None:
                changed |= self.unbound.ensure(r.unbound)
            elif self.unbound.pid() is not None:
                self.unbound.stop()
                changed = True
        except (Nat64Error, OSError, subprocess.SubprocessError) as e:
            self.last_error = str(e)
            raise Nat64Error(str(e)) from None
        self.last_error = None
        return changed

    def _tun(self, r: Nat64Rendered) -> None:
        """The persistent tun, up, with the /96 and the pool routed into it; the resolver's address on lo."""
        want = (r.routes, r.dns64_address)
        if self._plumbed == want and Path(f"/sys/class/net/{TUN}").exists():
            return
        ip = shutil.which("ip") or "ip"
        if not Path(f"/sys/class/net/{TUN}").exists():
            mk = self.run_dir / "tayga-mktun.conf"  # --mktun reads the device name from a config
            mk.write_text(r.tayga)
            res = subprocess.run([self.tayga.argv(mk)[0], "-c", str(mk), "--mktun"],
                                 capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                raise Nat64Error(f"tayga --mktun: {(res.stderr or res.stdout).strip()[:500]}")
        self._ip(ip, "link", "set", TUN, "up")
        # what a previous config (of this agent or one before it) put in and this one does not want:
        # the tun's routes as the kernel has them, the address as the file says
        for fam in ("-6", "-4"):
            res = subprocess.run([ip, "-j", fam, "route", "show", "dev", TUN], capture_output=True, text=True,
                                 timeout=30)
            for route in json.loads(res.stdout or "[]") if res.returncode == 0 else []:
                dst = str(route.get("dst", ""))
                if dst and "/" not in dst:
                    dst += "/128" if ":" in dst else "/32"
                if route.get("protocol") == "static" and dst not in r.routes:  # ours are proto static
                    subprocess.run([ip, "route", "del", dst, "dev", TUN], capture_output=True, timeout=30)
        old = self._old_address()
        if old not in (None, r.dns64_address):
            subprocess.run([ip, "addr", "del", f"{old}/128", "dev", "lo"], capture_output=True, timeout=30)
        for dst in r.routes:
            # below BIRD's 32: a peer announcing the prefix (an upstream NAT64) must not take this
            # host's workloads away from its own translator (IPv6's default metric is 1024)
            self._ip(ip, "route", "replace", dst, "dev", TUN, "proto", "static", "metric", str(TUN_METRIC))
        if r.dns64_address is not None:
            self._ip(ip, "addr", "replace", f"{r.dns64_address}/128", "dev", "lo", "nodad")
            self._address_file.write_text(r.dns64_address)
        else:
            self._address_file.unlink(missing_ok=True)
        self._plumbed = want

    def _old_address(self) -> str | None:
        try:
            return str(ipaddress.IPv6Address(self._address_file.read_text().strip()))
        except (OSError, ValueError):
            return None

    @staticmethod
    def _ip(*argv: str) -> None:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise Nat64Error(f"{' '.join(argv[1:])}: {res.stderr.strip()[:300]}")

    def _remove(self) -> bool:
        """No nat64 pool (or workload) here any more: both stopped, the tun (and its routes) gone."""
        had = bool(self.pids()) or Path(f"/sys/class/net/{TUN}").exists()
        self.tayga.stop()
        self.unbound.stop()
        if Path(f"/sys/class/net/{TUN}").exists():
            subprocess.run([shutil.which("ip") or "ip", "link", "del", TUN], capture_output=True, timeout=30)
        old = self._old_address()
        if old is not None:
            subprocess.run([shutil.which("ip") or "ip", "addr", "del", f"{old}/128", "dev", "lo"],
                           capture_output=True, timeout=30)
            self._address_file.unlink(missing_ok=True)
            had = True
        self._plumbed = None
        if had:
            log.info("NAT64 stopped: no workload on a nat64 pool here")
        return had


class ExitWatch:
    """Calls ``on_exit(name)`` from its own thread when a watched process ends: one pidfd per
    process (works for processes that are not our children), and a pipe to change the set."""

    def __init__(self, on_exit: Callable[[str], None]) -> None:
        self.on_exit = on_exit
        self._want: dict[str, int] = {}
        self._lock = threading.Lock()
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="exit-watch", daemon=True)
        self._thread.start()

    def watch(self, pids: dict[str, int]) -> None:
        with self._lock:
            if pids == self._want:
                return
            self._want = dict(pids)
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"x")

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"x")

    def _run(self) -> None:
        fds: dict[int, tuple[str, int]] = {}
        warned: set[tuple[str, int]] = set()
        try:
            while not self._stop:
                with self._lock:
                    want = dict(self._want)
                for fd, (name, pid) in list(fds.items()):
                    if want.get(name) != pid:
                        os.close(fd)
                        del fds[fd]
                have = {v for v in fds.values()}
                for name, pid in want.items():
                    if (name, pid) not in have:
                        try:
                            fds[os.pidfd_open(pid)] = (name, pid)
                        except ProcessLookupError:
                            with self._lock:
                                self._want.pop(name, None)
                            self.on_exit(name)  # gone before we looked
                        except OSError as e:  # no pidfd (kernel < 5.3, no fds left): said, then polled
                            if (name, pid) not in warned:
                                warned.add((name, pid))
                                log.error("cannot watch %s (pid %d): %s; looking every 2 s instead", name, pid, e)
                            if not _running(pid):
                                with self._lock:
                                    self._want.pop(name, None)
                                self.on_exit(name)
                poll_ms = None if all(n in {v[0] for v in fds.values()} for n in want) else 2000
                poller = select.poll()
                poller.register(self._r, select.POLLIN)
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                for fd, _ in poller.poll(poll_ms):
                    if fd == self._r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._r, 4096)
                        continue
                    name, pid = fds.pop(fd)
                    os.close(fd)
                    with self._lock:
                        if self._want.get(name) == pid:
                            del self._want[name]  # reported once; the next watch() says what runs then
                    log.warning("%s (pid %d) exited", name, pid)
                    self.on_exit(name)
        finally:
            for fd in fds:
                os.close(fd)
