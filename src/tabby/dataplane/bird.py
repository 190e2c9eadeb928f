"""Runs and reconfigures this host's BIRD 2, and reads its sessions back.

The agent hands over the rendered config text; apply writes it (atomically, only when the
text changed) and asks the running bird to re-read it (``configure`` on its control socket). bird is started
detached, in its own session, with its pid in the run directory, so an agent restart adopts the
running bird instead of restarting it: the BGP sessions, and so the peers' routes, survive an
agent upgrade. If bird dies, the next apply starts it again with ``-R`` (graceful-restart
recovery), and the peers, which kept its routes as stale meanwhile, get them refreshed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class BirdError(Exception):
    def __init__(self, argv: list[str], code: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)}: exit {code}: {output.strip()[-500:]}")
        self.argv, self.code, self.output = argv, code, output


class BirdReconciler:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.conf = run_dir / "bird.conf"
        self.sock = run_dir / "bird.ctl"
        self.pidfile = run_dir / "bird.pid"
        self.log = run_dir / "bird.log"
        self.desired: str | None = None
        # the config the running bird read, at its start or its last configure (None: not known,
        # e.g. one adopted after an agent restart). Not the file: a config written while a bird
        # was starting on the one before was never read by it (seen: a host's block missing from
        # its kernel for good when three changes came in the agent's first second)
        self.loaded: str | None = None
        self.last_error: str | None = None
        self.starts = 0

    def set_config(self, text: str | None) -> None:
        self.desired = text

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if Path(f"/proc/{pid}").exists() else []
        return pid if any(str(self.conf).encode() == part for part in cmdline) else None

    def control(self, command: str, timeout: float = 10.0) -> str:
        """One command over bird's control socket, its reply as birdc would print it.

        Why not ``birdc``: the agent asks for the sessions every few seconds, and a birdc process
        each time (fork, exec, dynamic linking) was most of an idle agent's CPU. The protocol:
        after a hello line, each reply line is a 4-digit code then ``-`` (more follows) or a
        space (last line), or a space alone (continuing the previous code); codes from 8000 up
        are errors."""
        if "\n" in command:
            raise ValueError("one line per command")
        argv = ["bird control", str(self.sock), command]
        lines: list[str] = []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.sock))
                f = s.makefile("rwb")
                f.readline()  # 0001 BIRD x.y.z ready.
                f.write(command.encode() + b"\n")
                f.flush()
                while True:
                    raw = f.readline()
                    if not raw:
                        raise BirdError(argv, -1, "\n".join(lines) + "\n(bird closed the connection)")
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    if line[:4].isdigit() and line[4:5] in ("-", " "):
                        code, text = int(line[:4]), line[5:]
                        lines.append(text)
                        if code >= 8000:
                            raise BirdError(argv, code, text)
                        if line[4] == " ":
                            return "\n".join(lines) + "\n"
                    else:
                        lines.append(line[1:])
        except OSError as e:  # no socket (bird not running), refused, timed out
            raise BirdError(argv, -1, str(e)) from e

    def _check(self, path: Path) -> None:
        argv = [shutil.which("bird") or "bird", "-p", "-c", str(path)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise BirdError(argv, r.returncode, r.stdout + r.stderr)

    def apply(self) -> bool:
        """Make bird run the desired config. Returns True if anything was done."""
        if self.desired is None:
            return False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        current = self.conf.read_text() if self.conf.exists() else None
        changed = current != self.desired
        if changed:
            tmp = self.conf.with_suffix(".new")
            # 0600: the config may hold TCP MD5 passwords
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.desired)
            os.chmod(tmp, 0o600)  # a leftover .new of another mode
            try:
                self._check(tmp)
            except BirdError as e:
                self.last_error = str(e)
                log.error("rendered BIRD config rejected, keeping the running one: %s", e)
                return False
            os.replace(tmp, self.conf)
        pid = self.pid()
        if pid is None:
            self._start(recovering=self.starts > 0 or current is not None)
            self.loaded = self.desired
            self.last_error = None
            return True
        if self.loaded != self.desired:
            out = self.control("configure")
            # BIRD's replies that take it (cmd_reconfig_msg): done, in progress, queued behind one
            # in progress (it is read when that one ends), or the same config
            if not any(ok in out for ok in ("Reconfigured", "Reconfiguration in progress", "queueing new config",
                                            "Nothing to do")):
                self.last_error = out.strip()
                log.error("birdc configure: %s", out.strip())
                return False
            self.loaded = self.desired
            log.info("BIRD reconfigured")
            changed = True
        self.last_error = None
        return changed

    def _start(self, recovering: bool) -> None:
        argv = [shutil.which("bird") or "bird", "-c", str(self.conf), "-s", str(self.sock), "-P", str(self.pidfile)]
        if recovering:
            argv.append("-R")  # graceful-restart recovery: wait for peers before touching the kernel
        with open(self.log, "ab") as logf:
            r = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, timeout=10)
        if r.returncode != 0:
            raise BirdError(argv, r.returncode, self.log.read_text()[-500:])
        self.starts += 1
        # until it answers as ours: its socket, and its pid file (written after the socket); a
        # check before the pid file took it for not running, and started a second one
        deadline = time.monotonic() + 5
        while not (self.sock.exists() and self.pid() is not None) and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("BIRD started (pid %s%s)", self.pid(), ", graceful-restart recovery" if recovering else "")

    def stop(self) -> None:
        """End the bird we run (by its pid file), e.g. when this host is refused or deleted."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, 15)

    def sessions(self) -> list[dict[str, Any]]:
        """BGP sessions as bird sees them: name, peer description, state, since, routes in/out."""
        try:
            text = self.control("show protocols all")
        except BirdError as e:
            return [{"error": str(e)}]
        out: list[dict[str, Any]] = []
        cur: dict[str, Any] | None = None
        for line in text.splitlines():
            m = re.match(r"^(\S+)\s+BGP\s+\S+\s+(\S+)\s+(\S+ \S+|\S+)\s*(.*)$", line)
            if m:
                cur = {"name": m.group(1), "state": m.group(4).strip() or m.group(2), "proto_state": m.group(2),
                       "since": m.group(3), "imported": 0, "exported": 0, "description": ""}
                out.append(cur)
                continue
            if re.match(r"^\S", line):
                cur = None
                continue
            if cur is None:
                continue
            d = re.match(r"^\s+Description:\s+(.*)$", line)
            if d:
                cur["description"] = d.group(1)
            r = re.match(r"^\s+Routes:\s+(\d+) imported, (?:\d+ filtered, )?(\d+) exported", line)
            if r:
                cur["imported"] += int(r.group(1))
                cur["exported"] += int(r.group(2))
        return out

    def bfd_sessions(self) -> dict[str, str]:
        """BFD peer -> state ("Up", "Down", "Init", "AdminDown") of this BIRD's BFD sessions; a
        link-local peer is keyed "addr%iface", as ``bird_config.bfd_targets`` keys one that names
        its link, and an IPv4 one also by its address alone (a peer that names no link: the
        kernel's route picks it; the first session of that address, if several)."""
        out: dict[str, str] = {}
        for line in self.control("show bfd sessions").splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            try:
                ip = ipaddress.ip_address(parts[0])
            except ValueError:
                continue  # the protocol's name, the heading
            if ip.is_link_local:
                out[f"{ip}%{parts[1]}"] = parts[2]
                if ip.version == 4:
                    out.setdefault(str(ip), parts[2])
            else:
                out[str(ip)] = parts[2]
        return out


def tcp_md5_failures(netstat: Path = Path("/proc/net/netstat")) -> int:
    """This namespace's count of TCP segments the kernel dropped for a wrong or missing MD5
    signature (TcpExt TCPMD5Failure + TCPMD5NotFound + TCPMD5Unexpected): the only trace a wrong
    password leaves, since such segments are never answered."""
    lines = netstat.read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return sum(int(row.get(k, 0)) for k in ("TCPMD5Failure", "TCPMD5NotFound", "TCPMD5Unexpected"))
    return 0

