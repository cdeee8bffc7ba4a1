"""From the threads that generate to the event loop, one wake-up for many hand-offs.

`loop.call_soon_threadsafe` writes to the loop's self-pipe and wakes it every time it is called.
An engine step hands over one token for each streaming request and a result for each finished
one: hundreds of hand-offs a step, each waking the loop. A `Relay` queues them and wakes the
loop once; the loop then runs them all, in the order they were posted (so a request's last
piece of text still comes before its result).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable, tuple]] = []
        self._scheduled = False

    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the event loop, soon; from any thread."""
        with self._lock:
            self._calls.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed: the server is gone, and these with it
            pass

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._scheduled = False
        for fn, args in calls:
            fn(*args)
