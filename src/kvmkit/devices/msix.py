"""MSI-X (PCI Local Bus 3.0, 6.8.2): the capability, the vector table and the Pending Bit Array.

The register model only. The capability lives in a
:class:`~kvmkit.devices.pci.PciFunction`'s config space; the table and the
PBA live in one or two of its memory BARs, and the device's BAR handler
routes accesses in those ranges to :attr:`Msix.table` and :attr:`Msix.pba`
(both :class:`~kvmkit.devices.base.BusDevice`\\ s, offsets relative to the
start of the table or PBA). Delivery goes through an :class:`MsixHost`.

Why the host interface has two calls: under KVM each vector becomes one MSI
routing entry (address/data -> GSI) plus one irqfd, so that a device thread
(or the kernel, for vhost) raises the interrupt by writing an eventfd, with
no ioctl on the hot path. The machine therefore needs to hear about every
change of a vector's *route* - :meth:`MsixHost.route_changed` with the
message address, data and whether the vector is masked - and, separately,
to fire it - :meth:`MsixHost.deliver`. The model calls ``deliver`` only for
an unmasked vector of an enabled function, so an eventfd write is always
allowed to reach the guest; a host that wires irqfds straight to a vhost
worker can also detach the irqfd while ``masked`` is true.

Rules (PCI 3.0 6.8.2 unless noted):

* Message Control: Table Size (bits 10:0) = vectors - 1, read-only;
  Function Mask (14) and MSI-X Enable (15) are the writable bits. Table
  Offset/BIR and PBA Offset/BIR are read-only.
* Every table entry resets with its Mask bit set and address/data zero.
* Software "must use aligned full DWORD or aligned full QWORD transactions"
  to the table and the PBA, the result being undefined otherwise. Here any
  other access reads 0 and writes nothing. The low two bits of Message
  Address and bits 31:1 of Vector Control read 0 and ignore writes.
* The PBA is read-only; writes are ignored.
* :meth:`Msix.notify` returns False when MSI-X is disabled, so the device
  can fall back to INTx# (the capability inhibits INTx# while enabled, as
  6.8 requires). With MSI-X enabled, a vector that is masked - by its own
  Mask bit or by Function Mask - gets its Pending bit set instead of a
  message; when it becomes unmasked with the bit set, the message is sent
  then and the bit cleared. Pending bits are kept while MSI-X is disabled
  and delivered when it is enabled again with the vector unmasked. (QEMU
  treats "disabled" like Function Mask and so also sets Pending bits while
  disabled; here a disabled function uses INTx# instead, which is what the
  spec's fallback means.)
* A vector number outside the table (devices such as virtio pass numbers
  the guest chose) sends nothing and returns True: MSI-X is in charge and
  the guest asked for no interrupt.

Threading: :meth:`Msix.notify` may come from a device worker thread while a
vCPU thread writes the table or the capability. One lock inside the model
serialises them. ``route_changed`` and ``deliver`` are called with that lock
held, so that the host sees route changes and deliveries in the order they
happened; they must not call back into this Msix or into the PciFunction
(updating a KVM route or writing an eventfd is fine). Capability writes
arrive with the PciFunction's lock held and then take this one; nothing
takes them in the other order.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Protocol

from kvmkit.devices.base import BusDevice
from kvmkit.devices.pci import PciFunction
from kvmkit.devices.state import StateReader

__all__ = ["Msix", "MsixHost", "MsixEntry", "PCI_CAP_ID_MSIX", "MSIX_ENTRY_SIZE", "MAX_VECTORS"]

PCI_CAP_ID_MSIX = 0x11
MSIX_ENTRY_SIZE = 16
MAX_VECTORS = 2048

# Capability body offsets (the body starts after the ID and Next Pointer bytes).
MSG_CTRL = 0  # Message Control, 16 bits (config offset cap + 2)
TABLE_OFFSET_BIR = 2  # 32 bits (cap + 4)
PBA_OFFSET_BIR = 6  # 32 bits (cap + 8)
CAP_BODY_SIZE = 10

MSG_CTRL_TABLE_SIZE = 0x07FF
MSG_CTRL_FUNCTION_MASK = 1 << 14
MSG_CTRL_ENABLE = 1 << 15
BIR_MASK = 0x7

# Table entry dwords.
ENTRY_ADDR_LO = 0x0
ENTRY_ADDR_HI = 0x4
ENTRY_DATA = 0x8
ENTRY_VECTOR_CTRL = 0xC
VECTOR_CTRL_MASK = 1 << 0
_ENTRY = struct.Struct("<IIII")  # Message Address, Message Upper Address, Message Data, Vector Control


class MsixHost(Protocol):
    """What the machine does for an MSI-X function: keep a route per vector, fire it."""

    def route_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        """The vector's message or its effective mask changed (masked = disabled, function- or vector-masked)."""
        ...

    def deliver(self, vector: int) -> None:
        """Send the vector's current message (it is unmasked and MSI-X is enabled)."""
        ...


