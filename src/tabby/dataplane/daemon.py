"""What the daemons the agent runs detached (dnsmasq, tayga, unbound) share: finding the one a
pid file names, and whether a process still runs."""

from __future__ import annotations

from pathlib import Path


def adopted_pid(pidfile: Path, conf: Path) -> int | None:
    """The pid in pidfile if that process runs with conf on its command line (ours, from this
    agent or one before it), else None: a stale pid file may name anybody's process by now."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(conf).encode() in cmdline and running(pid) else None


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
