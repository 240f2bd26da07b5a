"""Differential test: the same mechanism #1 traffic on QEMU's PCI config space and on PciFunction/PciBus.

QEMU ("pc" machine, frozen with -S so no firmware programs anything) runs a
virtio-rng-pci at 00:04.0. Its header has an I/O BAR 0 (32 bytes), a 32-bit
memory BAR 1 (4 KiB, MSI-X) and a 64-bit prefetchable BAR 4 (16 KiB); the
model is built with the same identity and BARs, and every access goes to
both through ports 0xCF8/0xCFC over the qtest protocol.

Deliberate differences, each avoided below:

1. COMMAND.SERR# Enable (bit 8) is writable in QEMU, hardwired to 0 in the
   model. Random writes never set it.
2. Capability lists differ (QEMU has virtio's and MSI-X; the model one
   placeholder), so the Capabilities Pointer byte (0x34) and everything
   from 0x40 on are not compared. STATUS.Capabilities List agrees.
3. Byte and word reads of 0xCF8-0xCFB: QEMU answers with bytes of
   CONFIG_ADDRESS; the model reads all ones (an unclaimed I/O cycle, as on
   a PC). Never compared.
4. Reserved CONFIG_ADDRESS bits (30:24, 1:0): QEMU keeps them; the model
   reads them as 0. Only valid addresses are written.
5. Decode is never enabled (COMMAND bits 0-1 stay clear): a random I/O BAR
   over 0xCF8 would hide QEMU's config ports, and qtest cannot see where a
   BAR decodes anyway.
"""

from __future__ import annotations

import random

import pytest

from _qtest import QEMU, QTest

from kvmkit.devices.pci import PciBus, PciFunction, PciHostBridge

SLOT = 4

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (Debian package qemu-system-x86)"),
]


class Pair:
    """Sends each port access to QEMU and to the model; compares every read."""

    def __init__(self, q: QTest, bus: PciBus) -> None:
        self.q = q
        self.bus = bus
        self.log: list[str] = []

    def out(self, port: int, size: int, value: int) -> None:
        self.log.append(f"out{size} {port:#x} {value:#x}")
        self.q.out(port, size, value)
        self.bus.io_write(port - 0xCF8, size, value)

    def inp(self, port: int, size: int, mask: int = -1) -> int:
        q = self.q.inp(port, size)
        m = self.bus.io_read(port - 0xCF8, size)
        self.log.append(f"in{size} {port:#x} -> qemu {q:#x} model {m:#x}")
        assert q & mask == m & mask, "\n".join(self.log[-40:])
        return m

    def select(self, reg: int, *, slot: int = SLOT, bus: int = 0, fn: int = 0, enable: bool = True) -> None:
        self.out(0xCF8, 4, (enable << 31) | (bus << 16) | (slot << 11) | (fn << 8) | (reg & 0xFC))


def qemu_header(q: QTest) -> bytes:
    out = b""
    for reg in range(0, 0x40, 4):
        q.out(0xCF8, 4, 0x8000_0000 | SLOT << 11 | reg)
        out += q.inp(0xCFC, 4).to_bytes(4, "little")
    return out


def qemu_bar_masks(q: QTest) -> list[int]:
    masks = []
    for reg in range(0x10, 0x28, 4):
        q.out(0xCF8, 4, 0x8000_0000 | SLOT << 11 | reg)
        orig = q.inp(0xCFC, 4)
        q.out(0xCFC, 4, 0xFFFF_FFFF)
        masks.append(q.inp(0xCFC, 4))
        q.out(0xCFC, 4, orig)
    return masks


@pytest.fixture
def pair():
    q = QTest("-device", f"virtio-rng-pci,addr={SLOT:02x}.0")
    try:
        hdr = qemu_header(q)
        expected_masks = [0xFFFF_FFE1, 0xFFFF_F000, 0, 0, 0xFFFF_C00C, 0xFFFF_FFFF]
        if qemu_bar_masks(q) != expected_masks:
            pytest.skip("this QEMU's virtio-rng-pci has a different BAR layout")
        word = lambda off: int.from_bytes(hdr[off:off + 2], "little")  # noqa: E731
        f = PciFunction(word(0), word(2), int.from_bytes(hdr[9:12], "little"), revision=hdr[8],
                        subsystem_vendor_id=word(0x2C), subsystem_id=word(0x2E), interrupt_pin=hdr[0x3D])
        f.add_bar(0, 32, "io")
        f.add_bar(1, 0x1000, "mem32")
        f.add_bar(4, 0x4000, "mem64", prefetchable=True)
        f.add_capability(0x09, bytes(2))
        bus = PciBus()
        bus.add(0, PciHostBridge())
        bus.add(SLOT, f)
        yield Pair(q, bus)
    finally:
        q.close()


