#!/usr/bin/env python3
"""Crashed guest processes per boot: consecutive stock-kernel boots, each running an exec-heavy workload.

For each vCPU count (default 1 and 2), ``--boots`` cold boots of the stock
Debian kernel with the busybox initramfs (cached after its first download),
one after the other. In each, once the shell answers:

  execs     ``--execs`` runs of ``busybox true`` from a shell loop, split
            evenly over the CPUs with taskset (one loop per CPU, run at
            once); a run that ends on a signal (exit status 128 or more) is a
            crashed process
  pipeline  ``seq 1 5000 | sort -rn | head -n 1``, which must print 5000
  dmesg     the kernel's "segfault at" lines, whatever process they name

The figures: crashed processes per boot and per thousand execs, and the
boot-to-shell time per vCPU count (median). A guest process that crashes
because of the VMM (a register or segment base the VMM got wrong) shows up
here; docs/quirks.md tells the story of the one this was written to catch.

    python3 benchmarks/soak.py [--boots N] [--cpus 1,2] [--execs 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from kvmkit import VirtualMachine  # noqa: E402

CURSOR_QUERY = "\x1b[6n"  # busybox's line editor asks where the cursor is after each prompt
PROMPT = re.compile(rb"\n[^\n]*# ")


def exec_loop(execs: int, cpus: int, program: str = "busybox true") -> str:
    """One shell line: ``execs`` runs of ``program`` split over ``cpus`` CPUs, each loop reporting
    ``soak-cpuC runs crashed``; a run that ends on a signal (status >= 128) counts as crashed."""
    share = [execs // cpus + (1 if c < execs % cpus else 0) for c in range(cpus)]
    loops = []
    for c, n in enumerate(share):
        body = (f"n=0; bad=0; while [ $n -lt {n} ]; do {program}; [ $? -ge 128 ] && bad=$((bad+1)); "
                f"n=$((n+1)); done; echo soak-cpu{c} $n $bad")
        loops.append(f"(busybox taskset -c {c} busybox sh -c '{body}') & p=\"$p $!\";")
    # Wait for these loops only: a plain `wait` would also wait for any job the shell already had.
    return "p=; " + " ".join(loops) + " wait $p"


LOOP_RESULT = re.compile(r"^soak-cpu(\d+) (\d+) (\d+)\r?$", re.M)


def parse_loops(output: str) -> dict[int, tuple[int, int]]:
    """What :func:`exec_loop`'s loops reported: CPU -> (runs, crashed)."""
    return {int(c): (int(n), int(bad)) for c, n, bad in LOOP_RESULT.findall(output)}


class Shell:
    """The booted guest's shell on the API console: type a line, get what it printed."""

    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm
        self.n = 0

    def answer_query(self, timeout: float) -> None:
        self.vm.console.wait_for(CURSOR_QUERY, timeout)
        self.vm.console.send("\x1b[24;5R")

    def run(self, command: str, timeout: float) -> str:
        self.n += 1
        end = f"@@soak-end-{self.n}@@"
        self.vm.console.send(f"{command}; echo @@soak-end-$(({self.n}+0))@@\r")
        out = self.vm.console.wait_for(re.compile(re.escape(end).encode() + rb"\r?\n"), timeout)
        self.answer_query(60)
        return out.rsplit(end, 1)[0]


