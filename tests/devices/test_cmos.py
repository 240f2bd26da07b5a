"""The CMOS RTC model: time in BCD/binary and 12/24 h, UIP, NMI mask, setting the clock, NVRAM."""

from __future__ import annotations

import calendar

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.devices import cmos as c
from kvmkit.devices.cmos import Cmos

# 2024-02-29 13:45:56.5 UTC, a Thursday
T0 = calendar.timegm((2024, 2, 29, 13, 45, 56, 0, 0, 0)) + 0.5


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rd(dev: Cmos, index: int) -> int:
    dev.io_write(0, 1, index)
    return dev.io_read(1, 1)


def wr(dev: Cmos, index: int, value: int) -> None:
    dev.io_write(0, 1, index)
    dev.io_write(1, 1, value)


def test_power_on_registers() -> None:
    d = Cmos(Clock())
    assert rd(d, c.REG_A) == 0x26
    assert rd(d, c.REG_B) == c.REG_B_24H
    assert rd(d, c.REG_D) == c.REG_D_VRT
    assert rd(d, c.REG_C) == 0


def test_time_in_bcd_24h() -> None:
    d = Cmos(Clock())
    assert [rd(d, r) for r in (c.SECONDS, c.MINUTES, c.HOURS, c.DAY_OF_MONTH, c.MONTH, c.YEAR, c.CENTURY)] == \
        [0x56, 0x45, 0x13, 0x29, 0x02, 0x24, 0x20]
    assert rd(d, c.DAY_OF_WEEK) == 5  # Sunday = 1


def test_time_in_binary() -> None:
    d = Cmos(Clock())
    wr(d, c.REG_B, c.REG_B_24H | c.REG_B_DM)
    assert [rd(d, r) for r in (c.SECONDS, c.MINUTES, c.HOURS, c.DAY_OF_MONTH, c.MONTH, c.YEAR)] == [56, 45, 13, 29, 2, 24]


def test_12_hour_mode_sets_pm_bit() -> None:
    d = Cmos(Clock())
    wr(d, c.REG_B, 0)  # BCD, 12 h
    assert rd(d, c.HOURS) == 0x80 | 0x01
    d.clock.t = calendar.timegm((2024, 1, 1, 0, 30, 0, 0, 0, 0))
    assert rd(d, c.HOURS) == 0x12  # 12 AM
    wr(d, c.REG_B, c.REG_B_DM)  # binary, 12 h
    d.clock.t = calendar.timegm((2024, 1, 1, 23, 0, 0, 0, 0, 0))
    assert rd(d, c.HOURS) == 0x80 | 11


def test_update_in_progress_just_before_each_second() -> None:
    clock = Clock(T0 - 0.5 + 0.9999)  # 100 us before the next second
    d = Cmos(clock)
    assert rd(d, c.REG_A) & c.REG_A_UIP
    clock.t = T0  # mid-second
    assert not rd(d, c.REG_A) & c.REG_A_UIP


def test_uip_bit_is_read_only() -> None:
    d = Cmos(Clock())
    wr(d, c.REG_A, 0xA6)
    assert rd(d, c.REG_A) == 0x26


def test_nmi_mask_bit_of_index_port() -> None:
    d = Cmos(Clock())
    d.io_write(0, 1, 0x80 | c.SECONDS)
    assert d.nmi_disabled
    assert d.io_read(1, 1) == 0x56  # the index still selects register 0
    d.io_write(0, 1, c.SECONDS)
    assert not d.nmi_disabled


def test_index_port_reads_ff_and_index_wraps_to_128_bytes() -> None:
    d = Cmos(Clock())
    assert d.io_read(0, 1) == 0xFF
    wr(d, 0x7F, 0x5A)
    d.io_write(0, 1, 0xFF)  # NMI bit + index 0x7f
    assert d.io_read(1, 1) == 0x5A
    for index in range(256):
        d.read_register(index)
        d.write_register(index, 0)  # never raises


def test_setting_the_clock_with_set_bit() -> None:
    clock = Clock()
    d = Cmos(clock)
    wr(d, c.REG_B, c.REG_B_24H | c.REG_B_SET)
    clock.t += 10  # frozen while SET is on
    assert rd(d, c.SECONDS) == 0x56
    wr(d, c.YEAR, 0x30)
    wr(d, c.MONTH, 0x12)
    wr(d, c.DAY_OF_MONTH, 0x31)
    wr(d, c.HOURS, 0x23)
    wr(d, c.MINUTES, 0x59)
    wr(d, c.SECONDS, 0x58)
    wr(d, c.REG_B, c.REG_B_24H)
    assert [rd(d, r) for r in (c.YEAR, c.MONTH, c.DAY_OF_MONTH, c.HOURS, c.MINUTES, c.SECONDS)] == \
        [0x30, 0x12, 0x31, 0x23, 0x59, 0x58]
    clock.t += 3  # and it runs again, across the new year
    assert [rd(d, r) for r in (c.YEAR, c.MONTH, c.DAY_OF_MONTH, c.HOURS, c.SECONDS)] == [0x31, 0x01, 0x01, 0x00, 0x01]


def test_register_c_update_flag_clears_on_read() -> None:
    clock = Clock()
    d = Cmos(clock)
    rd(d, c.REG_C)
    clock.t += 1.0
    wr(d, c.REG_B, c.REG_B_24H | c.REG_B_UIE)
    v = rd(d, c.REG_C)
    assert v & c.REG_C_UF and v & c.REG_C_IRQF
    assert rd(d, c.REG_C) & c.REG_C_UF == 0


