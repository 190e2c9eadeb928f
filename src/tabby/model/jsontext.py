"""JSON text from outside -> plain data, total: any bytes become a value or ``InvalidResource``.

Apart from ``codec`` (which adds the pydantic models) so that readers on a latency path (the CNI
plugin started per call, IPAM's records) check bytes without importing pydantic or yaml.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# etcd refuses requests over 1.5 MiB by default, and the largest record a tabby writer makes (a
# Profile from a big security group) is far below 1 MiB: anything larger did not come from us.
MAX_RECORD_BYTES = 1024 * 1024
# The deepest legitimate record is a Policy: spec > ingress > rule > src_nets > item, about 6
# levels. 32 leaves room to grow and keeps every walk over a record shallow.
MAX_DEPTH = 32
# Characters that have no business in any field and that mislead a reader of a log or a table:
# C0/C1 controls (a newline forges a log line) and the Unicode bidi controls (Trojan Source).
_FORBIDDEN_CHARS = frozenset(
    [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)]
    + [chr(c) for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))])
# Values and keys a walk may visit: a 1 MiB record holds fewer, and a YAML document whose aliases
# fan out (the "billion laughs") is refused instead of being walked for ever.
MAX_NODES = 500_000
# one Store record's values (a Profile of 60,000 networks is far below): 520,000 bad list items in a
# 1 MiB record took pydantic 1.6 s and 2 GB to refuse, and under a memory limit a MemoryError, or a
# pydantic-core panic that hung the agent. Counted by the commas, before anything is parsed.
MAX_RECORD_VALUES = 100_000


class InvalidResource(ValueError):
    """A record or document that failed decoding or validation: the "corrupt record" value.

    ``where`` is the key (or document), ``errors`` are ``field: message`` lines, ``field`` the
    first bad field ("(document)" when the whole thing is unreadable)."""

    def __init__(self, where: str, errors: list[str]) -> None:
        # hostile text (a key, a field name) must not forge a log line or a status record
        self.where = _printable(where, 1000)
        self.errors = [_printable(e, 1000) for e in errors[:20]]
        self.field = self.errors[0].split(":", 1)[0][:200] if self.errors else "(document)"
        super().__init__(f"{self.where}: " + "; ".join(self.errors))


def _printable(text: str, limit: int) -> str:
    """Non-printable characters (controls, bidi marks, lone surrogates) as escapes; cut to limit."""
    if not text.isprintable() or any(c in _FORBIDDEN_CHARS or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = "".join(c if c.isprintable() and c not in _FORBIDDEN_CHARS and not 0xD800 <= ord(c) <= 0xDFFF
                       else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Reject(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Reject(f"duplicate key {k!r} in one object")
        out[k] = v
    return out


def _constant(name: str) -> float:
    raise _Reject(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"number {text[:40]} is out of range")
    return value


def _bad_text(s: str) -> str | None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (not valid Unicode)"
    bad = next((c for c in s if c in _FORBIDDEN_CHARS), None)
    return None if bad is None else f"contains control character U+{ord(bad):04X}"


def _check_tree(doc: Any) -> None:
    """Depth and text checks in one iterative walk (a recursive one is what hostile input breaks)."""
    stack: list[tuple[Any, str, int]] = [(doc, "", 1)]
    visited = 0
    while stack:
        node, path, depth = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise InvalidResource("", [f"(document): more than {MAX_NODES} values"])
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, list):
            items = ((str(i), v) for i, v in enumerate(node))
        else:
            if isinstance(node, str):
                if why := _bad_text(node):
                    raise InvalidResource("", [f"{path or '(document)'}: {why}"])
            elif node is not None and type(node) not in (int, float, bool):
                # YAML's explicit tags make other values (!!binary bytes, !!set, !!timestamp): pydantic
                # read bytes as text, past the control-character check, so the record was corrupt
                # for every reader once written
                raise InvalidResource("", [f"{path or '(document)'}: a {type(node).__name__} value (a YAML tag?) "
                                           "is no JSON value"])
            continue
        if depth > MAX_DEPTH:
            raise InvalidResource("", [f"{path or '(document)'}: nested deeper than {MAX_DEPTH} levels"])
        for k, v in items:
            if not isinstance(k, str):  # YAML allows any key; JSON and our models want strings
                raise InvalidResource("", [f"{path or '(document)'}: key {k!r} is not a string"])
            where = f"{path}.{k}" if path else k
            if isinstance(node, dict) and (why := _bad_text(k)):
                raise InvalidResource("", [f"{where}: key {why}"])
            stack.append((v, where, depth + 1))


def strict_json(text: str) -> Any:
    """json.loads that refuses duplicate keys, NaN and infinities (raises ValueError, RecursionError)."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_constant, parse_float=_finite)


def load_json(key: str, value: bytes, max_bytes: int = MAX_RECORD_BYTES,
              max_values: int | None = MAX_RECORD_VALUES) -> Any:
    """Any bytes -> plain JSON data, or InvalidResource naming the key (and the field). max_values:
    a Store record's bound (None for a file of many records, each decoded and bounded on its own)."""
    if len(value) > max_bytes:
        raise InvalidResource(key, [f"(document): {len(value)} bytes, more than the {max_bytes} allowed"])
    if max_values is not None and value.count(b",") >= max_values:  # (an upper bound, counted in C)
        raise InvalidResource(key, [f"(document): more than {max_values} values"])
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidResource(key, [f"(document): not UTF-8 (byte {e.start})"]) from None
    try:
        doc = strict_json(text)
    except RecursionError:
        raise InvalidResource(key, [f"(document): nested deeper than {MAX_DEPTH} levels"]) from None
    except _Reject as e:
        raise InvalidResource(key, [f"(document): {e}"]) from None
    except ValueError as e:  # JSONDecodeError, and ints past Python's digit limit
        raise InvalidResource(key, [f"(document): not valid JSON: {e}"]) from None
    try:
        if text.isascii() and "\\" not in text and "\x7f" not in text:
            # no escape anywhere, nothing outside ASCII and no DEL: no string can hold a control,
            # bidi or surrogate character (JSON refuses raw controls), so only the depth is left
            _check_depth(text)
        else:
            _check_tree(doc)
    except InvalidResource as e:
        raise InvalidResource(key, e.errors) from None
    return doc


_STRINGS_AND_TEXT = re.compile(r'"[^"]*"|[^\[\]{}"]+')


def _check_depth(text: str) -> None:
    """The nesting depth of escape-free JSON text, from its brackets alone (strings removed)."""
    depth = 0
    for c in _STRINGS_AND_TEXT.sub("", text):
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise InvalidResource("", [f"(document): nested deeper than {MAX_DEPTH} levels"])
        else:
            depth -= 1
