"""virtio-9p, the 9P transport (virtio 1.2 §5.9 device ID 9; Linux's 9pnet_virtio): one request queue.

The device only carries messages: each chain holds one 9P request in its
device-readable buffers and room for the reply in its device-writable
ones. The server that answers (a 9P2000.L file server, host/p9server.py)
is the host's business; the machine hands it in as a :class:`P9Backend`.

Why the request is gathered whole: Linux's zero-copy path puts the message
header in one buffer and the user's pages after it (the header's size
field counts both), so a message spans descriptors; the reply is
scattered the same way (an 11-byte Rread header, then the pages). Both are
bounded: the request by the backend's ``max_msize`` (a longer chain is
cut, and the server refuses the size mismatch with an Rlerror carrying the
tag), the reply by the chain's writable bytes (a reply that does not fit
becomes Rlerror EMSGSIZE; a chain without room even for that completes
with 0 bytes, counted in ``unanswered``).

Requests are served one after another on the thread that saw the kick
(the machine gives this device a worker thread: file I/O can block, a
vCPU must not).

A snapshot of a mounted share is refused: the server's fids are open host
files that a restore could not hand back to the guest's mount. An unmounted
share (no fid in use) has no state to save.
"""

from __future__ import annotations

import errno
import struct
from typing import Protocol

from ..state import StateError
from . import VIRTIO_ID_9P
from .device import VirtioDeviceBase
from .queue import Chain, gather, scatter

VIRTIO_9P_MOUNT_TAG = 0      # the configuration space holds the mount tag
QUEUE_SIZE = 128             # Linux's 9pnet_virtio builds its lists for a 128-entry ring
MAX_TAG = 64                 # bytes of mount tag kvmkit accepts (the driver allocates tag_len + 1)
HEADER = struct.Struct("<IBH")  # size[4] type[1] tag[2]
RLERROR = 7
RLERROR_SIZE = HEADER.size + 4


class P9Backend(Protocol):
    """What answers the requests: one reply per request (b"" when it cannot even be tagged)."""

    max_msize: int

    def handle(self, request: bytes | bytearray | memoryview) -> bytes: ...

    @property
    def fid_count(self) -> int: ...


def rlerror(tag: int, code: int) -> bytes:
    """An Rlerror; the device builds it itself only when the server's reply does not fit the chain."""
    return HEADER.pack(RLERROR_SIZE, RLERROR, tag & 0xFFFF) + struct.pack("<I", code)


def valid_tag(tag: str) -> bool:
    """A mount tag the guest's ``mount -t 9p TAG`` can name: 1 to 64 bytes of letters, digits, ``_.-``."""
    return 0 < len(tag.encode()) <= MAX_TAG and all(c.isascii() and (c.isalnum() or c in "_.-") for c in tag)


class VirtioP9(VirtioDeviceBase):
    device_type = VIRTIO_ID_9P
    num_queues = 1
    queue_max_size = QUEUE_SIZE
    features = 1 << VIRTIO_9P_MOUNT_TAG
    _state_name = "the virtio 9P device"

    def __init__(self, backend: P9Backend, tag: str) -> None:
        if not valid_tag(tag):
            raise ValueError(f"9P mount tag {tag!r} must be 1 to {MAX_TAG} letters, digits, '_', '.' or '-'")
        super().__init__()
        self.backend = backend
        self.tag = tag
        self._config = struct.pack("<H", len(tag.encode())) + tag.encode()
        self.requests = 0
        self.unanswered = 0     # chains completed without a reply (no tag, or no room for one)
        self.bytes_in = 0       # request bytes taken from the guest
        self.bytes_out = 0      # reply bytes given to it

    def config_bytes(self) -> bytes:
        return self._config

    def _notify(self, index: int) -> None:
        self._serve(index, self._request)

    def _request(self, chain: Chain) -> int:
        self.requests += 1
        if chain.error is not None or chain.read_len < HEADER.size:
            self.unanswered += 1
            return 0
        request = gather(chain.readable, 0, min(chain.read_len, self.backend.max_msize))
        self.bytes_in += len(request)
        reply = self.backend.handle(request)
        if len(reply) > chain.write_len:
            tag = HEADER.unpack_from(request)[2]
            reply = rlerror(tag, errno.EMSGSIZE) if chain.write_len >= RLERROR_SIZE else b""
        if not reply:
            self.unanswered += 1
            return 0
        written = scatter(chain.writable, reply)
        self.bytes_out += written
        return written

    def _save_state(self) -> dict[str, object]:
        if self.backend.fid_count:
            raise StateError(f"the guest has the 9P share {self.tag!r} mounted: its open host files cannot be "
                             "saved; unmount it in the guest, then snapshot.")
        return {}
