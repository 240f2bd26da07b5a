#!/usr/bin/env python3
"""Guest timers side by side: LAPIC one-shot (TMICT), TSC deadline, and the PV clock event device.

The bundled guest's ``timer-bench <mode> N delta_us`` runs N program ->
expiry cycles of one timer (guest/timer.c). For each mode this script boots
two VMs, one with N cycles and one with 0, and takes the difference, so
boot, calibration and printing cancel out. Per cycle it reports:

* userspace exits: kvmkit's own exit accounting (every KVM_RUN return),
  difference of the two VMs, divided by N;
* in-kernel exits: KVM's binary stats (``exits``, and the ``mmio_exits``,
  ``halt_exits``, ``irq_injections`` and ``insn_emulation`` behind it), read
  at the guest's markers (port 0x510) around the loop;
* host CPU time of the whole kvmkit process (all threads: vCPU, the host
  loop that serves the PV device's timerfd and doorbell, and the host
  kernel's work for them), also between the markers, and of the vCPU and
  host-loop threads on their own;
* expiry lateness p50/p99, measured in the guest (TSC at wake-up minus the
  deadline), in 1 us buckets;
* for the PV modes: doorbells that reached the host loop, host timer
  arms, and re-arms for deadlines moved later with no exit.

Modes: tmict, tsc-deadline, pv (shared block + in-kernel doorbell), pv-reg
(one trapping DEADLINE write per program), pv-later (each cycle programs a
deadline, then moves it later: two programs, at most one doorbell), pv-gsi
(as pv-reg, delivered as an edge on IOAPIC pin 10 as the Linux module does).
Rounds alternate the modes so host noise falls on all of them.

    python3 benchmarks/timer.py [--cycles N] [--delta-us D] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import kvmkit  # noqa: E402

MODES = ["tmict", "tsc-deadline", "pv", "pv-reg", "pv-later", "pv-gsi"]
MODE_INDEX = {m: i + 1 for i, m in enumerate(MODES)}  # guest/timer.c's enum
MARK_PORT = 0x510
KSTATS = ("exits", "mmio_exits", "io_exits", "halt_exits", "irq_injections", "insn_emulation", "halt_wakeup")
LINE_RE = re.compile(r"timer-bench: (\S+) cycles=(\d+) delta_ns=(\d+) late_p50_ns=(\d+) late_p99_ns=(\d+) "
                     r"tsc_per_cycle=(\d+) hlt_wakeups=(\d+)")
SYNC_RE = re.compile(r"pv clock sync: handshake \+-(\d+) ns, measured offset error (-?\d+) ns \(\+-(\d+) ns\)")
AFTER_RE = re.compile(r"pv clock after the runs: offset error (-?\d+) ns \(\+-(\d+) ns\)")


def _thread_cpu_ns(thread) -> int:
    """CPU time of one thread (user + system, ns), from /proc/self/task/<tid>/schedstat."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, AttributeError, ValueError, IndexError):
        return 0


class Marker:
    """Port 0x510: the guest writes 2*mode before its loop and 2*mode+1 after it."""

    def __init__(self, machine) -> None:
        self.machine = machine
        self.snaps: dict[int, dict] = {}

    def snapshot(self) -> dict:
        m = self.machine
        ks = m.in_kernel_stats().get(0, {})
        snap = {"cpu_ns": time.process_time_ns(), "wall_ns": time.perf_counter_ns(),
                "mmio_user": sum(m.runners[0].stats.mmio.values())}
        snap.update({k: ks.get(k, 0) for k in KSTATS})
        snap["cpu_vcpu_ns"] = _thread_cpu_ns(m.runners[0].thread)
        snap["cpu_host_ns"] = _thread_cpu_ns(m.loop.thread)
        if m.pvclockevent is not None:
            vt = m.pvclockevent.hosts[0]
            snap.update(pv_doorbells=vt.bells, pv_arms=vt.model.arms, pv_fires=vt.model.fires,
                        pv_rearms_later=vt.model.rearms_later, pv_timer_wakeups=vt.expiries)
        return snap

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        # Runs on the vCPU thread inside the exit: the guest is stopped here.
        self.snaps[value & 0xFF] = self.snapshot()
        if value & 1 and self.machine.pvclockevent is not None:  # end of a loop: the host wake-up lateness of it
            lates = list(self.machine.pvclockevent.hosts[0].wake_late_ns)
            start = self.snaps.get((value & 0xFF) - 1, {}).get("pv_timer_wakeups", 0)
            self.host_wake_late = sorted(lates[start:]) if start <= len(lates) else []

    host_wake_late: list[int] = []


