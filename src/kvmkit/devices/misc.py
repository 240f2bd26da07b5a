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


# i8042 keyboard controller: data port 0x60, status/command port 0x64.
I8042_DATA = 0x60
I8042_COMMAND = 0x64
I8042_CMD_PULSE_RESET = 0xFE  # pulse output port bit 0: the CPU reset line
I8042_CMD_READ_OUTPUT = 0xD0
I8042_CMD_WRITE_OUTPUT = 0xD1
I8042_STATUS_OBF = 0x01
I8042_STATUS_SYS = 0x04  # system flag: POST passed


class I8042:
    """Just enough of the 8042 for reboot: the reset line and a quiet keyboard.

    Linux's default ``reboot=k`` path pulses the reset line with command 0xFE;
    it also probes the controller, so reads answer "no data" rather than
    floating to 0xFF, which it would take as a broken controller.
    """

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.output_port = 0x03  # A20 enabled, reset line not asserted
        self._pending_cmd: int | None = None
        self._out: list[int] = []

    def io_read(self, offset: int, size: int) -> int:
        if offset == 0:  # 0x60
            return self._out.pop(0) if self._out else 0x00
        if offset == 4:  # 0x64
            return I8042_STATUS_SYS | (I8042_STATUS_OBF if self._out else 0)
        return 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 4:
            self._pending_cmd = None
            if value == I8042_CMD_PULSE_RESET or (value & 0xF0 == 0xF0 and not value & 1):
                self.on_reset()
            elif value == I8042_CMD_READ_OUTPUT:
                self._out = [self.output_port]
            elif value == I8042_CMD_WRITE_OUTPUT:
                self._pending_cmd = value
        elif offset == 0 and self._pending_cmd == I8042_CMD_WRITE_OUTPUT:
            self._pending_cmd = None
            self.output_port = value
            if not value & 1:  # bit 0 low = assert CPU reset
                self.on_reset()

    def save_state(self) -> dict[str, object]:
        """The output port, a command waiting for its data byte, and the output buffer (one byte deep)."""
        return {"output_port": self.output_port, "pending_command": self._pending_cmd, "output_buffer": list(self._out)}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the controller :meth:`save_state` described; StateError (and no change) if it is damaged.

        Restoring an output port with the reset line low does not reset: the
        reset happened when it was written, before the snapshot.
        """
        r = StateReader(state, "the i8042 controller", ("output_port", "pending_command", "output_buffer"))
        output_port = r.take_int("output_port", 0, 0xFF)
        pending = r.take_optional_int("pending_command", I8042_CMD_WRITE_OUTPUT, I8042_CMD_WRITE_OUTPUT)
        out = r.take_int_list("output_buffer", 0, 0xFF, 1)
        self.output_port, self._pending_cmd, self._out = output_port, pending, list(out)


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
