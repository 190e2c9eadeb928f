"""`tabby agent` and `tabby cni-server`: the long-running processes of a host."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated

import typer

from tabby.cli.common import (
    STATE,
    LogLevel,
    app,
    fail,
)
from tabby.store import StoreError, open_store


def _daemon_setup(host: str, log_level: str | None, what: str) -> None:
    """A long-running command's checks and logging: the host name first, then one log format."""
    import logging

    from tabby.model.names import check_name

    try:
        check_name(host)
    except ValueError as e:
        fail(f"--host: {e}")
    logging.basicConfig(level=(log_level or "info").upper(),
                        format=f"%(asctime)s {host} {what}%(levelname)s %(name)s: %(message)s")


_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9._+-]+)+/?")


# BIRD's control sockets are RUN_DIR/bird.ctl and RUN_DIR/bfd/bird.ctl, and a Unix socket's path is
# at most 107 bytes: a longer directory was taken, then BIRD could not bind it (no BGP at all)
MAX_RUN_DIR = 107 - len("/bfd/bird.ctl")


def plain_run_dir(path: str) -> bool:
    """An absolute path that can go into a daemon's config unquoted."""
    return bool(_PLAIN_PATH.fullmatch(path)) and all(s not in (".", "..") for s in path.split("/")) \
        and len(path) <= 200


@app.command()
def agent(
    host: Annotated[str, typer.Option(help="the Host this agent serves (its Endpoints have spec.host = HOST)")],
    metrics_port: Annotated[int | None, typer.Option(
        help="port for /healthz and /metrics; 0 picks a free one (default: Config metrics_port, 9091)",
        min=0, max=65535)] = None,
    metrics_addr: Annotated[str, typer.Option(help="address for /healthz and /metrics")] = "127.0.0.1",
    resync_s: Annotated[float | None, typer.Option(
        help="full kernel check interval, jittered by 10% (default: Config resync_interval_s, 90)",
        min=0.1, max=86400)] = None,
    log_level: Annotated[LogLevel | None, typer.Option(help="default: Config log_level, info")] = None,
    bgp: Annotated[bool, typer.Option(help="run and configure BIRD for this host")] = True,
    run_dir: Annotated[Path | None, typer.Option(help="BIRD's files (default /run/tabby/HOST)")] = None,
    bgp_password_dir: Annotated[Path, typer.Option(
        help="the only directory whose files a BGP password_file (BGPPeer, Config) may name; a file "
             "elsewhere is not read and its sessions are disabled")] = Path("/etc/tabby/bgp-passwords"),
) -> None:
    """Run the per-host agent in this network namespace, until SIGTERM or SIGINT."""
    import logging
    import signal

    from tabby.agent.agent import Agent

    _daemon_setup(host, log_level, "")
    if run_dir is not None and not plain_run_dir(str(run_dir)):
        # it is written into dnsmasq's, tayga's and unbound's configs: a space, quote or newline
        # would break (or add) their lines
        fail(f"--run-dir: {str(run_dir)!r} is not an absolute path of letters, digits and '._+-/' "
             "without '.' or '..' steps", code=2)
    effective = str(run_dir or Path("/run/tabby") / host).rstrip("/")
    if len(effective) > MAX_RUN_DIR:
        fail(f"--run-dir: {effective[:60]!r}... is {len(effective)} characters; BIRD's control socket "
             f"{'' if run_dir else '(under the default /run/tabby/HOST) '}needs it at most {MAX_RUN_DIR} "
             "(a Unix socket path is at most 107 bytes): give a shorter --run-dir", code=2)
    if not plain_run_dir(str(bgp_password_dir)):
        fail(f"--bgp-password-dir: {str(bgp_password_dir)!r} is not an absolute path of letters, digits and "
             "'._+-/' without '.' or '..' steps", code=2)
    try:
        ipaddress.ip_address(metrics_addr)
    except ValueError:
        fail(f"--metrics-addr: {metrics_addr!r} is not an IP address", code=2)
    for noisy in ("urllib3", "asyncio"):  # one debug line per message or connection
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        store = open_store(STATE.store_url)
    except (ValueError, StoreError, OSError) as e:
        fail(f"cannot open store {STATE.store_url}: {e}")
    given = {"log_level": log_level, "resync_interval_s": resync_s, "metrics_port": metrics_port}
    a = Agent(store, host, resync_s=resync_s or 90.0, metrics_addr=metrics_addr,
              metrics_port=9091 if metrics_port is None else metrics_port, bgp=bgp,
              overrides=frozenset(k for k, v in given.items() if v is not None),
              run_dir=run_dir, bgp_password_dir=bgp_password_dir)
    signal.signal(signal.SIGTERM, lambda *_: a.stop())
    signal.signal(signal.SIGINT, lambda *_: a.stop())
    a.run()


@app.command("cni-server")
def cni_server(
    host: Annotated[str, typer.Option(help="the Host this node is (the default for calls that name none)")],
    socket_path: Annotated[Path | None, typer.Option("--socket", help="default /run/tabby/cni/HOST.sock")] = None,
    log_level: Annotated[LogLevel, typer.Option()] = LogLevel.info,
) -> None:
    """Serve tabby-cni calls warm, in this network namespace, until SIGTERM or SIGINT."""
    import logging
    import signal
    import threading

    from tabby.cni.server import serve
    from tabby.cni.shim import SOCKET_DIR

    _daemon_setup(host, log_level, "cni-server ")
    path = socket_path or Path(SOCKET_DIR) / f"{host}.sock"
    try:
        server = serve(path, {"TABBY_STORE": STATE.store_url, "TABBY_HOST": host})
    except OSError as e:  # a file that is not a socket is there, a directory cannot be made...
        fail(f"--socket {path}: {e.strerror or e}")
    stop = lambda *_: threading.Thread(target=server.shutdown).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("tabby.cni").info("serving on %s", path)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        path.unlink(missing_ok=True)
