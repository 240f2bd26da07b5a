import pytest

from kvmkit.errors import GuestMemoryError
from kvmkit.memory import HIGH_RAM_START, PCI_HOLE_START, GuestMemory, ram_layout


def test_layout_small_is_one_region():
    assert ram_layout(256 << 20) == [(0, 256 << 20)]


def test_layout_splits_around_pci_hole():
    size = 4 << 30
    assert ram_layout(size) == [(0, PCI_HOLE_START), (HIGH_RAM_START, size - PCI_HOLE_START)]


def test_layout_rejects_zero():
    with pytest.raises(GuestMemoryError):
        ram_layout(0)


def test_read_write_roundtrip_and_helpers():
    mem = GuestMemory(2 << 20)
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    mem.write_u64(0x2000, 0x1122334455667788)
    assert mem.read_u32(0x2000) == 0x55667788
    assert mem.read_u16(0x2006) == 0x1122
    mem.write(0x3000, b"abc\0def")
    assert mem.read_cstring(0x3000) == b"abc"
    mem.close()


@pytest.mark.parametrize("gpa,size", [(-1, 1), ((2 << 20) - 2, 4), (2 << 20, 1), (0x1000, -1), (1 << 40, 8)])
def test_out_of_bounds_is_an_error(gpa, size):
    mem = GuestMemory(2 << 20)
    with pytest.raises(GuestMemoryError):
        mem.read(gpa, size)
    if size > 0:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\0" * size)
    assert not mem.is_ram(gpa, size)
    mem.close()


def test_access_may_not_span_the_hole():
    mem = GuestMemory((3 << 30) + (1 << 20))
    with pytest.raises(GuestMemoryError):
        mem.read(PCI_HOLE_START - 4, 8)
    mem.write(HIGH_RAM_START, b"x")
    assert mem.read(HIGH_RAM_START, 1) == b"x"
    mem.close()