KVM_CAP_HALT_POLL = 182


def run_vm(mode: str, cycles: int, delta_us: int, halt_poll: bool) -> dict:
    script = f"timer-bench {mode} {cycles} {delta_us}"
    with kvmkit.VirtualMachine(script=script, mem="64M") as vm:
        if not halt_poll:
            # KVM spins up to halt_poll_ns (default 200 us) in a halted vCPU's
            # thread before it sleeps: CPU time that depends on the wake-up
            # source, not on the timer. Off by default, --halt-poll to keep it.
            vm.machine.vm.enable_cap(KVM_CAP_HALT_POLL, 0)
        marker = Marker(vm.machine)
        vm.machine.pio_bus.register(MARK_PORT, 1, marker, "timer-mark")
        try:
            status = vm.wait(600)
        except kvmkit.VmTimeout:
            raise SystemExit(f"timer: {script!r} did not finish in 600 s") from None
    # The console's last bytes are flushed when the machine shuts down.
    out = vm.console.text
    if status != 0:
        raise SystemExit(f"timer: {script!r} ended with status {status} ({vm.stop_message}):\n{out[-2000:]}")
    text = out
    stats = vm.machine.exit_stats()[0]
    res = {"mode": mode, "cycles": cycles, "status": status, "user_exits": stats.total_exits,
           "user_exits_by_reason": stats.as_dict()["exits"], "console": out}
    if "not available here" in text:
        res["unavailable"] = True
        return res
    m = LINE_RE.search(out)
    if not m:
        raise SystemExit(f"timer: no result line from {script!r}:\n{out[-2000:]}")
    res.update(late_p50_ns=int(m.group(4)), late_p99_ns=int(m.group(5)), guest_tsc_per_cycle=int(m.group(6)),
               hlt_wakeups=int(m.group(7)))
    idx = MODE_INDEX[mode]
    a, b = marker.snaps.get(2 * idx), marker.snaps.get(2 * idx + 1)
    if a and b:
        res["loop"] = {k: b[k] - a[k] for k in a}
    lates = marker.host_wake_late
    if lates:
        res["host_wake_late_p50_ns"] = lates[len(lates) // 2]
        res["host_wake_late_p99_ns"] = lates[min(len(lates) - 1, (len(lates) * 99) // 100)]
    s = SYNC_RE.search(out)
    if s:
        res["sync"] = {"handshake_bound_ns": int(s.group(1)), "offset_error_ns": int(s.group(2)),
                       "read_bound_ns": int(s.group(3))}
    s = AFTER_RE.search(out)
    if s:
        res["sync_after"] = {"offset_error_ns": int(s.group(1)), "read_bound_ns": int(s.group(2))}
    return res


def per_cycle(full: dict, empty: dict, n: int) -> dict:
    loop = full.get("loop", {})
    out = {
        "user_exits": (full["user_exits"] - empty["user_exits"]) / n,
        "user_exits_in_loop_mmio": loop.get("mmio_user", 0) / n,
        "kernel_exits": loop.get("exits", 0) / n,
        "mmio_exits": loop.get("mmio_exits", 0) / n,
        "halt_exits": loop.get("halt_exits", 0) / n,
        "irq_injections": loop.get("irq_injections", 0) / n,
        "insn_emulation": loop.get("insn_emulation", 0) / n,
        "host_cpu_us": loop.get("cpu_ns", 0) / n / 1000,
        "cpu_vcpu_us": loop.get("cpu_vcpu_ns", 0) / n / 1000,
        "cpu_host_us": loop.get("cpu_host_ns", 0) / n / 1000,
        "wall_us": loop.get("wall_ns", 0) / n / 1000,
        "late_p50_us": full["late_p50_ns"] / 1000,
        "late_p99_us": full["late_p99_ns"] / 1000,
    }
    if "pv_fires" in loop and full["mode"].startswith("pv"):
        out.update(host_wake_p50_us=full.get("host_wake_late_p50_ns", 0) / 1000,
                   host_wake_p99_us=full.get("host_wake_late_p99_ns", 0) / 1000,
                   doorbells=loop["pv_doorbells"] / n, host_arms=loop["pv_arms"] / n,
                   rearms_later=loop["pv_rearms_later"] / n, fires=loop["pv_fires"] / n)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--delta-us", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--halt-poll", action="store_true", help="leave KVM's halt polling on (it burns CPU while halted)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    raw: dict[str, list[dict]] = {m: [] for m in modes}
    unavailable: set[str] = set()
    for _ in range(args.rounds):
        for mode in modes:
            if mode in unavailable:
                continue
            empty = run_vm(mode, 0, args.delta_us, args.halt_poll)
            full = run_vm(mode, args.cycles, args.delta_us, args.halt_poll)
            if full.get("unavailable"):
                unavailable.add(mode)
                continue
            rounds[mode].append(per_cycle(full, empty, args.cycles))
            full.pop("console", None)
            raw[mode].append(full)
    summary = {}
    for mode in modes:
        if not rounds[mode]:
            continue
        keys = rounds[mode][0].keys()
        summary[mode] = {k: statistics.median(r[k] for r in rounds[mode]) for k in keys}
    base = summary.get("tmict", {}).get("host_cpu_us")
    for mode, s in summary.items():
        if base:
            s["host_cpu_vs_tmict"] = s["host_cpu_us"] / base
    sync = [r.get("sync") for m in modes for r in raw[m] if r.get("sync")]
    after = [r.get("sync_after") for m in modes for r in raw[m] if r.get("sync_after")]
    result = {"cycles": args.cycles, "delta_us": args.delta_us, "rounds": args.rounds, "halt_poll": args.halt_poll,
              "threads": threading.active_count(), "per_cycle_median": summary,
              "unavailable": sorted(unavailable), "clock_sync": sync, "clock_after": after, "raw": raw}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    cols = ["user_exits", "kernel_exits", "mmio_exits", "halt_exits", "insn_emulation", "host_cpu_us",
            "host_cpu_vs_tmict", "cpu_vcpu_us", "cpu_host_us", "late_p50_us", "late_p99_us", "doorbells", "rearms_later",
            "host_wake_p50_us", "host_wake_p99_us"]
    print(f"per cycle, median of {args.rounds} rounds; {args.cycles} cycles of {args.delta_us} us; "
          f"KVM halt polling {'on' if args.halt_poll else 'off'}")
    print(f"{'mode':13}" + "".join(f"{c:>{max(9, len(c) + 1)}}" for c in cols))
    for mode, s in summary.items():
        print(f"{mode:13}" + "".join(f"{s[c]:{max(9, len(c) + 1)}.2f}" if c in s else f"{'-':>{max(9, len(c) + 1)}}"
                                     for c in cols))
    for mode in sorted(unavailable):
        print(f"{mode:13} not available on this host")
    if sync:
        errs = [abs(x["offset_error_ns"]) for x in sync]
        print(f"pv clock offset: handshake bound median {statistics.median(x['handshake_bound_ns'] for x in sync):.0f} ns, "
              f"measured |error| median {statistics.median(errs):.0f} ns, max {max(errs)} ns")
    if after:
        errs = [abs(x["offset_error_ns"]) for x in after]
        print(f"pv clock offset after the loops: |error| median {statistics.median(errs):.0f} ns, max {max(errs)} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
