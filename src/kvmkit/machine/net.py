"""The host end of a virtio-net device: frames between its rings and a backend, on the host loop.

The device model (``devices/virtio/net.py``) pulls received frames and
hands over transmitted ones; a backend (``host/netuser.py``: passt over a
stream socket; ``host/tap.py``: a tap interface) moves them to and from
the host without ever blocking. This class is the model's
:class:`~kvmkit.devices.virtio.net.NetHost` and the backend's owner on the
host loop, where the device's kicks are served too, so frames move off the
vCPU threads, a batch per kick or per readable event.

Back pressure both ways:

* Receive: the backend's fd is watched only while the guest has receive
  buffers. When the device finds the ring empty it reads nothing, the fd
  leaves the poll set, and the guest's next RX kick (``rx_ready``) puts it
  back; the host's frames meanwhile wait in the host's socket or tap queue.
* Transmit: the backend takes frames while its output bound allows; when
  it takes fewer, the device keeps the rest in the ring (chains not
  completed) and the fd is watched for writability; once output drains
  the device is resumed (``tx_resume``).

When the backend goes down (passt exited, the tap was deleted) the guest's
link goes down (VIRTIO_NET_S_LINK_UP clears, a configuration interrupt),
kvmkit says why once, and frames sent afterwards are dropped and counted.

Locking: the device calls ``transmit``/``receive_frame`` with its lock
held; they take this end's lock around the backend. The loop's callbacks
take this end's lock only around backend calls and call the device
without it, so the order is always device lock, then this lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol, Sequence

from ..devices.virtio.net import VirtioNet, format_mac
from ..host.loop import EventLoop

log = logging.getLogger(__name__)


class NetBackend(Protocol):
    """What host/netstream.py's StreamBackend (and UserNetBackend) and host/tap.py's TapBackend offer."""

    kind: str
    down: str | None

    def fileno(self) -> int: ...

    def read_frame(self) -> memoryview | None: ...

    def buffered_frame(self) -> bool: ...

    def write_frames(self, frames: Sequence[Sequence[memoryview]]) -> int: ...

    @property
    def output_pending(self) -> bool: ...

    def flush(self) -> bool: ...

    def describe(self) -> str: ...

    def why_down(self) -> str | None: ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class VirtioNetEnd:
    """NetHost for the model; owner of the backend's fd on the host loop."""

    def __init__(self, name: str, loop: EventLoop, backend: NetBackend, mac: bytes) -> None:
        self.name = name
        self.loop = loop
        self.backend = backend
        self._lock = threading.Lock()
        self.device = VirtioNet(self, mac, link_up=backend.down is None)
        self._fd = backend.fileno()
        self._reading = False
        self._writing = False
        self._closed = False
        self._down_reported = False
        self.pumps = 0  # receive passes run (a test reads it: no pass while the ring is empty)

    # --- NetHost (device lock held; host loop, or a vCPU on a trapped notify) ----------------
    def transmit(self, frames: Sequence[Sequence[memoryview]]) -> int:
        with self._lock:
            taken = self.backend.write_frames(frames)
            follow_up = self.backend.output_pending or self.backend.down is not None
        if follow_up:
            self.loop.call_soon(self._after_transmit)  # never here: the device lock is held
        return taken

    def receive_frame(self) -> memoryview | None:
        with self._lock:
            return self.backend.read_frame()

    def rx_ready(self) -> None:
        self.loop.call_soon(self._pump)

    # --- host loop ------------------------------------------------------------------------
    def start(self) -> None:
        """Watch the backend (before the loop starts, or on it)."""
        if self.backend.down is not None:
            self._went_down()
            return
        self._set_reading(True)

    def _set_reading(self, on: bool) -> None:
        if self._closed:
            return
        if on and not self._reading:
            self.loop.add_reader(self._fd, self._pump)
            self._reading = True
        elif not on and self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def _set_writing(self, on: bool) -> None:
        if self._closed:
            return
        if on and not self._writing:
            self.loop.add_writer(self._fd, self._on_writable)
            self._writing = True
        elif not on and self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False

    def _pump(self) -> None:
        """The backend may have frames (or the guest posted buffers): move what the guest can take."""
        if self._closed or self._down_reported:
            return
        self.pumps += 1
        self.device.receive()
        with self._lock:
            down = self.backend.down is not None
            more = self.backend.buffered_frame()
        if down:
            self._went_down()
        elif self.device.rx_waiting:
            self._set_reading(False)  # the host's frames wait in its queue until the guest posts buffers
        else:
            self._set_reading(True)
            if more:
                self.loop.call_soon(self._pump)  # a queue's worth per pass; the rest is already read

    def _after_transmit(self) -> None:
        with self._lock:
            down = self.backend.down is not None
            pending = self.backend.output_pending
        if down:
            self._went_down()
        elif pending:
            self._set_writing(True)

    def _on_writable(self) -> None:
        with self._lock:
            drained = self.backend.flush()
            down = self.backend.down is not None
        if down:
            self._went_down()
            return
        if drained:
            self._set_writing(False)
        if self.device.tx_blocked:
            self.device.tx_resume()

    def _went_down(self) -> None:
        if self._down_reported or self._closed:
            return
        self._down_reported = True
        self._set_reading(False)
        self._set_writing(False)
        why = self.backend.why_down()  # may wait a moment for passt's exit status: not under the lock
        what = self.backend.describe()
        log.warning("%s: %s: %s; the guest's network link is down and what it sends is dropped (counted).",
                    self.name, what, why)
        self.device.set_link(False)
        self.device.tx_resume()  # frames that waited for room are taken (and dropped) now

    # --- statistics and teardown ---------------------------------------------------------------
    def counters(self) -> dict[str, object]:
        with self._lock:
            backend = self.backend.counters()
            down = self.backend.down
        return {"mac": format_mac(self.device.mac), "backend": self.backend.describe(), "down": down,
                "device": self.device.counters(), "host": backend}

    def summary(self) -> str:
        c = self.counters()
        dev = c["device"]
        assert isinstance(dev, dict)
        drops = ", ".join(f"{k} {v}" for k, v in dev["drops"].items()) or "none"
        host = ", ".join(f"{k} {v}" for k, v in c["host"].items())  # type: ignore[union-attr]
        state = f"; down: {c['down']}" if c["down"] else ""
        return (f"{self.name} ({c['mac']}, {c['backend']}): tx {dev['tx_frames']} frames {dev['tx_bytes']} bytes, "
                f"rx {dev['rx_frames']} frames {dev['rx_bytes']} bytes; dropped: {drops}; host: {host}{state}")

    def close(self) -> None:
        """Stop watching the backend and close it (a passt kvmkit started is stopped). Loop stopped, or on it."""
        if self._closed:
            return
        self._set_reading(False)
        self._set_writing(False)
        self._closed = True
        with self._lock:
            self.backend.close()
