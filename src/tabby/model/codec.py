"""Turning bytes and documents into resources and back, with errors that name the field.

Every read path is total: ``load_json`` turns any bytes into plain JSON data or raises
``InvalidResource`` naming the key and the field, and nothing else (no RecursionError, no
UnicodeError, no float infinities). ``decode`` adds validation into a resource. Callers that
loop over records catch ``InvalidResource`` (a ``ValueError``) and go on with the next.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from tabby.model.jsontext import (  # (re-exported too: the codec's public names)
    MAX_DEPTH,
    MAX_RECORD_BYTES,
    MAX_RECORD_VALUES,
    InvalidResource,
    _check_tree,
    _printable,
    load_json,
    strict_json,
)
from tabby.model.keys import endpoint_host, endpoint_key, parse_key, resource_key
from tabby.model.resources import Resource

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Resource)


def _tag(part: object) -> bool:
    """A part of an error's location that names no field: a model or union member ("IPv6Address"),
    or one of pydantic's schema tags ("function-after[_unscoped(), ...]", "lax-or-strict[...]",
    "constrained-int"). Field names never hold a hyphen; a label key may, so only these shapes go."""
    return isinstance(part, str) and (part[:1].isupper() or _SCHEMA_TAG.match(part) is not None)


_SCHEMA_TAG = re.compile(r"[a-z-]+\[|constrained-(?:int|str|float|bytes)$")


def _describe(exc: ValidationError) -> list[str]:
    """The first errors, formatted (InvalidResource keeps 20): formatting all of a record's half a
    million bad list items took 5.8 s of the agent's loop."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    out = [] if len(errors) <= 20 else [f"(document): {len(errors)} errors, the first 19 follow"]
    for err in errors[:20 - len(out)]:
        loc = ".".join(str(p) for p in err["loc"] if not _tag(p))
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{loc or '(document)'}: {msg}")
    return out


def validate(doc: Any, where: str = "document") -> Any:
    """A plain dict (from YAML/JSON) -> a Resource, or InvalidResource naming the fields."""
    if not isinstance(doc, dict):
        got = type(doc).__name__
        raise InvalidResource(where, [f"(document): expected a mapping with kind/metadata/spec, got {got}"])
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as e:
        raise InvalidResource(where, _describe(e)) from None
    except Exception as e:  # a validator that failed otherwise than by ValueError: still a bad record
        raise InvalidResource(where, [f"(document): validation failed: {type(e).__name__}: {e}"]) from None


def encode(resource: Any) -> bytes:
    """The Store's bytes: the one encoding that carries secrets (Config bgp_secrets) in the clear."""
    return resource.model_dump_json(exclude_defaults=False, context={"reveal_secrets": True}).encode()


def too_big(resource: Any, where: str, value: bytes | None = None) -> None:
    """InvalidResource if the record (value: its encoding, when at hand) would be larger than any
    reader takes (MAX_RECORD_BYTES): written, it was corrupt for every agent (6,000 rules of a
    Profile, each with its defaults written out)."""
    data = encode(resource) if value is None else value
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidResource(where, [f"(document): encodes to {len(data)} bytes, more than the {MAX_RECORD_BYTES} a "
                                      "Store record may hold"])
    if data.count(b",") >= MAX_RECORD_VALUES:  # what every reader counts (load_json)
        raise InvalidResource(where, [f"(document): more than {MAX_RECORD_VALUES} values, more than a Store record "
                                      "may hold"])


def to_plain(resource: Any) -> dict[str, Any]:
    """For people and tools (`tabby get`): secrets shown as <redacted>."""
    return resource.model_dump(mode="json")


def key_of(resource: Any) -> str:
    if resource.kind == "Endpoint":
        return endpoint_key(resource.spec.host, resource.metadata.name)
    return resource_key(resource.kind, resource.metadata.name)


def decode(key: str, value: bytes) -> Any:
    """A Store record -> a Resource. Raises InvalidResource (never anything else) when corrupt,
    including a record whose kind or name disagrees with its key, and a key outside the layout."""
    expected = parse_key(key)
    if expected is None:
        raise InvalidResource(key, ["(key): not a resource key of tabby's layout (/tabby/v1/<kind>/<name>, "
                                    "/tabby/v1/endpoints/<host>/<name>)"])
    resource = validate(load_json(key, value), key)
    if expected != (resource.kind, resource.metadata.name):
        got = f"{resource.kind}/{resource.metadata.name}"
        raise InvalidResource(key, [f"kind: record is {got} but its key says {expected[0]}/{expected[1]}"])
    if resource.kind == "Endpoint" and endpoint_host(key) != resource.spec.host:
        raise InvalidResource(key, [f"spec.host: record says {resource.spec.host!r} but its key is under "
                                    f"{endpoint_host(key)!r}"])
    return resource


