"""A lab process launcher that takes argv only: what the lab once wrote as ``sh -c`` strings.

    python -m tabby.lab.launch [--tmpfs DIR]... [--retry N --every S] -- PROGRAM ARG...

--tmpfs: mount a fresh tmpfs on DIR first (in this process's own mount namespace: ``ip netns
exec`` gives every call one, so the host's DIR is untouched); for daemons that keep state in
directories that are not per network namespace (dhcpcd's /run/dhcpcd, /var/lib/dhcpcd).
--retry: run PROGRAM until it exits 0, at most N times, S seconds apart (dhclient -6 exits when
its link-local address is not usable yet; a boot service would restart it). Without --retry the
program replaces this process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tabby.lab.launch")
    ap.add_argument("--tmpfs", action="append", default=[])
    ap.add_argument("--retry", type=int, default=0)
    ap.add_argument("--every", type=float, default=0.3)
    ap.add_argument("program", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        ap.error("no program given")
    for d in args.tmpfs:
        os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)
    if args.retry <= 0:
        os.execvp(program[0], program)
    for _ in range(args.retry):
        if subprocess.run(program).returncode == 0:
            return 0
        time.sleep(args.every)
    return 1


if __name__ == "__main__":
    sys.exit(main())
