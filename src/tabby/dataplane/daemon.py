"""What the daemons the agent runs detached (dnsmasq, tayga, unbound) share: finding the one a
pid file names, and whether a process still runs."""

from __future__ import annotations

from pathlib import Path


def adopted_pid(pidfile: Path, conf: Path, program: str) -> int | None:
    """The pid in pidfile if that process is program run with conf as an argument (ours, from this
    agent or one before it: ``-c CONF`` or ``--conf-file=CONF``), else None: a stale pid file may
    name anybody's process by now, and one that merely names the path (an editor on ``CONF``, a
    ``CONF.bak``) is not ours."""
    try:
        pid = int(pidfile.read_text().strip())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    raw = str(conf).encode()
    ours = args[0].rsplit(b"/", 1)[-1] == program.encode() and \
        any(a == raw or (a.startswith(b"--") and a.endswith(b"=" + raw)) for a in args[1:])
    return pid if ours and running(pid) else None


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