class _Yaml12(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.2's core schema for plain scalars, where PyYAML reads YAML 1.1's: there ``10:20`` (a
    port range) is the base-60 integer 620, ``010`` is 8, ``on`` and ``yes`` are true, ``1e3`` is a
    string and ``2026-12-01`` a date. Here only true/false are booleans, integers are decimal (or 0o, 0x), and a float
    may have an exponent without a dot; anything else is text, which the model then takes or
    refuses by name. A key twice in one mapping is refused, as in JSON (PyYAML keeps the last:
    ``kind: Host`` then ``kind: IPPool`` made an IPPool). libyaml's parser where there is one
    (the pure-Python one took 69 s and 2 GB for a 6 MB file)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            # the mapping's own keys only: a merge (<<: *anchor) brings keys its own may override
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    twice = key in seen
                except TypeError:  # an unhashable key: SafeConstructor says so
                    break
                if twice:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


_BOOL, _INT, _FLOAT, _TIME = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp"))
_Yaml12.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIME)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Yaml12.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


class _YamlOut(yaml.SafeDumper):
    """Quotes every string that YAML 1.2 (``_Yaml12``, our apply) or 1.1 (other tools) would read
    as something else: "1e3" or "0o17" went out plain, and `get -o yaml | apply -f -` read numbers."""


_YamlOut.yaml_implicit_resolvers = {
    first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []), *_Yaml12.yaml_implicit_resolvers.get(first, [])]
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *_Yaml12.yaml_implicit_resolvers}}


def dump_yaml(docs: list[Any]) -> str:
    """Documents as YAML that ``parse_documents`` (and a YAML 1.1 reader) reads back as they are."""
    return yaml.dump_all(docs, Dumper=_YamlOut, sort_keys=False)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
    if digits.startswith(("0o", "0x")):
        return sign * int(digits[2:], 8 if digits[1] == "o" else 16)
    return sign * int(digits, 10)  # "010" is ten, not eight


_Yaml12.add_constructor(_INT, _yaml12_int)


# YAML is parsed into a whole tree first (libyaml: 12 s and 1.2 GB for 6 MB of one list, measured):
# far above any real set of resources, far below what would exhaust a host
MAX_YAML_CHARS = 4 << 20


def parse_documents(text: str, source: str = "input") -> list[Any]:
    """Every document in a YAML (multi-document) or JSON text, all validated before any is used.

    Raises InvalidResource listing every bad document, so that ``tabby apply`` writes nothing
    unless everything is good."""
    try:
        stripped = text.lstrip()
        if stripped.startswith(("[", "{")):
            loaded = strict_json(text)
            docs = loaded if isinstance(loaded, list) else [loaded]
        else:
            if len(text) > MAX_YAML_CHARS:  # the node tree is built before any limit can look at it
                raise InvalidResource(source, [f"(document): YAML longer than {MAX_YAML_CHARS >> 20} Mi characters "
                                               "(its parser needs ~200 bytes of memory per character): give it "
                                               "as JSON"])
            docs = [d for d in yaml.load_all(text, Loader=_Yaml12) if d is not None]
    except RecursionError:
        raise InvalidResource(source, [f"(document): nested deeper than {MAX_DEPTH} levels"]) from None
    except (ValueError, yaml.YAMLError) as e:
        raise InvalidResource(source, [f"(document): cannot parse: {' '.join(str(e).split())}"]) from None
    out, errors = [], []
    for i, doc in enumerate(docs):
        where = f"{source} document {i + 1}"
        try:
            _check_tree(doc)  # first: nothing of the document is formatted before it is bounded
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            name = meta.get("name") if isinstance(meta, dict) else None
            kind = doc.get("kind") if isinstance(doc, dict) else None
            if isinstance(name, str) and isinstance(kind, str):
                where += f" ({_printable(kind, 40)}/{_printable(name, 100)})"
            res = validate(doc, where)
            too_big(res, where)
            out.append(res)
        except InvalidResource as e:
            errors.append(f"{where}: " + "; ".join(e.errors) if not e.where else str(e))
    if errors:
        raise InvalidResource(source, errors)
    return out
