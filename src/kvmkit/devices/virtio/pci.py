"""The virtio-pci modern transport (virtio 1.2 §4.1): registers, negotiation, interrupts.

Everything a virtio device needs from PCI except PCI itself: the PCI
configuration header, the capability list and the MSI-X table belong to
the PCI model, which places what this module produces.

What the PCI model places
-------------------------
* :attr:`VirtioPciTransport.capabilities`: the vendor-specific (ID 0x09)
  capabilities, in order COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG (only
  when the device has a configuration space) and PCI_CFG. Each ``body`` is
  the capability *without its first two bytes* (cap_vndr, cap_next): it
  starts at ``cap_len`` and is ``cap_len - 2`` bytes long::

      body[0]      cap_len   (16, or 20 for NOTIFY_CFG and PCI_CFG)
      body[1]      cfg_type
      body[2]      bar       (the BAR index given to the constructor)
      body[3]      id        (0)
      body[4:6]    padding   (0)
      body[6:10]   offset    (le32, within the BAR)
      body[10:14]  length    (le32)
      body[14:18]  notify_off_multiplier (NOTIFY_CFG) or pci_cfg_data (PCI_CFG)

  so ``add_capability(0x09, cap.body)`` yields the spec's structure. The
  PCI_CFG capability is live: the PCI model should forward config-space
  accesses that fall inside it to :attr:`VirtioPciTransport.pci_cfg`
  (offsets relative to the capability's first byte, cap_vndr = 0).
* :attr:`VirtioPciTransport.bar` (a bus device, offsets relative to the
  BAR) for a memory BAR of :attr:`bar_size` bytes at :attr:`bar_index`.
  It is MMIO with read side effects (the ISR), so it should not be marked
  prefetchable; 64-bit is fine. Layout: common config at 0x0000, ISR at
  0x1000, device config at 0x2000, notifications from 0x3000: queue *n*
  is notified by a write at ``NOTIFY_OFFSET + 4 * n``
  (:meth:`notify_offset`), so each queue can have its own ioeventfd.
* :attr:`VirtioPciTransport.identity`: vendor 0x1AF4, device 0x1040 + the
  virtio device type, revision 1, subsystem 0x1AF4:0x0040, class code.

Interrupts go out through :class:`VirtioInterrupts`, which the machine
implements on top of the MSI-X model and an INTx line.

Threading
---------
Register accesses (the BAR, the PCI_CFG window) come from vCPU threads.
``queue_notify`` comes from the thread that watches the ioeventfds, or
from a vCPU when a notify write traps. Device work runs on the thread
that called ``queue_notify`` (or that called a device's host-side method).

Three locks, always taken in this order and never the other way round:
the transport's register lock (common config, device config, status;
held across ``device.activate`` and ``device.reset``), then the device's
own lock (held while it works on its queues), then the transport's
interrupt lock (ISR and the INTx level; held while calling
:class:`VirtioInterrupts`). A device signals (``used``,
``config_changed``, a broken queue) without the register lock, so a
worker never waits for a vCPU, and a reset (status 0) waits for the
worker's request in flight to finish, after which no queue is touched
until the driver sets DRIVER_OK again. ``queue_notify`` takes no
transport lock at all.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from . import (
    ACKNOWLEDGE,
    DEVICE_FEATURE_MASK,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_CONSOLE,
    VIRTIO_ID_NET,
    VIRTIO_ID_RNG,
    VIRTIO_ID_9P,
    VIRTIO_MSI_NO_VECTOR,
)
from ..state import StateReader
from .device import VirtioDevice
from .queue import GuestRam, Virtqueue

# --- capability types (§4.1.4) ---------------------------------------------------
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
PCI_CAP_ID_VNDR = 0x09

# --- BAR layout (one 4 KiB page per structure) -------------------------------------
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
REGION_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4   # one dword per queue: distinct addresses for distinct ioeventfds
DEFAULT_BAR = 4             # where QEMU puts its modern virtio BAR; BAR0/1 stay free (MSI-X table)

# --- common configuration (struct virtio_pci_common_cfg, through queue_reset) ------
COMMON_DEVICE_FEATURE_SELECT = 0x00
COMMON_DEVICE_FEATURE = 0x04
COMMON_DRIVER_FEATURE_SELECT = 0x08
COMMON_DRIVER_FEATURE = 0x0C
COMMON_CONFIG_MSIX_VECTOR = 0x10
COMMON_NUM_QUEUES = 0x12
COMMON_DEVICE_STATUS = 0x14
COMMON_CONFIG_GENERATION = 0x15
COMMON_QUEUE_SELECT = 0x16
COMMON_QUEUE_SIZE = 0x18
COMMON_QUEUE_MSIX_VECTOR = 0x1A
COMMON_QUEUE_ENABLE = 0x1C
COMMON_QUEUE_NOTIFY_OFF = 0x1E
COMMON_QUEUE_DESC = 0x20
COMMON_QUEUE_DRIVER = 0x28
COMMON_QUEUE_DEVICE = 0x30
COMMON_QUEUE_NOTIFY_DATA = 0x38
COMMON_QUEUE_RESET = 0x3A
COMMON_CFG_LEN = 0x3C
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHH")
assert _COMMON.size == COMMON_CFG_LEN

ISR_QUEUE = 1
ISR_CONFIG = 2

PCI_VENDOR_ID_VIRTIO = 0x1AF4
PCI_DEVICE_ID_BASE = 0x1040
PCI_SUBSYSTEM_ID = 0x0040   # §4.1.2.1: non-transitional devices SHOULD use 0x40 or higher
_CLASS_CODES = {
    VIRTIO_ID_NET: 0x020000,      # network controller, Ethernet
    VIRTIO_ID_BLOCK: 0x010000,    # mass storage, SCSI (what guests expect of virtio-blk)
    VIRTIO_ID_CONSOLE: 0x078000,  # simple communication controller, other
    VIRTIO_ID_RNG: 0xFF0000,      # unassigned class
    VIRTIO_ID_9P: 0x018000,       # mass storage, other (a file share)
}

_TRANSPORT_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)
_DRIVER_STATUS_BITS = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED
_M32 = 0xFFFF_FFFF
_STATE_KEYS = ("device_status", "device_feature_select", "driver_feature_select", "driver_features",
               "config_msix_vector", "queue_select", "queue_msix_vectors", "queues", "isr", "intx",
               "config_generation", "config_dirty", "pci_cfg", "device")


class VirtioInterrupts(Protocol):
    """How the transport raises interrupts (implemented by the machine over its MSI-X model).

    Called from any thread with the transport's interrupt lock held: they
    must not block on a vCPU or call back into the transport.
    """

    def msix(self, vector: int) -> bool:
        """Send MSI-X table entry ``vector`` (or set its pending bit if masked).

        False when MSI-X is disabled in the function's capability; the
        transport then uses INTx."""
        ...

    def msix_enabled(self) -> bool:
        """Whether MSI-X is enabled (an event mapped to NO_VECTOR then raises nothing)."""
        ...

    def intx(self, level: bool) -> None:
        """Drive the function's INTx line (and the Interrupt Status bit of its PCI status register)."""
        ...


