"""For bench workers: write a record, then time until a route for it shows up in this kernel."""

from __future__ import annotations

import threading
import time

from tabby.dataplane.netlink import Monitor


class RouteTimer:
    """Listens for new routes of one protocol; ``time(write, dst)`` is write -> route, in ms."""

    def __init__(self, proto: int) -> None:
        self.proto = proto
        self.mon = Monitor()
        self.seen: dict[str, float] = {}
        self.cv = threading.Condition()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        while True:
            for ch in self.mon.read():
                if ch.kind == "route" and not ch.deleted and ch.proto == self.proto:
                    with self.cv:
                        self.seen.setdefault(ch.key, time.perf_counter())
                        self.cv.notify_all()

    def time(self, write: object, dst: str, timeout: float = 10.0) -> float:
        t0 = time.perf_counter()
        write()  # type: ignore[operator]
        with self.cv:
            self.cv.wait_for(lambda: dst in self.seen, timeout=timeout)
            return (self.seen.get(dst, float("inf")) - t0) * 1000
