"""``tabby cni-server``: the CNI verbs, warm, for the shim on this host.

One per host (per network namespace, since ADD makes the veth where the server runs), on a unix
socket only root may open (0600; a directory it creates is 0700): whoever can talk to it can make
interfaces. Each call runs in its own thread, like separate plugin processes would; calls share
one ``Context`` (a SQLite Store connection under its lock, IPAM's pool cache and block hints),
and calls for one attachment wait for each other on its lock (``lock.py``), which in-process
plugins take too. A call from another network namespace, or whose CNI_NETNS path names another
file here than there, is told to run itself (``fallback``). Work a verb leaves for after its
answer (DEL's veth deletion and address release) runs in the call's own thread once the answer
is out and the connection half-closed: starting a thread for it cost the answer ~1-2 ms (the new
thread took the GIL first). The wire format is in ``shim.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
import time
from pathlib import Path

from tabby.cni.errors import INTERNAL
from tabby.cni.main import run
from tabby.cni.plugin import Context, Phases
from tabby.cni.shim import MAGIC, netns_id, path_id

log = logging.getLogger(__name__)

MAX_REQUEST = 512 * 1024  # stdin (256 KiB at most, checked again by the verbs) and the environment


def decode_request(data: bytes) -> tuple[int, str, dict[str, str], bytes]:
    """(caller's netns inode, its CNI_NETNS "dev:ino", environment, stdin); ValueError if malformed."""
    if len(data) < 8 or not data.startswith(MAGIC) or len(data) > MAX_REQUEST:
        raise ValueError("not a tabby-cni request")
    n = int.from_bytes(data[4:8], "big")
    if 8 + n > len(data):
        raise ValueError("truncated request")
    fields = data[8:8 + n].decode("utf-8", "surrogateescape").split("\0")
    if len(fields) < 2 or not fields[0].isdigit():
        raise ValueError("bad request header")
    env = {}
    for f in fields[2:]:
        k, sep, v = f.partition("=")
        if not sep:
            raise ValueError("bad environment entry")
        env[k] = v
    return int(fields[0]), fields[1], env, data[8 + n:]


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        t0 = time.perf_counter()
        phases = Phases()  # the log line's timers: request, the verb's own phases, answer
        try:
            peer_ns, peer_path, env, raw = decode_request(self.rfile.read(MAX_REQUEST + 1))
        except ValueError as e:
            log.warning("malformed request: %s", e)
            err = {"cniVersion": "1.1.0", "code": 4, "msg": "malformed request to tabby cni-server"}
            self.wfile.write(MAGIC + b"1\n" + json.dumps(err).encode())
            return
        if peer_ns != netns_id() or (peer_path and path_id(env.get("CNI_NETNS", "")) != peer_path):
            self.wfile.write(MAGIC + b"F")
            return
        for key, value in self.server.defaults.items():  # type: ignore[attr-defined]
            env.setdefault(key, value)
        phases.mark("request")
        ctx: Context = self.server.ctx  # type: ignore[attr-defined]
        with ctx.deferred() as later:
            try:
                code, out = run(env, raw, ctx, phases)
            except Exception as e:  # a bug must not end the server; the caller gets a CNI error
                log.exception("CNI %s failed", env.get("CNI_COMMAND"))
                code, out = 1, json.dumps({"cniVersion": "1.1.0", "code": INTERNAL, "msg": "internal error",
                                           "details": str(e)})
        try:
            self.wfile.write(MAGIC + f"{code}\n".encode() + out.encode())
            if later:  # the shim reads to the end: end the answer, then finish the call's work here
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_WR)
            phases.mark("answer")
            cid = env.get("CNI_CONTAINERID", "")
            shown = cid[:16] if cid.isascii() and cid.isprintable() else "(unprintable)"
            ifname = env.get("CNI_IFNAME", "")
            log.info("%s %s %s -> %d in %.1f ms (%s)",
                     env.get("CNI_COMMAND", "")[:8].encode("unicode_escape").decode(), shown,
                     ifname[:16].encode("unicode_escape").decode(), code, (time.perf_counter() - t0) * 1000, phases)
        finally:
            # also when the answer could not be sent (the runtime gave up on the call and closed):
            # the work deferred holds the attachment's lock, and only it releases the lock and frees
            # the veth and addresses
            ctx.run_later(later)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    defaults: dict[str, str]
    ctx: Context


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
    server.ctx = Context(keep=True, background=True)
    # everything a call needs, imported now rather than on the first call
    import ctypes  # noqa: F401  (setns)
    import fcntl  # noqa: F401

    import tabby.client
    import tabby.ipam
    import tabby.ipam.allocator
    import tabby.store.etcd
    import tabby.store.sqlite  # noqa: F401
    if ready is not None:
        ready.set()
    return server
