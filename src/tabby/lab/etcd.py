"""Throw-away etcd for tests, benches and the lab (Debian's etcd-server): one member, or a cluster
of several with TLS (certificates made here with Debian's openssl) and users and roles.

Every process is one we started and is ended by its pid; ``kill`` (SIGKILL) and ``start`` again
bring a member down and back with its data, as a crash and a restart do.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlencode

OPENSSL_DAYS = "2"  # test certificates: long enough for a lab that stays up over a night


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _openssl(*args: str) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")


# the same request from inside a namespace: this module, run there
_FETCH = ("import sys; from tabby.lab.etcd import _fetch; "
          "sys.stdout.write(_fetch(sys.argv[1], sys.argv[2], float(sys.argv[3]), *sys.argv[4:7]))")


def _fetch(url: str, data: str, timeout: float, ca: str, cert: str, key: str) -> str:
    """GET url (POST data if any) with the CA and a client certificate if ca; the body."""
    ctx = None
    if ca:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(cert, key)
    req = urllib.request.Request(url, data=data.encode() if data else None, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
        return r.read().decode()


@dataclass
class Pki:
    """A CA and the certificates signed by it, in one directory (keys 0600)."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}-key.pem"

    @classmethod
    def create(cls, directory: Path, ca_name: str = "tabby-test-ca") -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(directory)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(directory / "ca-key.pem"), "-out", str(pki.ca), "-subj", f"/CN={ca_name}",
                 "-days", OPENSSL_DAYS, "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return pki

    def issue(self, name: str, ips: tuple[str, ...] = (), ca_key: Path | None = None, ca: Path | None = None) -> Path:
        """A certificate named name, signed by this CA or by another one's ``ca``/``ca_key`` (one the
        cluster must refuse). With ips, a member's: CN=name and these IP SANs. Without, a client's:
        no CN at all (O=tabby, OU=name), because etcd refuses any gateway request whose client
        certificate has a CN once auth is on (the CN would not be the user there); the user is the
        one the password names."""
        sans = ",".join(f"IP:{ip}" for ip in ips) or f"DNS:{name}"
        subject = f"/CN={name}" if ips else f"/O=tabby/OU={name}"
        csr = self.dir / f"{name}.csr"
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(self.key(name)), "-out", str(csr), "-subj", subject,
                 "-addext", f"subjectAltName={sans}", "-addext", "extendedKeyUsage=serverAuth,clientAuth")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca or self.ca),
                 "-CAkey", str(ca_key or self.dir / "ca-key.pem"), "-CAcreateserial", "-days", OPENSSL_DAYS,
                 "-copy_extensions", "copy", "-out", str(self.cert(name)))
        csr.unlink()
        self.key(name).chmod(0o600)
        return self.cert(name)


