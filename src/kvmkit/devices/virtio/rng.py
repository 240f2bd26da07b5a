"""virtio-rng, the entropy device (virtio 1.2 §5.4): random bytes into guest buffers.

The host supplies ``entropy(n) -> bytes`` (the machine passes
``os.getrandom``). A request is filled up to ``max_request`` bytes (64 KiB
by default) whatever buffer the guest offers: §5.4.6.2 lets the device use
less than the whole buffer, and the bound keeps one request from making
the host allocate (and the entropy source produce) more than that at once.
Device-readable buffers, which a driver must not post here, are ignored.
If the entropy source fails (OSError) or runs short, the request completes
with what it got.

Its snapshot state is empty: random bytes leave nothing behind that the
guest could observe, and the byte counters are statistics.
"""

from __future__ import annotations

from typing import Callable

from . import VIRTIO_ID_RNG
from .device import VirtioDeviceBase
from .queue import Chain, scatter, slice_bufs

MAX_REQUEST = 64 * 1024
QUEUE_SIZE = 64


class VirtioRng(VirtioDeviceBase):
    device_type = VIRTIO_ID_RNG
    num_queues = 1
    queue_max_size = QUEUE_SIZE
    _state_name = "the virtio entropy device"

    def __init__(self, entropy: Callable[[int], bytes], *, max_request: int = MAX_REQUEST) -> None:
        super().__init__()
        self.entropy = entropy
        self.max_request = max(1, max_request)
        self.bytes_served = 0
        self.requests = 0
        self.failures = 0

    def _notify(self, index: int) -> None:
        self._serve(index, self._fill)

    def _fill(self, chain: Chain) -> int:
        written = 0
        if chain.error is None and chain.write_len:
            n = min(chain.write_len, self.max_request)
            try:
                data = self.entropy(n)[:n]
            except OSError:
                data = b""
                self.failures += 1
            written = scatter(slice_bufs(chain.writable, 0, n), data)
            self.bytes_served += written
        self.requests += 1
        return written
