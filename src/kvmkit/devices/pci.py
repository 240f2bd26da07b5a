"""PCI bus 0 as a PC chipset presents it: type-0 configuration spaces and configuration mechanism #1.

The register model only, in the terms of the PCI Local Bus Specification 3.0
(chapter 6, "Configuration Space") and of the PC's configuration mechanism
#1 (CONFIG_ADDRESS at I/O port 0xCF8, CONFIG_DATA at 0xCFC). It knows
nothing of KVM: where a BAR decodes is reported through
:attr:`PciFunction.on_bar_change`, the INTx# output through an
:data:`~kvmkit.devices.base.IrqCallback`, and the guest reaches the model
through :class:`PciBus` (a :class:`~kvmkit.devices.base.BusDevice` for the
eight ports 0xCF8-0xCFF) and the BAR handlers the device supplies.

Why hardware-exact: Linux learns everything about a device from config
space. It sizes a BAR by writing all ones and reading back
(drivers/pci/probe.c, ``__pci_read_base``), walks the capability list byte by byte, and
decides that mechanism #1 exists by writing 0x80000000 to CONFIG_ADDRESS with
a dword ``outl`` and reading it back, after a byte write to 0xCFB that must
*not* land in CONFIG_ADDRESS (arch/x86/pci/direct.c, ``pci_check_type1``).
A model that rounds any of this off sends the guest down a different path.

Choices where the specification leaves room, or where references differ:

* CONFIG_ADDRESS is latched only by a dword access at 0xCF8, as Intel's
  chipsets document ("a byte or word reference will pass through ... onto
  the PCI bus as an I/O cycle") and as QEMU's ``pci_host_config_write``
  does. Byte and word accesses to 0xCF8-0xCFB go to :attr:`PciBus.passthrough`
  when the machine sets one (on a PIIX, 0xCF9 is the reset control
  register, which Linux may use to reboot once mechanism #1 works), and
  otherwise read all ones and are dropped, as an unclaimed I/O cycle on a PC
  is. QEMU differs here: it answers such reads with bytes of CONFIG_ADDRESS;
  the old kvm tool even latched byte writes.
* The reserved bits of CONFIG_ADDRESS (30:24 and 1:0) read back as zero;
  QEMU keeps whatever was written. Linux only ever reads back 0x80000000.
* CONFIG_DATA is four byte lanes, 0xCFC-0xCFF; lane *n* reaches register
  ``CONFIG_ADDRESS[7:2] + n``. An access that runs past 0xCFF, or starts
  below 0xCFC, is split by lane: the lanes outside the window take the
  path above (QEMU, measured with qtest, splits the same way).
* Bus numbers other than 0, slots without a function and functions 1-7 end
  in a master abort: reads return all ones (vendor ID 0xFFFF, which is how
  Linux detects "nothing here"), writes are dropped.
* COMMAND: only I/O Space (bit 0), Memory Space (1), Bus Master (2) and
  Interrupt Disable (10) are writable. SERR# Enable is hardwired to 0 (a
  virtual function never signals SERR#; QEMU leaves it writable).
* STATUS: Capabilities List (bit 4) is set when the function has
  capabilities, Interrupt Status (bit 3) follows :meth:`PciFunction.set_intx`,
  and the error bits (8, 11-15) are write-one-to-clear. Nothing in the model
  sets the error bits on its own; :meth:`PciFunction.signal_status` lets a
  device report one.
* Cache Line Size is a plain read/write byte with no effect (the
  specification says read/write; Linux writes it and reads it back; QEMU does
  the same). Latency Timer, BIST, CardBus CIS, the expansion ROM BAR,
  Min_Gnt and Max_Lat read as zero and ignore writes: no function here has
  a ROM, and Linux then sees a ROM BAR of size 0, i.e. none.
* I/O BARs implement all 32 address bits above their size (as QEMU does),
  so sizing one reads 0xFFFFFFxx; Linux copes with either width.

Where a BAR decodes (:meth:`PciFunction.bar_address`) follows QEMU's rules
for what a PC can map, tightened so that a sizing write can never create a
mapping:

* nothing decodes while COMMAND's enable bit for the BAR's space is clear;
* address 0 means "not programmed" (reset value) and does not decode;
* an I/O BAR must lie inside the 64 KiB port space;
* a memory BAR must not cover the byte at 4 GiB - 1. That byte is the PC's
  reset vector, and a BAR whose low dword holds the sizing pattern (all ones
  above its size: 0xFFFFF000 for 4 KiB) ends exactly there - for a 32-bit
  BAR always, for a 64-bit BAR whenever its high dword is 0, i.e. whenever
  it lives below 4 GiB or is unprogrammed. A guest that sizes a 64-bit BAR
  above 4 GiB with decode enabled does see it decode briefly at
  ``high:FFFFF000``, as on hardware; Linux disables decode first;
* a 64-bit BAR must end at or below 2**52, x86-64's architectural physical
  address limit (the machine may refuse more: its guest has fewer bits).

:attr:`PciFunction.on_bar_change` is called for *every* change of a BAR's
decoded address, at the access that causes it, never coalesced: Linux's
sizing sequence (COMMAND decode off, write ~0, read, restore, decode on)
produces exactly two calls, ``(i, A, None)`` then ``(i, None, A)``. The
machine's view is therefore always :meth:`PciFunction.bar_address`, with no
deferred state to get wrong.

Thread safety: each :class:`PciFunction` has one re-entrant lock, taken by
config accesses (vCPU threads) and :meth:`PciFunction.set_intx` (device
threads). Its callbacks (``on_bar_change``, ``irq`` and capability write
hooks) are made with that lock held: they may read the function
(``bar_address``) but must not write its config space. The handler of a
live capability (``add_capability(..., handler=...)``) is called without
it. :class:`PciBus` has its own lock around each mechanism #1 access; the
lock order is bus, then function, then any capability's own lock (see
:mod:`kvmkit.devices.msix`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Literal

from kvmkit.devices.base import BusDevice, IrqCallback, no_irq
from kvmkit.devices.state import StateReader

__all__ = [
    "PciFunction", "PciHostBridge", "PciBus", "PciBar", "PciConfigStats",
    "BarKind", "BarChangeCallback", "CapabilityWriteHook",
    "CONFIG_SPACE_SIZE", "MEM64_DECODE_LIMIT",
]

CONFIG_SPACE_SIZE = 256

# --- type-0 configuration header (PCI 3.0, figure 6-1) ----------------------
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09  # class code: programming interface 0x09, sub-class 0x0A, base class 0x0B
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F
PCI_CAP_START = 0x40  # first byte after the header: capabilities live from here on
NUM_BARS = 6

PCI_COMMAND_IO = 1 << 0
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
PCI_COMMAND_SERR = 1 << 8
PCI_COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE

PCI_STATUS_INTERRUPT = 1 << 3
PCI_STATUS_CAP_LIST = 1 << 4
PCI_STATUS_MASTER_DATA_PARITY = 1 << 8
PCI_STATUS_SIG_TARGET_ABORT = 1 << 11
PCI_STATUS_REC_TARGET_ABORT = 1 << 12
PCI_STATUS_REC_MASTER_ABORT = 1 << 13
PCI_STATUS_SIG_SYSTEM_ERROR = 1 << 14
PCI_STATUS_DETECTED_PARITY = 1 << 15
STATUS_W1C = (PCI_STATUS_MASTER_DATA_PARITY | PCI_STATUS_SIG_TARGET_ABORT | PCI_STATUS_REC_TARGET_ABORT
              | PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_SIG_SYSTEM_ERROR | PCI_STATUS_DETECTED_PARITY)

# BAR low bits (PCI 3.0, 6.2.5.1).
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08

PCI_CLASS_BRIDGE_HOST = 0x060000

# Configuration mechanism #1.
CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_VALID = CONFIG_ADDRESS_ENABLE | 0x00FF_FFFC  # bus 23:16, device 15:11, function 10:8, register 7:2
CONFIG_WINDOW = 8  # ports 0xCF8-0xCFF

MEM64_DECODE_LIMIT = 1 << 52
"""x86-64's architectural physical-address limit: no 64-bit BAR decodes past it."""

