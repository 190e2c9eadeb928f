"""Any record under tabby's root -> its typed value, by where its key lives. No I/O.

The one dispatch every reader that walks the whole Store uses (``tabby status``, the hostile-input
tests), so that a key outside the layout is reported the same way everywhere.
"""

from __future__ import annotations

from typing import Any

from tabby.model.codec import InvalidResource, decode
from tabby.model.ipam import decode_ipam
from tabby.model.keys import IPAM_PREFIX, PREFIX, ROOT, STATUS_PREFIX
from tabby.model.status import decode_status


def decode_record(key: str, value: bytes) -> Any:
    """A resource, an IPAM record or a status record; InvalidResource (only) when it is none."""
    if key.startswith(STATUS_PREFIX):
        return decode_status(key, value)
    if key.startswith(IPAM_PREFIX):
        return decode_ipam(key, value)
    if key.startswith(PREFIX):
        return decode(key, value)
    if key.startswith(ROOT):
        raise InvalidResource(key, [f"(key): neither under {PREFIX} nor under {STATUS_PREFIX}"])
    raise InvalidResource(key, ["(key): outside tabby's prefix " + ROOT])
