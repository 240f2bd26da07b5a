"""The boot status line: drawn while the console is quiet, erased before the guest's next output."""

from __future__ import annotations

import os
import time

import pytest

from kvmkit.host.loop import EventLoop
from kvmkit.machine import status_line as sl
from kvmkit.machine.console_watch import ConsoleWatch


def read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_the_line_appears_when_quiet_and_clears(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sl, "TICK_S", 0.05)
    monkeypatch.setattr(sl, "QUIET_S", 0.2)
    r, w = os.pipe()
    os.set_blocking(r, False)
    loop = EventLoop()
    watch = ConsoleWatch()
    count = [0]

    def exits() -> int:
        count[0] += 500
        return count[0]
    line = sl.StatusLine(loop, watch, exits, w)
    loop.start()
    try:
        line.start()
        watch.feed(b"booting\n")                  # output now: no line for QUIET_S
        time.sleep(0.1)
        assert read_all(r) == b"" and not line.shown
        time.sleep(0.4)
        drawn = read_all(r)
        assert drawn.startswith(sl.ERASE + b"kvmkit: ") and b"k exits/s, no console output for" in drawn
        assert line.shown
        watch.feed(b"more\n")                      # the guest writes (the watch sees it as it is taken) ...
        loop.call_soon(line.clear)                 # ... and the stream erases the line before writing it out
        time.sleep(0.02)
        assert read_all(r).endswith(sl.ERASE) and not line.shown
        time.sleep(0.1)
        assert read_all(r) == b""                  # output came: quiet again only after QUIET_S
    finally:
        loop.stop()
        line.stop()
        loop.close()
        os.close(r)
        os.close(w)
