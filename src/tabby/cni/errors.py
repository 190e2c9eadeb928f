"""CNI error codes (SPEC.md "Error codes") and the one exception the verbs raise."""

from __future__ import annotations

from typing import Any

INCOMPATIBLE, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER, INVALID_ENV, IO_FAILURE, DECODE, INVALID_CONF = 1, 2, 3, 4, 5, 6, 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADDs now
INTERNAL = 999  # a bug in tabby-cni (codes from 100 up are a plugin's own)


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out