_4G = 1 << 32
_IO_SPACE = 1 << 16

BarKind = Literal["mem32", "mem64", "io"]
BarChangeCallback = Callable[[int, "int | None", "int | None"], None]
"""``(bar index, old decoded address, new decoded address)``; None = not decoded."""
CapabilityWriteHook = Callable[[bytes, bytes], None]
"""``(old body, new body)`` of a capability, after a guest write covered a writable byte of it."""


@dataclass(frozen=True)
class PciBar:
    """One implemented Base Address Register, as the device declared it."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool
    handler: BusDevice | None

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the BAR register (space, type, prefetchable)."""
        if self.kind == "io":
            return PCI_BASE_ADDRESS_SPACE_IO
        bits = PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind == "mem64" else 0
        return bits | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)

    @property
    def is_io(self) -> bool:
        return self.kind == "io"


@dataclass
class _Capability:
    offset: int  # of the capability ID byte
    cap_id: int
    length: int  # ID + next pointer + body
    writable: bool  # has any writable body byte
    on_write: CapabilityWriteHook | None
    handler: BusDevice | None  # a live capability: its body bytes are the handler's

    @property
    def body_start(self) -> int:
        return self.offset + 2

    @property
    def end(self) -> int:
        return self.offset + self.length


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class PciFunction:
    """One function's 256-byte type-0 configuration space.

    Vendor/device ID, class code, revision, subsystem IDs, the interrupt pin
    and the capability list are fixed when the machine builds the function;
    BARs and capabilities are added before the guest runs (a mistake there
    raises ValueError: it is a wiring bug). Every guest access after that
    goes through :meth:`config_read`/:meth:`config_write`, which accept any
    offset, size and value without raising.

    ``interrupt_pin`` is 0 for none or 1-4 for INTA#-INTD#; the machine
    routes the pin and records the routing in the Interrupt Line register
    (read/write, no effect on the model), as firmware does.
    """

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 1,
                 irq: IrqCallback = no_irq) -> None:
        for name, value, bits in (("vendor_id", vendor_id, 16), ("device_id", device_id, 16),
                                  ("class_code", class_code, 24), ("revision", revision, 8),
                                  ("subsystem_vendor_id", subsystem_vendor_id, 16),
                                  ("subsystem_id", subsystem_id, 16)):
            if not 0 <= value < 1 << bits:
                raise ValueError(f"{name} {value:#x} does not fit in {bits} bits")
        if vendor_id == 0xFFFF:
            raise ValueError("vendor ID 0xFFFF means 'no device' to every PCI enumerator")
        if not 0 <= interrupt_pin <= 4:
            raise ValueError(f"interrupt_pin {interrupt_pin} is not 0 (none) or 1-4 (INTA#-INTD#)")
        self._lock = threading.RLock()
        self._cfg = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        self._w1c = bytearray(CONFIG_SPACE_SIZE)
        self._put(PCI_VENDOR_ID, 2, vendor_id)
        self._put(PCI_DEVICE_ID, 2, device_id)
        self._put(PCI_REVISION_ID, 1, revision)
        self._put(PCI_CLASS_PROG, 3, class_code)
        self._put(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self._put(PCI_INTERRUPT_PIN, 1, interrupt_pin)
        self._put_mask(self._wmask, PCI_COMMAND, 2, COMMAND_WRITABLE)
        self._put_mask(self._w1c, PCI_STATUS, 2, STATUS_W1C)
        self._wmask[PCI_CACHE_LINE_SIZE] = 0xFF
        self._wmask[PCI_INTERRUPT_LINE] = 0xFF

        self._bars: dict[int, PciBar] = {}
        self._slot_owner: list[int | None] = [None] * NUM_BARS  # register -> BAR index (mem64 takes two)
        self._decoded: dict[int, int | None] = {}
        self._caps: list[_Capability] = []

        self._intx_level = False
        self._intx_out = False
        self._intx_inhibit = False

        self.irq: IrqCallback = irq
        """INTx# output; called with the new level on every change (the machine routes the pin)."""
        self.on_bar_change: BarChangeCallback | None = None
        """Called on every change of a BAR's decoded address; see the module docstring."""

    # --- build time ---------------------------------------------------------

    def add_bar(self, index: int, size: int, kind: BarKind, *, prefetchable: bool = False,
                handler: BusDevice | None = None) -> PciBar:
        """Declare BAR ``index``; a "mem64" BAR also takes register ``index + 1``.

        Memory BARs are at least 4 KiB so that each sits on its own page
        (what KVM maps and what Linux's resource code prefers); I/O BARs are
        4-256 bytes (PCI 3.0 6.2.5.1: no more than 256 bytes per I/O BAR).
        """
        if kind not in ("mem32", "mem64", "io"):
            raise ValueError(f"BAR kind {kind!r} is not 'mem32', 'mem64' or 'io'")
        slots = 2 if kind == "mem64" else 1
        if index < 0 or index + slots > NUM_BARS:
            raise ValueError(f"BAR {index} ({kind}) does not fit in BAR registers 0-5")
        if not _is_pow2(size):
            raise ValueError(f"BAR size {size:#x} is not a power of two")
        if kind == "io":
            if not 4 <= size <= 256:
                raise ValueError(f"I/O BAR size {size:#x} is not 4-256 bytes")
            if prefetchable:
                raise ValueError("an I/O BAR cannot be prefetchable")
        elif size < 0x1000:
            raise ValueError(f"memory BAR size {size:#x} is below 4 KiB")
        elif kind == "mem32" and size > 1 << 31:
            raise ValueError(f"32-bit memory BAR size {size:#x} is above 2 GiB")
        elif kind == "mem64" and size > 1 << 51:
            raise ValueError(f"64-bit memory BAR size {size:#x} is above 2**51")
        with self._lock:
            for reg in range(index, index + slots):
                if self._slot_owner[reg] is not None:
                    raise ValueError(f"BAR register {reg} is already used by BAR {self._slot_owner[reg]}")
            bar = PciBar(index, kind, size, prefetchable, handler)
            reg_off = PCI_BASE_ADDRESS_0 + 4 * index
            self._put(reg_off, 4, bar.type_bits)
            # Sizing is just the write mask: address bits below the size are hardwired to 0.
            low_bits = 0x3 if kind == "io" else 0xF
            self._put_mask(self._wmask, reg_off, 4, ~(size - 1) & ~low_bits & 0xFFFF_FFFF)
            if kind == "mem64":
                self._put_mask(self._wmask, reg_off + 4, 4, ~((size - 1) >> 32) & 0xFFFF_FFFF)
            for reg in range(index, index + slots):
                self._slot_owner[reg] = index
            self._bars[index] = bar
            self._decoded[index] = self._decode(bar)
            return bar

    def add_capability(self, cap_id: int, body: bytes, *, writable: bytes | None = None,
                       on_write: CapabilityWriteHook | None = None, handler: BusDevice | None = None) -> int:
        """Append a capability to the list; returns the config offset of its ID byte.

        ``body`` is what follows the ID and Next Pointer bytes. ``writable``
        is a per-byte write mask over the body (default: all read-only);
        ``on_write(old_body, new_body)`` runs after any guest write that
        covered a writable byte of the body, with the function's lock held,
        so that a capability such as MSI-X can act on its control bits.

        A *live* capability instead passes ``handler``: every guest access
        to its body bytes goes to ``handler.io_read``/``io_write`` with the
        offset relative to the capability's ID byte (so the body starts at
        2), split from any bytes of the access outside the body. This is for
        registers with read side effects, such as virtio's PCI_CFG window,
        which performs a BAR access. The handler runs *without* the
        function's lock, so it may take device locks that are also held
        while a device thread calls :meth:`set_intx`. ``body`` is then only
        the image :meth:`config_bytes` shows.

        Capabilities are placed one after another from 0x40, each dword
        aligned, and must end within the 256-byte space.
        """
        if not 0 <= cap_id <= 0xFE:
            raise ValueError(f"capability ID {cap_id:#x} is not 0x00-0xFE")
        body = bytes(body)
        mask = bytes(len(body)) if writable is None else bytes(writable)
        if len(mask) != len(body):
            raise ValueError(f"writable mask has {len(mask)} bytes for a {len(body)}-byte body")
        if handler is not None and (writable is not None or on_write is not None):
            raise ValueError("a live capability (handler) owns its body: no writable mask or on_write hook")
        with self._lock:
            offset = PCI_CAP_START if not self._caps else (self._caps[-1].end + 3) & ~3
            length = 2 + len(body)
            if offset + length > CONFIG_SPACE_SIZE:
                raise ValueError(f"capability {cap_id:#04x} ({length} bytes at {offset:#x}) "
                                 f"does not fit in the {CONFIG_SPACE_SIZE}-byte configuration space")
            cap = _Capability(offset, cap_id, length, any(mask), on_write, handler)
            self._cfg[offset] = cap_id
            self._cfg[offset + 1] = 0
            self._cfg[offset + 2:offset + length] = body
            self._wmask[offset + 2:offset + length] = mask
            if self._caps:
                self._cfg[self._caps[-1].offset + 1] = offset
            else:
                self._cfg[PCI_CAPABILITY_LIST] = offset
                self._put(PCI_STATUS, 2, self._get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
            self._caps.append(cap)
            return offset

    def set_bar_address(self, index: int, address: int) -> None:
        """Program BAR ``index`` as firmware would, before the guest runs.

        The address must be aligned to the BAR's size and fit its kind (I/O
        below 64 KiB, mem32 below 4 GiB). Decoding still needs COMMAND's
        enable bit; if this changes the decoded address, ``on_bar_change``
        is called as for a guest write.
        """
        bar = self._bar(index)
        limit = {"io": _IO_SPACE, "mem32": _4G, "mem64": MEM64_DECODE_LIMIT}[bar.kind]
        if address < 0 or address % bar.size or address + bar.size > limit:
            raise ValueError(f"BAR {index} ({bar.kind}, size {bar.size:#x}) cannot be at {address:#x}")
        with self._lock:
            reg_off = PCI_BASE_ADDRESS_0 + 4 * index
            self._put(reg_off, 4, (address & 0xFFFF_FFFF) | bar.type_bits)
            if bar.kind == "mem64":
                self._put(reg_off + 4, 4, address >> 32)
            self._refresh_decode()

    # --- queries for the machine --------------------------------------------

    def bar(self, index: int) -> PciBar:
        """The BAR declared at ``index`` (ValueError if none, or if it is a mem64's upper half)."""
        return self._bar(index)

    @property
    def bars(self) -> list[PciBar]:
        return [self._bars[i] for i in sorted(self._bars)]

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now; None if it does not (see the module docstring)."""
        self._bar(index)
        with self._lock:
            return self._decoded[index]

    @property
    def capability_offsets(self) -> list[int]:
        return [c.offset for c in self._caps]

    def capability_body(self, offset: int) -> bytes:
        """Current body bytes of the capability whose ID byte is at ``offset``."""
        cap = self._cap(offset)
        with self._lock:
            return bytes(self._cfg[cap.body_start:cap.end])

    def set_capability_body(self, offset: int, body: bytes) -> None:
        """Device-side update of a capability's body (read-only bytes included); no hook runs."""
        cap = self._cap(offset)
        if len(body) != cap.length - 2:
            raise ValueError(f"capability at {offset:#x} has a {cap.length - 2}-byte body, not {len(body)}")
        with self._lock:
            self._cfg[cap.body_start:cap.end] = body

    @property
    def command(self) -> int:
        with self._lock:
            return self._get(PCI_COMMAND, 2)

    @property
    def status(self) -> int:
        with self._lock:
            return self._get(PCI_STATUS, 2)

    @property
    def bus_master(self) -> bool:
        """COMMAND.Bus Master: a device must not DMA into guest memory while this is clear."""
        return bool(self.command & PCI_COMMAND_MASTER)

    @property
    def vendor_id(self) -> int:
        return self._get(PCI_VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self._get(PCI_DEVICE_ID, 2)

    @property
    def interrupt_pin(self) -> int:
        return self._cfg[PCI_INTERRUPT_PIN]

    @property
    def intx_asserted(self) -> bool:
        """The INTx# output level as last reported through :attr:`irq`."""
        with self._lock:
            return self._intx_out

    def config_bytes(self) -> bytes:
        """A snapshot of all 256 bytes as the guest reads them (a live capability's body: its image)."""
        with self._lock:
            return bytes(self._cfg)

    # --- snapshot -----------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The 256 configuration bytes (BARs, COMMAND, STATUS, capability bodies) and the INTx# state.

        ``intx_level`` is the device's interrupt condition, ``intx_inhibit``
        MSI-X's gate, ``intx`` the output as last reported. Where BARs
        decode is not saved: it follows from the bytes.
        """
        with self._lock:
            return {"config": bytes(self._cfg).hex(), "intx_level": self._intx_level,
                    "intx_inhibit": self._intx_inhibit, "intx": self._intx_out}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the function :meth:`save_state` described; StateError (and no change) if it is damaged.

        Read-only bytes must match this function's: a snapshot of another
        device (other IDs, BARs or capability list) is refused. Nothing is
        called: the machine re-maps BARs from :meth:`bar_address` and sets
        the line from :attr:`intx_asserted`; capability hooks do not run
        (MSI-X loads its own state).
        """
        r = StateReader(state, f"PCI function {self.vendor_id:04x}:{self.device_id:04x}",
                        ("config", "intx_level", "intx_inhibit", "intx"))
        cfg = r.take_hex_bytes("config", CONFIG_SPACE_SIZE, min_len=CONFIG_SPACE_SIZE)
        level, inhibit, out = r.take_bool("intx_level"), r.take_bool("intx_inhibit"), r.take_bool("intx")
        with self._lock:
            free = self._restorable()
            bad = [i for i in range(CONFIG_SPACE_SIZE) if (cfg[i] ^ self._cfg[i]) & ~free[i]]
            r.require(not bad, "config", f"read-only byte {bad[0] if bad else 0:#x} differs, so it is another device")
            status = int.from_bytes(cfg[PCI_STATUS:PCI_STATUS + 2], "little")
            r.require(bool(status & PCI_STATUS_INTERRUPT) == level, "intx_level",
                      "STATUS.Interrupt Status follows the interrupt condition")
            r.require(out == self._intx_output(cfg, level, inhibit), "intx", "it is not the level the bytes give")
            self._cfg[:] = cfg
            self._intx_level, self._intx_inhibit, self._intx_out = level, inhibit, out
            for index, bar in self._bars.items():
                self._decoded[index] = self._decode(bar)

    def _restorable(self) -> bytearray:
        """Per byte, the bits a snapshot may hold differently from this function now.

        The guest-writable and write-one-to-clear bits, Interrupt Status, and
        whole capability bodies (the device may rewrite even their read-only
        bytes, :meth:`set_capability_body`); a live capability's image is fixed.
        """
        free = bytearray(w | c for w, c in zip(self._wmask, self._w1c))
        free[PCI_STATUS] |= PCI_STATUS_INTERRUPT
        for cap in self._caps:
            if cap.handler is None:
                free[cap.body_start:cap.end] = b"\xff" * (cap.end - cap.body_start)
        return free

    # --- device side --------------------------------------------------------

    def set_intx(self, level: bool) -> None:
        """The function's internal interrupt condition (True = requesting service).

        STATUS.Interrupt Status follows it unconditionally; the INTx# output
        is asserted only while COMMAND.Interrupt Disable is clear, the
        function has a pin, and no capability (MSI-X) has taken interrupts
        over - PCI 3.0 6.2.3 and 6.8.
        """
        with self._lock:
            self._intx_level = bool(level)
            status = self._get(PCI_STATUS, 2)
            status = status | PCI_STATUS_INTERRUPT if level else status & ~PCI_STATUS_INTERRUPT
            self._put(PCI_STATUS, 2, status)
            self._refresh_intx()

    def set_intx_inhibit(self, inhibit: bool) -> None:
        """Gate the INTx# output off while MSI/MSI-X is enabled (called by those capabilities)."""
        with self._lock:
            self._intx_inhibit = bool(inhibit)
            self._refresh_intx()

    def signal_status(self, bits: int) -> None:
        """Set write-one-to-clear STATUS error bits (e.g. Received Master Abort after a failed DMA)."""
        with self._lock:
            self._put(PCI_STATUS, 2, self._get(PCI_STATUS, 2) | (bits & STATUS_W1C))

    # --- guest side ---------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        """A ``size``-byte little-endian read at any ``offset``; bytes outside 0-255 read 0xFF.

        Sizes other than 1-8 (no bus produces them) read 0.
        """
        if not isinstance(size, int) or not 1 <= size <= 8 or not isinstance(offset, int):
            return 0
        value = 0
        for start, end, live in self._segments(offset, offset + size):
            if live is not None and live.handler is not None:
                part = live.handler.io_read(start - live.offset, end - start) & ((1 << (8 * (end - start))) - 1)
            else:
                with self._lock:
                    part = 0
                    for addr in range(start, end):
                        byte = self._cfg[addr] if 0 <= addr < CONFIG_SPACE_SIZE else 0xFF
                        part |= byte << (8 * (addr - start))
            value |= part << (8 * (start - offset))
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A ``size``-byte little-endian write at any ``offset``; read-only bits and bytes past 255 ignore it."""
        if not isinstance(size, int) or not 1 <= size <= 8 or not isinstance(offset, int):
            return
        if not isinstance(value, int):
            return
        value &= (1 << (8 * size)) - 1
        for start, end, live in self._segments(max(offset, 0), min(offset + size, CONFIG_SPACE_SIZE)):
            if live is not None and live.handler is not None:
                part = (value >> (8 * (start - offset))) & ((1 << (8 * (end - start))) - 1)
                live.handler.io_write(start - live.offset, end - start, part)
            else:
                self._write_local(start, end, offset, value)

    def _segments(self, lo: int, hi: int) -> list[tuple[int, int, _Capability | None]]:
        """Split ``[lo, hi)`` into runs of plain bytes and runs inside one live capability's body."""
        if lo >= hi:
            return []
        live = [c for c in self._caps if c.handler is not None and c.body_start < hi and lo < c.end]
        if not live:
            return [(lo, hi, None)]
        parts: list[tuple[int, int, _Capability | None]] = []
        pos = lo
        for cap in live:  # in address order, never overlapping
            s, e = max(pos, cap.body_start), min(hi, cap.end)
            if pos < s:
                parts.append((pos, s, None))
            parts.append((s, e, cap))
            pos = e
        if pos < hi:
            parts.append((pos, hi, None))
        return parts

    def _write_local(self, lo: int, hi: int, offset: int, value: int) -> None:
        """Store bytes ``[lo, hi)`` of a write of ``value`` at ``offset``, then act on what changed."""
        with self._lock:
            hooked = [c for c in self._caps
                      if c.on_write is not None and c.writable
                      and any(self._wmask[a] for a in range(max(lo, c.body_start), min(hi, c.end)))]
            old_bodies = [bytes(self._cfg[c.body_start:c.end]) for c in hooked]
            for addr in range(lo, hi):
                byte = (value >> (8 * (addr - offset))) & 0xFF
                wm = self._wmask[addr]
                new = (self._cfg[addr] & ~wm) | (byte & wm)
                self._cfg[addr] = new & ~(byte & self._w1c[addr]) & 0xFF
            touches_command = lo < PCI_COMMAND + 2 and hi > PCI_COMMAND
            touches_bars = lo < PCI_BASE_ADDRESS_0 + 4 * NUM_BARS and hi > PCI_BASE_ADDRESS_0
            if touches_command or touches_bars:
                self._refresh_decode()
            if touches_command:
                self._refresh_intx()
            for cap, old in zip(hooked, old_bodies):
                assert cap.on_write is not None
                cap.on_write(old, bytes(self._cfg[cap.body_start:cap.end]))

    # --- internals ----------------------------------------------------------

    def _bar(self, index: int) -> PciBar:
        bar = self._bars.get(index)
        if bar is None:
            raise ValueError(f"no BAR is declared at index {index}")
        return bar

    def _cap(self, offset: int) -> _Capability:
        for cap in self._caps:
            if cap.offset == offset:
                return cap
        raise ValueError(f"no capability starts at {offset:#x}")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._cfg[offset:offset + size], "little")

    def _put(self, offset: int, size: int, value: int) -> None:
        self._cfg[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @staticmethod
    def _put_mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _decode(self, bar: PciBar) -> int | None:
        command = self._get(PCI_COMMAND, 2)
        reg_off = PCI_BASE_ADDRESS_0 + 4 * bar.index
        raw = self._get(reg_off, 4)
        if bar.kind == "io":
            if not command & PCI_COMMAND_IO:
                return None
            address = raw & ~(bar.size - 1) & 0xFFFF_FFFC
            if address == 0 or address + bar.size > _IO_SPACE:
                return None
            return address
        if not command & PCI_COMMAND_MEMORY:
            return None
        if bar.kind == "mem64":
            raw |= self._get(reg_off + 4, 4) << 32
        address = raw & ~(bar.size - 1) & ~0xF
        end = address + bar.size
        if address == 0 or end > MEM64_DECODE_LIMIT:
            return None
        if address < _4G <= end:  # covers 0xFFFFFFFF: the sizing pattern, or the reset vector
            return None
        return address

    def _refresh_decode(self) -> None:
        for index in sorted(self._bars):
            new = self._decode(self._bars[index])
            old = self._decoded[index]
            if new != old:
                self._decoded[index] = new
                if self.on_bar_change is not None:
                    self.on_bar_change(index, old, new)

    @staticmethod
    def _intx_output(cfg: bytes | bytearray, level: bool, inhibit: bool) -> bool:
        command = int.from_bytes(cfg[PCI_COMMAND:PCI_COMMAND + 2], "little")
        return level and not inhibit and cfg[PCI_INTERRUPT_PIN] != 0 and not command & PCI_COMMAND_INTX_DISABLE

    def _refresh_intx(self) -> None:
        out = self._intx_output(self._cfg, self._intx_level, self._intx_inhibit)
        if out != self._intx_out:
            self._intx_out = out
            self.irq(out)


class PciHostBridge(PciFunction):
    """The host bridge at 00:00.0: an Intel 82441FX (440FX "Natoma"), 8086:1237 revision 02.

    Why this ID: it is what QEMU's "pc" machine presents, so every Linux
    since 2.x has booted against it as a VM. Linux's early x86 quirks
    (arch/x86/kernel/early-quirks.c) key on other Intel host bridges (the
    0x3403-0x3406 interrupt-remapping check, the HPET blacklist) and never
    on 0x1237; the two regular quirks for it are harmless here:
    ``quirk_natoma`` only sets a flag that some capture drivers read to
    avoid PCI-to-PCI DMA, and ``quirk_passive_release`` only touches a PIIX3
    ISA bridge (8086:7000), which this machine does not have. Its class
    (host bridge, 0x060000) is also what Linux's mechanism #1 sanity check
    looks for on bus 0, and it makes Linux keep decode enabled while sizing
    (``quirk_mmio_always_on``); the bridge has no BARs anyway.
    """

    VENDOR_ID = 0x8086
    DEVICE_ID = 0x1237
    REVISION = 0x02

    def __init__(self) -> None:
        super().__init__(self.VENDOR_ID, self.DEVICE_ID, PCI_CLASS_BRIDGE_HOST, revision=self.REVISION,
                         interrupt_pin=0)


@dataclass
class PciConfigStats:
    """Counters of configuration mechanism #1 traffic: each one is a PIO exit."""

    address_reads: int = 0  # dword reads of CONFIG_ADDRESS
    address_writes: int = 0  # dword writes of CONFIG_ADDRESS
    data_reads: int = 0  # reads that touched CONFIG_DATA
    data_writes: int = 0  # writes that touched CONFIG_DATA
    unclaimed: int = 0  # CONFIG_DATA accesses that reached no function (enable clear, no device)
    other: int = 0  # byte/word accesses to 0xCF8-0xCFB (passed through or dropped)

    @property
    def config_accesses(self) -> int:
        return self.data_reads + self.data_writes


class PciBus:
    """Bus 0 and configuration mechanism #1 (a BusDevice for the 8 ports 0xCF8-0xCFF).

    Offsets 0-3 of the window are CONFIG_ADDRESS, 4-7 CONFIG_DATA. Only
    function 0 of each slot exists (header type bit 7 stays clear, so
    enumerators do not probe functions 1-7). ``passthrough`` receives the
    byte and word accesses to offsets 0-3 that are not CONFIG_ADDRESS, with
    offsets relative to 0xCF8 (0xCF9 is offset 1).
    """

    def __init__(self, *, passthrough: BusDevice | None = None) -> None:
        self._lock = threading.Lock()
        self._slots: dict[int, PciFunction] = {}
        self._config_address = 0
        self.passthrough = passthrough
        self.stats = PciConfigStats()

    def add(self, slot: int, function: PciFunction) -> None:
        """Place ``function`` as function 0 of device ``slot`` (0-31) on bus 0."""
        if not 0 <= slot <= 31:
            raise ValueError(f"PCI slot {slot} is not 0-31")
        if not isinstance(function, PciFunction):
            raise ValueError(f"{function!r} is not a PciFunction")
        with self._lock:
            if slot in self._slots:
                raise ValueError(f"PCI slot {slot} is already taken")
            self._slots[slot] = function

    def function(self, slot: int, function: int = 0) -> PciFunction | None:
        """The function at 00:slot.function, or None."""
        if function != 0:
            return None
        return self._slots.get(slot)

    @property
    def slots(self) -> dict[int, PciFunction]:
        return dict(self._slots)

    @property
    def config_address(self) -> int:
        return self._config_address

    def save_state(self) -> dict[str, object]:
        """CONFIG_ADDRESS: the functions on the bus save their own state, and the statistics are not saved."""
        with self._lock:
            return {"config_address": self._config_address}

    def load_state(self, state: Mapping[str, object]) -> None:
        r = StateReader(state, "the PCI bus", ("config_address",))
        address = r.take_int("config_address", 0, 0xFFFF_FFFF)
        r.require(not address & ~CONFIG_ADDRESS_VALID, "config_address", "its reserved bits read as zero")
        with self._lock:
            self._config_address = address

    def config_read(self, bus: int, slot: int, function: int, offset: int, size: int) -> int:
        """A configuration read cycle by bus/device/function (what an ECAM window would use too)."""
        fn = self._target(bus, slot, function)
        if fn is None:
            return (1 << (8 * size)) - 1 if 1 <= size <= 8 else 0
        return fn.config_read(offset, size)

    def config_write(self, bus: int, slot: int, function: int, offset: int, size: int, value: int) -> None:
        """A configuration write cycle; dropped when nothing answers."""
        fn = self._target(bus, slot, function)
        if fn is not None:
            fn.config_write(offset, size, value)

    # --- BusDevice: ports 0xCF8-0xCFF ---------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        if not isinstance(size, int) or not 1 <= size <= 8 or not isinstance(offset, int):
            return 0
        with self._lock:
            value = 0
            for start, length in self._lanes(offset, size):
                part = self._read_part(start, length)
                value |= part << (8 * (start - offset))
            return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        if not isinstance(size, int) or not 1 <= size <= 8 or not isinstance(offset, int):
            return
        if not isinstance(value, int):
            return
        value &= (1 << (8 * size)) - 1
        with self._lock:
            for start, length in self._lanes(offset, size):
                part = (value >> (8 * (start - offset))) & ((1 << (8 * length)) - 1)
                self._write_part(start, length, part)

    # --- internals ----------------------------------------------------------

    @staticmethod
    def _lanes(offset: int, size: int) -> list[tuple[int, int]]:
        """Split an access into runs of byte lanes: below 0, 0-3, 4-7, from 8 on."""
        parts = []
        end = offset + size
        for lo, hi in ((-(1 << 62), 0), (0, 4), (4, CONFIG_WINDOW), (CONFIG_WINDOW, 1 << 62)):
            s, e = max(offset, lo), min(end, hi)
            if s < e:
                parts.append((s, e - s))
        return parts

    def _read_part(self, start: int, length: int) -> int:
        ones = (1 << (8 * length)) - 1
        if 0 <= start < 4:
            if (start, length) == (0, 4):
                self.stats.address_reads += 1
                return self._config_address
            self.stats.other += 1
            if self.passthrough is not None:
                return self.passthrough.io_read(start, length) & ones
            return ones
        if 4 <= start < CONFIG_WINDOW:
            self.stats.data_reads += 1
            fn = self._addressed()
            if fn is None:
                self.stats.unclaimed += 1
                return ones
            return fn.config_read((self._config_address & 0xFC) + start - 4, length)
        return ones  # outside the window: nothing of ours answers

    def _write_part(self, start: int, length: int, value: int) -> None:
        if 0 <= start < 4:
            if (start, length) == (0, 4):
                self.stats.address_writes += 1
                self._config_address = value & CONFIG_ADDRESS_VALID
                return
            self.stats.other += 1
            if self.passthrough is not None:
                self.passthrough.io_write(start, length, value)
            return
        if 4 <= start < CONFIG_WINDOW:
            self.stats.data_writes += 1
            fn = self._addressed()
            if fn is None:
                self.stats.unclaimed += 1
                return
            fn.config_write((self._config_address & 0xFC) + start - 4, length, value)

    def _addressed(self) -> PciFunction | None:
        addr = self._config_address
        if not addr & CONFIG_ADDRESS_ENABLE:
            return None
        return self._target((addr >> 16) & 0xFF, (addr >> 11) & 0x1F, (addr >> 8) & 0x7)

    def _target(self, bus: int, slot: int, function: int) -> PciFunction | None:
        if bus != 0 or function != 0:
            return None
        return self._slots.get(slot)
