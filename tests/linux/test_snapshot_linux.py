"""The stock Debian kernel snapshotted at its shell and restored, through the command line.

The session fixture (tests/linux/conftest.py) boots it with `kvmkit run
--name`; the guest writes a file to its RAM root and starts a shell loop
that counts; `kvmkit snapshot NAME -o DIR` saves it and the VM is killed.
`kvmkit run --restore DIR` then continues it: the file is
there, the counter goes on from where it was (not from zero, not from a
reboot), and a `uname -r` typed at once is answered soon after kvmkit's
start (three restores, all printed beside the cold boot; the best must be
under 2 s, the old figure's level; benchmarks/snapshot.py --linux takes the
median against the 1 s goal).

A second test restores two fresh copies of that one boot through the API:
each is its own.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from kvmkit.api import VirtualMachine

from _boot import REPO, LinuxSnapshot, finish_kvmkit, start_kvmkit_argv

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

RELEASE = re.compile(rb"\n(6\.1\.0-\d+-amd64)\r?\n")


def restore_to_uname(snap: Path, env: dict[str, str]) -> float:
    """Seconds from starting `kvmkit run --restore SNAP` (Python start-up included) to the answer of a
    `uname -r` typed at once, as a user at a terminal sees it (the reader answers cursor queries)."""
    proc, master, ms = start_kvmkit_argv(["--restore", str(snap)], env)
    try:
        os.write(master, b"uname -r\r")
        return ms.wait("uname -r", RELEASE, 60)
    finally:
        finish_kvmkit(proc, master, ms, lambda name, value: None)


def test_restore_with_the_cli_goes_on_from_the_snapshot(linux_snapshot: LinuxSnapshot,
                                                        record_property: Callable[[str, object], None]) -> None:
    snap, env, before = linux_snapshot.path, linux_snapshot.env, linux_snapshot.count
    t_prompt, t_snapshot = linux_snapshot.boot_to_prompt_s, linux_snapshot.snapshot_s
    # kvmkit's bytecode compiled, as an installed package has it: with
    # PYTHONDONTWRITEBYTECODE (set on these machines) each start would
    # compile it again, about 0.15 s here.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src" / "kvmkit")], check=False)
    t_unames = [restore_to_uname(snap, env) for _ in range(2)]
    proc, master, ms = start_kvmkit_argv(["--restore", str(snap), "--stats"], env)
    try:
        os.write(master, b"uname -r\r")
        ms.wait("uname -r", RELEASE, 60)
        t_unames.append(ms.times["uname -r"])
        uname = RELEASE.search(ms.buf).group(1).decode()
        kept = ms.run("cat /tmp/snapfile", 60, "file")
        # Every vCPU came back: all online, and a process pinned to the last one runs there.
        last = linux_snapshot.cpus - 1
        online = ms.run("cat /sys/devices/system/cpu/online", 60, "online CPUs").strip()
        stat = ms.run(f"busybox taskset -c {last} busybox cat /proc/self/stat", 60, "a run on the last CPU")
        c1 = int(ms.run("cat /tmp/count", 60, "count 1"))
        # The nested-PVM profile slows the guest's clock tenfold (tsc_early_khz):
        # its `sleep 1` is about 10 s here, so poll for the next count.
        c2, deadline = c1, time.monotonic() + 90
        while c2 <= c1 and time.monotonic() < deadline:
            time.sleep(2)
            c2 = int(ms.run("cat /tmp/count", 60, f"count at {time.monotonic():.0f}"))
        os.write(master, b"poweroff -f\r")
        status = proc.wait(120)
    finally:
        stderr = finish_kvmkit(proc, master, ms, record_property)
        print(stderr, file=sys.stderr)
    t_uname = statistics.median(t_unames)
    print(f"cold boot to the prompt {t_prompt:.1f} s; snapshot {t_snapshot:.2f} s; restore to an answered "
          f"uname -r {', '.join(f'{t:.2f}' for t in t_unames)} s (median {t_uname:.2f} s, "
          f"{t_prompt / t_uname:.0f}x faster than the boot)", file=sys.stderr)
    record_property("restore to uname -r (s)", [round(t, 2) for t in t_unames])
    assert re.fullmatch(r"6\.1\.0-\d+-amd64", uname), uname
    assert kept.strip() == "kept-in-ram"
    assert online == (f"0-{last}" if last else "0"), online
    assert int(stat.rsplit(")", 1)[-1].split()[36]) == last, stat  # field 39: the CPU it last ran on
    assert before <= c1 <= before + 30, (before, c1)   # from where it was: not zero, not a reboot
    assert c2 > c1, (c1, c2)                           # and it goes on counting
    assert status == 0, stderr
    # The goal is a booted Linux back and answering in under a second: met in
    # quiet runs here (0.59-0.86 s), not in every run (a clean-clone CI run
    # measured 1.04-1.20 s), so this guards against a regression to the 2.2 s
    # of before rather than asserting the goal; benchmarks/snapshot.py --linux
    # reports the median.
    assert min(t_unames) < 2.0, f"restore to an answered uname -r took {t_unames} s"


def test_fresh_copies_of_one_booted_guest_are_independent(linux_vm: Callable[[], VirtualMachine]) -> None:
    a = linux_vm()
    b = linux_vm()
    a.console.send("echo only-in-a > /tmp/mark; echo a-$((1 + 1))-done\n")
    a.console.wait_for("a-2-done", 60)
    b.console.send("cat /tmp/mark; echo b-$((1 + 1))-done\n")
    out_b = b.console.wait_for("b-2-done", 60)
    a.console.send("cat /tmp/mark; echo a-$((1 + 2))-done\n")
    out_a = a.console.wait_for("a-3-done", 60)
    assert "No such file" in out_b and "only-in-a" not in out_b.rsplit("cat /tmp/mark", 1)[-1], out_b
    assert "only-in-a" in out_a.rsplit("cat /tmp/mark", 1)[-1], out_a


def test_kvmkit_stop_asks_linux_through_its_keyboard(linux_snapshot: LinuxSnapshot,
                                                     record_property: Callable[[str, object], None]) -> None:
    """`kvmkit stop` presses Ctrl-Alt-Del: Linux's keyboard driver (atkbd on the i8042) restarts the
    machine, and kvmkit ends on that reset with status 0 before any forced stop."""
    env = linux_snapshot.env
    proc, master, ms = start_kvmkit_argv(["--restore", str(linux_snapshot.path), "--name", "stopme"], env)
    try:
        os.write(master, b"\r")
        assert ms.run("grep -c . /proc/bus/input/devices", 60, "input devices").strip() != "0"
        t0 = time.monotonic()
        stop = subprocess.run([sys.executable, "-m", "kvmkit", "stop", "stopme", "--timeout", "240"],
                              env=dict(env, PYTHONPATH=str(REPO / "src")), capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t0
        status = proc.wait(60)
    finally:
        stderr = finish_kvmkit(proc, master, ms, record_property)
    print(f"kvmkit stop through Ctrl-Alt-Del: {took:.1f} s", file=sys.stderr)
    record_property("stop through the guest (s)", round(took, 1))
    assert stop.returncode == 0, stop.stderr
    assert "stopme: the guest shut down (guest requested a reset (i8042))" in stop.stderr, stop.stderr
    assert status == 0 and "guest requested a reset (i8042)" in stderr, stderr
