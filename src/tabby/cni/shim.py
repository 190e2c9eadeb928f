"""``tabby-cni``: hand the call to this host's warm ``tabby cni-server``, or run it here.

Why a shim: a runtime starts one plugin process per call, and importing tabby's model (pydantic)
alone costs ~100 ms. This file imports only the standard library; the server has everything
loaded already. The call goes in-process instead when no server answers on the socket, or when
the server sits in another network namespace than the caller (it would make the veth in its own),
or does not see the caller's CNI_NETNS path as the same namespace file.
Once the server has the request, its answer is final: a server that dies mid-call yields CNI
error 11 (try again later), never a second attempt here, so an ADD is never run twice at once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys

SOCKET_DIR = "/run/tabby/cni"
TRY_AGAIN = 11


def socket_path(raw: bytes, environ: dict[str, str]) -> str | None:
    """The server socket for this call: the config's ``server_socket``, else one per host name."""
    try:
        conf = json.loads(raw)
    except ValueError:
        return None  # let the full parser report it
    if not isinstance(conf, dict):
        return None
    if isinstance(conf.get("server_socket"), str):
        return conf["server_socket"]
    host = conf.get("host") or environ.get("TABBY_HOST") or socket.gethostname()
    if not isinstance(host, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}", host):
        return None
    return f"{SOCKET_DIR}/{host}.sock"


def netns_id() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def path_id(path: str) -> str:
    """What a path names, as this process sees it ("" if nothing): CNI_NETNS is a path, and a
    runtime like podman mounts its namespaces where only its own mount namespace sees them."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def via_server(path: str, environ: dict[str, str], raw: bytes) -> tuple[int, str] | None:
    """(code, stdout) from the server; None when there is no server for us to use."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2.0)
        s.connect(path)
    except OSError:
        s.close()
        return None
    env = {k: v for k, v in environ.items() if k.startswith("CNI_") or k in ("TABBY_STORE", "TABBY_HOST")}
    request = json.dumps({"env": env, "stdin": raw.decode("utf-8", "replace"), "netns": netns_id(),
                          "cni_netns": path_id(env["CNI_NETNS"]) if env.get("CNI_NETNS") else ""}).encode()
    try:
        s.settimeout(300.0)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except OSError as e:
        return _try_again(f"tabby cni-server: {e}")
    finally:
        s.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        return _try_again("tabby cni-server ended without an answer")
    if reply.get("fallback"):
        return None
    return int(reply["code"]), str(reply["stdout"])


def _try_again(why: str) -> tuple[int, str]:
    return 1, json.dumps({"cniVersion": "1.1.0", "code": TRY_AGAIN, "msg": "try again later", "details": why})


def main() -> None:
    environ = dict(os.environ)
    raw = sys.stdin.buffer.read()
    path = socket_path(raw, environ) if environ.get("CNI_COMMAND") != "VERSION" else None
    result = via_server(path, environ, raw) if path and not environ.get("TABBY_CNI_NO_SERVER") else None
    if result is None:
        from tabby.cni.main import run

        result = run(environ, raw)
    code, out = result
    if out:
        print(out)
    sys.exit(code)


if __name__ == "__main__":
    main()
