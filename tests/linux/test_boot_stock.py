"""Debian's stock 6.1 kernel on kvmkit, end to end, in one boot (minutes on a nested-PVM host).

`kvmkit run --kernel <stock bzImage> --initrd <busybox initramfs> --cpus 4`
runs on a pseudo terminal, as a user would run it. The test types into the
busybox shell and checks, in order:

1. the banner "Linux version 6.1" on COM1 (earlyprintk);
2. the kernel's own 8250 driver finding kvmkit's UART as a 16550A on
   0x3f8 / IRQ 4, and never "too much work for irq";
3. /init's marker, an interactive shell prompt, commands typed into it
   (`uname -r`, `cat /proc/interrupts`, `echo` through the interrupt-driven
   TTY path), and `poweroff -f` ending kvmkit with status 0;
4. the mail's complaint, measured on Linux's own console: kvmkit's
   statistics (Ctrl-A s, typed at the prompt) show at most 64 host write()
   calls per KiB of boot log, which Linux's printk console writes one
   character at a time;
5. Linux's own view of IRQ 4 (/proc/irq/4/spurious) after the boot and
   after 1 MiB written through the tty (the 8250 driver's interrupt-driven
   path): under 1 % of the interrupts unhandled;
6. all four CPUs online (`nproc`, /proc/cpuinfo), each taking its own local
   timer interrupts, and a workload pinned to each CPU with taskset running
   on all four at once, the CPUs signalling each other (rescheduling and
   function-call IPIs) on the way. (tests/linux/test_run_command.py boots
   two vCPUs.)

Each milestone's host time is printed (seconds since kvmkit was started,
so kvmkit's own start-up and the kernel's decompression are included) and
kept in the test report: `pytest -s tests/linux` shows them.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

import pytest
from _boot import finish_kvmkit, start_kvmkit

from kvmkit.boot.initramfs import INIT_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

# Seconds from start to the shell prompt on this project's nested-PVM machines. The first
# measurement gave 151 s; on 2026-11-30 the same machines ran the code of that morning to its prompt
# at 194-232 s, and in the afternoon that code at 240 s and this one (keyboard, early console and
# panic=-1 by default) at 234 s, one after the other: they vary by a fifth within a day.
SHELL_PROMPT_LIMIT = 300.0
CPUS = 4


def per_cpu(interrupts: str, name: str) -> list[int]:
    """One /proc/interrupts row (LOC, RES, CAL...) as its per-CPU counts."""
    m = re.search(rf"^\s*{name}:((?:\s+\d+)+)", interrupts, re.M)
    assert m, f"no {name} row in:\n{interrupts}"
    return [int(x) for x in m.group(1).split()]


def pinned_loops(cpus: int) -> str:
    """A busy loop pinned to each CPU, all at once; each ends by printing the CPU a process it
    starts runs on (field 39 of /proc/self/stat)."""
    loops = " ".join(f"(busybox taskset -c {c} busybox sh -c 'i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; "
                     f"echo loop{c}-$i-on-cpu$(busybox awk \"{{print \\$39}}\" /proc/self/stat)') &" for c in range(cpus))
    return f"{loops} wait"


def test_stock_kernel_to_busybox_shell_and_poweroff(stock_bzimage: Path, busybox_initrd: Path,
                                                      record_property: Callable[[str, object], None]) -> None:
    proc, master, ms = start_kvmkit(stock_bzimage, busybox_initrd, "--cpus", str(CPUS))
    try:
        ms.wait("banner", "Linux version 6.1", 120)
        ms.wait("console enabled", "console [ttyS0] enabled", 300)
        ms.wait("8250 driver", "ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A", 300)
        ms.wait("init", "Run /init as init process", 200)
        ms.wait("init output", INIT_MARKER, 60)
        t_prompt = ms.wait("shell prompt", re.compile(rb"\n[^\n]*[#$] "), 60)  # ash may follow it with ESC[6n

        os.write(master, b"\x01s")  # Ctrl-A s: kvmkit's statistics, so far the boot's console output only
        boot_stats = ms.wait("stats", re.compile(rb"COM1: \d+ bytes out in \d+ host writes \(([\d.]+) writes per KiB\)"), 60)
        writes_per_kib = float(re.findall(r"COM1: \d+ bytes out in \d+ host writes \(([\d.]+) writes per KiB\)", ms.text)[-1])
        record_property("COM1 host writes per KiB (boot)", writes_per_kib)
        uname = ms.run("uname -r", 60, "uname -r")
        interrupts = ms.run("cat /proc/interrupts", 60, "/proc/interrupts")
        echo = ms.run("echo kvmkit-$((6 * 7))", 60, "echo")
        spurious_boot = ms.run("cat /proc/irq/4/spurious", 60, "spurious after boot")
        ms.run("head -c 1048576 /dev/zero | tr '\\0' x > /dev/ttyS0", 600, "1 MiB through ttyS0")
        spurious_mib = ms.run("cat /proc/irq/4/spurious; grep '^ *4:' /proc/interrupts", 60, "spurious after 1 MiB")
        online = ms.run("nproc; grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online", 60, "CPUs online")
        before = ms.run("cat /proc/interrupts", 60, "interrupts before the loops")
        loops = ms.run(pinned_loops(CPUS), 600, "a loop pinned to each CPU")
        after = ms.run("cat /proc/interrupts", 60, "interrupts after the loops")
        os.write(master, b"poweroff -f\r")
        status = proc.wait(120)
        ms.wait("poweroff", re.compile(rb"$"), 1)
    finally:
        stderr = finish_kvmkit(proc, master, ms, record_property)
        print(stderr, file=sys.stderr)

    text = ms.text
    print(f"COM1 host writes per KiB of boot console: {writes_per_kib}\n"
          f"/proc/irq/4/spurious after boot:\n{spurious_boot}\nafter 1 MiB:\n{spurious_mib}", file=sys.stderr)
    assert re.fullmatch(r"6\.1\.0-\d+-amd64", uname.strip()), uname
    # The UART's interrupts arrived (on whichever CPU the IO-APIC sends line 4 to).
    assert re.search(r"^\s*4:.*ttyS0", interrupts, re.M) and sum(per_cpu(interrupts, "4")) > 0, interrupts
    assert echo.strip() == "kvmkit-42", echo
    assert online.split() == [str(CPUS), str(CPUS), f"0-{CPUS - 1}"], online
    for c in range(CPUS):
        assert f"loop{c}-3000-on-cpu{c}" in loops, loops  # ran to the end, on CPU c
    loc_before, loc_after = per_cpu(before, "LOC"), per_cpu(after, "LOC")
    assert len(loc_after) == CPUS and all(b > a > 0 for a, b in zip(loc_before, loc_after)), (loc_before, loc_after)
    ipis = [sum(x) for x in zip(per_cpu(after, "RES"), per_cpu(after, "CAL"))]
    assert all(n > 0 for n in ipis), after                # every CPU was sent IPIs by another
    record_property("LOC per CPU after the loops", loc_after)
    assert status == 0, stderr
    assert "too much work for irq" not in text
    assert "Kernel panic" not in text
    assert t_prompt <= SHELL_PROMPT_LIMIT, f"shell prompt after {t_prompt:.0f} s"
    assert boot_stats and writes_per_kib <= 64, f"{writes_per_kib} host writes per KiB of boot console"
    count, unhandled = (int(re.search(rf"^{k} (\d+)", spurious_mib, re.M).group(1)) for k in ("count", "unhandled"))
    # All CPUs' columns: with several vCPUs the IO-APIC may send the line to any of them.
    irqs = sum(int(n) for n in re.search(r"^\s*4:((?:\s+\d+)+)", spurious_mib, re.M).group(1).split())
    record_property("IRQ 4 unhandled / interrupts after 1 MiB", f"{unhandled} / {irqs}")
    assert irqs > 1000, spurious_mib                     # the MiB went out interrupt-driven
    # count and unhandled are Linux's note_interrupt() window (reset every 100000 interrupts)
    assert unhandled < max(count, 1) / 100, spurious_mib
