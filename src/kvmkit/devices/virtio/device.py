"""What a virtio device and its transport promise each other, and the bookkeeping devices share."""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Sequence

from ..state import StateReader
from .queue import Chain, Virtqueue


class VirtioEvents(Protocol):
    """What a device may ask of its transport once activated (any thread)."""

    def used(self, queue: int) -> None:
        """Send the used-buffer notification of ``queue`` (after ``should_notify()`` said so)."""
        ...

    def config_changed(self) -> None:
        """The device configuration changed: bump config_generation, send the config notification."""
        ...


class VirtioDevice(Protocol):
    """A virtio device model as a transport drives it.

    Threading: ``config_read``/``config_write``/``activate``/``reset`` come
    from a vCPU thread with the transport's register lock held;
    ``queue_notify`` comes from whichever thread saw the doorbell (an
    ioeventfd thread, or a vCPU for a trapped write). The device serialises
    its queue work with its own lock; ``reset`` takes that lock, so it waits
    for a request in flight to finish and no queue is touched afterwards.
    """

    device_type: int
    num_queues: int
    queue_max_size: int
    config_size: int
    features: int  # device-type feature bits offered (the transport adds the ring ones)

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def activate(self, features: int, queues: Sequence[Virtqueue], events: VirtioEvents) -> None:
        """DRIVER_OK: start serving ``queues`` (indexed like the device's queues) with ``features``."""
        ...

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue ``index`` (may arrive before activate or after reset)."""
        ...

    def reset(self) -> None:
        """Back to the just-created state; after it returns the device holds no view of guest RAM."""
        ...

    def save_state(self) -> dict[str, object]:
        """The device-specific state (the transport saves features, activation and queues)."""
        ...

    def check_state(self, state: object) -> Callable[[], None]:
        """Validate a saved device-specific state (StateError); returns the function that loads it."""
        ...


class VirtioDeviceBase:
    """The bookkeeping every device model shares: its lock, activation and reset.

    Subclasses set the class attributes of :class:`VirtioDevice`, return
    their configuration space from :meth:`config_bytes` and serve queues in
    :meth:`_notify` (called with :attr:`lock` held, only while active).
    """

    device_type = 0
    num_queues = 1
    queue_max_size = 256
    features = 0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = False
        self.driver_features = 0
        self.queues: list[Virtqueue] = []
        self.events: VirtioEvents | None = None

    # --- configuration space -----------------------------------------------------
    def config_bytes(self) -> bytes:
        """The device configuration structure as the driver sees it (little-endian)."""
        return b""

    @property
    def config_size(self) -> int:
        return len(self.config_bytes())

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or size not in (1, 2, 4, 8):
            return 0
        # No lock: a vCPU must not wait behind a request in flight, and the
        # transport's config_generation covers a change between two reads.
        chunk = self.config_bytes()[offset:offset + size]
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Configuration fields are read-only unless a device says otherwise."""

    # --- lifecycle -------------------------------------------------------------------
    def has(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    def activate(self, features: int, queues: Sequence[Virtqueue], events: VirtioEvents) -> None:
        with self.lock:
            self.driver_features = features
            self.queues = list(queues)
            self.events = events
            self.active = True
            self._activated()

    def reset(self) -> None:
        with self.lock:
            self.active = False
            self.driver_features = 0
            self.queues = []
            self.events = None
            self._reset()

    def queue_notify(self, index: int) -> None:
        with self.lock:
            if self.active and 0 <= index < len(self.queues):
                self._notify(index)

    # --- snapshot --------------------------------------------------------------------
    _state_name = "the virtio device"

    def save_state(self) -> dict[str, object]:
        """The device-specific state; the transport saves features, activation and the queues.

        Requests in flight are not saved, and none can be seen here: the
        lock is taken, and a device serves a kick to the end under it, so
        a request being served completes (into guest RAM) before the state
        is read. Buffers still in the available ring are guest RAM and are
        served after a restore. A device that keeps requests across kicks
        raises StateError instead (see :class:`~.console.VirtioConsole`).
        """
        with self.lock:
            return self._save_state()

    def check_state(self, state: object) -> Callable[[], None]:
        """Validate a saved state without changing the device; returns the function that loads it.

        Split so that the transport can check its own state and the
        device's before it changes either; the loader takes the device lock.
        """
        load = self._check_state(state)

        def locked() -> None:
            with self.lock:
                load()
        return locked

    def load_state(self, state: object) -> None:
        """Load the device-specific state; StateError (and no change) if it is damaged."""
        self.check_state(state)()

    def _save_state(self) -> dict[str, object]:
        """Hook: the device-specific state (lock held)."""
        return {}

    def _check_state(self, state: object) -> Callable[[], None]:
        """Hook: validate ``state``; return what loads it (called with the lock held)."""
        StateReader(state, self._state_name, ())
        return lambda: None

    def _activated(self) -> None:
        """Hook: just activated (lock held)."""

    def _reset(self) -> None:
        """Hook: drop device state and every view of guest RAM (lock held)."""

    def _notify(self, index: int) -> None:
        """Hook: serve queue ``index`` (lock held, device active)."""

    def _serve(self, index: int, handle: Callable[[Chain], int]) -> None:
        """Complete every available chain of queue ``index`` with ``handle(chain)`` bytes written.

        One interrupt per batch; notifications stay off while the batch runs
        and are re-armed with a last look, so buffers that raced in are
        served now rather than left for a kick that will not come. At most
        a queue's worth per pass, so a guest refilling the ring cannot keep
        one pass going forever."""
        q = self.queues[index]
        while True:
            q.disable_notifications()
            for _ in range(q.size):
                chain = q.pop()
                if chain is None:
                    break
                q.push(chain, handle(chain))
            self._signal(index)
            if not q.enable_notifications():
                return

    def _signal(self, index: int) -> None:
        """One used-buffer notification for a batch, if the driver wants it."""
        if self.queues[index].should_notify() and self.events is not None:
            self.events.used(index)


class HostEndedDevice(VirtioDeviceBase):
    """A device whose receive queue 0 and transmit queue 1 meet a host end with back pressure both ways
    (virtio-console, virtio-net): the kick logic they share.

    TX: the subclass's ``_transmit`` offers frames or bytes to the host end and
    sets ``_tx_blocked`` (keeping the rest in ``_tx_pending``) when it is full;
    :meth:`tx_resume` goes on once it has room. RX: a kick of the receive
    queue while the host end waits for buffers (``_rx_waiting``) wakes it
    through ``host.rx_ready()``, outside the device lock, since the host end
    then calls back into the device to fill them.
    """

    RECEIVEQ = 0
    TRANSMITQ = 1
    host: Any
    _tx_pending: Any

    def queue_notify(self, index: int) -> None:
        wake = False
        with self.lock:
            if not self.active or not 0 <= index < len(self.queues):
                return
            if index == self.TRANSMITQ:
                self._transmit()
            elif index == self.RECEIVEQ and self._rx_waiting:
                self._rx_waiting = False
                wake = True
        if wake:
            self.host.rx_ready()

    def _activated(self) -> None:
        self._rx_waiting = True

    def _reset(self) -> None:
        self._tx_pending.clear()
        self._tx_blocked = False
        self._rx_waiting = True

    def tx_resume(self) -> None:
        """The host end can take output again: offer what waits, then whatever the guest queued since."""
        with self.lock:
            if self.active and len(self.queues) > self.TRANSMITQ:
                self._tx_blocked = False
                self._transmit()

    def _transmit(self) -> None:
        """Hook: offer the transmit queue's output to the host end (lock held, device active)."""
        raise NotImplementedError
