"""Desired and actual state of one kind of kernel object, and the delta between them.

``set_desired`` and ``delete_desired`` are cheap and do no I/O; a reconciler's apply walks
only the pending keys, marks each success, and leaves what failed pending for the next round.
After a restart nothing is remembered: ``replace_dataplane`` with a fresh read recomputes the
whole delta.
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
_MISSING = object()


class DeltaTracker(Generic[K, V]):
    def __init__(self) -> None:
        self.desired: dict[K, V] = {}
        self.dataplane: dict[K, V] = {}
        self.pending_updates: dict[K, V] = {}
        self.pending_deletes: set[K] = set()

    def set_desired(self, key: K, value: V) -> None:
        self.desired[key] = value
        self.pending_deletes.discard(key)
        if self.dataplane.get(key, _MISSING) == value:
            self.pending_updates.pop(key, None)
        else:
            self.pending_updates[key] = value

    def delete_desired(self, key: K) -> None:
        self.desired.pop(key, None)
        self.pending_updates.pop(key, None)
        if key in self.dataplane:
            self.pending_deletes.add(key)

    def replace_dataplane(self, actual: dict[K, V]) -> None:
        self.dataplane = dict(actual)
        self.pending_updates = {k: v for k, v in self.desired.items() if actual.get(k, _MISSING) != v}
        self.pending_deletes = {k for k in actual if k not in self.desired}

    def dataplane_is(self, key: K, value: V) -> None:
        """The kernel holds key with value (learnt otherwise than by our write: a renamed device)."""
        self.dataplane[key] = value
        if key not in self.desired:
            self.pending_deletes.add(key)
        elif self.desired[key] == value:
            self.pending_updates.pop(key, None)
        else:
            self.pending_updates[key] = self.desired[key]

    def dataplane_gone(self, key: K) -> None:
        """The kernel lost it (deleted by hand, device gone): put it back if still desired."""
        self.dataplane.pop(key, None)
        self.pending_deletes.discard(key)
        if key in self.desired:
            self.pending_updates[key] = self.desired[key]

    def applied_update(self, key: K, value: V) -> None:
        self.dataplane[key] = value
        if self.pending_updates.get(key, _MISSING) == value:
            del self.pending_updates[key]

    def applied_delete(self, key: K) -> None:
        self.dataplane.pop(key, None)
        self.pending_deletes.discard(key)
