"""Typed resource access over any Store: what the CLI and orchestrator adapters write through.

Writes are compare-and-swap: ``apply`` reads the current revision and updates only if nobody
wrote in between, retrying a few times, so two writers never silently overwrite each other's
read-modify-write.
"""

from __future__ import annotations

from typing import Any

from tabby.model import InvalidResource, decode, encode, key_of
from tabby.model.codec import too_big
from tabby.model.keys import ENDPOINTS_PREFIX, ROOT, kind_prefix, resource_key
from tabby.model.records import decode_record
from tabby.store import KV, AlreadyExists, NotFound, RevisionMismatch, Store, StoreError


class Conflict(StoreError):
    """Kept losing compare-and-swap to other writers."""


class ResourceClient:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _endpoint_kvs(self, name: str) -> list[KV]:
        """Every record of the Endpoint called name, oldest first: one, or (after a move that stopped
        between its create and its delete) one per host. Its key names its host, so finding it by name
        alone lists them all: what the CLI and the orchestrators do, not the agents."""
        kvs, _ = self.store.list(ENDPOINTS_PREFIX)  # (a key another program wrote, not UTF-8, names no Endpoint)
        # only keys of the layout, <host>/<name>: endpoints/junk/x/<name> hid the Endpoint from get
        # (its "not a resource key"), and an apply of it deleted the stray as its other copy
        return sorted((kv for kv in kvs if kv.key.rsplit("/", 1)[-1] == name and kv.key.isprintable()
                       and kv.key.count("/", len(ENDPOINTS_PREFIX)) == 1),
                      key=lambda kv: kv.create_revision)

    def get(self, kind: str, name: str) -> Any | None:
        """The resource, None if absent; InvalidResource (naming key and field) if corrupt. Of an
        Endpoint recorded on two hosts (a move cut short), the newer."""
        if kind == "Endpoint":
            found = self._endpoint_kvs(name)
            kv = found[-1] if found else None
        else:
            kv = self.store.get(resource_key(kind, name))
        return decode(kv.key, kv.value) if kv else None

    def corrupt_records(self, prefix: str = ROOT) -> list[InvalidResource]:
        """Every record under prefix that does not decode (resources, IPAM and status alike)."""
        kvs, _ = self.store.list(prefix)
        bad = []
        for kv in kvs:
            try:
                decode_record(kv.key, kv.value)
            except InvalidResource as e:
                bad.append(e)
        return bad

    def list_created(self, kind: str) -> tuple[list[tuple[Any, int]], list[tuple[str, str]]]:
        """Like ``list``, with each resource's create revision (who came first decides conflicts)."""
        kvs, _ = self.store.list(kind_prefix(kind))
        good, bad = [], []
        for kv in kvs:
            try:
                good.append((decode(kv.key, kv.value), kv.create_revision))
            except ValueError as e:
                bad.append((kv.key, str(e)))
        return good, bad

    def list(self, kind: str) -> tuple[list[Any], list[tuple[str, str]]]:
        """(good resources, [(key, error)] for corrupt records) — one bad record never hides the rest."""
        kvs, _ = self.store.list(kind_prefix(kind))
        good, bad = [], []
        for kv in kvs:
            try:
                good.append(decode(kv.key, kv.value))
            except ValueError as e:
                bad.append((kv.key, str(e)))
        return good, bad

    def apply(self, resource: Any, attempts: int = 5) -> tuple[str, int]:
        """Create or update; returns ("created" | "updated" | "unchanged", revision). An Endpoint
        whose host changed moves: created under the new host, then deleted under the old one, so
        that it is never absent (agents take one name on two hosts as one endpoint, not a conflict)."""
        key, value = key_of(resource), encode(resource)
        too_big(resource, key, value)  # what no reader would take is not written
        for _ in range(attempts):
            elsewhere = [kv for kv in self._endpoint_kvs(resource.metadata.name) if kv.key != key] \
                if resource.kind == "Endpoint" else []
            kv = self.store.get(key)
            try:
                if kv is None:
                    outcome, rev = ("updated" if elsewhere else "created"), self.store.create(key, value)
                elif kv.value == value:
                    outcome, rev = "unchanged", kv.mod_revision
                else:
                    outcome, rev = "updated", self.store.update(key, value, kv.mod_revision)
                for old in elsewhere:
                    rev = max(rev, self.store.delete(old.key, expected_revision=old.mod_revision))
                    outcome = "updated"
                return outcome, rev
            except (AlreadyExists, RevisionMismatch, NotFound):
                continue
        raise Conflict(f"{key}: gave up after {attempts} compare-and-swap conflicts")

    def delete(self, kind: str, name: str) -> int:
        """NotFound if there is none; an Endpoint goes from every host that has it."""
        if kind != "Endpoint":
            return self.store.delete(resource_key(kind, name))
        found = self._endpoint_kvs(name)
        if not found:
            raise NotFound(f"{ENDPOINTS_PREFIX}*/{name}")
        return max(self.store.delete(kv.key) for kv in found)
