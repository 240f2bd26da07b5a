"""virtio-console (virtio 1.2 §5.3), one port, no MULTIPORT: a byte pipe with back pressure.

Queue 0 (receiveq) carries host->guest bytes into buffers the guest
posted; queue 1 (transmitq) carries guest->host bytes. Neither direction
drops a byte:

* Transmit: on a kick, the device pops every available chain and hands
  all their device-readable buffers to the host in one
  :meth:`ConsoleHost.output` call (a gather list, ready for ``writev``,
  at most ``IOV_MAX`` buffers). The host may take fewer bytes than
  offered; that means "full": the chains not wholly taken stay with the
  device, unacknowledged (the guest sees them still in flight), and the
  device stops taking new ones until the host calls
  :meth:`VirtioConsole.tx_resume`, which resumes exactly where output
  stopped. A chain is returned to the guest only once all its bytes were
  taken.
* Receive: the host offers bytes with :meth:`VirtioConsole.receive`,
  which fills whatever buffers the guest has posted and returns how many
  bytes it took (0 when none are posted). The host keeps the rest; the
  device calls :meth:`ConsoleHost.rx_ready` once the guest posts buffers
  after a short receive (it asks the guest to kick for exactly that), and
  the host then offers the rest again.

Threading: ``receive`` and ``tx_resume`` may be called from any host
thread; kicks arrive from the transport. All are serialised by the
device's lock. ``output`` is called with that lock held (the order of the
bytes depends on it), so it must not call back into the device;
``rx_ready`` is called after the lock is released, so the host may call
``receive`` from inside it.
"""

from __future__ import annotations

import collections
import struct
from typing import Callable, Protocol, Sequence

from ..state import StateError, StateReader
from . import VIRTIO_ID_CONSOLE
from .device import HostEndedDevice
from .queue import Chain, scatter

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 128
IOV_MAX = 1024   # Linux's limit on one writev(); one output() call never exceeds it
_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr


class ConsoleHost(Protocol):
    """The host end of the console."""

    def output(self, bufs: Sequence[memoryview]) -> int:
        """Take guest output, in order; returns how many bytes were taken.

        Fewer than offered means the host end is full: it calls
        ``tx_resume()`` once it can take more. The views are guest RAM,
        valid only during the call."""
        ...

    def rx_ready(self) -> None:
        """The guest posted receive buffers after a short ``receive()``: offer the rest again."""
        ...


