"""TCP MD5 passwords on the host mesh, between two real BIRDs: a wrong one never reaches
Established and the status says why; fixed in its file, the session comes up without a Store
write; the password is in no log, no status, no ``tabby get`` output (only the file's path is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lablib import birdc, lab

from tabby.client import ResourceClient
from tabby.dataplane import bird_config
from tabby.lab import lab as L
from tabby.model import validate
from tabby.store import open_store

RIGHT, WRONG, SECRET = "right-Pw#1 x", "wrong-Pw#2 y", "from-Config#3 z"
SESSION = bird_config._ident("host h2 v6")


def cli(the_lab: L.Lab, *args: str, stderr: bool = True) -> str:
    r = subprocess.run([sys.executable, "-m", "tabby.cli", "--store", the_lab.store_url, *args], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    return r.stdout + (r.stderr if stderr else "")


def h1_state(the_lab: L.Lab) -> str:
    line = next((x for x in birdc(the_lab, "h1", "show", "protocols").splitlines() if x.startswith(SESSION)), "")
    return line


def test_wrong_password_never_established_says_why_and_leaks_nowhere(tmp_path: Path) -> None:
    with lab(2, 0, ipv6_only=True) as the_lab:
        right, wrong = the_lab.bgp_password_dir / "mesh.pw", the_lab.bgp_password_dir / "mesh-h2.pw"
        right.write_text(RIGHT + "\n")
        wrong.write_text(WRONG + "\n")
        client = ResourceClient(open_store(the_lab.store_url))

        def h1_error() -> str:
            docs = json.loads(cli(the_lab, "bgp", "status", "-o", "json", stderr=False) or "[]")
            return next((str(d.get("error")) for d in docs if d["host"] == "h1"), "")

        # a file outside the agents' --bgp-password-dir is not read, whatever it holds: the
        # sessions are disabled, and the status says why
        outside = tmp_path / "mesh.pw"
        outside.write_text(RIGHT + "\n")
        client.apply(validate({"kind": "Config", "metadata": {"name": "global"},
                               "spec": {"mesh_password_file": str(outside)}}))
        assert L.wait_until(lambda: "not in the agent's --bgp-password-dir" in h1_error(), 30), h1_error()
        assert str(outside) in h1_error() and "disabled;" in (the_lab.run_dir / "h1" / "bird.conf").read_text()
        assert "Established" not in h1_state(the_lab)

        client.apply(validate({"kind": "Config", "metadata": {"name": "global"},
                               "spec": {"mesh_password_file": str(right)}}))
        client.apply(validate({"kind": "Config", "metadata": {"name": "host.h2"},
                               "spec": {"mesh_password_file": str(wrong)}}))

        def why() -> str | None:
            docs = json.loads(cli(the_lab, "bgp", "status", "-o", "json", stderr=False) or "[]")
            for d in docs:
                if d["host"] == "h1":
                    return next((s.get("why") for s in d["sessions"] if s["name"] == SESSION), None)
            return None

        # the kernel's MD5 drop counters say it is a mismatch once h2's first segments came in
        assert L.wait_until(lambda: "password differs" in str(why()), 30), cli(the_lab, "bgp", "status", "-o", "json")
        assert "Established" not in h1_state(the_lab)
        conf = the_lab.run_dir / "h1" / "bird.conf"
        assert f'password "{RIGHT}";' in conf.read_text() and (conf.stat().st_mode & 0o077) == 0

        # fixed in its file alone: the agent looks at password files at every BGP check
        wrong.write_text(RIGHT + "\n")
        assert L.wait_until(lambda: "Established" in h1_state(the_lab), 30), h1_state(the_lab)
        assert L.wait_until(lambda: not why(), 15), why()

        shown = cli(the_lab, "get", "config", "-o", "yaml") + cli(the_lab, "get", "config", "-o", "json") + \
            cli(the_lab, "bgp", "status", "-o", "json") + cli(the_lab, "bgp", "status") + \
            cli(the_lab, "status", "-o", "json")
        assert str(right) in shown  # the path is what the Store holds
        logs = [p.read_text(errors="replace") for p in the_lab.dir.glob("*.log")]
        logs += [p.read_text(errors="replace") for p in Path(the_lab.run_dir).rglob("*.log")]
        for text in [shown, *logs]:
            assert RIGHT not in text and WRONG not in text


def test_password_from_a_config_secret_is_redacted_everywhere() -> None:
    with lab(2, 0, ipv6_only=True) as the_lab:
        client = ResourceClient(open_store(the_lab.store_url))
        client.apply(validate({"kind": "Config", "metadata": {"name": "global"},
                               "spec": {"mesh_password_secret": "mesh", "bgp_secrets": {"mesh": SECRET}}}))
        confs = [the_lab.run_dir / h / "bird.conf" for h in ("h1", "h2")]
        assert L.wait_until(lambda: all(c.exists() and f'password "{SECRET}";' in c.read_text() for c in confs), 30)
        assert L.wait_until(lambda: "Established" in h1_state(the_lab), 30), h1_state(the_lab)
        shown = cli(the_lab, "get", "config", "-o", "yaml") + cli(the_lab, "get", "config", "global", "-o", "json") + \
            cli(the_lab, "bgp", "status", "-o", "json") + cli(the_lab, "status", "-o", "json")
        assert "<redacted>" in shown
        logs = [p.read_text(errors="replace") for p in the_lab.dir.glob("*.log")]
        logs += [p.read_text(errors="replace") for p in Path(the_lab.run_dir).rglob("*.log")]
        for text in [shown, *logs]:
            assert SECRET not in text

