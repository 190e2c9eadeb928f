"""Turning bytes and documents into resources and back, with errors that name the field."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from tabby.model.keys import parse_key, resource_key
from tabby.model.resources import Resource

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Resource)


class InvalidResource(ValueError):
    """A resource that failed validation; ``str()`` names every bad field."""

    def __init__(self, where: str, errors: list[str]) -> None:
        self.where = where
        self.errors = errors
        super().__init__(f"{where}: " + "; ".join(errors))


def _describe(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper()))
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{loc or '(document)'}: {msg}")
    return out


def validate(doc: Any, where: str = "document") -> Any:
    """A plain dict (from YAML/JSON) -> a Resource, or InvalidResource naming the fields."""
    if not isinstance(doc, dict):
        raise InvalidResource(where, [f"expected a mapping with kind/metadata/spec, got {type(doc).__name__}"])
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as e:
        raise InvalidResource(where, _describe(e)) from None


def encode(resource: Any) -> bytes:
    return resource.model_dump_json(exclude_defaults=False).encode()


def to_plain(resource: Any) -> dict[str, Any]:
    return resource.model_dump(mode="json")


def key_of(resource: Any) -> str:
    return resource_key(resource.kind, resource.metadata.name)


def decode(key: str, value: bytes) -> Any:
    """A Store record -> a Resource. Raises InvalidResource (never anything else) when corrupt,
    including a record whose kind or name disagrees with its key."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidResource(key, [f"not valid JSON: {e}"]) from None
    resource = validate(doc, key)
    expected = parse_key(key)
    if expected is not None and expected != (resource.kind, resource.metadata.name):
        raise InvalidResource(
            key, [f"record is {resource.kind}/{resource.metadata.name} but its key says {expected[0]}/{expected[1]}"]
        )
    return resource


def parse_documents(text: str, source: str = "input") -> list[Any]:
    """Every document in a YAML (multi-document) or JSON text, all validated before any is used.

    Raises InvalidResource listing every bad document, so that ``tabby apply`` writes nothing
    unless everything is good."""
    try:
        stripped = text.lstrip()
        if stripped.startswith(("[", "{")):
            loaded = json.loads(text)
            docs = loaded if isinstance(loaded, list) else [loaded]
        else:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (ValueError, yaml.YAMLError) as e:
        raise InvalidResource(source, [f"cannot parse: {e}"]) from None
    out, errors = [], []
    for i, doc in enumerate(docs):
        name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
        where = f"{source} document {i + 1}" + (f" ({doc.get('kind')}/{name})" if name else "")
        try:
            out.append(validate(doc, where))
        except InvalidResource as e:
            errors.append(str(e))
    if errors:
        raise InvalidResource(source, errors)
    return out
