"""One lock per attachment, across processes: ADD, DEL and GC of one (container id, ifname) run
one at a time, whether in the warm server or in a plugin process of their own.

``fcntl.flock`` on ``/run/tabby/cni/locks/<sha256 of "id/ifname">``; the kernel drops it when its
holder dies (a SIGKILLed server included), so a lock is never left held. The file exists only
while work on the attachment is in flight and holds its progress, ``{"state": "adding" |
"deleting", "handle": ...}``: a file found by the next caller means an ADD or DEL died half way,
and that caller cleans up thoroughly (stray block allocations included) before anything else.
A finished ADD or DEL removes the file while still holding it; a waiter that then gets the lock
on the removed file notices (its inode is no longer the path's) and opens a new one. So after
a crash-free run nothing is left in the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import Any

try:  # the built-in module: hashlib loads OpenSSL's libcrypto (~4 ms) for what is one digest here
    from _sha256 import sha256
except ImportError:  # Python 3.12 renamed it
    from hashlib import sha256

LOCK_DIR = "/run/tabby/cni/locks"
WAIT_S = 120.0


class LockTimeout(Exception):
    pass


class AttachmentLock:
    def __init__(self, key: str, directory: str = LOCK_DIR, wait_s: float = WAIT_S) -> None:
        self.path = os.path.join(directory, sha256(key.encode()).hexdigest()[:32])
        self.directory, self.wait_s = directory, wait_s
        self.fd = -1

    def __enter__(self) -> AttachmentLock:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        pause = 0.001
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise LockTimeout(f"attachment lock {self.path} held for more than {self.wait_s:.0f} s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)  # removed by the holder before us: take the new file

    def __exit__(self, *_: object) -> None:
        if self.fd >= 0:
            try:
                if os.fstat(self.fd).st_size == 0 and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)  # nothing in flight was recorded: leave no file behind
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1

    def read(self) -> dict[str, Any]:
        data = os.pread(self.fd, 4096, 0)
        try:
            state = json.loads(data) if data else {}
        except ValueError:
            return {"state": "adding"}  # torn by a crash mid-write: assume the worst
        return state if isinstance(state, dict) else {"state": "adding"}

    def write(self, state: dict[str, Any]) -> None:
        data = json.dumps(state).encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def remove(self) -> None:
        """Drop the file (the attachment is gone); the lock is held until __exit__."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def wait_idle(key: str, directory: str = LOCK_DIR, wait_s: float = WAIT_S) -> None:
    """Return once nobody holds the attachment's lock (creates no file): for callers that want
    to see an attachment after background work on it, such as the server's DEL, has finished."""
    path = os.path.join(directory, sha256(key.encode()).hexdigest()[:32])
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LockTimeout(f"attachment lock {path} held for more than {wait_s:.0f} s") from None
        finally:
            os.close(fd)
        time.sleep(0.002)
