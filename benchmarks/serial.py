#!/usr/bin/env python3
"""Serial throughput with an 8250-style guest driver: kvmkit's 16550A against a no-FIFO UART.

The bundled guest's ``serial-selftest 2 tx|rx N`` (guest/serial8250.c)
probes COM2 as Linux's 8250 driver does and moves N bytes of a xorshift32
stream through it, interrupt-driven, with Linux's per-interrupt logic
(16-byte loads per THRE on a 16550A, 1 on a 16450, 512-pass limit). The
host end is a socket pair read (tx) or written (rx) by this script. Each
case runs in its own VM, all in one run, side by side:

  fifo    kvmkit's 16550A (VmConfig.serial_fifo=True)
  nofifo  the same UART without FIFOs, what the old kvm tool emulated
          (serial_fifo=False; the driver then sees a 16450)

Figures per case: host-measured transfer time and throughput, COM2 port
exits per byte (kvmkit's exit accounting), in-kernel KVM exits per byte
(binary stats, read around the transfer), interrupts per KiB (the guest's
count and the IrqLine raise counter of GSI 3), host write() calls per KiB
(tx) or read() calls per KiB (rx), handler passes and pass-limit
overflows. Every transfer is checked byte for byte.

Interactive echo (``--echo N``, default 40 keys): a key typed into the
bundled guest's shell on COM1 and its echo read back, the round trip timed
on the host, with kvmkit's output batching as it is (bytes that answer
input are written at once) and with every byte written at once (hold 0),
the two VMs alternating key by key. The difference of the medians is the
latency the batching adds to typing (goal: under 10 ms).

    python3 benchmarks/serial.py [--bytes N] [--cases fifo,nofifo] [--dirs tx,rx] [--echo N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from kvmkit import VirtualMachine  # noqa: E402
from kvmkit.host.backends import NullBackend, SocketPairBackend  # noqa: E402
from kvmkit.selftest import SUMMARY, stream  # noqa: E402

COM2_PORTS = range(0x2F8, 0x300)


def kvm_exits(vm: VirtualMachine) -> int:
    return sum(s.get("exits", 0) for s in vm.machine.in_kernel_stats().values())


def run_case(fifo: bool, direction: str, n: int, data: bytes, timeout: float) -> dict:
    com2 = SocketPairBackend()
    got = bytearray()
    vm = VirtualMachine(script=f"serial-selftest 2 {direction} {n}; shell", serial_fifo=fifo,
                        extra_ports=[com2, NullBackend(), NullBackend()])
    with vm:
        port = vm.machine.serial_ports[1]
        line = vm.machine.irq_line(3)
        if direction == "tx":
            vm.console.wait_for(re.compile(r"COM2 at 0x2f8 irq 3: .*bugs:.*\n"), timeout=60)
        else:
            vm.console.wait_for(f"ready to receive {n} bytes", timeout=60)
        raises0, exits0, t0 = line.raises, kvm_exits(vm), time.perf_counter()
        if direction == "tx":
            def reader() -> None:
                while len(got) < n:
                    chunk = com2.peer.recv(65536)
                    if not chunk:
                        return
                    got.extend(chunk)
            worker = threading.Thread(target=reader, daemon=True)
        else:
            worker = threading.Thread(target=com2.peer.sendall, args=(data,), daemon=True)
        worker.start()
        vm.console.wait_for(re.compile(r"serial-selftest: COM2 \S+ (tx|rx) \d+ bytes in .*crc=0x[0-9a-f]{8}"), timeout=timeout)
        t1, raises1, exits1 = time.perf_counter(), line.raises, kvm_exits(vm)
        worker.join(10)
        m = list(SUMMARY.finditer(vm.console.text))[-1]
        vm.stop()
        exit_stats = vm.machine.exit_stats()
    com2_exits = sum(n_ for s in exit_stats for (p, _d), n_ in s.pio.items() if p in COM2_PORTS)
    kib = n / 1024
    c = port.counters
    ok = int(m["errors"]) == 0 and int(m["crc"], 16) == zlib.crc32(data)
    if direction == "tx":
        ok = ok and bytes(got) == data
    return {
        "uart": "16550A" if fifo else "no FIFO",
        "detected": m["type"],
        "direction": direction,
        "bytes": n,
        "seconds": round(t1 - t0, 3),
        "kib_per_s": round(kib / (t1 - t0), 2),
        "guest_tsc": int(m["tsc"]),
        "com2_exits_per_byte": round(com2_exits / n, 3),
        "kvm_exits_per_byte": round((exits1 - exits0) / n, 2),
        "guest_irqs_per_kib": round(int(m["irqs"]) / kib, 2),
        "irq_raises_per_kib": round((raises1 - raises0) / kib, 2),
        "handler_passes": int(m["passes"]),
        "unhandled_irqs": int(m["unhandled"]),
        "pass_limit_overflows": int(m["overflows"]),
        "host_writes_per_kib": round(c.host_writes / kib, 2),
        "host_reads_per_kib": round(c.host_reads / kib, 2),
        "input_pauses": c.input_pauses,
        "output_stalls": c.output_stalls,
        "lossless": ok,
    }


def echo_rtts(keys: int, timeout: float = 60) -> dict:
    """Round trips of single keys through COM1 and the guest's line editor, batching on and off."""
    vms = {"batched": VirtualMachine(), "immediate": VirtualMachine()}
    rtt: dict[str, list[float]] = {k: [] for k in vms}
    try:
        for name, vm in vms.items():
            vm.start()
            vm.console.wait_for("kvmkit> ", timeout=timeout)
            if name == "immediate":
                vm.machine.serial_ports[0].stream.hold = 0.0
        for i in range(keys):
            for name, vm in vms.items():
                key = "abcdefghij"[i % 10]
                t0 = time.perf_counter()
                vm.console.send(key)
                vm.console.wait_for(key, timeout=timeout)
                rtt[name].append(time.perf_counter() - t0)
                time.sleep(0.02)
        holds = {k: vm.machine.serial_ports[0].counters.hold_ns_max / 1e6 for k, vm in vms.items()}
    finally:
        for vm in vms.values():
            vm.stop()
            vm.close()
    med = {k: statistics.median(v) * 1000 for k, v in rtt.items()}
    p99 = {k: sorted(v)[max(0, int(len(v) * 0.99) - 1)] * 1000 for k, v in rtt.items()}
    return {"keys": keys, "rtt_ms_median": {k: round(v, 2) for k, v in med.items()},
            "rtt_ms_p99": {k: round(v, 2) for k, v in p99.items()},
            "added_latency_ms": round(med["batched"] - med["immediate"], 2),
            "longest_hold_ms": {k: round(v, 2) for k, v in holds.items()}}


