#!/usr/bin/python3
"""The lab's guest agent: runs inside a qemu guest, answering the host over a virtio-serial port.

Not network configuration: it is how the lab runs the matrix's ping and TCP checks, reads the
guest's addresses and routes and runs ``tabby guest check`` inside the guest, without a login on
the serial console. Installed into the configured image by guest_image.install_agent; runs on the
guest's python3 alone (no tabby, no third-party modules).

One JSON object per line each way, one request at a time (the host holds a lock per guest):
  {"id": N, "op": "run", "argv": [...], "timeout": S} -> {"id": N, "rc": R, "out": "...", "err": "..."}
  {"id": N, "op": "tcp", "addr": A, "port": P, "timeout": S} -> {"id": N, "ok": bool, "out": "..."}
  {"id": N, "op": "serve", "port": P, "text": T}  -> {"id": N, "ok": true}: a TCP listener (both
      families) answering T to each connection, as the lab's socat listeners do in namespaces
  {"id": N, "op": "hello"} -> {"id": N, "ok": true, "boot_id": ...}
When the host is not connected, reads of the port return nothing: the agent waits and reads again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any


def _serve(port: int, text: str) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(16)

    def loop() -> None:
        while True:
            c, _ = s.accept()
            try:
                c.sendall((text + "\n").encode())
            finally:
                c.close()

    threading.Thread(target=loop, daemon=True).start()


SERVING: set[int] = set()


def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "hello":
        with open("/proc/sys/kernel/random/boot_id") as f:
            return {"ok": True, "boot_id": f.read().strip()}
    if op == "run":
        try:
            r = subprocess.run([str(a) for a in req["argv"]], capture_output=True, text=True,
                               timeout=float(req.get("timeout", 30)))
            return {"rc": r.returncode, "out": r.stdout, "err": r.stderr}
        except subprocess.TimeoutExpired:
            return {"rc": -1, "out": "", "err": "timed out"}
        except OSError as e:
            return {"rc": -1, "out": "", "err": str(e)}
    if op == "tcp":
        try:
            to = (str(req["addr"]), int(req["port"]))
            with socket.create_connection(to, timeout=float(req.get("timeout", 3))) as c:
                data = c.recv(256).decode(errors="replace").strip()
            return {"ok": bool(data), "out": data}
        except OSError as e:
            return {"ok": False, "out": str(e)}
    if op == "serve":
        port = int(req["port"])
        if port not in SERVING:
            _serve(port, str(req["text"]))
            SERVING.add(port)
        return {"ok": True}
    return {"error": f"unknown op {op!r}"}


def main(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.5)
    fd = os.open(path, os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:  # the host is not connected
            time.sleep(0.1)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                req = json.loads(line)
                reply = handle(req)
                reply["id"] = req.get("id")
            except Exception as e:  # a bad request costs one error reply, never the agent
                reply = {"id": None, "error": f"{type(e).__name__}: {e}"}
            out = memoryview((json.dumps(reply) + "\n").encode())
            while out:  # a port's write may take part of a long reply (dmesg, journals)
                out = out[os.write(fd, out):]


if __name__ == "__main__":
    main(sys.argv[1])
