"""The CNI verbs behind one function: environment and stdin in, (exit code, CNI JSON) out.

``run`` is what both callers use: the in-process fallback of ``tabby-cni`` (``shim.py``) and the
warm ``tabby cni-server`` (``server.py``). Nothing here reads ``os.environ``: the caller passes
the CNI_* variables (and TABBY_STORE / TABBY_HOST) it was given, so one server serves many calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from tabby.cni.config import SUPPORTED_VERSIONS, ConfError, parse
from tabby.cni.plugin import INVALID_CONF, INVALID_ENV, CniError, Env, add, check, delete, gc, status, version


def run(environ: Mapping[str, str], raw: bytes) -> tuple[int, str]:
    command = environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, json.dumps(version())
    ver = SUPPORTED_VERSIONS[-1]
    try:
        try:
            conf = parse(raw)
        except ConfError as e:
            raise CniError(INVALID_CONF, "invalid network configuration", str(e)) from None
        ver = conf.cni_version
        conf.store = conf.store or environ.get("TABBY_STORE")
        conf.host = conf.host or environ.get("TABBY_HOST")
        if command in ("STATUS", "GC"):
            status(conf) if command == "STATUS" else gc(conf, json.loads(raw))
            return 0, ""
        missing = [k for k in ("CNI_CONTAINERID", "CNI_IFNAME") if not environ.get(k)]
        if command in ("ADD", "CHECK") and not environ.get("CNI_NETNS"):
            missing.append("CNI_NETNS")
        if missing:
            raise CniError(INVALID_ENV, f"missing {', '.join(missing)}")
        env = Env(command, environ["CNI_CONTAINERID"], environ.get("CNI_NETNS", ""), environ["CNI_IFNAME"],
                  environ.get("CNI_ARGS", ""))
        if command == "ADD":
            return 0, json.dumps(add(conf, env))
        if command == "DEL":
            delete(conf, env)
        elif command == "CHECK":
            check(conf, env)
        else:
            raise CniError(INVALID_ENV, f"CNI_COMMAND: unknown verb {command or '(unset)'}")
        return 0, ""
    except CniError as e:
        return 1, json.dumps(e.json(ver))


def main() -> None:
    """In-process entry (no server): what the shim falls back to."""
    import os
    import sys

    code, out = run(os.environ, sys.stdin.buffer.read())
    if out:
        print(out)
    sys.exit(code)
