"""The PV clock event module (guest/linux/pvce.ko) in Debian's stock kernel on kvmkit.

The stock kernel as tests/linux/test_boot_stock.py boots it (same command
line, kvmkit's automatic host quirks), restored from the session's one boot
at its shell (tests/linux/conftest.py: its initramfs carries /pvce.ko and
/timer_check, tests/linux/timer_check.c built static on the host), so this
test costs seconds of boot rather than minutes. At the shell the test:

1. reads the clock source, clockevent0's current device and the timer
   interrupt counts; loads the module with `insmod /pvce.ko`; shows
   `dmesg | tail`;
2. checks that clockevent0's current device is now the PV device ("pvce0")
   and no longer the local APIC;
3. measures `sleep 1` and `usleep 200000` with /proc/uptime, and runs
   timer_check: 20 one-shot POSIX timers (timer_create(CLOCK_MONOTONIC) +
   timer_settime), 20 periods of a periodic one, 20 nanosleep() calls, all
   of 50 ms, each measured with clock_gettime;
4. checks that the pvce IRQ count in /proc/interrupts rose, and powers off.

All timings are on the guest's own clock (what the guest's users see). A
correct timer gives each interval >= its period; the bound above is wide for
this nested host (20% or 10 ms on the median), but a timer that never fires,
fires at once or runs 10x off fails. What the guest reported is printed
(`pytest -s`) and kept as report properties.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from _boot import LinuxSnapshot, finish_kvmkit, start_kvmkit_argv


pytestmark = [pytest.mark.slow, pytest.mark.kvm]

PERIOD_MS = 50
COUNT = 20
CLOCKEVENT = "/sys/devices/system/clockevents/clockevent0/current_device"


def irq_counts(interrupts: str) -> dict[str, int]:
    """Per-line total counts of /proc/interrupts, keyed by IRQ number or name (LOC, ...)."""
    out = {}
    for line in interrupts.splitlines():
        m = re.match(r"\s*(\w+):((?:\s+\d+)+)(.*)", line)
        if m:
            out[m.group(1)] = sum(int(x) for x in m.group(2).split())
            if "pvce" in m.group(3):
                out[m.group(3).split()[-1]] = out[m.group(1)]
    return out


def uptime_delta(ms, command: str) -> tuple[float, float]:
    """(guest seconds from /proc/uptime, host seconds) around ``command``."""
    t = time.monotonic()
    out = ms.run(f"read a x < /proc/uptime; {command}; read b x < /proc/uptime; echo up $a $b", 120, command)
    host = time.monotonic() - t
    m = re.search(r"up (\d+\.\d+) (\d+\.\d+)", out)
    assert m, out
    return float(m.group(2)) - float(m.group(1)), host


def intervals(out: str, kind: str) -> list[float]:
    m = re.search(rf"{kind}_us:((?: \d+)+)", out)
    assert m, f"no {kind} line in:\n{out}"
    return [int(x) / 1000 for x in m.group(1).split()]


def test_pvce_module_takes_over_the_tick(linux_snapshot: LinuxSnapshot,
                                         record_property: Callable[[str, object], None]) -> None:
    proc, master, ms = start_kvmkit_argv(["--restore", str(linux_snapshot.path), "--stats"], linux_snapshot.env)
    report: dict[str, object] = {}
    try:
        ms.run("kill %1", 60, "stop the counter")   # the fixture's background job: a timer test wants a quiet guest
        report["clocksource"] = ms.run("cat /sys/devices/system/clocksource/clocksource0/current_clocksource").strip()
        report["clockevent before"] = ms.run(f"cat {CLOCKEVENT}").strip()
        before = irq_counts(ms.run("cat /proc/interrupts"))
        report["insmod"] = ms.run("insmod /pvce.ko; echo insmod=$?", 120).strip()
        report["dmesg"] = ms.run("dmesg | tail -n 8")
        report["clockevent after"] = ms.run(f"cat {CLOCKEVENT}").strip()
        loaded = irq_counts(ms.run("cat /proc/interrupts"))
        sleep_1 = uptime_delta(ms, "sleep 1")
        usleep = uptime_delta(ms, "usleep 200000")
        tc = ms.run(f"/timer_check {COUNT} {PERIOD_MS}; echo rc=$?", 300, "timer_check")
        after = irq_counts(ms.run("cat /proc/interrupts"))
        report["list"] = ms.run("cat /sys/devices/system/clockevents/clockevent0/current_device "
                                "/sys/devices/system/clockevents/broadcast/current_device 2>&1")
        # End with a reboot (test_boot_stock ends with poweroff -f): Linux
        # resets through the i8042, and kvmkit stops with status 0.
        os.write(master, b"reboot -f\r")
        status = proc.wait(120)
    finally:
        stderr = finish_kvmkit(proc, master, ms, record_property)
        for k, v in report.items():
            print(f"guest {k}: {v}", file=sys.stderr)
        print(stderr, file=sys.stderr)

    pv_irq = next((k for k in loaded if k.startswith("pvce")), None)
    summary = {
        "sleep 1 (guest s, host s)": f"{sleep_1[0]:.2f}, {sleep_1[1]:.1f}",
        "usleep 200000 (guest s, host s)": f"{usleep[0]:.2f}, {usleep[1]:.1f}",
        "LOC before/loaded/after": f"{before.get('LOC')}/{loaded.get('LOC')}/{after.get('LOC')}",
        f"{pv_irq} loaded/after": f"{loaded.get(pv_irq)}/{after.get(pv_irq)}",
        "timer_check": tc.strip(),
    }
    for k, v in summary.items():
        print(f"guest {k}: {v}", file=sys.stderr)
        record_property(k, v)

    text = ms.text
    assert len(ms.segfaults) <= 1, ms.segfaults
    assert status == 0, stderr
    assert "guest requested a reset (i8042)" in stderr, stderr
    assert "Kernel panic" not in text and "BUG:" not in text
    assert "insmod=0" in str(report["insmod"]), report
    assert "pvce: version 1." in str(report["dmesg"]), report["dmesg"]
    assert str(report["clockevent before"]).startswith("lapic"), report
    assert report["clockevent after"] == "pvce0", report
    assert pv_irq == "pvce0" and after[pv_irq] > loaded[pv_irq] > 0, (loaded, after)

    assert 0.9 <= sleep_1[0] <= 1.3, sleep_1
    assert 0.15 <= usleep[0] <= 0.4, usleep
    assert "rc=0" in tc, tc
    for kind in ("oneshot", "periodic", "nanosleep"):
        got = intervals(tc, kind)
        assert len(got) == COUNT, (kind, got)
        med = statistics.median(got)
        assert PERIOD_MS * 0.98 <= med <= max(PERIOD_MS * 1.2, PERIOD_MS + 10), (kind, med, got)
        assert max(got) <= 4 * PERIOD_MS, (kind, got)
        if kind == "periodic":  # catch-up after a late expiry may shorten one period, not the sum
            assert COUNT * PERIOD_MS * 0.98 <= sum(got) <= COUNT * PERIOD_MS * 1.3, (kind, sum(got), got)
        else:  # a one-shot timer or a sleep never ends early
            assert min(got) >= PERIOD_MS * 0.98, (kind, got)
