"""MC146818 CMOS RTC and NVRAM at ports 0x70 (index) and 0x71 (data).

What a PC's firmware and Linux read from it: the time of day (BCD or binary,
12 or 24 hour, as register B says), the update-in-progress flag Linux waits
on before reading the time, the NMI-mask bit of the index port, and the
memory-size bytes as SeaBIOS fills them (0x15-0x18, 0x30-0x31, 0x34-0x35,
0x5b-0x5d) plus the CPU count at 0x5f.

Pure: the time comes from an injected clock function (seconds since the
epoch, UTC, as a float), nothing touches the host. The guest may set the
clock (register B's SET bit, then the time registers); the model keeps the
difference to the injected clock. Interrupt flags in register C (update,
alarm, periodic) are computed when the guest reads it; IRQ 8 is not
raised (nothing in a console boot enables it).
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Mapping
from fractions import Fraction
from typing import Callable

from kvmkit.devices.state import StateReader

CMOS_INDEX = 0x70
CMOS_DATA = 0x71
NMI_DISABLE = 0x80  # bit 7 of a write to the index port

# Register numbers (MC146818 datasheet names)
SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32  # IBM PC convention (ACPI FADT century field points here)

REG_A_UIP = 0x80  # update in progress
REG_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_SET = 0x80  # halt updates, let the guest set the time
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_DM = 0x04  # data mode: 1 = binary, 0 = BCD
REG_B_24H = 0x02
REG_B_DEFAULT = REG_B_24H
REG_C_IRQF = 0x80
REG_C_PF = 0x40
REG_C_AF = 0x20
REG_C_UF = 0x10
REG_D_VRT = 0x80  # valid RAM and time: the battery is good

UIP_WINDOW = 244e-6  # seconds before each update during which UIP reads 1 (datasheet tBUC)
NVRAM_SIZE = 128

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


MAX_RTC_TIME = 253402300799  # 9999-12-31 23:59:59 UTC: the last time the century byte can show


def _clamp(t: float) -> float:
    """A time within what the RTC's registers can show: a host clock far off (or NaN) is clamped."""
    if not t == t:  # NaN
        return 0.0
    return min(max(t, 0.0), float(MAX_RTC_TIME))


def _representable(t: float) -> int:
    """Whole seconds of :func:`_clamp`."""
    return int(_clamp(t))


_NS = 10**9
_NS_LIMIT = 1 << 100  # |offset| and the frozen time, in ns: far past any RTC date, still a finite float


def _to_ns(t: float) -> int:
    """Seconds as whole nanoseconds, exactly rounded: a snapshot holds no floats."""
    return round(Fraction(t) * _NS) if math.isfinite(t) else 0


def to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