class VirtioConsole(HostEndedDevice):
    device_type = VIRTIO_ID_CONSOLE
    num_queues = 2
    queue_max_size = QUEUE_SIZE

    def __init__(self, host: ConsoleHost, *, size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.host = host
        self.features = (1 << VIRTIO_CONSOLE_F_SIZE) if size is not None else 0
        self.cols, self.rows = size if size is not None else (0, 0)
        # (chain, views not yet taken by the host), oldest first
        self._tx_pending: collections.deque[tuple[Chain, list[memoryview]]] = collections.deque()
        self._tx_blocked = False
        self._rx_waiting = True  # the host may have input before the guest posted any buffer
        # statistics
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.output_calls = 0
        self.bad_chains = 0

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.cols & 0xFFFF, self.rows & 0xFFFF, 1, 0)

    def resize(self, cols: int, rows: int) -> None:
        """The host terminal changed size (reported to the guest only with VIRTIO_CONSOLE_F_SIZE)."""
        with self.lock:
            self.cols, self.rows = cols, rows
            events = self.events if self.active and self.has(VIRTIO_CONSOLE_F_SIZE) else None
            if events is not None:
                events.config_changed()

    # --- snapshot (VirtioDeviceBase.save_state: taken under the lock) ----------------------
    _state_name = "the virtio console"

    def _save_state(self) -> dict[str, object]:
        """The size the guest was told, and whether the host is owed an ``rx_ready`` at the next RX kick.

        Guest output the host has not taken yet (it was full) is a request
        in flight that outlives a kick, held as views of guest RAM: it is
        not saved and raises StateError. Dropping it instead would lose
        those bytes and never return their buffers, which the guest's
        driver waits for; the machine saves once the host end has taken it
        (``tx_resume``). Blocked output always has such bytes pending.
        """
        if self._tx_pending:
            raise StateError("The virtio console has guest output the host end has not taken yet; "
                             "save again once it has drained.")
        return {"cols": self.cols & 0xFFFF, "rows": self.rows & 0xFFFF, "rx_waiting": self._rx_waiting}

    def _check_state(self, state: object) -> Callable[[], None]:
        r = StateReader(state, self._state_name, ("cols", "rows", "rx_waiting"))
        cols, rows = r.take_int("cols", 0, 0xFFFF), r.take_int("rows", 0, 0xFFFF)
        rx_waiting = r.take_bool("rx_waiting")

        def load() -> None:
            self.cols, self.rows, self._rx_waiting = cols, rows, rx_waiting
            self._tx_pending.clear()
            self._tx_blocked = False
        return load

    # --- guest -> host ---------------------------------------------------------------------
    def _transmit(self) -> None:
        if self._tx_blocked:
            return
        q = self.queues[TRANSMITQ]
        pushed = False
        pending = self._tx_pending
        while True:
            q.disable_notifications()
            nbufs = sum(len(views) for _, views in pending)
            while nbufs < IOV_MAX:
                chain = q.pop()
                if chain is None:
                    break
                if chain.error is not None or not chain.readable:
                    self.bad_chains += chain.error is not None
                    q.push(chain, 0)
                    pushed = True
                    continue
                pending.append((chain, list(chain.readable)))
                nbufs += len(chain.readable)
            if not pending:
                if q.enable_notifications():
                    continue
                break
            bufs = [v for _, views in pending for v in views][:IOV_MAX]
            offered = sum(len(v) for v in bufs)
            self.output_calls += 1
            taken = min(max(int(self.host.output(bufs)), 0), offered)
            self.tx_bytes += taken
            pushed |= self._consume(taken)
            if taken < offered:
                self._tx_blocked = True  # leave notifications off: tx_resume() picks up from here
                break
        if pushed:
            self._signal(TRANSMITQ)

    def _consume(self, n: int) -> bool:
        """Drop ``n`` taken bytes from the front of the pending output; complete finished chains."""
        q = self.queues[TRANSMITQ]
        pending = self._tx_pending
        pushed = False
        while pending:
            chain, views = pending[0]
            while views and n:
                v = views[0]
                if len(v) <= n:
                    n -= len(v)
                    views.pop(0)
                else:
                    views[0] = v[n:]
                    n = 0
            if views:
                break
            pending.popleft()
            q.push(chain, 0)  # the device wrote nothing into a transmit buffer
            pushed = True
        return pushed

    # --- host -> guest ----------------------------------------------------------------------
    def receive(self, data: bytes | bytearray | memoryview) -> int:
        """Put host input into the guest's posted buffers; returns how many bytes were taken."""
        src = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        total = len(src)
        if total == 0:
            return 0
        with self.lock:
            if not self.active or len(self.queues) <= RECEIVEQ:
                self._rx_waiting = True
                return 0
            q = self.queues[RECEIVEQ]
            taken = 0
            pushed = False
            while taken < total:
                chain = q.pop()
                if chain is None:
                    if q.enable_notifications():
                        continue  # buffers raced in while we asked for kicks
                    self._rx_waiting = True
                    break
                if chain.error is not None or not chain.write_len:
                    self.bad_chains += chain.error is not None
                    q.push(chain, 0)
                    pushed = True
                    continue
                n = scatter(chain.writable, src[taken:])
                q.push(chain, n)
                pushed = True
                taken += n
            else:
                # All taken: no kicks needed until the host has more to say.
                q.disable_notifications()
                self._rx_waiting = False
            self.rx_bytes += taken
            if pushed:
                self._signal(RECEIVEQ)
            return taken
