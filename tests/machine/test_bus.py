import pytest
from hypothesis import given, strategies as st

from kvmkit.machine.bus import Bus, BusConflict


class Regs:
    def __init__(self, size=8):
        self.mem = bytearray(size)
        self.log = []

    def io_read(self, offset, size):
        self.log.append(("r", offset, size))
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def io_write(self, offset, size, value):
        self.log.append(("w", offset, size, value))
        self.mem[offset:offset + size] = value.to_bytes(size, "little")


class Broken:
    def io_read(self, offset, size):
        raise RuntimeError("model bug")

    def io_write(self, offset, size, value):
        raise RuntimeError("model bug")


def test_dispatch_passes_offset_within_window():
    bus = Bus("pio", 0x10000)
    dev = Regs()
    bus.register(0x3F8, 8, dev, "com1")
    bus.write(0x3FB, 1, 0x83)
    assert dev.log == [("w", 3, 1, 0x83)]
    assert bus.read(0x3FB, 1) == 0x83


def test_unclaimed_reads_float_high_and_are_counted():
    bus = Bus("pio", 0x10000)
    assert bus.read(0x1234, 1) == 0xFF
    assert bus.read(0x1234, 2) == 0xFFFF
    assert bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x1234, 1, 5)
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (3, 1)
    assert bus.unclaimed[0x1234] == 4


def test_access_straddling_window_end_is_unclaimed():
    bus = Bus("mmio", 1 << 52)
    bus.register(0x1000, 8, Regs())
    assert bus.read(0x1006, 4) == 0xFFFFFFFF
    assert bus.unclaimed_reads == 1


def test_overlap_rejected():
    bus = Bus("pio", 0x10000)
    bus.register(0x3F8, 8, Regs(), "a")
    with pytest.raises(BusConflict):
        bus.register(0x3FF, 1, Regs(), "b")
    with pytest.raises(BusConflict):
        bus.register(0xFFFF, 2, Regs(), "c")
    bus.register(0x400, 1, Regs(), "d")  # adjacent is fine
    assert [m.name for m in bus.mappings()] == ["a", "d"]


def test_device_exception_never_escapes():
    bus = Bus("pio", 0x10000)
    bus.register(0x10, 4, Broken())
    assert bus.read(0x10, 1) == 0xFF
    bus.write(0x10, 1, 1)
    assert bus.device_errors == 2


@given(st.lists(st.tuples(st.integers(-10, 0x10010), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)), max_size=60))
def test_random_accesses_never_raise(ops):
    bus = Bus("pio", 0x10000)
    regs = Regs(16)
    bus.register(0x100, 16, regs)
    for addr, size, value in ops:
        v = bus.read(addr, size)
        assert 0 <= v < (1 << (8 * size))
        bus.write(addr, size, value)


def test_unclaimed_accounting_stays_bounded_whatever_the_guest_sweeps():
    """Issue 12, item 7: a guest touching every address must not grow kvmkit's tables."""
    from kvmkit.profile.exits import MAX_DISTINCT, OTHER, VcpuExitStats, tally
    bus = Bus("mmio", 1 << 52)
    for i in range(100_000):
        bus.write(0x1_0000_0000 + i * 8, 4, i)
        bus.read(0x2_0000_0000 + i * 8, 4)
    assert bus.unclaimed_writes == 100_000 and bus.unclaimed_reads == 100_000
    assert len(bus.unclaimed) <= MAX_DISTINCT + 1
    assert sum(bus.unclaimed.values()) == 200_000 and bus.unclaimed[OTHER] > 0
    assert "other" in bus.summary()
    st = VcpuExitStats(0)
    for page in range(0, 10_000 << 12, 1 << 12):
        tally(st.mmio, (page, "w"))
    assert len(st.mmio) <= MAX_DISTINCT + 1 and sum(st.mmio.values()) == 10_000
    assert "other/w" in st.as_dict()["mmio"]
