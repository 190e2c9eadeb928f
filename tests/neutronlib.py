"""A real neutron-server for tests: Neutron's own WSGI API application, ML2 with tabby's driver,
a SQLite database, no authentication, the fake (in-process) RPC transport. It runs from
.venv-neutron (scripts/setup.sh makes it), in a process of its own, ended at the end."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tabby.lab.etcd import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv-neutron" / "bin" / "python"

# Neutron's migrations use ALTERs SQLite cannot do: the schema is made from the models instead and
# stamped as current (Neutron's unit tests run on SQLite the same way). The migrations would also
# have seeded default security group rules; here new groups start empty.
MAKE_DB = """
import sys
import sqlalchemy as sa
from neutron.db.migration.models import head
head.get_metadata().create_all(sa.create_engine(sys.argv[1]))
"""

SERVE = """
import os, sys
os.environ["OS_NEUTRON_CONFIG_DIR"] = sys.argv[1]
os.environ["OS_NEUTRON_CONFIG_FILES"] = "neutron.conf;ml2_conf.ini"
port = int(sys.argv[2])
sys.argv = sys.argv[:1]
from wsgiref.simple_server import WSGIRequestHandler, make_server
from neutron.wsgi.api import application
class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass
make_server("127.0.0.1", port, application, handler_class=Quiet).serve_forever()
"""


@contextmanager
def neutron_server(d: Path, store_url: str, page_size: int | None = None) -> Iterator[str]:
    """page_size: Neutron's pagination_max_limit (it pages every list at that size)."""
    d.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{d}/neutron.db"
    paste = ROOT / ".venv-neutron" / "etc" / "neutron" / "api-paste.ini"
    (d / "neutron.conf").write_text(textwrap.dedent(f"""\
        [DEFAULT]
        core_plugin = ml2
        service_plugins =
        auth_strategy = noauth
        transport_url = fake:/
        state_path = {d}/state
        api_paste_config = {paste}
        {f"pagination_max_limit = {page_size}" if page_size else ""}
        [database]
        connection = {db}
        [oslo_concurrency]
        lock_path = {d}/lock
        """))
    (d / "ml2_conf.ini").write_text(textwrap.dedent(f"""\
        [ml2]
        type_drivers = flat
        tenant_network_types =
        mechanism_drivers = tabby
        extension_drivers = port_security
        [ml2_type_flat]
        flat_networks = *
        [tabby]
        store_url = {store_url}
        """))
    subprocess.run([str(PY), "-c", MAKE_DB, db], check=True, capture_output=True)
    subprocess.run([str(ROOT / ".venv-neutron" / "bin" / "neutron-db-manage"), "--config-file",
                    str(d / "neutron.conf"), "--config-file", str(d / "ml2_conf.ini"), "stamp", "heads"],
                   check=True, capture_output=True)
    port = free_port()
    log = open(d / "neutron-server.log", "wb")  # noqa: SIM115 - lives with the process
    # the driver from this tree (the venv's editable install may point at another checkout)
    paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.Popen([str(PY), "-c", SERVE, str(d), str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"neutron-server exited: {(d / 'neutron-server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/v2.0/networks", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("neutron-server did not answer within 90 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print("--- neutron-server log (tail)\n" + (d / "neutron-server.log").read_text()[-3000:])


def resync(store_url: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``tabby openstack resync`` as an operator runs it where neutron-server runs (openstacksdk and
    keystoneauth1 are there), with credentials only in ``env`` (OS_*), never in argv."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    return subprocess.run([str(PY), "-m", "tabby.cli", "--store", store_url, "openstack", "resync", *args],
                          capture_output=True, text=True, env={**clean, **env, "PYTHONPATH": str(ROOT / "src")})
