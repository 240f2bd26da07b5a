"""virtio-net (virtio 1.2 §5.1, device ID 1): one receive queue, one transmit queue, no control queue.

Ethernet frames cross between the guest's rings and a host backend (a passt
connection or a tap device, chosen by the machine) through the small
:class:`NetHost` protocol. Each frame in either direction is preceded in
the ring by the 12-byte ``struct virtio_net_hdr`` (with VERSION_1 the header
has ``num_buffers`` whether or not MRG_RXBUF is negotiated, §5.1.6).

Features offered: MAC (the configuration space holds the address the
machine chose), STATUS (``status`` says whether the backend is connected;
a change is a configuration change notification) and MRG_RXBUF (a
received frame may span several receive chains, Linux's usual mode).
No checksum or segmentation offload is offered: the header of every frame
is all zeros but ``num_buffers``, the guest computes its own checksums, and
a transmitted header that asks for an offload (NEEDS_CSUM, or a gso_type
other than NONE) was not negotiated and is dropped.

Transmit: on a kick the device pops the available chains, checks each
(a bad chain, a device-writable buffer, a header cut short, a frame under
14 bytes or over :data:`MAX_FRAME` is dropped, completed with 0 bytes and
counted under its reason) and hands the good frames to
:meth:`NetHost.transmit` in one batch, as gather lists of guest RAM views
(the header already cut off; no copy). The host may take fewer frames than
offered: it is full, and the frames it did not take stay with the device,
their chains not completed, until the host calls
:meth:`VirtioNet.tx_resume`. So a slow backend slows the guest's sender
the way a full NIC ring does, and nothing is dropped for it.

Receive: the host calls :meth:`VirtioNet.receive` when it may have frames;
the device pulls them with :meth:`NetHost.receive_frame` only while the
guest has receive chains posted, so nothing is read from the host while
the ring is empty: the device sets :attr:`rx_waiting`, asks for the
guest's next RX kick and then calls :meth:`NetHost.rx_ready`. A frame that
does not fit the buffers offered (with MRG_RXBUF, all the chains
available; without, the next chain) is dropped and counted, and the chains
popped for it are returned empty (Linux counts those as length errors and
posts new ones). A frame under 14 or over :data:`MAX_FRAME` bytes is
dropped too.

Snapshot: the device state is empty. Transmit frames the host has not
taken yet are requests in flight held as views of guest RAM, so a save
then raises StateError (the machine saves again once the backend has taken
them, as for the console). Received frames never wait in the device: they
go from the backend into guest buffers in one step; whatever the backend
had read from its socket but not delivered is the backend's and is not
kept (a restored machine starts a new backend).

Threading: ``receive`` and ``tx_resume`` may come from any host thread and
kicks from the transport; the device lock serialises them. ``transmit``
and ``receive_frame`` are called with that lock held, so they must not
call back into the device; ``rx_ready`` is called after it is released.
"""

from __future__ import annotations

import collections
import struct
from typing import Callable, Protocol, Sequence

from ..state import StateError, StateReader
from . import VIRTIO_ID_NET
from .device import HostEndedDevice
from .queue import Chain, Virtqueue, gather, scatter, slice_bufs

# --- feature bits (§5.1.3) -------------------------------------------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1

# --- struct virtio_net_hdr (§5.1.6) ------------------------------------------------------
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
HDR_LEN = NET_HDR.size               # 12

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 256

ETH_HLEN = 14
MIN_FRAME = ETH_HLEN
# Without VIRTIO_NET_F_MTU, Linux lets the guest raise its MTU to ETH_MAX_MTU
# (65535), and without GSO a frame is at most that MTU plus the Ethernet
# header and one VLAN tag. passt offers MTUs up to 65520 by DHCP, so the
# bound must be this one, not 1518.
MAX_FRAME = 65535 + ETH_HLEN + 4

