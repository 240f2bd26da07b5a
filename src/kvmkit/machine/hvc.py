"""The host end of the virtio console (hvc0): the same stream, backends and guarantees as a COM port.

The device model (``kvmkit.devices.virtio.console``) hands over guest output
as a gather list and takes host input into buffers the guest posted; this
class connects it to a :class:`~kvmkit.machine.stream.HostStream`, the code
COM ports use too, so hvc0 gets the same batching, the same back pressure in
both directions and the same Ctrl-A escapes (they live in the stdio backend).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..devices.virtio.console import VirtioConsole
from ..host.backends import Backend
from ..host.loop import EventLoop
from .stream import READ_CHUNK, HostStream


class VirtioConsoleEnd:
    """ConsoleHost for the model, StreamDevice for the stream."""

    def __init__(self, name: str, loop: EventLoop, backend: Backend) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.console = VirtioConsole(self)
        self.stream = HostStream(name, loop, backend, self, self.lock)
        self.counters = self.stream.counters

    @property
    def backend(self) -> Backend:
        return self.stream.backend

    # --- ConsoleHost (device lock held, any thread) ------------------------------------
    def output(self, bufs: Sequence[memoryview]) -> int:
        taken = 0
        for buf in bufs:
            n = self.stream.append(buf)
            taken += n
            if n < len(buf):
                break
        return taken

    def rx_ready(self) -> None:
        self.stream.resume_input()

    # --- StreamDevice (host loop) ------------------------------------------------------------
    def input_room(self) -> int:
        # The ring's free space is not known without walking it: offer a
        # bounded chunk; what the guest cannot take is held by the stream.
        return READ_CHUNK if self.console.active else 0

    def input(self, data: bytes) -> int:
        return self.console.receive(data)

    def output_room(self) -> None:
        self.console.tx_resume()

    def host_note(self, text: str) -> None:
        self.stream.note(text)

    def start(self) -> None:
        self.stream.start()

    def close(self) -> None:
        self.stream.close()
