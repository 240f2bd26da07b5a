"""The PV clock event module (guest/linux/pvce.ko) in Debian's stock kernel on kvmkit.

The stock kernel as tests/linux/test_boot_stock.py boots it (same command
line, kvmkit's automatic host quirks), restored from the session's one boot
at its shell (tests/linux/conftest.py: its initramfs carries /pvce.ko and
/timer_check, tests/linux/timer_check.c built static on the host), so this
test costs seconds of boot rather than minutes. At the shell the test:

1. reads the clock source, each CPU's clock event device and the timer
   interrupt counts; loads the module with `insmod /pvce.ko`; shows
   `dmesg | tail`;
2. checks that each CPU's clock event device is now its own PV device
   (pvce0, pvce1, ...: the snapshot has two vCPUs) and no longer the local
   APIC;
3. measures `sleep 1` pinned to each CPU and `usleep 200000` with
   /proc/uptime, and runs timer_check on each CPU: 20 one-shot POSIX timers
   (timer_create(CLOCK_MONOTONIC) + timer_settime), 20 periods of a
   periodic one, 20 nanosleep() calls, all of 50 ms, each measured with
   clock_gettime;
4. checks that each pvceN line in /proc/interrupts counts on CPU N and on
   no other, and rose; and reboots.

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
from typing import Callable

import pytest
from _boot import LinuxSnapshot, finish_kvmkit, start_kvmkit_argv


pytestmark = [pytest.mark.slow, pytest.mark.kvm]

PERIOD_MS = 50
COUNT = 20
CLOCKEVENTS = "/sys/devices/system/clockevents/clockevent[0-9]*/current_device"


def irq_rows(interrupts: str) -> dict[str, list[int]]:
    """/proc/interrupts as its per-CPU counts, keyed by IRQ number or name (LOC, ...); a pvce line
    also under its device's name (pvce0, ...)."""
    out = {}
    for line in interrupts.splitlines():
        m = re.match(r"\s*(\w+):((?:\s+\d+)+)(.*)", line)
        if m:
            out[m.group(1)] = [int(x) for x in m.group(2).split()]
            if re.search(r"\bpvce\d+\s*$", m.group(3)):
                out[m.group(3).split()[-1]] = out[m.group(1)]
    return out


def pvce_rows(rows: dict[str, list[int]]) -> dict[str, list[int]]:
    return {k: v for k, v in rows.items() if k.startswith("pvce")}


def uptime_delta(ms, command: str, cpu: int | None = None) -> tuple[float, float]:
    """(guest seconds from /proc/uptime, host seconds) around ``command``, in a shell pinned to ``cpu``
    if given (so the measure leaves out the execs of taskset and the shell)."""
    t = time.monotonic()
    line = f"read a x < /proc/uptime; {command}; read b x < /proc/uptime; echo up $a $b"
    if cpu is not None:
        line = f"busybox taskset -c {cpu} busybox sh -c '{line}'"
    out = ms.run(line, 120, command if cpu is None else f"{command} on CPU {cpu}")
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
    cpus = linux_snapshot.cpus
    try:
        ms.run("kill %1", 60, "stop the counter")   # the fixture's background job: a timer test wants a quiet guest
        report["clocksource"] = ms.run("cat /sys/devices/system/clocksource/clocksource0/current_clocksource").strip()
        report["clockevents before"] = ms.run(f"cat {CLOCKEVENTS}").split()
        before = irq_rows(ms.run("cat /proc/interrupts"))
        report["insmod"] = ms.run("insmod /pvce.ko; echo insmod=$?", 120).strip()
        report["dmesg"] = ms.run("dmesg | tail -n 8")
        report["clockevents after"] = ms.run(f"cat {CLOCKEVENTS}").split()
        loaded = irq_rows(ms.run("cat /proc/interrupts"))
        loaded_cols = pvce_rows(loaded)
        # Each CPU sleeps on its own device: pinned there, only that CPU's pvce can wake it.
        sleeps = [uptime_delta(ms, "sleep 1", c) for c in range(cpus)]
        usleep = uptime_delta(ms, "usleep 200000")
        tcs = [ms.run(f"busybox taskset -c {c} /timer_check {COUNT} {PERIOD_MS}; echo rc=$?", 300, f"timer_check on CPU {c}")
               for c in range(cpus)]
        after = irq_rows(ms.run("cat /proc/interrupts"))
        after_cols = pvce_rows(after)
        report["list"] = ms.run(f"cat {CLOCKEVENTS} /sys/devices/system/clockevents/broadcast/current_device 2>&1")
        # End with a reboot (test_boot_stock ends with poweroff -f): Linux
        # resets through the i8042, and kvmkit stops with status 0.
        os.write(master, b"reboot -f\r")
        status = proc.wait(120)
    finally:
        stderr = finish_kvmkit(proc, master, ms, record_property)
        for k, v in report.items():
            print(f"guest {k}: {v}", file=sys.stderr)
        print(stderr, file=sys.stderr)

    names = [f"pvce{c}" for c in range(cpus)]
    summary = {
        "sleep 1 per CPU (guest s, host s)": "; ".join(f"{g:.2f}, {h:.1f}" for g, h in sleeps),
        "usleep 200000 (guest s, host s)": f"{usleep[0]:.2f}, {usleep[1]:.1f}",
        "LOC before/loaded/after": "/".join(str(sum(r.get("LOC", []))) for r in (before, loaded, after)),
        "pvce per CPU loaded/after": f"{loaded_cols}/{after_cols}",
        "timer_check": [tc.strip() for tc in tcs],
    }
    for k, v in summary.items():
        print(f"guest {k}: {v}", file=sys.stderr)
        record_property(k, v)

    text = ms.text
    assert status == 0, stderr
    assert "guest requested a reset (i8042)" in stderr, stderr
    assert "Kernel panic" not in text and "BUG:" not in text
    assert "insmod=0" in str(report["insmod"]), report
    assert "pvce: version 1." in str(report["dmesg"]), report["dmesg"]
    assert "forwarded" not in text, "a pvce interrupt reached the wrong CPU"
    assert len(report["clockevents before"]) == cpus, report  # type: ignore[arg-type]
    assert all(str(d).startswith("lapic") for d in report["clockevents before"]), report  # type: ignore[union-attr]
    assert report["clockevents after"] == names, report
    # Each CPU's device interrupts that CPU and no other, and keeps doing so.
    assert sorted(after_cols) == names, after_cols
    for c, name in enumerate(names):
        assert [n for i, n in enumerate(after_cols[name]) if i != c] == [0] * (cpus - 1), after_cols
        assert after_cols[name][c] > loaded_cols.get(name, [0] * cpus)[c] > 0, (loaded_cols, after_cols)

    for g, _ in sleeps:
        assert 0.9 <= g <= 1.3, sleeps
    assert 0.15 <= usleep[0] <= 0.4, usleep
    for tc in tcs:
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