class EtcdServer:
    """One etcd member with a temporary data dir; ``stop`` ends only the process it started.

    Alone by default; in a cluster, ``initial_cluster`` names every member's peer URL. With
    ``pki`` the member serves clients and peers over TLS with its own certificate (SANs: host and
    127.0.0.1) and asks clients for one signed by the CA."""

    def __init__(self, name: str = "tabby-test", data_dir: str | None = None, netns: str | None = None,
                 host: str = "127.0.0.1", *, pki: Pki | None = None, peer_host: str = "127.0.0.1",
                 port: int | None = None, peer_port: int | None = None, progress_notify_s: float = 10.0) -> None:
        """netns: run inside that network namespace (listening on host there), as the lab does.
        progress_notify_s: how often a quiet watch is told it is up to date (below the watch's
        WATCH_IDLE_S, as an operator's etcd should be: tabby.store.etcd's docstring says why)."""
        self.name = name
        self.netns = netns
        self.host = host
        self.peer_host = peer_host
        self.pki = pki
        self.progress_notify_s = progress_notify_s
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="tabby-etcd-")
        self.port = port or free_port()
        self.peer_port = peer_port or free_port()
        self.metrics_port = free_port()
        self.initial_cluster = ""  # set by EtcdCluster; empty: this member alone
        self.proc: subprocess.Popen[bytes] | None = None
        if pki is not None and not pki.cert(name).exists():
            pki.issue(name, tuple(dict.fromkeys((host, peer_host, "127.0.0.1"))))

    @property
    def scheme(self) -> str:
        return "https" if self.pki else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{_bracket(self.host)}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{_bracket(self.peer_host)}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"{_bracket(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """The Store URL of this member alone (TLS: with the CA and the ``root`` client certificate)."""
        if self.pki is None:
            return f"etcd://{self.endpoint}"
        return f"etcds://{self.endpoint}?" + urlencode(self.pki_query("root"), safe="/")

    def pki_query(self, client: str) -> dict[str, str]:
        assert self.pki is not None
        return {"ca": str(self.pki.ca), "cert": str(self.pki.cert(client)), "key": str(self.pki.key(client))}

    def request(self, path: str, body: dict[str, object] | None = None, timeout: float = 1.0) -> dict[str, object]:
        """GET (or POST body to) one of the member's own endpoints, from where it runs, as root."""
        url = f"{self.client_url}{path}"
        tls = [str(self.pki.ca), str(self.pki.cert("root")), str(self.pki.key("root"))] if self.pki else ["", "", ""]
        data = "" if body is None else json.dumps(body)
        if self.netns is None:
            return json.loads(_fetch(url, data, timeout, *tls))
        r = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", _FETCH, url, data, str(timeout),
                            *tls], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(r.stderr.strip()[-300:])
        return json.loads(r.stdout)

    def healthy(self) -> bool:
        try:
            return self.request("/health").get("health") == "true"
        except (OSError, ValueError):
            return False

    def _argv(self) -> list[str]:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian package etcd-server)")
        data = Path(self.data_dir) / "data"
        argv = [binary, "--name", self.name, "--data-dir", str(data),
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
                "--listen-metrics-urls", f"http://127.0.0.1:{self.metrics_port}",
                # etcd 3.4/3.5's name (Debian 12 has 3.4); 3.6 calls it --watch-progress-notify-interval
                "--experimental-watch-progress-notify-interval", f"{round(self.progress_notify_s * 1000)}ms"]
        if self.pki is not None:
            cert, key, ca = str(self.pki.cert(self.name)), str(self.pki.key(self.name)), str(self.pki.ca)
            argv += ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
                     "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca,
                     "--peer-client-cert-auth"]
        return argv

    def spawn(self) -> None:
        """Start the process and return at once (members of a cluster start together)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(Path(self.data_dir) / "etcd.log", "ab")  # noqa: SIM115 - lives with the process
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen([*prefix, *self._argv()], stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"etcd {self.name} exited with {code}; see {self.data_dir}/etcd.log")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd {self.name} did not become healthy within {timeout}s; see {self.data_dir}/etcd.log")

    def start(self, timeout: float = 20.0) -> EtcdServer:
        self.spawn()
        try:
            self.wait_healthy(timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: the data stays, ``start`` brings the member back."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

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


@dataclass
class EtcdCluster:
    """n members on loopback (or each in a namespace of its own), optionally with TLS.

    ``url(client)`` is the Store URL with every member and, with TLS, that client's certificate."""

    members: list[EtcdServer]
    pki: Pki | None = None
    _own_dir: Path | None = field(default=None, repr=False)

    @classmethod
    def create(cls, n: int = 3, *, tls: bool = True, name: str = "tabby-test", directory: Path | None = None,
               hosts: list[tuple[str | None, str]] | None = None, clients: tuple[str, ...] = ()) -> EtcdCluster:
        """hosts: (netns, address) per member; default: all on 127.0.0.1. clients: names of client
        certificates to make besides ``root`` (the TLS CN; the user name where auth is on)."""
        own = directory is None
        directory = directory or Path(tempfile.mkdtemp(prefix="tabby-etcdc-"))
        pki = None
        if tls:
            pki = Pki.create(directory / "pki")
            for c in ("root", *clients):
                pki.issue(c)
        where = hosts or [(None, "127.0.0.1")] * n
        members = []
        for i, (ns, addr) in enumerate(where):
            d = directory / f"m{i}"
            d.mkdir(parents=True, exist_ok=True)
            members.append(EtcdServer(f"{name}-{i}", str(d), ns, addr, pki=pki, peer_host=addr))
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for m in members:
            m.initial_cluster = initial
        return cls(members, pki, directory if own else None)

    def url(self, client: str = "root", **query: str) -> str:
        eps = ",".join(m.endpoint for m in self.members)
        if self.pki is None:
            return f"etcd://{eps}" + (f"?{urlencode(query, safe='/')}" if query else "")
        return f"etcds://{eps}?" + urlencode({**self.members[0].pki_query(client), **query}, safe="/")

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for m in self.members:
            m.spawn()
        try:
            for m in self.members:
                m.wait_healthy(timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def status(self, m: EtcdServer) -> dict[str, object]:
        """The member's /v3/maintenance/status (its id, the leader's id, its raft index)."""
        return m.request("/v3/maintenance/status", {}, timeout=2)

    def leader(self, timeout: float = 20.0) -> EtcdServer:
        """The member that leads now (waits for an election)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.members:
                if m.proc is None or m.proc.poll() is not None:
                    continue
                try:
                    st = self.status(m)
                except OSError:
                    continue
                if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):  # type: ignore[union-attr]
                    return m
            time.sleep(0.05)
        raise RuntimeError(f"no etcd leader within {timeout}s")

    def stop(self) -> None:
        for m in self.members:
            m.stop(keep_data=True)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
