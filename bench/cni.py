"""CNI plugin latency, as a runtime sees it: one plugin process per call, started directly in the
host's network namespace (as containerd or podman would), for a fresh container namespace each
time; tabby-cni and the reference plugins (ptp + host-local, Debian containernetworking-plugins)
side by side.

    python bench/cni.py [--quick] [--only server|in-process|ptp]

Prints add_p50_ms, add_p99_ms, del_p50_ms, del_p99_ms with labels plugin (tabby, ptp), family
(dual, v4), parallel (1, 8) and mode ("server": the shim hands the call to a warm `tabby
cni-server`; "in-process": the plugin process does everything itself, which is how ptp always
runs); server_phase_p50_ms per phase of the server's work (labels phase, verb); then checks that
all those ADDs and DELs left no veth (counted after each run's DELs, before its container
namespaces go), no allocation, no record and no host-local lease (leaked_objects); and
process_start_p50_ms, the start-up floor of each plugin process (VERSION). A "server" run fails
unless the server logged every one of its calls. ptp dual-stack waits for IPv6 DAD (~1.8 s an
ADD) and runs only a few calls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tabby.client import ResourceClient  # noqa: E402
from tabby.cni import nl  # noqa: E402
from tabby.cni.install import install  # noqa: E402
from tabby.ipam import IPAM  # noqa: E402
from tabby.lab import netns  # noqa: E402
from tabby.model import validate  # noqa: E402
from tabby.store import open_store  # noqa: E402

METRICS = ("add_p50_ms", "add_p99_ms", "del_p50_ms", "del_p99_ms", "server_phase_p50_ms", "process_start_p50_ms",
           "leaked_objects")
REFERENCE_PLUGINS = Path("/usr/lib/cni")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def emit(**fields: object) -> None:
    print(json.dumps({"bench": "cni", **fields}), flush=True)


class Runner:
    def __init__(self, d: Path, env: dict[str, str]) -> None:
        self.d, self.env = d, env

    def call(self, binary: str, command: str, conf: str, cid: str, container: str, extra: dict[str, str]) -> float:
        env = {**self.env, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0",
               "CNI_NETNS": f"/run/netns/{container}", **extra}
        t0 = time.perf_counter()
        r = subprocess.run([binary], input=conf, capture_output=True, text=True, env=env)
        dt = (time.perf_counter() - t0) * 1000
        if r.returncode != 0:
            raise RuntimeError(f"{binary} {command} {cid}: {r.stdout} {r.stderr}")
        return dt


def server_phases(log: Path, pos: int, calls: int, **labels: object) -> int:
    """Where the server's milliseconds went in the last run: the median of each phase of its
    log lines (one per call) written since pos; returns the new position. Also the proof that the
    run was served: the shim falls back to running a call itself when the server does not
    answer, so a "server" figure with fewer than ``calls`` ADDs and DELs logged would be another's."""
    deadline = time.monotonic() + 5.0  # the line of the last call may follow its answer
    while True:
        raw = log.read_bytes()[pos:]
        text = raw.decode(errors="replace")
        lines = re.findall(r" (ADD|DEL) \S+ eth0 -> 0 in ([0-9.]+) ms \((.*)\)", text)
        if len(lines) >= 2 * calls or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if len(lines) < 2 * calls:
        raise RuntimeError(f"the server logged {len(lines)} of {2 * calls} calls: the rest ran in-process")
    phases: dict[tuple[str, str], list[float]] = {}
    for verb, total, rest in lines:
        phases.setdefault((verb, "total"), []).append(float(total))
        for k, v in re.findall(r"(\w+)=([0-9.]+)", rest):
            phases.setdefault((verb, k), []).append(float(v))
    for (verb, phase), xs in sorted(phases.items()):
        emit(metric="server_phase_p50_ms", value=round(statistics.median(xs), 2), unit="ms", verb=verb,
             phase=phase, calls=len(xs), **labels)
    return pos + len(raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("server", "in-process", "ptp"), help="just these runs (and the start-up floor)")
    args = ap.parse_args()
    tag = uuid.uuid4().hex[:4]
    host_ns = f"tbyc{tag}"
    containers: list[str] = []
    server = None
    with tempfile.TemporaryDirectory(prefix="tabby-bench-cni-") as tmp:
        d = Path(tmp)
        try:
            netns.add_netns(host_ns)
            url = f"sqlite://{d}/store.db"
            store = open_store(url)
            client = ResourceClient(store)
            client.apply(validate({"kind": "IPPool", "metadata": {"name": "v6"}, "spec": {"cidr": "fd00:e::/104"}}))
            client.apply(validate({"kind": "IPPool", "metadata": {"name": "v4"}, "spec": {"cidr": "10.64.0.0/14"}}))
            sock = d / "cni.sock"
            binary = install(d / "bin")  # what CNI_PATH holds: the lean shim executable
            pythonpath = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
            runner = Runner(d, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": pythonpath,
                                "CNI_PATH": str(REFERENCE_PLUGINS)})
            server_log = d / "server.log"
            server = netns.spawn(host_ns, [sys.executable, "-m", "tabby.cli", "--store", url, "cni-server",
                                           "--host", "hb", "--socket", str(sock), "--log-level", "info"], server_log,
                                 {"PYTHONPATH": pythonpath})
            netns.wait_for(sock.exists, 30, 0.05, "cni-server")
            # from here on this process (and what it starts) is in the host's namespace, like a runtime
            fd = os.open(f"/run/netns/{host_ns}", os.O_RDONLY)
            nl._setns(fd)
            os.close(fd)

            def tabby_conf(v4_only: bool) -> str:
                return json.dumps({"cniVersion": "1.1.0", "name": "bench", "type": "tabby-cni", "store": url,
                                   "host": "hb", "server_socket": str(sock), "ipv6": not v4_only})

            def ptp_conf(dual: bool) -> str:
                ranges = [[{"subnet": "10.99.0.0/16"}]] + ([[{"subnet": "fd00:99::/64"}]] if dual else [])
                return json.dumps({"cniVersion": "1.0.0", "name": "ptpbench", "type": "ptp", "ipMasq": False,
                                   "ipam": {"type": "host-local", "ranges": ranges, "dataDir": str(d / "host-local"),
                                            "routes": [{"dst": "0.0.0.0/0"}] + ([{"dst": "::/0"}] if dual else [])}})

            n = 20 if args.quick else 200
            n_inproc = 6 if args.quick else 60
            runs = [  # plugin, family, mode, parallel, calls
                ("tabby", "dual", "server", 1, n), ("tabby", "dual", "server", 8, n),
                ("tabby", "v4", "server", 1, n),
                ("tabby", "dual", "in-process", 1, n_inproc), ("tabby", "dual", "in-process", 8, 2 * n_inproc),
                ("ptp", "v4", "in-process", 1, n), ("ptp", "v4", "in-process", 8, n),
            ]
            if not args.quick:
                runs.append(("ptp", "dual", "in-process", 1, 8))
            if args.only:
                runs = [r for r in runs if (r[0] if args.only == "ptp" else r[2]) == args.only and
                        (args.only == "ptp" or r[0] == "tabby")]
            log_pos = 0
            leaked_veths = 0
            for plugin, family, mode, parallel, calls in runs:
                names = [f"tbyc{tag}{plugin[0]}{family[0]}{mode[0]}{parallel}x{i}" for i in range(calls)]
                for c in names:
                    netns.add_netns(c)
                containers += names
                if plugin == "tabby":
                    binary_path, conf = str(binary), tabby_conf(family == "v4")
                    extra = {} if mode == "server" else {"TABBY_CNI_NO_SERVER": "1"}
                else:
                    binary_path, conf, extra = str(REFERENCE_PLUGINS / "ptp"), ptp_conf(family == "dual"), {}
                with ThreadPoolExecutor(parallel) as pool:
                    adds = list(pool.map(lambda c, b=binary_path, s=conf, e=extra: runner.call(b, "ADD", s, c, c, e),
                                         names))
                    dels = list(pool.map(lambda c, b=binary_path, s=conf, e=extra: runner.call(b, "DEL", s, c, c, e),
                                         names))
                for metric, xs in (("add", adds), ("del", dels)):
                    for q, label in ((0.5, "p50"), (0.99, "p99")):
                        emit(metric=f"{metric}_{label}_ms", value=round(statistics.median(xs) if q == 0.5 else
                                                                         pct(xs, q), 1),
                             unit="ms", plugin=plugin, family=family, mode=mode, parallel=parallel, calls=len(xs))
                # a veth DEL left behind is counted now: deleting its container namespace destroys it
                leaked_veths += sum(": tby" in line or ": veth" in line
                                    for line in netns.ip("-o", "link", "show", ns=host_ns).splitlines())
                for c in names:
                    netns.del_netns(c)
                if plugin == "tabby" and mode == "server":
                    log_pos = server_phases(server_log, log_pos, calls, family=family, parallel=parallel)
            # the floor under any plugin process: start-up alone (VERSION, answered without work)
            for name, argv in (("tabby-cni", [str(binary)]), ("ptp", [str(REFERENCE_PLUGINS / "ptp")]),
                               ("python -S", [sys.executable, "-S", "-c", "pass"])):
                xs = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    subprocess.run(argv, env={**runner.env, "CNI_COMMAND": "VERSION"}, input="{}", text=True,
                                   capture_output=True)
                    xs.append((time.perf_counter() - t0) * 1000)
                emit(metric="process_start_p50_ms", value=round(statistics.median(xs), 1), unit="ms", plugin=name,
                     calls=len(xs))
            leases = [p for p in (d / "host-local").rglob("*")  # host-local names a lease file by its address
                      if p.is_file() and re.fullmatch(r"[0-9a-f.:]+", p.name)]
            leaked = leaked_veths + len(IPAM(store).handles()) + len(store.list("/tabby/v1/endpoints/")[0]) + \
                len(leases)
            emit(metric="leaked_objects", value=leaked, unit="objects", adds_and_dels=2 * len(containers))
        finally:
            if server is not None:
                netns.stop(server)
            for c in containers:
                if netns.netns_exists(c):
                    netns.del_netns(c)
            netns.del_netns(host_ns)


if __name__ == "__main__":
    main()
