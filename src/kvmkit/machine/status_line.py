"""A line on the terminal that shows a slow boot is alive.

On an emulating host a Linux boot goes quiet for tens of seconds at a time
(initcalls that print nothing), and a user cannot tell that from a hang.
While the guest's console has been silent for a few seconds, kvmkit keeps
one line on stderr: the time since start, the exits per second KVM reports,
and how long the console has been quiet. It erases itself before the
guest's next output is written (the console stream calls :meth:`clear` on
the host loop thread, where this line is drawn too, so the two never
interleave). Only on a terminal; never in a file or a pipe.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from ..host.loop import EventLoop, TimerHandle
from .console_watch import ConsoleWatch

QUIET_S = 5.0       # console silence before the line appears
TICK_S = 1.0
ERASE = b"\r\x1b[K"


class StatusLine:
    """Draws and erases the line; ``exits`` gives KVM's total exit count so far."""

    def __init__(self, loop: EventLoop, watch: ConsoleWatch, exits: Callable[[], int], fd: int = 2) -> None:
        self.loop = loop
        self.watch = watch
        self.exits = exits
        self.fd = fd
        self.shown = False
        self.started = time.monotonic()
        self._last = (self.started, 0)
        self._timer: TimerHandle | None = None

    def start(self) -> None:
        """Begin ticking (any thread: the first tick is scheduled from the loop)."""
        self.loop.call_soon(lambda: setattr(self, "_timer", self.loop.call_later(TICK_S, self._tick)))

    def stop(self) -> None:
        """Stop ticking and erase the line; call once the host loop has stopped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.clear()

    def clear(self) -> None:
        """Erase the line if it is up (loop thread: the console stream calls it before each write)."""
        if self.shown:
            self.shown = False
            self._write(ERASE)

    def _tick(self) -> None:
        now = time.monotonic()
        try:
            exits = self.exits()
        except Exception:
            exits = self._last[1]
        then, before = self._last
        self._last = (now, exits)
        quiet = now - self.watch.last_output
        if quiet >= QUIET_S:
            rate = (exits - before) / max(now - then, 1e-3)
            text = (f"kvmkit: {now - self.started:.0f} s since start, {rate / 1000:.1f}k exits/s, "
                    f"no console output for {quiet:.0f} s (Ctrl-A x quits)")
            self._write(ERASE + text.encode())
            self.shown = True
        self._timer = self.loop.call_later(TICK_S, self._tick)

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # a terminal that went away: the status line is not worth an error