def one_boot(kernel: Path, initrd: Path, cpus: int, execs: int, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    vm = VirtualMachine(kernel=kernel, initrd=initrd, cpus=cpus)
    try:
        vm.start()
        vm.console.wait_for(PROMPT, timeout)
        boot_s = time.monotonic() - t0
        shell = Shell(vm)
        shell.answer_query(60)
        online = int(shell.run("busybox nproc", 120).strip().splitlines()[-1])
        t1 = time.monotonic()
        loops = parse_loops(shell.run(exec_loop(execs, cpus), 40 * execs))
        exec_s = time.monotonic() - t1
        pipeline = shell.run("busybox seq 1 5000 | busybox sort -rn | busybox head -n 1", 300).strip().splitlines()
        segv = [ln.strip() for ln in shell.run("busybox dmesg | busybox grep 'segfault at'", 120).splitlines()
                if "segfault at" in ln and "grep" not in ln]
    finally:
        vm.close()
    ran = sum(n for n, _ in loops.values())
    crashed = sum(bad for _, bad in loops.values()) + (0 if pipeline and pipeline[-1] == "5000" else 1)
    return {"cpus": cpus, "online": online, "boot_s": boot_s, "exec_s": exec_s, "execs": ran,
            "loops_reported": sorted(loops), "crashed": crashed, "pipeline": pipeline[-1:] if pipeline else [],
            "kernel_segfault_lines": segv}


def summarise(boots: list[dict[str, Any]]) -> dict[str, Any]:
    execs = sum(b["execs"] for b in boots)
    crashed = sum(b["crashed"] for b in boots)
    return {"boots": len(boots), "execs": execs, "crashed": crashed,
            "crashed_per_boot": crashed / len(boots), "crashed_per_kexec": 1000 * crashed / max(execs, 1),
            "kernel_segfault_lines": sum(len(b["kernel_segfault_lines"]) for b in boots),
            "failed_boots": sum(1 for b in boots if "error" in b),
            "boot_s_median": statistics.median([b["boot_s"] for b in boots if "error" not in b] or [float("nan")]),
            "exec_per_s_median": statistics.median([b["execs"] / b["exec_s"] for b in boots if b["exec_s"] > 0]
                                                   or [float("nan")]),
            "all_online": all(b["online"] == b["cpus"] for b in boots)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=20, help="boots per vCPU count")
    ap.add_argument("--cpus", default="1,2", help="vCPU counts, comma-separated")
    ap.add_argument("--execs", type=int, default=200,
                    help="busybox runs per boot (each costs about a second of emulated kernel on a nested-PVM host)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a boot may take to its shell")
    ap.add_argument("--json", type=Path, help="write every boot's figures here too")
    args = ap.parse_args()
    from kvmkit.boot.fetch import stock_kernel
    from kvmkit.boot.initramfs import busybox_initramfs
    counts = [int(c) for c in args.cpus.split(",") if c.strip()]
    kernel = stock_kernel()
    result: dict[str, Any] = {"boots": {str(n): [] for n in counts}, "summary": {}}
    with tempfile.TemporaryDirectory(prefix="kvmkit-soak-") as tmp:
        initrd = Path(tmp) / "initrd.img"
        initrd.write_bytes(busybox_initramfs())
        for i in range(args.boots):
            for n in counts:  # interleaved: each vCPU count sees the same host noise
                try:
                    b = one_boot(kernel, initrd, n, args.execs, args.timeout)
                except Exception as e:  # a boot that never reaches its shell is a figure too, not the end of the soak
                    b = {"cpus": n, "online": 0, "boot_s": float("nan"), "exec_s": 0.0, "execs": 0,
                         "loops_reported": [], "crashed": 0, "pipeline": [], "kernel_segfault_lines": [],
                         "error": f"{type(e).__name__}: {e}"}
                result["boots"][str(n)].append(b)
                print(f"boot {i + 1}/{args.boots}, {n} vCPU(s): shell at {b['boot_s']:.0f} s, {b['online']} online, "
                      f"{b['execs']} execs in {b['exec_s']:.0f} s, {b['crashed']} crashed {b.get('error', '')}",
                      file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(result, indent=2))
    for n in counts:
        result["summary"][str(n)] = summarise(result["boots"][str(n)])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=1))
    print(f"\n{'vCPUs':>5} {'boots':>5} {'execs':>7} {'crashed':>7} {'/boot':>6} {'/1000 execs':>11} "
          f"{'boot s (median)':>15} {'execs/s':>7} {'all online':>10} {'failed':>6}")
    for n, sm in result["summary"].items():
        print(f"{n:>5} {sm['boots']:5d} {sm['execs']:7d} {sm['crashed']:7d} {sm['crashed_per_boot']:6.2f} "
              f"{sm['crashed_per_kexec']:11.3f} {sm['boot_s_median']:15.1f} {sm['exec_per_s_median']:7.1f} "
              f"{str(sm['all_online']):>10} {sm['failed_boots']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