# The reasons a frame or chain is dropped (a fixed set: the guest cannot grow the table).
DROP_REASONS = (
    "tx_bad_chain",      # the ring refused the chain (outside RAM, a loop, ...)
    "tx_writable",       # a device-writable buffer in a transmit chain
    "tx_short_header",   # fewer than 12 bytes: no complete virtio_net_hdr
    "tx_offload",        # the header asks for checksum or segmentation offload, which was not offered
    "tx_runt",           # frame under 14 bytes
    "tx_oversize",       # frame over MAX_FRAME bytes
    "rx_bad_chain",      # a receive chain refused by the ring, with readable buffers, or under 12 bytes
    "rx_no_buffers",     # the frame did not fit the receive buffers the guest had posted
    "rx_runt",           # host frame under 14 bytes
    "rx_oversize",       # host frame over MAX_FRAME bytes
)


class NetHost(Protocol):
    """The host end of the network device (a backend on the host loop)."""

    def transmit(self, frames: Sequence[Sequence[memoryview]]) -> int:
        """Take guest frames, in order; returns how many were taken (a prefix of ``frames``).

        Each frame is a gather list of guest RAM views, valid only during
        the call (copy what must outlive it). Fewer than offered means the
        host is full: it calls :meth:`VirtioNet.tx_resume` once it has room."""
        ...

    def receive_frame(self) -> bytes | bytearray | memoryview | None:
        """The next frame for the guest, or None when the host has none now (never blocks).

        The device has room for it when it asks; a returned view need only
        stay valid until the next call."""
        ...

    def rx_ready(self) -> None:
        """The guest posted receive buffers after :meth:`VirtioNet.receive` found none: call it again."""
        ...


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class VirtioNet(HostEndedDevice):
    device_type = VIRTIO_ID_NET
    num_queues = 2
    queue_max_size = QUEUE_SIZE
    features = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_NET_F_MRG_RXBUF)
    _state_name = "the virtio network device"

    def __init__(self, host: NetHost, mac: bytes, *, link_up: bool = True) -> None:
        if len(mac) != 6 or mac[0] & 1 or not any(mac):
            raise ValueError(f"a network device needs a 6-byte unicast MAC address, not {mac.hex()}")
        super().__init__()
        self.host = host
        self.mac = bytes(mac)
        self.link_up = link_up
        # (chain, frame views) the host has not taken yet, oldest first
        self._tx_pending: collections.deque[tuple[Chain, list[memoryview], int]] = collections.deque()
        self._tx_blocked = False
        self._rx_waiting = True  # the host may have frames before the guest posted a buffer
        # statistics (never reset: they describe the VM's life)
        self.tx_frames = 0
        self.tx_bytes = 0
        self.rx_frames = 0
        self.rx_bytes = 0
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    # --- configuration space -------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP if self.link_up else 0)

    def set_link(self, up: bool) -> None:
        """The backend connected or went away: the guest sees carrier on or off (with STATUS)."""
        with self.lock:
            if up == self.link_up:
                return
            self.link_up = up
            events = self.events if self.active and self.has(VIRTIO_NET_F_STATUS) else None
            if events is not None:
                events.config_changed()

    @property
    def rx_waiting(self) -> bool:
        """True while the device found no receive buffer and waits for the guest to post some."""
        return self._rx_waiting

    @property
    def tx_blocked(self) -> bool:
        """True while the host is full and transmit frames wait for :meth:`tx_resume`."""
        return self._tx_blocked

    def counters(self) -> dict[str, object]:
        return {"tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes, "rx_frames": self.rx_frames,
                "rx_bytes": self.rx_bytes, "drops": {k: v for k, v in self.drops.items() if v}}

    def _drop(self, reason: str) -> None:
        self.drops[reason] += 1

    # --- snapshot (VirtioDeviceBase.save_state: taken under the lock) ----------------------
    def _save_state(self) -> dict[str, object]:
        if self._tx_pending:
            raise StateError("The virtio network device has guest frames its backend has not taken yet; "
                             "save again once they have gone out.")
        return {}

    def _check_state(self, state: object) -> Callable[[], None]:
        StateReader(state, self._state_name, ())

        def load() -> None:
            self._tx_pending.clear()
            self._tx_blocked = False
            self._rx_waiting = True  # the first RX kick after the restore wakes the host end
        return load

    # --- guest -> host -------------------------------------------------------------------------
    def _transmit(self) -> None:
        if self._tx_blocked:
            return
        q = self.queues[TRANSMITQ]
        pending = self._tx_pending
        pushed = False
        while True:
            q.disable_notifications()
            while len(pending) < q.size:
                chain = q.pop()
                if chain is None:
                    break
                frame = self._tx_frame(chain)
                if frame is None:
                    q.push(chain, 0)
                    pushed = True
                    continue
                pending.append((chain, frame, chain.read_len - HDR_LEN))
            if not pending:
                if q.enable_notifications():
                    continue
                break
            offered = len(pending)
            taken = min(max(int(self.host.transmit([f for _, f, _ in pending])), 0), offered)
            for _ in range(taken):
                chain, _views, length = pending.popleft()
                q.push(chain, 0)  # the device writes nothing into a transmit buffer
                self.tx_frames += 1
                self.tx_bytes += length
            pushed |= taken > 0
            if taken < offered:
                self._tx_blocked = True  # notifications stay off: tx_resume() picks up from here
                break
        if pushed:
            self._signal(TRANSMITQ)

    def _tx_frame(self, chain: Chain) -> list[memoryview] | None:
        """The frame's views (header cut off), or None after counting why the chain is dropped."""
        if chain.error is not None:
            self._drop("tx_bad_chain")
        elif chain.writable:
            self._drop("tx_writable")
        elif chain.read_len < HDR_LEN:
            self._drop("tx_short_header")
        else:
            flags, gso_type = gather(chain.readable, 0, 2)
            length = chain.read_len - HDR_LEN
            if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM or gso_type != VIRTIO_NET_HDR_GSO_NONE:
                self._drop("tx_offload")
            elif length < MIN_FRAME:
                self._drop("tx_runt")
            elif length > MAX_FRAME:
                self._drop("tx_oversize")
            else:
                return slice_bufs(chain.readable, HDR_LEN)
        return None

    # --- host -> guest ---------------------------------------------------------------------------
    def receive(self) -> int:
        """Move frames from the host into the guest's receive buffers while it has some; returns how many.

        At most a queue's worth of frames per call, so one busy backend
        cannot hold the host thread: the host calls again while it has
        more. When the ring is empty the device sets :attr:`rx_waiting`
        and reads nothing more from the host until the guest posts buffers.
        """
        with self.lock:
            if not self.active or len(self.queues) <= RECEIVEQ:
                self._rx_waiting = True
                return 0
            q = self.queues[RECEIVEQ]
            delivered = 0
            pushed = False
            for _ in range(q.size):
                if not q.available():
                    if q.enable_notifications():
                        continue  # buffers raced in while we asked for kicks
                    self._rx_waiting = True
                    break
                frame = self.host.receive_frame()
                if frame is None:
                    q.disable_notifications()  # no RX kicks needed until the host has more
                    self._rx_waiting = False
                    break
                self._rx_waiting = False
                ok, used = self._deliver(q, frame)
                delivered += ok
                pushed |= used
            if pushed:
                self._signal(RECEIVEQ)
            return delivered

    def _deliver(self, q: Virtqueue, frame: bytes | bytearray | memoryview) -> tuple[bool, bool]:
        """Put one frame into the next chain(s); returns (delivered, anything pushed)."""
        src = memoryview(frame).cast("B") if isinstance(frame, memoryview) else memoryview(frame)
        n = len(src)
        if n < MIN_FRAME:
            self._drop("rx_runt")
            return False, False
        if n > MAX_FRAME:
            self._drop("rx_oversize")
            return False, False
        need = HDR_LEN + n
        merge = self.has(VIRTIO_NET_F_MRG_RXBUF)
        chains: list[Chain] = []
        room = 0
        pushed = False
        while room < need:
            chain = q.pop()
            if chain is None:
                break
            if chain.error is not None or chain.readable or chain.write_len < HDR_LEN:
                self._drop("rx_bad_chain")
                q.push(chain, 0)
                pushed = True
                continue
            chains.append(chain)
            room += chain.write_len
            if not merge:
                break
        if room < need:
            self._drop("rx_no_buffers")
            for chain in chains:
                q.push(chain, 0)
            return False, pushed or bool(chains)
        scatter(chains[0].writable, NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, len(chains)))
        dst = [v for c in chains for v in c.writable]
        scatter(slice_bufs(dst, HDR_LEN), src)
        left = need
        for chain in chains:
            used = min(chain.write_len, left)
            q.push(chain, used)
            left -= used
        self.rx_frames += 1
        self.rx_bytes += n
        return True, True