class _NoHost:
    def route_changed(self, vector: int, address: int, data: int, masked: bool) -> None:
        pass

    def deliver(self, vector: int) -> None:
        pass


@dataclass(frozen=True)
class MsixEntry:
    """One vector's message and effective mask, as the host sees it."""

    address: int
    data: int
    masked: bool


class _Window:
    """A BusDevice view of the table or the PBA."""

    def __init__(self, read: Callable[[int, int], int], write: Callable[[int, int, int], None]) -> None:
        self._read = read
        self._write = write

    def io_read(self, offset: int, size: int) -> int:
        return self._read(offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self._write(offset, size, value)


class Msix:
    """An MSI-X capability with ``vectors`` table entries.

    ``table_bar``/``pba_bar`` are BAR indices (the BIR fields) of memory
    BARs of the function it is added to, ``table_offset``/``pba_offset``
    byte offsets in those BARs, qword aligned (their low 3 bits hold the
    BIR in the capability). The device's BAR handler forwards accesses in
    ``[table_offset, table_offset + table_size)`` to :attr:`table` and those
    in ``[pba_offset, pba_offset + pba_size)`` to :attr:`pba`; :meth:`route`
    does that lookup.

    Enabling MSI-X or changing Function Mask re-reports every vector whose
    effective mask changes, one ``route_changed`` call each.
    """

    def __init__(self, vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int,
                 *, host: MsixHost | None = None) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X supports 1-{MAX_VECTORS} vectors, not {vectors}")
        for name, bar in (("table_bar", table_bar), ("pba_bar", pba_bar)):
            if not 0 <= bar <= 5:
                raise ValueError(f"{name} {bar} is not a BAR index 0-5")
        for name, off in (("table_offset", table_offset), ("pba_offset", pba_offset)):
            if off < 0 or off & BIR_MASK or off >= 1 << 32:
                raise ValueError(f"{name} {off:#x} is not a qword-aligned 32-bit offset")
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = pba_bar
        self.pba_offset = pba_offset
        self.table_size = vectors * MSIX_ENTRY_SIZE
        self.pba_size = (vectors + 63) // 64 * 8
        if table_bar == pba_bar and (table_offset < pba_offset + self.pba_size
                                     and pba_offset < table_offset + self.table_size):
            raise ValueError("the MSI-X table and PBA overlap")
        self.host: MsixHost = host if host is not None else _NoHost()

        self._lock = threading.Lock()
        self._addr_lo = [0] * vectors
        self._addr_hi = [0] * vectors
        self._data = [0] * vectors
        self._ctrl = [VECTOR_CTRL_MASK] * vectors
        self._pending = 0  # bit n = vector n
        self._enabled = False
        self._function_masked = False
        self._reported = [MsixEntry(0, 0, True)] * vectors
        self.function: PciFunction | None = None
        self.cap_offset: int | None = None

        self.table = _Window(self._table_read, self._table_write)
        """BusDevice for the vector table (offset 0 = entry 0's Message Address)."""
        self.pba = _Window(self._pba_read, self._pba_write)
        """BusDevice for the Pending Bit Array (offset 0 = vectors 0-63)."""

    def add_to(self, function: PciFunction) -> int:
        """Add the capability to ``function``; returns its config offset.

        The table and PBA BARs must already be declared there as memory BARs
        large enough to hold them.
        """
        if self.function is not None:
            raise ValueError("this MSI-X capability is already part of a function")
        for name, index, off, size in (("table", self.table_bar, self.table_offset, self.table_size),
                                       ("PBA", self.pba_bar, self.pba_offset, self.pba_size)):
            bar = function.bar(index)
            if bar.is_io:
                raise ValueError(f"the MSI-X {name} must be in a memory BAR, BAR {index} is I/O")
            if off + size > bar.size:
                raise ValueError(f"the MSI-X {name} ({size:#x} bytes at {off:#x}) does not fit in "
                                 f"BAR {index} ({bar.size:#x} bytes)")
        body = bytearray(CAP_BODY_SIZE)
        body[MSG_CTRL:MSG_CTRL + 2] = (self.vectors - 1).to_bytes(2, "little")
        body[TABLE_OFFSET_BIR:TABLE_OFFSET_BIR + 4] = (self.table_offset | self.table_bar).to_bytes(4, "little")
        body[PBA_OFFSET_BIR:PBA_OFFSET_BIR + 4] = (self.pba_offset | self.pba_bar).to_bytes(4, "little")
        writable = bytearray(CAP_BODY_SIZE)
        writable[MSG_CTRL + 1] = (MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK) >> 8
        self.cap_offset = function.add_capability(PCI_CAP_ID_MSIX, bytes(body), writable=bytes(writable),
                                                  on_write=self._control_written)
        self.function = function
        return self.cap_offset

    def route(self, bar: int, offset: int) -> tuple[BusDevice, int] | None:
        """Where an access at ``offset`` of BAR ``bar`` goes: (table or PBA, offset inside it), or None.

        For the owning device's BAR handler, which serves the rest of the BAR itself.
        """
        if bar == self.table_bar and self.table_offset <= offset < self.table_offset + self.table_size:
            return self.table, offset - self.table_offset
        if bar == self.pba_bar and self.pba_offset <= offset < self.pba_offset + self.pba_size:
            return self.pba, offset - self.pba_offset
        return None

    # --- state for the machine ----------------------------------------------

    @property
    def enabled(self) -> bool:
        with self._lock:
            return self._enabled

    @property
    def function_masked(self) -> bool:
        with self._lock:
            return self._function_masked

    def entry(self, vector: int) -> MsixEntry:
        """The vector's message and effective mask (what the last route_changed said)."""
        self._check_vector(vector)
        with self._lock:
            return self._reported[vector]

    def is_pending(self, vector: int) -> bool:
        self._check_vector(vector)
        with self._lock:
            return bool(self._pending >> vector & 1)

    # --- snapshot -----------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The vector table and the PBA as the guest reads them, MSI-X Enable and Function Mask.

        Enable and Function Mask are also in the function's configuration
        bytes, which :meth:`PciFunction.save_state` saves; both copies are
        kept so that each model loads on its own.
        """
        with self._lock:
            table = b"".join(_ENTRY.pack(self._addr_lo[v], self._addr_hi[v], self._data[v], self._ctrl[v])
                             for v in range(self.vectors))
            return {"table": table.hex(), "pba": self._pending.to_bytes(self.pba_size, "little").hex(),
                    "enabled": self._enabled, "function_masked": self._function_masked}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the capability :meth:`save_state` described; StateError (and no change) if it is damaged.

        No route is reported and nothing is delivered: the machine re-reads
        every vector's :meth:`entry` to rebuild its routes. A pending bit of
        a vector that is open (enabled, unmasked) is refused, since the
        model would have delivered it.
        """
        r = StateReader(state, f"the MSI-X capability ({self.vectors} vectors)",
                        ("table", "pba", "enabled", "function_masked"))
        table = r.take_hex_bytes("table", self.table_size, min_len=self.table_size)
        pending = int.from_bytes(r.take_hex_bytes("pba", self.pba_size, min_len=self.pba_size), "little")
        enabled, function_masked = r.take_bool("enabled"), r.take_bool("function_masked")
        entries = list(_ENTRY.iter_unpack(table))
        r.require(all(not lo & 0x3 and not ctrl & ~VECTOR_CTRL_MASK for lo, _, _, ctrl in entries), "table",
                  "an entry sets a reserved bit of Message Address or Vector Control")
        r.require(pending >> self.vectors == 0, "pba", "a pending bit is set past the last vector")
        masked = [not enabled or function_masked or bool(ctrl & VECTOR_CTRL_MASK) for *_, ctrl in entries]
        r.require(all(m for v, m in enumerate(masked) if pending >> v & 1), "pba",
                  "an unmasked vector of an enabled function cannot stay pending")
        with self._lock:
            self._addr_lo, self._addr_hi, self._data, self._ctrl = (list(f) for f in zip(*entries))
            self._pending, self._enabled, self._function_masked = pending, enabled, function_masked
            self._reported = [MsixEntry(hi << 32 | lo, data, m) for (lo, hi, data, _), m in zip(entries, masked)]

    # --- device side --------------------------------------------------------

    def notify(self, vector: int) -> bool:
        """Signal ``vector``. False if MSI-X is disabled (use INTx# instead), else True.

        True means the message was delivered, or is pending until the
        vector is unmasked, or the vector does not exist.
        """
        with self._lock:
            if not self._enabled:
                return False
            if not 0 <= vector < self.vectors:
                return True
            if self._function_masked or self._ctrl[vector] & VECTOR_CTRL_MASK:
                self._pending |= 1 << vector
            else:
                self.host.deliver(vector)
            return True

    def clear_pending(self, vector: int) -> None:
        """The device's reason for the interrupt went away while it was masked (6.8.2.9)."""
        if 0 <= vector < self.vectors:
            with self._lock:
                self._pending &= ~(1 << vector)

    # --- capability (config space, under the PciFunction's lock) ------------

    def _control_written(self, old: bytes, new: bytes) -> None:
        ctrl = int.from_bytes(new[MSG_CTRL:MSG_CTRL + 2], "little")
        enabled = bool(ctrl & MSG_CTRL_ENABLE)
        with self._lock:
            changed = (enabled, bool(ctrl & MSG_CTRL_FUNCTION_MASK)) != (self._enabled, self._function_masked)
            self._enabled = enabled
            self._function_masked = bool(ctrl & MSG_CTRL_FUNCTION_MASK)
            if changed:
                for vector in range(self.vectors):
                    self._sync(vector)
        if self.function is not None:
            self.function.set_intx_inhibit(enabled)

    # --- table and PBA (MMIO, vCPU threads) ---------------------------------

    def _table_read(self, offset: int, size: int) -> int:
        if not self._aligned(offset, size, self.table_size):
            return 0
        with self._lock:
            value = 0
            for i in range(size // 4):
                value |= self._dword(offset + 4 * i) << (32 * i)
            return value

    def _table_write(self, offset: int, size: int, value: int) -> None:
        if not self._aligned(offset, size, self.table_size) or not isinstance(value, int):
            return
        value &= (1 << (8 * size)) - 1
        vector = offset // MSIX_ENTRY_SIZE  # a qword never crosses an entry
        with self._lock:
            for i in range(size // 4):
                field = (offset + 4 * i) % MSIX_ENTRY_SIZE
                dword = (value >> (32 * i)) & 0xFFFF_FFFF
                if field == ENTRY_ADDR_LO:
                    self._addr_lo[vector] = dword & ~0x3
                elif field == ENTRY_ADDR_HI:
                    self._addr_hi[vector] = dword
                elif field == ENTRY_DATA:
                    self._data[vector] = dword
                else:
                    self._ctrl[vector] = dword & VECTOR_CTRL_MASK
            self._sync(vector)

    def _pba_read(self, offset: int, size: int) -> int:
        if not self._aligned(offset, size, self.pba_size):
            return 0
        with self._lock:
            return (self._pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def _pba_write(self, offset: int, size: int, value: int) -> None:
        """The PBA is read-only."""

    # --- internals ----------------------------------------------------------

    @staticmethod
    def _aligned(offset: int, size: int, limit: int) -> bool:
        return (isinstance(offset, int) and isinstance(size, int) and size in (4, 8)
                and offset % size == 0 and 0 <= offset and offset + size <= limit)

    def _dword(self, offset: int) -> int:
        vector, field = divmod(offset, MSIX_ENTRY_SIZE)
        if field == ENTRY_ADDR_LO:
            return self._addr_lo[vector]
        if field == ENTRY_ADDR_HI:
            return self._addr_hi[vector]
        if field == ENTRY_DATA:
            return self._data[vector]
        return self._ctrl[vector]

    def _sync(self, vector: int) -> None:
        """Report a changed route, then send a pending message if the vector is now open (lock held)."""
        masked = not self._enabled or self._function_masked or bool(self._ctrl[vector] & VECTOR_CTRL_MASK)
        entry = MsixEntry(self._addr_hi[vector] << 32 | self._addr_lo[vector], self._data[vector], masked)
        if entry != self._reported[vector]:
            self._reported[vector] = entry
            self.host.route_changed(vector, entry.address, entry.data, masked)
        if not masked and self._pending >> vector & 1:
            self._pending &= ~(1 << vector)
            self.host.deliver(vector)

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.vectors:
            raise ValueError(f"vector {vector} is not 0-{self.vectors - 1}")
