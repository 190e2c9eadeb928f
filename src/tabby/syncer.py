"""List-then-watch of typed resources: the one stream every agent loop consumes.

Yields ``Update`` for each change and ``InSync`` once the consumer has seen the whole current
state (after start and after every resync), so nothing sweeps before the first full view.

Failure model:
- a corrupt record (any bytes that do not decode: see ``tabby.model.codec``) is logged and
  reported to ``on_corrupt`` once per version (a relist does not report it again) and skipped;
  the last good version of that key stays in effect, so a bad write never un-programs a working
  endpoint, and a key that was never good is ignored; ``on_corrupt(key, None)`` says a key that
  was corrupt is good again or gone. ``seed`` carries last good versions across a restart (the
  agent keeps them on disk): a key that is corrupt at the first listing falls back to its seed;
- ``HistoryGone`` (the watch fell behind compaction) relists and emits only the difference
  against what the consumer already has, then ``InSync`` again;
- ``Unavailable`` (unreachable, locked, full, read-only) backs off and resumes the watch from
  the last revision seen;
- any other failure (a corrupt file, a bad reply, a bug) backs off and relists: the consumer's
  loop never ends on it.
Back-off doubles from ``retry_s`` to ``max_retry_s``, 1 s .. 10 s (a retry is one cheap
``revision()`` asking whether the Store answers again, and the cap bounds how late new
workloads are programmed once it does; the status writer, whose lag matters less, goes to
30 s). Each retry is one log line with its attempt number and the error, which names the
Store's file or URL. While the Store does not answer, ``failing`` says why (health reports
it); the consumer keeps what it has, so a dataplane is left as is.
Runs on the caller's thread; ``stop()`` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tabby.model import decode
from tabby.model.keys import IPAM_PREFIX, PREFIX
from tabby.store import HistoryGone, Store, StoreError, Unavailable, Watch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    key: str
    resource: Any | None  # None: the key was deleted
    revision: int
    created: int = 0  # the key's create revision: who came first, when two records conflict


@dataclass(frozen=True)
class InSync:
    revision: int


class ResourceSyncer:
    def __init__(
        self,
        store: Store,
        prefix: str = PREFIX,
        *,
        exclude: tuple[str, ...] = (IPAM_PREFIX,),
        on_corrupt: Callable[[str, Exception | None], None] | None = None,
        retry_s: float = 1.0,
        max_retry_s: float = 10.0,
        decoder: Callable[[str, bytes], Any] = decode,
        seed: dict[str, tuple[int, Any]] | None = None,
        pace_s: float = 0.0,
    ) -> None:
        """pace_s: the watch's (``Store.watch``), for a range whose news may come late."""
        self.store = store
        self.prefix = prefix
        self.exclude = exclude
        self.pace_s = pace_s
        self.on_corrupt = on_corrupt
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.decoder = decoder
        self.known: dict[str, Any] = {}
        # Every key that exists (good or not) -> its create revision. Derived from the stream: a
        # put of a key not yet here is its creation, so no backend needs to send create revisions.
        self.created: dict[str, int] = {}
        self.corrupt: dict[str, tuple[int, str]] = {}  # key -> (revision, error) reported
        self.seed = dict(seed or {})
        self.revision = 0
        self.events = 0  # every event the watch carried, wanted or not: what the fabric costs this agent
        self._stop = threading.Event()
        self._watch: Watch | None = None
        self._failing: str | None = None
        self._failed_at = float("-inf")

    @property
    def failing(self) -> str | None:
        """Why the Store cannot be read, while the loop is backing off; None when it answers."""
        return self._failing

    def _back_off(self, error: BaseException, attempt: int, then: str) -> int:
        """Wait out one failure and every further one until the Store answers a ``revision()``
        (or stop); one log line per try. Returns the attempt number reached: the caller's count
        of consecutive failures (a failure long after the last one starts again from 1)."""
        if time.monotonic() - self._failed_at > 2 * self.max_retry_s:
            attempt = 1
        while not self._stop.is_set():
            self._failed_at = time.monotonic()
            delay = min(self.retry_s * 2 ** min(attempt - 1, 20), self.max_retry_s)
            self._failing = f"store watch of {self.prefix}: {error} (attempt {attempt}, next try in {delay:g}s)"
            if isinstance(error, StoreError):
                log.warning("%s (watch of %s), attempt %d: %s; keeping what we have, %s in %gs",
                            "store unavailable" if isinstance(error, Unavailable) else "store watch failed",
                            self.prefix, attempt, error, then, delay)
            else:  # not a Store error: a bug, so the traceback too
                log.error("store watch failed (watch of %s), attempt %d: %r; keeping what we have, %s in %gs",
                          self.prefix, attempt, error, then, delay, exc_info=error)
            if self._stop.wait(delay):
                break
            try:
                self.store.revision()
            except Exception as e:
                error, attempt = e, attempt + 1
                continue
            log.info("store answers again after %d failed attempt(s); %s", attempt, then)
            self._failing = None
            break
        return attempt

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.close()

    def _wanted(self, key: str) -> bool:
        return not key.startswith(self.exclude)

    def _decode(self, key: str, value: bytes, revision: int) -> Any | None:
        try:
            res = self.decoder(key, value)
        except ValueError as e:  # the decoders raise InvalidResource (a ValueError) and nothing else
            if self.corrupt.get(key, (0, ""))[0] != revision:
                self.corrupt[key] = (revision, str(e))
                kept = "keeping its last good version" if key in self.known else "it was never good: ignored"
                log.error("corrupt record %s at revision %d (%s): %s", key, revision, kept, e)
                if self.on_corrupt is not None:
                    self.on_corrupt(key, e)
            return None
        self._cured(key)
        return res

    def _cured(self, key: str) -> None:
        if self.corrupt.pop(key, None) is not None:
            log.info("record %s is no longer corrupt", key)
            if self.on_corrupt is not None:
                self.on_corrupt(key, None)

    def _put(self, key: str, value: bytes, revision: int, created: int) -> Update | None:
        self.created.setdefault(key, created)
        res = self._decode(key, value, revision)
        if res is None or self.known.get(key) == res:
            return None
        self.known[key] = res
        return Update(key, res, revision, self.created[key])

    def _resync(self) -> Iterator[Update | InSync]:
        kvs, rev = self.store.list(self.prefix)
        seen: set[str] = set()
        seeded: set[str] = set()
        for kv in kvs:
            if not self._wanted(kv.key):
                continue
            seen.add(kv.key)
            if self.created.get(kv.key) != kv.create_revision:
                self.created[kv.key] = kv.create_revision
                if self.known.pop(kv.key, None) is not None:  # re-created while we were away: the old
                    yield Update(kv.key, None, rev)            # one is gone, whatever the new one holds
            update = self._put(kv.key, kv.value, kv.mod_revision, kv.create_revision)
            seed = self.seed.get(kv.key)
            if update is None and kv.key in self.corrupt and kv.key not in self.known and seed is not None \
                    and seed[0] == kv.create_revision:  # the same incarnation of the record, not a new one
                log.warning("%s: using its last good version from before the restart", kv.key)
                self.known[kv.key] = seed[1]
                seeded.add(kv.key)
                update = Update(kv.key, seed[1], kv.mod_revision, kv.create_revision)
            if update is not None:
                yield update
        # a last good version this listing did not need (the record is good again, gone, or another
        # incarnation) is told cured, so that its keeper forgets it: kept, it came back at a later
        # start, older than what the kernel had run since, and counted against the keeper's limit
        stale = [k for k in self.seed if k.startswith(self.prefix) and self._wanted(k) and k not in seeded]
        self.seed.clear()  # only the first listing after a start falls back to it
        if self.on_corrupt is not None:
            for key in stale:
                if key not in self.corrupt:  # (one corrupt now stays reported; its seed is of another
                    self.on_corrupt(key, None)  # incarnation, which no later start takes either)
        for key in [k for k in self.created if k not in seen]:
            del self.created[key]
            self._cured(key)
            if self.known.pop(key, None) is not None:
                yield Update(key, None, rev)
        self.revision = rev
        yield InSync(rev)

    def __iter__(self) -> Iterator[Update | InSync]:
        need_list = True
        failures = 0
        while not self._stop.is_set():
            try:
                if need_list:
                    yield from self._resync()
                    need_list = False
                self._watch = self.store.watch(self.prefix, self.revision, exclude=self.exclude,
                                              pace_s=self.pace_s)
                if self._stop.is_set():
                    return
                for ev in self._watch:
                    failures = 0
                    self.events += 1
                    self.revision = ev.revision
                    if not self._wanted(ev.key):
                        continue
                    if ev.type == "delete":
                        self.created.pop(ev.key, None)
                        self._cured(ev.key)
                        if self.known.pop(ev.key, None) is not None:
                            yield Update(ev.key, None, ev.revision)
                        continue
                    update = self._put(ev.key, ev.value or b"", ev.revision, ev.revision)
                    if update is not None:
                        yield update
            except HistoryGone as e:
                log.warning("%s; relisting", e)
                need_list = True
            except Unavailable as e:
                failures = self._back_off(e, failures + 1,
                                          "relisting" if need_list else f"resuming from revision {self.revision}")
            except Exception as e:
                # anything else (a corrupt file, a bad reply, a bug): never let it end the
                # consumer's loop; start over from a fresh listing, which is always safe
                need_list = True
                failures = self._back_off(e, failures + 1, "relisting")
            finally:
                if self._watch is not None:
                    # resumed after what the backend said is delivered (past the last event when it
                    # told us nothing else happened: see Watch.revision), not from the last event
                    self.revision = max(self.revision, self._watch.revision)
                    self._watch.close()
                    self._watch = None