def test_alarm_flag() -> None:
    clock = Clock()
    d = Cmos(clock)
    wr(d, c.SECONDS_ALARM, 0x58)
    wr(d, c.MINUTES_ALARM, 0xC0)  # don't care
    wr(d, c.HOURS_ALARM, 0xFF)
    rd(d, c.REG_C)
    clock.t += 1
    assert not rd(d, c.REG_C) & c.REG_C_AF  # :57
    clock.t += 1
    assert rd(d, c.REG_C) & c.REG_C_AF  # :58


def test_memory_bytes_like_seabios() -> None:
    m = c.memory_bytes(256 << 20, 0, 1)
    assert (m[0x15] | m[0x16] << 8) == 640
    assert (m[0x17] | m[0x18] << 8) == 0xFC00  # capped at 63 MiB of extended memory
    assert (m[0x30] | m[0x31] << 8) == 0xFC00
    assert (m[0x34] | m[0x35] << 8) == (240 << 20) // 65536
    assert m[0x5B] == m[0x5C] == m[0x5D] == 0
    m = c.memory_bytes(0xC000_0000, 5 << 30, 4)
    assert (m[0x5B] | m[0x5C] << 8 | m[0x5D] << 16) == (5 << 30) // 65536
    assert m[0x5F] == 3
    small = c.memory_bytes(8 << 20)
    assert (small[0x17] | small[0x18] << 8) == 7 * 1024
    assert small[0x34] == small[0x35] == 0


def test_nvram_initial_bytes_readable_and_writable() -> None:
    d = Cmos(Clock(), nvram=c.memory_bytes(256 << 20))
    assert rd(d, 0x15) == 0x80 and rd(d, 0x16) == 0x02
    wr(d, 0x40, 0x12)
    assert rd(d, 0x40) == 0x12


def test_bcd_round_trip() -> None:
    for v in range(100):
        assert c.from_bcd(c.to_bcd(v)) == v


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)), max_size=60),
       st.floats(0, 4e9, allow_nan=False))
def test_any_access_sequence_is_safe(ops: list[tuple[int, int, int]], t: float) -> None:
    d = Cmos(Clock(t))
    for is_write, size, value in ops:
        if is_write:
            d.io_write(value & 1, size, value >> 1)
        else:
            assert 0 <= d.io_read(value & 1, size) <= 0xFF


def _walked(d: Cmos, t0: float, t1: float) -> bool:
    """The old definition, second by second: the reference the computed alarm check must agree with."""
    import time as _time
    alarm = (d.ram[c.HOURS_ALARM], d.ram[c.MINUTES_ALARM], d.ram[c.SECONDS_ALARM])
    for sec in range(int(t0) + 1, min(int(t1), int(t0) + 1 + 86400) + 1):
        t = _time.gmtime(sec)
        want = (d._encode_hour(t.tm_hour), d._encode(t.tm_min), d._encode(t.tm_sec))
        if all(a >= 0xC0 or a == w for a, w in zip(alarm, want)):
            return True
    return False


@settings(max_examples=300, deadline=None)
@given(h=st.sampled_from([0x00, 0x07, 0x12, 0x23, 0x81, 0x92, 0xC0, 0xFF, 0x30, 0x99]),
       m=st.sampled_from([0x00, 0x30, 0x59, 0x60, 0xC5, 0x7F]), s=st.sampled_from([0x00, 0x29, 0x59, 0xC0, 0x5A]),
       start=st.integers(0, 86400 * 3), length=st.integers(0, 90000), mode=st.sampled_from([0x02, 0x06, 0x00, 0x04]))
def test_alarm_check_agrees_with_walking_every_second(h, m, s, start, length, mode) -> None:
    d = Cmos(Clock())
    wr(d, c.REG_B, mode)  # 24 h or 12 h, BCD or binary
    for reg, v in ((c.HOURS_ALARM, h), (c.MINUTES_ALARM, m), (c.SECONDS_ALARM, s)):
        wr(d, reg, v)
    t0 = T0 + start
    assert d._alarm_passed(t0, t0 + length) == _walked(d, t0, t0 + length)


def test_reg_c_after_a_day_long_clock_jump_is_immediate() -> None:
    """Issue 12, item 16: the alarm check used to walk every second of the jump (0.24 s per day)."""
    import time as _time
    clock = Clock()
    d = Cmos(clock)
    wr(d, c.SECONDS_ALARM, 0x12)
    wr(d, c.MINUTES_ALARM, 0x34)
    wr(d, c.HOURS_ALARM, 0x05)
    rd(d, c.REG_C)
    clock.t += 86400 * 365 * 50
    t = _time.perf_counter()
    assert rd(d, c.REG_C) & c.REG_C_AF
    assert _time.perf_counter() - t < 0.02


@given(t=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70).map(float)))
def test_an_absurd_host_clock_still_reads_as_bcd(t: float) -> None:
    d = Cmos(Clock(t))
    for reg in (c.SECONDS, c.MINUTES, c.HOURS, c.DAY_OF_MONTH, c.MONTH, c.YEAR, c.CENTURY):
        v = rd(d, reg) & 0x7F if reg == c.HOURS else rd(d, reg)
        assert v >> 4 <= 9 and v & 0xF <= 9, (t, reg, hex(v))
    rd(d, c.REG_C)
