"""Start and stop a throw-away etcd on loopback (Debian's etcd-server) for tests, benches and the lab."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member with a temporary data dir; ``stop`` ends only the process it started."""

    def __init__(self, name: str = "tabby-test", data_dir: str | None = None, netns: str | None = None,
                 host: str = "127.0.0.1") -> None:
        """netns: run inside that network namespace (listening on host there), as the lab does."""
        self.name = name
        self.netns = netns
        self.host = host
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="tabby-etcd-")
        self.port = free_port()
        self.peer_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"etcd://{h}:{self.port}"

    def _healthy(self, client: str) -> bool:
        if self.netns is None:
            try:
                return requests.get(f"{client}/health", timeout=1).json().get("health") == "true"
            except (requests.RequestException, ValueError):
                return False
        probe = ("import json,urllib.request;"
                 f"print(json.load(urllib.request.urlopen('{client}/health',timeout=1)).get('health'))")
        r = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", probe],
                           capture_output=True, text=True)
        return r.stdout.strip() == "true"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian package etcd-server)")
        h = f"[{self.host}]" if ":" in self.host else self.host
        client = f"http://{h}:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(Path(self.data_dir) / "etcd.log", "wb")  # noqa: SIM115 - lives with the process
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*prefix, binary, "--name", self.name, "--data-dir", str(Path(self.data_dir) / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{self.name}={peer}",
             "--listen-metrics-urls", f"http://127.0.0.1:{self.metrics_port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.data_dir}/etcd.log")
            if self._healthy(client):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy within {timeout}s")

    def stop(self, keep_data: bool = False) -> None:
        """End the process we started; keep_data=True lets ``start`` bring the same member back."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._own_dir and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
