"""Small PC devices a guest touches to stop, reset or signal progress.

Each reports what the guest asked for through a callback and does nothing
else; the machine decides what "reset" or "exit" means for the VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

from kvmkit.devices.state import StateReader

# The kvmkit exit port: a byte written here ends the VM with that status
# (like QEMU's isa-debug-exit, without its (v << 1) | 1 encoding).
EXIT_PORT = 0x501


class ExitPort:
    """A guest write of byte ``v`` asks the VMM to exit with status ``v``."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.on_exit(value & 0xFF)

    def save_state(self) -> dict[str, object]:
        """Nothing: a write acts at once and leaves nothing behind."""
        return {}

    def load_state(self, state: Mapping[str, object]) -> None:
        StateReader(state, "the exit port", ())


class PortSink:
    """Ports such as 0x80 (POST codes, used by guests as an I/O delay): remember the last value."""

    def __init__(self) -> None:
        self.last = 0
        self.writes = 0

    def io_read(self, offset: int, size: int) -> int:
        return self.last

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.last = value
        self.writes += 1

    def save_state(self) -> dict[str, object]:
        """The last value, which reads return; not the write count, a statistic."""
        return {"last": self.last}

    def load_state(self, state: Mapping[str, object]) -> None:
        r = StateReader(state, "the POST code port", ("last",))
        self.last = r.take_int("last", 0, (1 << 64) - 1)
