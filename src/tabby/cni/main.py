"""Entry point of ``tabby-cni``. Only VERSION is served until the CNI issue lands; every other
verb answers with a CNI error (code 4, "unsupported field/verb") instead of pretending."""

from __future__ import annotations

import json
import os
import sys

SUPPORTED_VERSIONS = ["1.0.0", "1.1.0"]


def main() -> None:
    command = os.environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        print(json.dumps({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}))
        return
    print(json.dumps({"cniVersion": "1.1.0", "code": 4,
                      "msg": f"tabby-cni: CNI_COMMAND {command or '(unset)'} is not implemented yet"}))
    sys.exit(1)
