"""The parts import one way (DESIGN.md): a test, so a shortcut across the layers fails CI."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tabby"

# part -> parts it must never import
FORBIDDEN = {
    "dataplane": ("tabby.agent", "tabby.cli", "tabby.store", "tabby.syncer", "tabby.client"),
    "model": ("tabby.agent", "tabby.dataplane", "tabby.store", "tabby.ipam", "tabby.cli"),
    "store": ("tabby.agent", "tabby.dataplane", "tabby.model", "tabby.ipam", "tabby.cli"),
    "ipam": ("tabby.agent", "tabby.dataplane", "tabby.cli"),
    "openstack": ("tabby.agent", "tabby.dataplane"),
    "cni": ("tabby.agent", "tabby.dataplane.bird", "tabby.dataplane.dnsmasq", "tabby.dataplane.policy"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def test_no_part_imports_a_layer_above_it() -> None:
    bad = []
    for part, forbidden in FORBIDDEN.items():
        for path in sorted((SRC / part).rglob("*.py")):
            for line, module in imports(path):
                if module.startswith(forbidden):
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from tabby.agent.calc import HostIndex\n")
    assert imports(f) == [(2, "tabby.agent.calc")]
