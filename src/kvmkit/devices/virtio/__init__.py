"""Virtio 1.2 (modern only): constants shared by the transport, the queues and the devices.

The split is the spec's own: a *transport* (here virtio-pci, in ``pci.py``)
owns the registers, feature negotiation, status and interrupts; a *device*
(``blk.py``, ``console.py``, ``rng.py``) owns the meaning of its queues and
of its configuration space; :mod:`.queue` owns the ring format. They meet
in the :class:`~.device.VirtioDevice` and :class:`~.device.VirtioEvents`
protocols (``device.py``), so a device never learns which transport carries
it (virtio-mmio could be added without touching one). This module holds the
spec's numbers only.

Only the non-legacy interface exists: all fields are little-endian,
VERSION_1 is mandatory, and a driver that does not accept it is refused at
FEATURES_OK.
"""

from __future__ import annotations


# --- device types (§5) ---------------------------------------------------------
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_9P = 9

# --- device status bits (§2.1) -------------------------------------------------
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# --- reserved (transport/ring) feature bits (§6) --------------------------------
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40

# Bits a device type may define: 0..23 and 50..63 (the rest belong to the
# transport and ring layout, which the transport alone decides).
DEVICE_FEATURE_MASK = ((1 << 24) - 1) | (((1 << 64) - 1) & ~((1 << 50) - 1))

# --- ring constants (§2.7) -------------------------------------------------------
MAX_QUEUE_SIZE = 32768
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# --- MSI-X (§4.1.5.1.2) ---------------------------------------------------------------
VIRTIO_MSI_NO_VECTOR = 0xFFFF


def feature(bit: int) -> int:
    """The mask of feature ``bit``; spelled out because feature words are 64 bits wide."""
    return 1 << bit
