"""The last good version of each record that is corrupt now, kept on disk across agent restarts.

Why: a restarted agent that finds a corrupt record has never seen it good, and would withdraw
what the kernel still holds for it. So when a record turns corrupt, the agent writes its last
good version here; the next agent's first listing falls back to it. Written only when a record
turns corrupt or is cured (rare), atomically (temporary file, then rename), mode 0600. The file
is read back as hostile input like any other: every entry is decoded again, a bad one dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tabby.model.codec import MAX_RECORD_BYTES, InvalidResource, load_json
from tabby.model.ipam import encode_ipam
from tabby.model.plain import Plain

log = logging.getLogger(__name__)

MAX_ENTRIES = 1_000  # corrupt records remembered; past that, new ones are only logged
MAX_FILE_BYTES = 64 * MAX_RECORD_BYTES  # room for many large records; a larger file is not ours


class LastGood:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list[Any]] = {}  # key -> [create revision, the good record's JSON text]
        self._lock = threading.Lock()

    def load(self, decoder: Callable[[str, bytes], Any]) -> dict[str, tuple[int, Any]]:
        """key -> (create revision, decoded last good version); anything unreadable is dropped."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.warning("cannot read %s: %s", self.path, e)
            return {}
        if len(raw) > MAX_FILE_BYTES:
            log.warning("ignoring %s: %d bytes, more than %d", self.path, len(raw), MAX_FILE_BYTES)
            return {}
        try:
            doc = load_json(str(self.path), raw, max_bytes=MAX_FILE_BYTES, max_values=None)  # each entry: its own
        except InvalidResource as e:
            log.warning("ignoring %s: %s", self.path, e)
            return {}
        out: dict[str, tuple[int, Any]] = {}
        for key, entry in doc.items() if isinstance(doc, dict) else ():
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                    and isinstance(entry[1], str)):
                continue
            created, text = entry
            try:
                out[key] = (created, decoder(key, text.encode()))
                self.entries[key] = [created, text]
            except InvalidResource as e:
                log.warning("ignoring the remembered version of %s: %s", key, e)
        return out

    def set(self, key: str, created: int, good: Any) -> None:
        """Remember good (a resource, or an IPAM record: this host's block affinities) as key's last
        good version (this incarnation: created), in the bytes the Store has for it. Called from
        every syncer's thread: one at a time (two at once broke the dict's iteration in json.dump
        and tore the shared temporary file; a torn file is ignored at the next start)."""
        text = encode_ipam(good).decode() if isinstance(good, Plain) else \
            good.model_dump_json(context={"reveal_secrets": True})
        entry = [created, text]
        with self._lock:
            if self.entries.get(key) == entry or (key not in self.entries and len(self.entries) >= MAX_ENTRIES):
                return
            self.entries[key] = entry
            self._write()

    def forget(self, key: str) -> None:
        """The record is good again, or gone."""
        with self._lock:
            if self.entries.pop(key, None) is not None:
                self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot write %s (a restart would not keep the last good versions): %s", self.path, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
