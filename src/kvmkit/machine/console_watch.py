"""What kvmkit reads in a guest's console output: the Linux panic line, and when output last came.

A panicked Linux kernel with kvmkit's default ``panic=-1`` resets the
machine at once, and a reset alone reads like a reboot the guest asked for.
Watching the console for the kernel's own "Kernel panic - not syncing"
line lets kvmkit end with a non-zero status and quote the reason. The watch
sees every byte the guest writes (it is fed before the host stream's
buffering), keeps a bounded tail, and costs one ``bytes.find`` per batch.
"""

from __future__ import annotations

import threading
import time

PANIC_MARK = b"Kernel panic - not syncing"
MAX_LINE = 300  # a panic line longer than this is cut (a guest can write anything)


class ConsoleWatch:
    """Fed with one console's output (any thread); :attr:`panic_line` once the kernel has panicked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tail = bytearray()         # unmatched tail, or the panic line so far
        self._in_panic = False
        self._panic: str | None = None
        self.last_output = time.monotonic()  # when the guest last wrote to this console

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.last_output = time.monotonic()
        with self._lock:
            if self._panic is not None:
                return
            buf = self._tail + bytes(data)
            if not self._in_panic:
                at = buf.find(PANIC_MARK)
                if at < 0:
                    self._tail = buf[-(len(PANIC_MARK) - 1):]
                    return
                self._in_panic = True
                buf = buf[at:]
            end = buf.find(b"\n")
            if end >= 0 or len(buf) >= MAX_LINE:
                self._panic = self._text(buf[:end if end >= 0 else MAX_LINE])
                self._tail = bytearray()
            else:
                self._tail = buf

    @staticmethod
    def _text(line: bytes | bytearray) -> str:
        return bytes(line[:MAX_LINE]).decode("utf-8", "replace").strip()

    @property
    def panic_line(self) -> str | None:
        """The kernel's panic line (cut at MAX_LINE; what came of it if the line never ended); None if no panic."""
        with self._lock:
            if self._panic is None and self._in_panic:
                return self._text(self._tail)
            return self._panic
