"""Write the ``tabby-cni`` executable into a CNI plugin directory (``CNI_PATH``):

    python -m tabby.cni.install /opt/cni/bin

Why not pip's ``tabby-cni`` console script: that wrapper imports ``re`` and the interpreter
loads ``site`` (every .pth file) before the shim runs, ~3 ms of the ~15 ms a Python plugin
process costs on every call. This one runs the same interpreter with ``-SE`` (no site, no
PYTHON* variables), puts the directory holding the ``tabby`` package first on ``sys.path`` and
calls the shim, which imports only built-in modules. When the shim has to run the call itself
(no server), ``site`` is loaded the first time an import needs it (``shim._SiteOnDemand``), so
everything installed is still found.
The file is written to a temporary name and renamed: a runtime never sees half of it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import tabby


def script(python: str = sys.executable) -> str:
    package_root = str(Path(tabby.__file__).resolve().parents[1])
    return (f"#!{python} -SE\n"
            "# tabby-cni: written by `python -m tabby.cni.install`; see tabby/cni/install.py\n"
            f"import sys\nsys.path.insert(0, {package_root!r})\n"
            "from tabby.cni.shim import main\nmain()\n")


def install(directory: str | os.PathLike[str], name: str = "tabby-cni", python: str = sys.executable) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.tmp{os.getpid()}"
    tmp.write_text(script(python))
    tmp.chmod(0o755)
    target = d / name
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tabby.cni.install CNI_BIN_DIR")
    print(install(sys.argv[1]))
