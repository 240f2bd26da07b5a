#!/usr/bin/env python3
"""virtio-console against the 16550A, and virtio-blk sequential I/O, with the bundled guest, in one run.

Console, guest to host, the same bytes (the serial self-test's xorshift32
stream) through each device into a socket pair this script reads:

  16550A   ``serial-selftest 2 tx N``: COM2 with the guest's 8250-style
           driver (16-byte loads per THRE interrupt, as Linux's)
  virtio   ``virtio-console-test tx N``: virtio-console port 0, 32 KiB buffers

Figures: host-measured throughput, host write() calls per KiB, port or MMIO
exits per KiB reaching kvmkit, in-kernel KVM exits per KiB; every byte is
checked. The goal (issue "PCI and virtio"): virtio >= 10x the 16550A's
throughput and <= 4 host writes per KiB.

Disk: ``virtio-blk-bench write|read M`` (128 KiB requests, 32 in flight)
on a raw image file: MiB/s on the host clock, kicks, interrupts and exits
per MiB, and CPU time: the whole process, the disk's worker thread, the
host loop and the vCPU thread's time in kvmkit's exit handlers. "kvmkit's
share" is (worker + host loop + exit handlers) / process CPU: how much of
the transfer's host CPU is Python rather than the guest and the kernel's
I/O. The goal: <= 10 %.

    python3 benchmarks/virtio.py [--console-bytes N] [--disk-mib M] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from kvmkit import VirtualMachine  # noqa: E402
from kvmkit.host.backends import NullBackend, SocketPairBackend  # noqa: E402
from kvmkit.selftest import SUMMARY, stream  # noqa: E402

# Up to the end of the line: a summary read as it arrives must not match a prefix of its last word.
CONSOLE_DONE = re.compile(r"virtio-console-test: tx bytes=\d+ sent=(\d+) .*result=(\w+)\r?\n")
BENCH = re.compile(r"virtio-blk-bench: (read|write) bytes=(\d+) requests=(\d+) .*irqs=(\d+) kicks=(\d+) .*errors=(\d+).*result=(\w+)\r?\n")


def thread_cpu_ns(thread: threading.Thread | None) -> int:
    """CPU time of one thread (schedstat: on-CPU ns), 0 if unknown."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:  # type: ignore[union-attr]
            return int(f.read().split()[0])
    except (OSError, AttributeError, ValueError, IndexError):
        return 0


def kvm_exits(vm: VirtualMachine) -> int:
    return sum(s.get("exits", 0) for s in vm.machine.in_kernel_stats().values())


def user_exits(vm: VirtualMachine) -> int:
    return sum(sum(s.exits.values()) for s in vm.machine.exit_stats())


def _reader(sock, n: int, got: bytearray) -> None:
    while len(got) < n:
        chunk = sock.recv(65536)
        if not chunk:
            return
        got.extend(chunk)


def console_case(kind: str, n: int, timeout: float) -> dict:
    data = stream(n)
    sink = SocketPairBackend()
    got = bytearray()
    if kind == "16550A":
        vm = VirtualMachine(script=f"serial-selftest 2 tx {n}; shell", extra_ports=[sink, NullBackend(), NullBackend()])
        ready, done = re.compile(r"COM2 at 0x2f8 irq 3: .*bugs:.*\n"), re.compile(r"serial-selftest: COM2 \S+ tx \d+ bytes in .*crc=0x[0-9a-f]{8}")
    else:
        vm = VirtualMachine(script=f"virtio-console-test tx {n}; shell", virtio_console=sink)
        ready, done = re.compile(r"virtio-console-test: 00:\S+ 1af4:1043 .*\n"), CONSOLE_DONE
    with vm:
        vm.console.wait_for(ready, timeout=60)
        vm.machine.kick_all()
        time.sleep(0.05)
        u0, k0, t0 = user_exits(vm), kvm_exits(vm), time.perf_counter()
        worker = threading.Thread(target=_reader, args=(sink.peer, n, got), daemon=True)
        worker.start()
        vm.console.wait_for(done, timeout=timeout)
        worker.join(timeout)
        t1 = time.perf_counter()
        vm.machine.kick_all()
        time.sleep(0.05)
        u1, k1 = user_exits(vm), kvm_exits(vm)
        end = vm.machine.serial_ports[1] if kind == "16550A" else vm.machine.hvc
        counters = end.counters  # type: ignore[union-attr]
        ok = bytes(got) == data
        if kind == "16550A":
            m = list(SUMMARY.finditer(vm.console.text))[-1]
            ok = ok and int(m["crc"], 16) == zlib.crc32(data)
        vm.stop()
    kib = n / 1024
    return {"device": kind, "bytes": n, "seconds": round(t1 - t0, 3), "kib_per_s": round(kib / (t1 - t0), 1),
            "host_writes_per_kib": round(counters.host_writes / kib, 2),
            "user_exits_per_kib": round((u1 - u0) / kib, 2), "kvm_exits_per_kib": round((k1 - k0) / kib, 2),
            "lossless": ok}


