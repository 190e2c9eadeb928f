"""Entry point of ``tabby-cni``: environment and stdin in, CNI JSON out, the right exit code."""

from __future__ import annotations

import json
import os
import sys

from tabby.cni.config import SUPPORTED_VERSIONS, ConfError, parse
from tabby.cni.plugin import INVALID_CONF, INVALID_ENV, CniError, Env, add, check, delete, gc, status, version


def main() -> None:
    command = os.environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        print(json.dumps(version()))
        return
    ver = SUPPORTED_VERSIONS[-1]
    try:
        raw = sys.stdin.buffer.read()
        try:
            conf = parse(raw)
        except ConfError as e:
            raise CniError(INVALID_CONF, "invalid network configuration", str(e)) from None
        ver = conf.cni_version
        if command in ("STATUS", "GC"):
            status(conf) if command == "STATUS" else gc(conf, json.loads(raw))
            return
        missing = [k for k in ("CNI_CONTAINERID", "CNI_IFNAME") if not os.environ.get(k)]
        if command in ("ADD", "CHECK") and not os.environ.get("CNI_NETNS"):
            missing.append("CNI_NETNS")
        if missing:
            raise CniError(INVALID_ENV, f"missing {', '.join(missing)}")
        env = Env(command, os.environ["CNI_CONTAINERID"], os.environ.get("CNI_NETNS", ""), os.environ["CNI_IFNAME"],
                  os.environ.get("CNI_ARGS", ""))
        if command == "ADD":
            print(json.dumps(add(conf, env)))
        elif command == "DEL":
            delete(conf, env)
        elif command == "CHECK":
            check(conf, env)
        else:
            raise CniError(INVALID_ENV, f"CNI_COMMAND: unknown verb {command or '(unset)'}")
    except CniError as e:
        print(json.dumps(e.json(ver)))
        sys.exit(1)
