"""What a tabby-cni process that runs a call itself imports: none of pydantic, yaml, site,
dataclasses, hashlib or socket.py on the normal ADD and DEL path (each is tens of ms of every
call); and ``site`` still arrives the moment an import needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

# every module and reader an in-process ADD and DEL uses, exercised without a kernel
PATH = f"""
import sys
sys.path.insert(0, {SRC!r})
import ctypes, fcntl
import tabby.cni.main, tabby.cni.nl, tabby.cni.lock, tabby.ipam, tabby.store, tabby.store.sqlite
from tabby.cni.config import parse, request
from tabby.model import light
from tabby.model.ipam import Handle, decode_ipam, encode_ipam
from tabby.model.keys import ipam_handle_key, resource_key
request(parse(b'{{"cniVersion": "1.1.0", "name": "n", "type": "tabby-cni"}}'))
pool = light.read(resource_key("IPPool", "v6"),
                  b'{{"kind":"IPPool","metadata":{{"name":"v6","labels":{{}}}},'
                  b'"spec":{{"cidr":"fd00:e::/104","block_size":122,"nat_outgoing":false,"disabled":false}}}}',
                  "IPPool")
assert type(pool).__module__ == "tabby.model.light", pool
light.endpoint_record({{"kind": "Endpoint", "metadata": {{"name": "n.c.eth0", "labels": {{"cni.network": "n"}}}},
                       "spec": {{"host": "h1", "orchestrator": "container", "workload_id": "n.c/eth0",
                                "interface": "tby0", "mac": "ee:ee:ee:ee:ee:ee",
                                "ipv6_addresses": ["fd00:e::5/128"], "ipv4_addresses": []}}}})
decode_ipam(ipam_handle_key("n.c/eth0"), encode_ipam(Handle(handle="n.c/eth0")))
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-SE", "-c", code], capture_output=True, text=True, timeout=60)


def test_the_in_process_path_imports_none_of_the_slow_modules() -> None:
    r = _run(PATH + "print(' '.join(sorted(sys.modules)))")
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "tabby.model.light" in loaded and "tabby.ipam.allocator" in loaded  # the path was walked
    slow = {"pydantic", "pydantic_core", "yaml", "site", "dataclasses", "inspect", "hashlib", "_hashlib", "socket",
            "selectors", "inotify_simple", "ctypes.util", "tabby.model.resources", "tabby.model.codec"}
    assert loaded & slow == set()


def test_site_is_loaded_when_an_import_needs_it() -> None:
    code = (f"import sys\nsys.path.insert(0, {SRC!r})\nfrom tabby.cni.shim import _SiteOnDemand\n"
            "sys.meta_path.append(_SiteOnDemand)\nimport tabby.cni.main\nassert 'site' not in sys.modules\n"
            "import pydantic\nassert 'site' in sys.modules and _SiteOnDemand not in sys.meta_path\n"
            "try:\n    import tabby_no_such_module\nexcept ModuleNotFoundError as e:\n    print(e.name)\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tabby_no_such_module"