COLUMNS = [("uart", "uart", 8), ("detected", "probe", 7), ("direction", "dir", 3), ("kib_per_s", "KiB/s", 7),
           ("com2_exits_per_byte", "exits/B", 7), ("kvm_exits_per_byte", "kvm/B", 6),
           ("guest_irqs_per_kib", "irq/KiB", 7), ("irq_raises_per_kib", "raise/KiB", 9),
           ("host_writes_per_kib", "wr/KiB", 7), ("host_reads_per_kib", "rd/KiB", 7),
           ("pass_limit_overflows", "ovfl", 4), ("lossless", "ok", 5)]


def table(rows: list[dict]) -> str:
    head = "  ".join(f"{title:>{w}}" for _k, title, w in COLUMNS)
    lines = [head]
    for r in rows:
        lines.append("  ".join(f"{str(r[k]):>{w}}" for k, _t, w in COLUMNS))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=64 * 1024, help="bytes per transfer (default 65536)")
    ap.add_argument("--cases", default="fifo,nofifo", help="fifo, nofifo or both (default both)")
    ap.add_argument("--dirs", default="tx,rx", help="tx (guest->host), rx (host->guest) or both")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per transfer")
    ap.add_argument("--echo", type=int, default=40, help="keys for the interactive echo figure (0: skip)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    n = args.bytes
    data = stream(n)
    rows = []
    for direction in args.dirs.split(","):
        for case in args.cases.split(","):
            rows.append(run_case(case == "fifo", direction, n, data, args.timeout))
    ratios = {}
    for direction in args.dirs.split(","):
        by = {r["uart"]: r for r in rows if r["direction"] == direction}
        if "16550A" in by and "no FIFO" in by:
            ratios[f"{direction}_throughput_fifo_over_nofifo"] = round(by["16550A"]["kib_per_s"] / by["no FIFO"]["kib_per_s"], 2)
    result = {"bytes": n, "cases": rows, "ratios": ratios}
    if args.echo:
        result["echo"] = echo_rtts(args.echo)
    print(json.dumps(result))
    print(table(rows))
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    if args.echo:
        e = result["echo"]
        print(f"echo round trip, median (p99) of {e['keys']} keys: batched {e['rtt_ms_median']['batched']} ms "
              f"({e['rtt_ms_p99']['batched']}), immediate {e['rtt_ms_median']['immediate']} ms "
              f"({e['rtt_ms_p99']['immediate']}); added by batching: {e['added_latency_ms']} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(r["lossless"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