def disk_case(op: str, mib: int, image: Path, timeout: float) -> dict:
    with VirtualMachine(script=f"virtio-blk-bench {op} {mib}; shell", disks=[str(image)], mem="512M") as vm:
        vm.console.wait_for("+ virtio-blk-bench", timeout=60)
        dev = vm.machine.virtio[0]
        threads = {"worker": dev.worker.thread if dev.worker else None, "loop": vm.machine.loop.thread}
        vm.machine.kick_all()
        time.sleep(0.05)

        def snap() -> dict:
            st = vm.machine.exit_stats()
            return {"proc": time.process_time_ns(), "wall": time.perf_counter_ns(),
                    "handler": sum(s.handler_ns for s in st), "user_exits": user_exits(vm), "kvm_exits": kvm_exits(vm),
                    **{k: thread_cpu_ns(t) for k, t in threads.items()}}
        a = snap()
        text = vm.console.wait_for(BENCH, timeout=timeout)
        vm.machine.kick_all()
        time.sleep(0.05)
        b = snap()
        m = BENCH.search(text)
        assert m is not None
        vm.stop()
    d = {k: b[k] - a[k] for k in a}
    ours = d["worker"] + d["loop"] + d["handler"]
    return {"op": op, "mib": mib, "mib_per_s": round(mib / (d["wall"] / 1e9), 2),
            "requests": int(m[3]), "irqs_per_mib": round(int(m[4]) / mib, 2), "kicks_per_mib": round(int(m[5]) / mib, 2),
            "user_exits_per_mib": round(d["user_exits"] / mib, 1), "kvm_exits_per_mib": round(d["kvm_exits"] / mib, 1),
            "process_cpu_ms_per_mib": round(d["proc"] / 1e6 / mib, 2), "worker_cpu_ms_per_mib": round(d["worker"] / 1e6 / mib, 2),
            "loop_cpu_ms_per_mib": round(d["loop"] / 1e6 / mib, 2), "handler_ms_per_mib": round(d["handler"] / 1e6 / mib, 2),
            "kvmkit_share": round(ours / d["proc"], 3) if d["proc"] else None,
            "ok": m[6] == "0" and m[7] == "ok"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--console-bytes", type=int, default=256 * 1024)
    ap.add_argument("--disk-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="rounds; cases alternate inside each")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    consoles: dict[str, list[dict]] = {"16550A": [], "virtio": []}
    disks: dict[str, list[dict]] = {"write": [], "read": []}
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "bench.raw"
        with open(image, "wb") as f:
            f.truncate((args.disk_mib + 16) << 20)
        for _ in range(args.rounds):
            for kind in consoles:
                consoles[kind].append(console_case(kind, args.console_bytes, args.timeout))
            for op in disks:
                disks[op].append(disk_case(op, args.disk_mib, image, args.timeout))
    med = {k: {f: statistics.median(r[f] for r in rows) if isinstance(rows[0][f], (int, float)) and not isinstance(rows[0][f], bool)
               else rows[0][f] for f in rows[0]} for k, rows in {**consoles, **disks}.items()}
    ratio = med["virtio"]["kib_per_s"] / med["16550A"]["kib_per_s"]
    result = {"console": consoles, "disk": disks, "median": med, "virtio_over_16550A_throughput": round(ratio, 1)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["median"], indent=1))
    print(f"\nconsole, guest -> host, {args.console_bytes} bytes, median of {args.rounds}:")
    print(f"{'device':8} {'KiB/s':>9} {'wr/KiB':>7} {'exits/KiB':>10} {'kvm/KiB':>8} {'ok':>5}")
    for k in consoles:
        r = med[k]
        print(f"{k:8} {r['kib_per_s']:9.1f} {r['host_writes_per_kib']:7.2f} {r['user_exits_per_kib']:10.2f} "
              f"{r['kvm_exits_per_kib']:8.2f} {str(r['lossless']):>5}")
    print(f"virtio / 16550A throughput: {ratio:.1f}x")
    print(f"\nvirtio-blk, {args.disk_mib} MiB sequential, 128 KiB requests, median of {args.rounds}:")
    print(f"{'op':6} {'MiB/s':>7} {'kicks/MiB':>9} {'irq/MiB':>8} {'exits/MiB':>9} {'kvm/MiB':>8} {'cpu ms/MiB':>10} "
          f"{'worker':>7} {'loop':>6} {'handler':>7} {'kvmkit':>7}")
    for k in disks:
        r = med[k]
        print(f"{k:6} {r['mib_per_s']:7.2f} {r['kicks_per_mib']:9.2f} {r['irqs_per_mib']:8.2f} {r['user_exits_per_mib']:9.1f} "
              f"{r['kvm_exits_per_mib']:8.1f} {r['process_cpu_ms_per_mib']:10.2f} {r['worker_cpu_ms_per_mib']:7.2f} "
              f"{r['loop_cpu_ms_per_mib']:6.2f} {r['handler_ms_per_mib']:7.2f} {r['kvmkit_share']:7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