class VirtioPciCap(NamedTuple):
    cfg_type: int
    body: bytes  # from cap_len on; see the module docstring


@dataclass(frozen=True)
class PciIdentity:
    vendor_id: int
    device_id: int
    revision: int
    subsystem_vendor_id: int
    subsystem_id: int
    class_code: int  # base class << 16 | subclass << 8 | programming interface


def _cap_body(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    cap_len = 16 + len(extra)
    return struct.pack("<BBBBxxII", cap_len, cfg_type, bar, 0, offset, length) + extra


class VirtioPciTransport:
    """One virtio device behind the modern PCI interface."""

    def __init__(self, device: VirtioDevice, mem: GuestRam, *, msix_vectors: int,
                 bar: int = DEFAULT_BAR, interrupts: VirtioInterrupts | None = None) -> None:
        if not 0 <= bar <= 5:
            raise ValueError(f"BAR index must be 0..5, not {bar}")
        self.device = device
        self.mem = mem
        self.interrupts = interrupts
        self.msix_vectors = max(0, min(msix_vectors, 0x800))
        self.bar_index = bar
        self.num_queues = device.num_queues
        self.device_features = (device.features & DEVICE_FEATURE_MASK) | _TRANSPORT_FEATURES
        self.queues = [Virtqueue(mem, device.queue_max_size, index=i) for i in range(self.num_queues)]
        for vq in self.queues:
            vq.on_broken = self._queue_broken
        self.lock = threading.Lock()        # registers
        self._irq_lock = threading.Lock()   # ISR and INTx level
        notify_len = NOTIFY_OFF_MULTIPLIER * max(self.num_queues, 1)
        end = NOTIFY_OFFSET + -(-notify_len // REGION_SIZE) * REGION_SIZE
        self.bar_size = 1 << (end - 1).bit_length()
        caps = [
            VirtioPciCap(VIRTIO_PCI_CAP_COMMON_CFG, _cap_body(VIRTIO_PCI_CAP_COMMON_CFG, bar, COMMON_OFFSET, COMMON_CFG_LEN)),
            VirtioPciCap(VIRTIO_PCI_CAP_NOTIFY_CFG, _cap_body(VIRTIO_PCI_CAP_NOTIFY_CFG, bar, NOTIFY_OFFSET, notify_len,
                                                              struct.pack("<I", NOTIFY_OFF_MULTIPLIER))),
            VirtioPciCap(VIRTIO_PCI_CAP_ISR_CFG, _cap_body(VIRTIO_PCI_CAP_ISR_CFG, bar, ISR_OFFSET, 1)),
        ]
        self._config_len = min(device.config_size, REGION_SIZE)
        if self._config_len:
            caps.append(VirtioPciCap(VIRTIO_PCI_CAP_DEVICE_CFG,
                                     _cap_body(VIRTIO_PCI_CAP_DEVICE_CFG, bar, DEVICE_OFFSET, self._config_len)))
        caps.append(VirtioPciCap(VIRTIO_PCI_CAP_PCI_CFG, _cap_body(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, bytes(4))))
        self.capabilities = caps
        self.bar = _BarWindow(self)
        self.pci_cfg = _PciCfgWindow(self)
        self.identity = PciIdentity(PCI_VENDOR_ID_VIRTIO, PCI_DEVICE_ID_BASE + device.device_type, 1,
                                    PCI_VENDOR_ID_VIRTIO, PCI_SUBSYSTEM_ID,
                                    _CLASS_CODES.get(device.device_type, 0xFF0000))
        # statistics
        self.notifies = [0] * self.num_queues
        self.feature_refusals = 0
        self.msix_sent = 0
        self.intx_raised = 0
        self.last_error: str | None = None   # why a queue broke, when one did
        self._isr = 0
        self._intx = False
        self._generation = 0
        self._config_dirty = False
        self._reset_registers()

    # --- geometry for the machine -----------------------------------------------------
    def notify_offset(self, queue: int) -> int:
        """BAR offset whose write notifies ``queue`` (bind one ioeventfd here per queue)."""
        return NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * queue

    # --- state ------------------------------------------------------------------------
    @property
    def status(self) -> int:
        return self._status | (DEVICE_NEEDS_RESET if self._needs_reset else 0)

    @property
    def driver_ok(self) -> bool:
        return self._driver_ok

    @property
    def isr(self) -> int:
        """The ISR byte without the read side effect (for tests and --stats)."""
        return self._isr

    @property
    def intx_level(self) -> bool:
        """The INTx level as last driven through :meth:`VirtioInterrupts.intx`."""
        return self._intx

    # --- snapshot -----------------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """Status, negotiation, selectors, vectors, ISR and INTx, the queues, PCI_CFG, and the device's own.

        DEVICE_NEEDS_RESET is in ``device_status`` as the driver reads it.
        Not saved: statistics, ``last_error``, the interrupt host and guest
        RAM. The machine quiesces the device's workers first: the queues'
        indices are read here, and the device's :meth:`save_state` refuses
        (StateError) if it holds a request across kicks.
        """
        with self.lock:
            with self._irq_lock:
                isr, intx = self._isr, self._intx
            with self.pci_cfg._lock:
                pci_cfg = bytes(self.pci_cfg._image)
            return {
                "device_status": self.status, "device_feature_select": self._dfselect,
                "driver_feature_select": self._gfselect, "driver_features": self.driver_features,
                "config_msix_vector": self._config_vector, "queue_select": self._queue_select,
                "queue_msix_vectors": list(self._queue_vectors), "queues": [vq.save_state() for vq in self.queues],
                "isr": isr, "intx": intx, "config_generation": self._generation, "config_dirty": self._config_dirty,
                "pci_cfg": pci_cfg.hex(), "device": self.device.save_state(),
            }

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the transport :meth:`save_state` described; StateError (and no change) if it is damaged.

        Everything, the device's state and every queue's included, is
        checked before anything changes. An active device is re-attached
        to its queues with ``activate`` (and a stopped one ``reset``), then
        given its saved state. No interrupt is sent: the machine sets the
        line from :attr:`intx_level`, and re-kicks queues with available
        buffers (``queue_notify``) in case a kick was lost while it saved.
        """
        r = StateReader(state, f"the virtio-pci transport (device type {self.device.device_type})", _STATE_KEYS)
        status = r.take_int("device_status", 0, 0xFF)
        r.require(not status & ~(_DRIVER_STATUS_BITS | DEVICE_NEEDS_RESET), "device_status", "it has undefined bits")
        dfselect, gfselect = r.take_int("device_feature_select", 0, _M32), r.take_int("driver_feature_select", 0, _M32)
        features = r.take_int("driver_features", 0, (1 << 64) - 1)
        n = self.num_queues
        config_vector = r.take_int("config_msix_vector", 0, 0xFFFF)
        queue_vectors = r.take_int_list("queue_msix_vectors", 0, 0xFFFF, n, min_len=n)
        for key, vectors in (("config_msix_vector", [config_vector]), ("queue_msix_vectors", queue_vectors)):
            r.require(all(self._vector(v) == v for v in vectors), key, f"a vector is not below {self.msix_vectors}")
        queue_select = r.take_int("queue_select", 0, 0xFFFF)
        queue_states = r.take_list("queues", n, min_len=n)
        queue_loads = [vq.check_state(qs) for vq, qs in zip(self.queues, queue_states)]
        isr, intx = r.take_int("isr", 0, ISR_QUEUE | ISR_CONFIG), r.take_bool("intx")
        r.require(isr != 0 or not intx, "intx", "INTx is raised only with an ISR bit to read")
        generation, config_dirty = r.take_int("config_generation", 0, 0xFF), r.take_bool("config_dirty")
        pci_cfg = r.take_hex_bytes("pci_cfg", _PciCfgWindow.SIZE, min_len=_PciCfgWindow.SIZE)
        with self.pci_cfg._lock:
            fixed = [i for i in range(_PciCfgWindow.SIZE) if i not in _PciCfgWindow._WRITABLE]
            r.require(all(pci_cfg[i] == self.pci_cfg._image[i] for i in fixed), "pci_cfg",
                      "a read-only byte of the capability differs")
        r.require(not status & DRIVER_OK or bool(status & FEATURES_OK), "device_status",
                  "DRIVER_OK needs FEATURES_OK")
        r.require(not status & FEATURES_OK or self._features_acceptable(features), "driver_features",
                  "FEATURES_OK was set for features this device refuses")
        broken = any(qs["broken"] for qs in queue_states)  # type: ignore[index]
        r.require(bool(status & DEVICE_NEEDS_RESET) == broken, "device_status",
                  "DEVICE_NEEDS_RESET is set exactly when a queue broke")
        device_load = self.device.check_state(r.state["device"])
        with self.lock:
            self._driver_ok = False
            if status & DRIVER_OK:
                self.device.activate(features, self.queues, self)
            else:
                self.device.reset()
            for load in queue_loads:
                load()
            self._status, self._needs_reset = status & _DRIVER_STATUS_BITS, broken
            self.driver_features, self._dfselect, self._gfselect = features, dfselect, gfselect
            self._config_vector, self._queue_vectors, self._queue_select = config_vector, list(queue_vectors), queue_select
            self._generation, self._config_dirty = generation, config_dirty
            with self._irq_lock:
                self._isr, self._intx = isr, intx
            with self.pci_cfg._lock:
                self.pci_cfg._image[:] = pci_cfg
            device_load()
            self._driver_ok = bool(status & DRIVER_OK)

    def _reset_registers(self) -> None:
        self._status = 0
        self._needs_reset = False
        self._driver_ok = False
        self.driver_features = 0
        self._dfselect = 0
        self._gfselect = 0
        self._queue_select = 0
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * self.num_queues

    def reset(self) -> None:
        """A platform reset (or teardown): as if the driver wrote 0 to device_status.

        Afterwards neither the transport nor the device holds a view of guest
        RAM, so the machine may unmap it."""
        with self.lock:
            self._reset()

    # --- the notify path (any thread) ------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        """The driver kicked queue ``index``: a notify write, or its ioeventfd firing."""
        if not 0 <= index < self.num_queues or not self._driver_ok:
            return
        self.notifies[index] += 1
        self.device.queue_notify(index)

    # --- VirtioEvents (device side, any thread) ---------------------------------------------
    def used(self, queue: int) -> None:
        if self._driver_ok and 0 <= queue < self.num_queues:
            self._interrupt(self._queue_vectors[queue], ISR_QUEUE)

    def config_changed(self) -> None:
        self._generation = (self._generation + 1) & 0xFF
        self._config_dirty = True
        if self._driver_ok:
            self._interrupt(self._config_vector, ISR_CONFIG)

    def _queue_broken(self, reason: str) -> None:
        self.last_error = reason
        if not self._needs_reset:
            self._needs_reset = True
            if self._driver_ok:  # §2.1.2: DEVICE_NEEDS_RESET is announced by a config notification
                self._interrupt(self._config_vector, ISR_CONFIG)

    def _interrupt(self, vector: int, bit: int) -> None:
        with self._irq_lock:
            if bit == ISR_CONFIG:
                self._isr |= ISR_CONFIG  # set before any config notification, MSI-X or not (§4.1.4.5.1)
            irqs = self.interrupts
            if irqs is not None:
                if vector != VIRTIO_MSI_NO_VECTOR:
                    if irqs.msix(vector):
                        self.msix_sent += 1
                        return
                elif irqs.msix_enabled():
                    return  # the driver unmapped this event
            self._isr |= bit
            if not self._intx:
                self._intx = True
                self.intx_raised += 1
                if irqs is not None:
                    irqs.intx(True)

    def _read_isr(self) -> int:
        with self._irq_lock:
            value, self._isr = self._isr, 0
            if self._intx:
                self._intx = False
                if self.interrupts is not None:
                    self.interrupts.intx(False)
        return value

    # --- BAR accesses (vCPU threads) -----------------------------------------------------------
    def bar_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset < 0:
            return 0
        mask = (1 << (8 * size)) - 1
        if COMMON_OFFSET <= offset < COMMON_OFFSET + REGION_SIZE:
            off = offset - COMMON_OFFSET
            with self.lock:
                image = self._common_image()
            return int.from_bytes(image[off:off + size].ljust(size, b"\0"), "little")
        if ISR_OFFSET <= offset < ISR_OFFSET + REGION_SIZE:
            return self._read_isr() & mask if offset == ISR_OFFSET else 0
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION_SIZE:
            off = offset - DEVICE_OFFSET
            if off >= self._config_len:
                return 0
            with self.lock:
                if self._config_dirty:  # §4.1.4.3.1: a changed value is seen with a changed generation
                    self._config_dirty = False
                    self._generation = (self._generation + 1) & 0xFF
                return self.device.config_read(off, size) & mask
        return 0

    def bar_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset < 0:
            return
        value &= (1 << (8 * size)) - 1
        if COMMON_OFFSET <= offset < COMMON_OFFSET + REGION_SIZE:
            with self.lock:
                self._common_write(offset - COMMON_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + REGION_SIZE:
            off = offset - DEVICE_OFFSET
            if off < self._config_len:
                with self.lock:
                    self.device.config_write(off, size, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * self.num_queues:
            # Outside the register lock: the device may work here for a while.
            self.queue_notify((offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER)

    # --- common configuration -------------------------------------------------------------------
    def _selected(self) -> Virtqueue | None:
        sel = self._queue_select
        return self.queues[sel] if sel < self.num_queues else None

    def _common_image(self) -> bytes:
        def word(features: int, select: int) -> int:
            return (features >> (32 * select)) & _M32 if select < 2 else 0

        vq = self._selected()
        if vq is not None:
            sel = self._queue_select
            qfields = (vq.size, self._queue_vectors[sel], 1 if vq.ready else 0, sel,
                       vq.desc_addr, vq.avail_addr, vq.used_addr)
        else:
            qfields = (0, VIRTIO_MSI_NO_VECTOR, 0, 0, 0, 0, 0)
        return _COMMON.pack(
            self._dfselect, word(self.device_features, self._dfselect),
            self._gfselect, word(self.driver_features, self._gfselect),
            self._config_vector, self.num_queues, self.status, self._generation,
            self._queue_select, *qfields, 0, 0)

    def _vector(self, value: int) -> int:
        """A vector the device can map, or NO_VECTOR (how §4.1.5.1.2 reports a failed mapping)."""
        return value if value < self.msix_vectors else VIRTIO_MSI_NO_VECTOR

    def _common_write(self, off: int, size: int, value: int) -> None:
        if size == 4 and off == COMMON_DEVICE_FEATURE_SELECT:
            self._dfselect = value
        elif size == 4 and off == COMMON_DRIVER_FEATURE_SELECT:
            self._gfselect = value
        elif size == 4 and off == COMMON_DRIVER_FEATURE:
            if self._gfselect < 2 and not self._status & FEATURES_OK:
                shift = 32 * self._gfselect
                self.driver_features = (self.driver_features & ~(_M32 << shift)) | (value << shift)
        elif size == 2 and off == COMMON_CONFIG_MSIX_VECTOR:
            self._config_vector = self._vector(value)
        elif size == 1 and off == COMMON_DEVICE_STATUS:
            self._write_status(value)
        elif size == 2 and off == COMMON_QUEUE_SELECT:
            self._queue_select = value
        elif off in (COMMON_QUEUE_SIZE, COMMON_QUEUE_MSIX_VECTOR, COMMON_QUEUE_ENABLE) and size == 2:
            self._queue_field(off, value)
        elif COMMON_QUEUE_DESC <= off < COMMON_QUEUE_NOTIFY_DATA and size in (4, 8) and off % size == 0:
            self._queue_address(off, size, value)
        # Everything else (read-only fields, odd widths) is ignored.

    def _queue_field(self, off: int, value: int) -> None:
        vq = self._selected()
        if vq is None:
            return
        if off == COMMON_QUEUE_MSIX_VECTOR:
            self._queue_vectors[self._queue_select] = self._vector(value)
            return
        if vq.ready or vq.broken or self._driver_ok:
            return  # a live queue's layout is fixed until reset
        if off == COMMON_QUEUE_SIZE:
            vq.size = value  # checked when the queue is enabled
        elif off == COMMON_QUEUE_ENABLE and value == 1:  # writing 0 is forbidden to the driver; ignored
            vq.event_idx = bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1)
            vq.indirect = bool(self.driver_features >> VIRTIO_F_INDIRECT_DESC & 1)
            vq.enable()  # a bad layout breaks the queue, which sets DEVICE_NEEDS_RESET

    def _queue_address(self, off: int, size: int, value: int) -> None:
        vq = self._selected()
        if vq is None or vq.ready or vq.broken or self._driver_ok:
            return
        rel = off - COMMON_QUEUE_DESC
        name = ("desc_addr", "avail_addr", "used_addr")[rel // 8]
        current = getattr(vq, name)
        if size == 8:
            new = value
        elif rel % 8 == 0:
            new = (current & ~_M32) | value
        else:
            new = (current & _M32) | (value << 32)
        setattr(vq, name, new)

    def _features_acceptable(self, accepted: int) -> bool:
        return not accepted & ~self.device_features and bool(accepted >> VIRTIO_F_VERSION_1 & 1)

    def _write_status(self, value: int) -> None:
        value &= _DRIVER_STATUS_BITS
        if value == 0:
            self._reset()
            return
        old = self._status
        new = old | value  # only a reset clears status bits
        if new & FEATURES_OK and not old & FEATURES_OK and not self._features_acceptable(self.driver_features):
            new &= ~FEATURES_OK  # the driver reads it back and gives up (§3.1.1 step 6)
            self.feature_refusals += 1
        if new & DRIVER_OK and not old & DRIVER_OK:
            if not new & FEATURES_OK:
                new &= ~DRIVER_OK  # a modern device cannot run without negotiated features
            else:
                self._status = new
                self._activate()
                return
        self._status = new

    def _activate(self) -> None:
        self._driver_ok = True
        self.device.activate(self.driver_features, self.queues, self)
        if self._needs_reset:
            self._interrupt(self._config_vector, ISR_CONFIG)
        # Buffers made available before DRIVER_OK got no (accepted) kick: serve them now.
        for i, vq in enumerate(self.queues):
            if vq.available():
                self.device.queue_notify(i)

    def _reset(self) -> None:
        self._driver_ok = False  # new kicks are dropped from here on
        self.device.reset()      # waits for the device's request in flight
        for vq in self.queues:
            vq.reset()
        self._reset_registers()
        with self._irq_lock:
            self._isr = 0
            if self._intx:
                self._intx = False
                if self.interrupts is not None:
                    self.interrupts.intx(False)


class _BarWindow:
    """The transport's memory BAR as a bus device (offsets relative to the BAR)."""

    def __init__(self, transport: VirtioPciTransport) -> None:
        self._t = transport

    def io_read(self, offset: int, size: int) -> int:
        return self._t.bar_read(offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self._t.bar_write(offset, size, value)


class _PciCfgWindow:
    """The VIRTIO_PCI_CAP_PCI_CFG capability (§4.1.4.8): BAR access through config space.

    Offsets are relative to the capability's first byte (cap_vndr); bytes 0
    and 1 belong to the PCI model and read as 0 here. ``cap.bar``,
    ``cap.offset``, ``cap.length`` and ``pci_cfg_data`` are writable; an
    access to ``pci_cfg_data`` performs a ``cap.length``-byte access at
    ``cap.offset`` of our BAR, when cap.bar names it, cap.length is 1, 2 or
    4 and cap.offset is aligned to it and inside the BAR (else nothing
    happens and reads return what is in pci_cfg_data).
    """

    SIZE = 20
    _WRITABLE = frozenset([4, *range(8, 20)])
    _DATA = 16

    def __init__(self, transport: VirtioPciTransport) -> None:
        self._t = transport
        self._lock = threading.Lock()
        body = next(c.body for c in transport.capabilities if c.cfg_type == VIRTIO_PCI_CAP_PCI_CFG)
        self._image = bytearray(2) + bytearray(body)

    def _target(self) -> tuple[int, int] | None:
        img = self._image
        bar = img[4]
        offset, length = struct.unpack_from("<II", img, 8)
        if bar != self._t.bar_index or length not in (1, 2, 4) or offset % length:
            return None
        if offset + length > self._t.bar_size:
            return None
        return offset, length

    def io_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.SIZE:
            return 0
        with self._lock:
            if offset + size > self._DATA:
                target = self._target()
                if target is not None:
                    value = self._t.bar_read(*target)
                    self._image[16:16 + target[1]] = value.to_bytes(target[1], "little")
            return int.from_bytes(self._image[offset:offset + size], "little")

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.SIZE:
            return
        with self._lock:
            for i in range(size):
                if offset + i in self._WRITABLE:
                    self._image[offset + i] = (value >> (8 * i)) & 0xFF
            if offset + size > self._DATA:
                target = self._target()
                if target is not None:
                    data = int.from_bytes(self._image[16:16 + target[1]], "little")
                    self._t.bar_write(target[0], target[1], data)
