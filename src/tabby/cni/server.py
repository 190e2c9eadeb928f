"""``tabby cni-server``: the CNI verbs, warm, for the shim on this host.

One per host (per network namespace, since ADD makes the veth where the server runs), on a unix
socket only root may open (0600; a directory it creates is 0700): whoever can talk to it can make
interfaces. Each call runs in its own thread, like separate plugin processes would, with its own
Store connection. A call from another network namespace, or whose CNI_NETNS path names another
file here than there, is told to run itself (``fallback``).
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
import time
from pathlib import Path

from tabby.cni.main import run
from tabby.cni.shim import netns_id, path_id

log = logging.getLogger(__name__)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        t0 = time.perf_counter()
        try:
            request = json.loads(self.rfile.read())
            env = {str(k): str(v) for k, v in request["env"].items()}
            raw = str(request["stdin"]).encode()
            peer_ns = int(request.get("netns", 0))
            peer_path = str(request.get("cni_netns", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("malformed request: %s", e)
            self.wfile.write(json.dumps({"code": 1, "stdout": json.dumps(
                {"cniVersion": "1.1.0", "code": 4, "msg": "malformed request to tabby cni-server"})}).encode())
            return
        if peer_ns != netns_id() or (peer_path and path_id(env.get("CNI_NETNS", "")) != peer_path):
            self.wfile.write(b'{"fallback": true}')
            return
        for key, value in self.server.defaults.items():  # type: ignore[attr-defined]
            env.setdefault(key, value)
        try:
            code, out = run(env, raw)
        except Exception as e:  # a bug must not end the server; the caller gets a CNI error
            log.exception("CNI %s failed", env.get("CNI_COMMAND"))
            code, out = 1, json.dumps({"cniVersion": "1.1.0", "code": 999, "msg": "internal error", "details": str(e)})
        self.wfile.write(json.dumps({"code": code, "stdout": out}).encode())
        log.info("%s %s %s -> %d in %.1f ms", env.get("CNI_COMMAND"), env.get("CNI_CONTAINERID", "")[:16],
                 env.get("CNI_IFNAME", ""), code, (time.perf_counter() - t0) * 1000)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    defaults: dict[str, str]


def serve(path: Path, defaults: dict[str, str], ready: threading.Event | None = None) -> _Server:
    """Listen on path (replacing a stale socket) and return the server; serve_forever() runs it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing directory keeps its mode
    if path.is_socket():
        path.unlink()
    old = os.umask(0o177)
    try:
        server = _Server(str(path), _Handler)
    finally:
        os.umask(old)
    server.defaults = defaults  # TABBY_STORE / TABBY_HOST for calls that name neither
    # everything a call needs, imported now rather than on the first call
    import tabby.client
    import tabby.ipam
    import tabby.store.etcd
    import tabby.store.sqlite  # noqa: F401
    if ready is not None:
        ready.set()
    return server
