"""Adopting a detached daemon by its pid file: only the program itself, run with our config."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tabby.dataplane.daemon import adopted_pid


def _started(argv0: str, *args: str) -> subprocess.Popen[bytes]:
    """A process of ours whose command line reads ``argv0 -c ... args`` (a sleeping Python)."""
    script = "import time; time.sleep(60)"
    return subprocess.Popen(["bash", "-c", 'exec -a "$0" "$1" -c "$2" "${@:3}"', argv0, sys.executable, script,
                             *args])


def test_only_the_daemon_run_with_our_config_is_adopted(tmp_path: Path) -> None:
    conf, pidfile = tmp_path / "dnsmasq.conf", tmp_path / "dnsmasq.pid"
    cases = [("/usr/sbin/dnsmasq", [f"--conf-file={conf}"], True),
             ("dnsmasq", ["-C", str(conf)], True),
             ("vim", [str(conf)], False),  # an editor on the file: the path was in its command line
             ("/usr/sbin/dnsmasq", [f"--conf-file={conf}.bak"], False),
             ("/usr/sbin/dnsmasq", [f"--conf-file=/elsewhere{conf}"], False)]
    procs = [_started(argv0, *args) for argv0, args, _ in cases]
    try:
        deadline = time.monotonic() + 10
        for p, (argv0, _, _) in zip(procs, cases, strict=True):  # exec done: the command line reads argv0
            while not Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(argv0.encode()):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        for p, (argv0, args, ours) in zip(procs, cases, strict=True):
            pidfile.write_text(f"{p.pid}\n")
            assert (adopted_pid(pidfile, conf, "dnsmasq") == p.pid) is ours, (argv0, args)
        assert adopted_pid(pidfile, conf, "tayga") is None  # the right file, another program
    finally:
        for p in procs:
            p.kill()
            p.wait()
    pidfile.write_text(f"{procs[0].pid}\n")  # stale: that process is gone
    assert adopted_pid(pidfile, conf, "dnsmasq") is None
    pidfile.write_text("not a pid")
    assert adopted_pid(pidfile, conf, "dnsmasq") is None