def memory_bytes(low_ram: int, high_ram: int = 0, cpus: int = 1) -> dict[int, int]:
    """CMOS bytes describing RAM as SeaBIOS writes them.

    ``low_ram`` is the RAM below 4 GiB (up to the PCI hole), ``high_ram`` the
    RAM above 4 GiB.
    """
    out: dict[int, int] = {}
    base_kb = 640
    out[0x15], out[0x16] = base_kb & 0xFF, base_kb >> 8
    ext_kb = min(max(low_ram - MiB, 0) // KiB, 0xFC00)  # 1 MiB..64 MiB in KiB, capped as SeaBIOS does
    out[0x17], out[0x18] = ext_kb & 0xFF, ext_kb >> 8
    out[0x30], out[0x31] = ext_kb & 0xFF, ext_kb >> 8
    above16 = min(max(low_ram - 16 * MiB, 0) // (64 * KiB), 0xFFFF)  # 16 MiB..4 GiB in 64 KiB units
    out[0x34], out[0x35] = above16 & 0xFF, above16 >> 8
    above4g = min(high_ram // (64 * KiB), 0xFFFFFF)  # above 4 GiB in 64 KiB units, 3 bytes
    out[0x5B], out[0x5C], out[0x5D] = above4g & 0xFF, (above4g >> 8) & 0xFF, above4g >> 16
    out[0x5F] = max(cpus - 1, 0) & 0xFF
    return out


class Cmos:
    """The RTC and its NVRAM; ``io_read``/``io_write`` at offsets 0 (index) and 1 (data)."""

    def __init__(self, clock: Callable[[], float] = time.time, nvram: dict[int, int] | None = None) -> None:
        self.clock = clock
        self.index = 0
        self.nmi_disabled = False
        self.ram = bytearray(NVRAM_SIZE)
        self.ram[REG_A] = REG_A_DEFAULT
        self.ram[REG_B] = REG_B_DEFAULT
        self.ram[REG_D] = REG_D_VRT
        for k, v in (nvram or {}).items():
            if 0 <= k < NVRAM_SIZE and k not in (REG_A, REG_B, REG_C, REG_D):
                self.ram[k] = v & 0xFF
        self.offset = 0.0  # guest-set time minus the injected clock, seconds
        self._frozen: float | None = None  # the time while SET is on
        self._last_c_read = _clamp(self.clock())

    # -- snapshot ----------------------------------------------------------------------
    def save_state(self) -> dict[str, object]:
        """The index port, the 128 bytes, and the time as the guest set it.

        The time registers are computed from the injected clock, so what is
        saved is what the guest changed: ``offset_ns`` (its time minus the
        clock's) or, while SET holds the clock, ``frozen_ns`` (the time it
        stands at). ``last_c_read_ns`` is the clock at the last REG_C read,
        against which the update, alarm and periodic flags are computed. The
        clock itself is the host's and is not saved: after a restore the RTC
        runs on with the new host's time plus the guest's offset.
        """
        return {"index": self.index, "nmi_disabled": self.nmi_disabled, "ram": bytes(self.ram).hex(),
                "offset_ns": _to_ns(self.offset),
                "frozen_ns": None if self._frozen is None else _to_ns(self._frozen),
                "last_c_read_ns": _to_ns(self._last_c_read)}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Become the RTC :meth:`save_state` described; StateError (and no change) if it is damaged."""
        r = StateReader(state, "the CMOS RTC", ("index", "nmi_disabled", "ram", "offset_ns", "frozen_ns",
                                                "last_c_read_ns"))
        index = r.take_int("index", 0, 0x7F)
        nmi_disabled = r.take_bool("nmi_disabled")
        ram = r.take_hex_bytes("ram", NVRAM_SIZE, min_len=NVRAM_SIZE)
        offset = r.take_int("offset_ns", -_NS_LIMIT, _NS_LIMIT) / _NS
        frozen_ns = r.take_optional_int("frozen_ns", -_NS_LIMIT, _NS_LIMIT)
        last_c_read = r.take_int("last_c_read_ns", 0, MAX_RTC_TIME * _NS) / _NS
        r.require(not ram[REG_A] & REG_A_UIP, "ram", "UIP in register A is read-only")
        r.require(bool(ram[REG_B] & REG_B_SET) == (frozen_ns is not None), "frozen_ns",
                  "the clock stands still exactly while register B's SET bit is on")
        r.require(not (ram[REG_B] & REG_B_SET and ram[REG_B] & REG_B_UIE), "ram", "SET clears UIE in register B")
        self.index, self.nmi_disabled, self.ram[:] = index, nmi_disabled, ram
        self.offset, self._last_c_read = offset, last_c_read
        self._frozen = None if frozen_ns is None else frozen_ns / _NS

    # -- the bus interface ---------------------------------------------------------
    def io_read(self, offset: int, size: int) -> int:
        if offset == 1:
            return self.read_register(self.index)
        return 0xFF  # the index port is write-only

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.nmi_disabled = bool(value & NMI_DISABLE)
            self.index = value & 0x7F
        elif offset == 1:
            self.write_register(self.index, value)

    # -- time ------------------------------------------------------------------------
    def now(self) -> float:
        """The RTC's current time, seconds since the epoch (UTC)."""
        if self._frozen is not None:
            return self._frozen
        return self.clock() + self.offset

    def _encode(self, v: int) -> int:
        return v if self.ram[REG_B] & REG_B_DM else to_bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.ram[REG_B] & REG_B_DM else from_bcd(v)

    def _encode_hour(self, hour: int) -> int:
        if self.ram[REG_B] & REG_B_24H:
            return self._encode(hour)
        pm = hour >= 12
        h12 = hour % 12 or 12
        return self._encode(h12) | (0x80 if pm else 0)

    def _decode_hour(self, v: int) -> int:
        if self.ram[REG_B] & REG_B_24H:
            return self._decode(v) % 24
        pm = bool(v & 0x80)
        h = self._decode(v & 0x7F) % 12
        return h + 12 if pm else h

    def _time_fields(self) -> dict[int, int]:
        t = time.gmtime(_representable(self.now()))
        return {SECONDS: self._encode(t.tm_sec), MINUTES: self._encode(t.tm_min),
                HOURS: self._encode_hour(t.tm_hour), DAY_OF_WEEK: self._encode((t.tm_wday + 1) % 7 + 1),
                DAY_OF_MONTH: self._encode(t.tm_mday), MONTH: self._encode(t.tm_mon),
                YEAR: self._encode(t.tm_year % 100), CENTURY: self._encode(t.tm_year // 100)}

    def _update_in_progress(self) -> bool:
        if self.ram[REG_B] & REG_B_SET:
            return False
        frac = self.now() % 1.0
        return frac >= 1.0 - UIP_WINDOW

    # -- registers ------------------------------------------------------------------------
    def read_register(self, index: int) -> int:
        index &= 0x7F
        if index in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY):
            return self._time_fields()[index]
        if index == REG_A:
            return (self.ram[REG_A] & 0x7F) | (REG_A_UIP if self._update_in_progress() else 0)
        if index == REG_C:
            return self._read_c()
        if index == REG_D:
            return REG_D_VRT
        return self.ram[index]

    def _read_c(self) -> int:
        now = _clamp(self.clock())
        flags = 0
        if int(now) != int(self._last_c_read) and not self.ram[REG_B] & REG_B_SET:
            flags |= REG_C_UF
            if self._alarm_passed(self._last_c_read + self.offset, now + self.offset):
                flags |= REG_C_AF
        rate = self.ram[REG_A] & 0xF
        if rate and now > self._last_c_read:
            period = 1.0 / (32768 >> (rate - 1)) if rate > 2 else 1.0 / (32768 >> (rate + 6))
            if int(now / period) != int(self._last_c_read / period):
                flags |= REG_C_PF
        self._last_c_read = now
        enabled = self.ram[REG_B] & (REG_B_PIE | REG_B_AIE | REG_B_UIE)
        if flags & enabled:  # PF/AF/UF line up with PIE/AIE/UIE
            flags |= REG_C_IRQF
        return flags

    def _alarm_passed(self, t0: float, t1: float) -> bool:
        """Whether the alarm time matched any second in (t0, t1] (0xC0-0xFF = don't care).

        Computed, not walked: at most 24 x 60 (hour, minute) pairs are looked
        at, whatever the gap since the last read (a host clock that jumped a
        day must not stall the vCPU reading REG_C).
        """
        start, end = _representable(t0) + 1, _representable(t1)
        if end < start:
            return False
        hours = self._alarm_values(self.ram[HOURS_ALARM], 24, hour=True)
        minutes = self._alarm_values(self.ram[MINUTES_ALARM], 60)
        seconds = self._alarm_values(self.ram[SECONDS_ALARM], 60)
        if not (hours and minutes and seconds):
            return False  # an alarm no time of day can match
        if end - start + 1 >= 86400:
            return True
        # The interval as times of day: one range, or two when it crosses midnight.
        s0, s1 = start % 86400, end % 86400
        ranges = [(s0, s1)] if s0 <= s1 else [(s0, 86399), (0, s1)]
        for h in hours:
            for m in minutes:
                base = h * 3600 + m * 60
                lo, hi = base + seconds[0], base + seconds[-1]
                for r0, r1 in ranges:
                    if lo > r1 or hi < r0:
                        continue
                    if len(seconds) == 60 or any(r0 <= base + sec <= r1 for sec in seconds):
                        return True
        return False

    def _alarm_values(self, reg: int, count: int, hour: bool = False) -> list[int]:
        """The values an alarm register matches: all of them for don't-care, else the one it encodes."""
        if reg >= 0xC0:
            return list(range(count))
        matches = [v for v in range(count) if (self._encode_hour(v) if hour else self._encode(v)) == reg]
        return matches

    def write_register(self, index: int, value: int) -> None:
        index &= 0x7F
        value &= 0xFF
        if index in (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY):
            self._set_time_field(index, value)
        elif index == REG_A:
            self.ram[REG_A] = value & 0x7F  # UIP is read-only
        elif index == REG_B:
            was_set = bool(self.ram[REG_B] & REG_B_SET)
            if value & REG_B_SET and not was_set:
                self._frozen = self.now()
            self.ram[REG_B] = value
            if value & REG_B_SET:
                self.ram[REG_B] &= ~REG_B_UIE  # the datasheet: setting SET clears UIE
            if was_set and not value & REG_B_SET and self._frozen is not None:
                self.offset = self._frozen - self.clock()
                self._frozen = None
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            self.ram[index] = value

    def _set_time_field(self, index: int, value: int) -> None:
        t = time.gmtime(int(self.now()))
        frac = self.now() % 1.0
        fields = {"sec": t.tm_sec, "min": t.tm_min, "hour": t.tm_hour, "mday": t.tm_mday, "mon": t.tm_mon,
                  "year": t.tm_year}
        if index == SECONDS:
            fields["sec"] = self._decode(value) % 60
        elif index == MINUTES:
            fields["min"] = self._decode(value) % 60
        elif index == HOURS:
            fields["hour"] = self._decode_hour(value)
        elif index == DAY_OF_MONTH:
            fields["mday"] = min(max(self._decode(value), 1), 31)
        elif index == MONTH:
            fields["mon"] = min(max(self._decode(value), 1), 12)
        elif index == YEAR:
            fields["year"] = (t.tm_year // 100) * 100 + self._decode(value) % 100
        elif index == CENTURY:
            fields["year"] = (self._decode(value) % 100) * 100 + t.tm_year % 100
        else:  # day of week: derived from the date here
            return
        try:
            new = calendar.timegm((fields["year"], fields["mon"], fields["mday"], fields["hour"], fields["min"], fields["sec"], 0, 0, 0))
        except (OverflowError, ValueError):
            return
        new_time = new + frac
        if self._frozen is not None:
            self._frozen = new_time
        else:
            self.offset = new_time - self.clock()