def header_mask(reg: int, lane: int, size: int) -> int:
    """Compare every byte of a header read except the Capabilities Pointer and capability bytes."""
    mask = 0
    for i in range(size):
        off = reg + lane + i
        if lane + i < 4 and off != 0x34 and off < 0x40:
            mask |= 0xFF << (8 * i)
        elif lane + i >= 4:
            mask |= 0xFF << (8 * i)  # past 0xCFF: both read an unclaimed port
    return mask


def scrub(reg: int, lane: int, size: int, value: int) -> int:
    """Keep decode and SERR# off (differences 1 and 5)."""
    for i in range(size):
        off = reg + lane + i
        if off == 0x04:
            value &= ~(0x03 << (8 * i))
        elif off == 0x05:
            value &= ~(0x01 << (8 * i))
    return value


def test_header_and_sizing_agree(pair: Pair) -> None:
    for reg in range(0, 0x40, 4):
        pair.select(reg)
        pair.inp(0xCFC, 4, header_mask(reg, 0, 4))
    for reg in list(range(0x10, 0x28, 4)) + [0x30]:
        pair.select(reg)
        orig = pair.inp(0xCFC, 4)
        pair.out(0xCFC, 4, 0xFFFF_FFFF)
        pair.inp(0xCFC, 4)
        pair.out(0xCFC, 4, 0x1234_5678)  # low bits read-only, address masked to the size
        pair.inp(0xCFC, 4)
        pair.out(0xCFC, 4, orig)


def test_lanes_and_straddling_accesses_agree(pair: Pair) -> None:
    for reg in (0x00, 0x08, 0x2C, 0x3C):
        pair.select(reg)
        for port, size in ((0xCFC, 1), (0xCFD, 1), (0xCFE, 1), (0xCFF, 1), (0xCFC, 2), (0xCFD, 2),
                           (0xCFE, 2), (0xCFF, 2), (0xCFC, 4), (0xCFD, 4), (0xCFE, 4), (0xCFF, 4)):
            pair.inp(port, size, header_mask(reg, port - 0xCFC, size))
    pair.select(0x3C)
    pair.out(0xCFF, 2, 0xABCD)  # lane 3 (Max_Lat, read-only) and 0xD00 (nothing)
    pair.out(0xCFD, 2, 0x1234)  # pin (read-only) and Min_Gnt (read-only)
    pair.out(0xCFC, 2, 0xBEEF)  # line takes 0xEF
    pair.inp(0xCFC, 4)
    pair.out(0xCF8, 2, 0)  # a word write does not touch CONFIG_ADDRESS
    pair.inp(0xCF8, 4)


def test_missing_functions_agree(pair: Pair) -> None:
    for kw in ({"slot": 7}, {"slot": 31}, {"fn": 1}, {"bus": 1}, {"enable": False}):
        pair.select(0x00, **kw)  # type: ignore[arg-type]
        pair.inp(0xCFC, 4)
        pair.inp(0xCFE, 2)
        pair.out(0xCFC, 4, 0)  # dropped by both
        pair.inp(0xCFC, 1)
    pair.select(0x00)
    pair.inp(0xCFC, 4)


@pytest.mark.parametrize("seed", range(4))
def test_random_header_traffic_agrees(pair: Pair, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        reg = rng.randrange(0x04, 0x40) & ~3
        pair.select(reg)
        lane = rng.randrange(4)
        size = rng.choice([s for s in (1, 2, 4) if lane + s <= 4])
        if rng.random() < 0.5:
            value = rng.choice([0, 0xFFFF_FFFF, rng.getrandbits(32)]) & ((1 << (8 * size)) - 1)
            pair.out(0xCFC + lane, size, scrub(reg, lane, size, value))
        else:
            pair.inp(0xCFC + lane, size, header_mask(reg, lane, size))
    for reg in range(0, 0x40, 4):
        pair.select(reg)
        pair.inp(0xCFC, 4, header_mask(reg, 0, 4))
