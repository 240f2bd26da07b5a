#!/usr/bin/env python3
"""PIO exit round trip: kvmkit's vCPU loop against a minimal C loop, same guest, one run.

The guest is 16 bytes of real-mode code doing N x ``out dx, al`` to port
0x80 and then writing its status to the exit port. Both VMMs load it at the
same address in a VM with the same devices (in-kernel irqchip and PIT), and
handle each exit by storing the byte. Rounds alternate C and kvmkit so
that host noise falls on both; the figure is the ratio of medians.

    python3 benchmarks/exit_cost.py [--exits N] [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from kvmkit.machine.cpu import set_real_mode  # noqa: E402
from kvmkit.machine.config import VmConfig  # noqa: E402
from kvmkit.machine.machine import Machine  # noqa: E402

LOAD = 0x1000


def guest_code(n: int) -> bytes:
    if not 1 <= n <= 0xFFFF:
        raise ValueError("exits per round must be 1..65535 (a 16-bit loop counter)")
    return bytes([
        0xBA, 0x80, 0x00,                 # mov dx, 0x80
        0xB9, n & 0xFF, n >> 8,           # mov cx, n
        0xEE,                             # loop: out dx, al
        0x49,                             # dec cx
        0x75, 0xFC,                       # jnz loop
        0xBA, 0x01, 0x05,                 # mov dx, 0x501
        0xB0, 0x00,                       # mov al, 0
        0xEE,                             # out dx, al
        0xF4,                             # hlt
    ])


def build_c(workdir: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("exit_cost: needs gcc (apt-get install gcc)")
    exe = workdir / "exit_cost"
    subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "exit_cost.c")], check=True)
    return exe


def run_c(exe: Path, blob: Path) -> dict:
    out = subprocess.run([str(exe), str(blob), hex(LOAD)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def run_kvmkit(code: bytes) -> dict:
    m = Machine(VmConfig(serial=["off"] * 4))
    try:
        assert m.mem is not None
        m.mem.write(LOAD, code)
        set_real_mode(m.runners[0].vcpu, LOAD)
        t0 = time.perf_counter_ns()
        m.start()
        m.wait()
        t1 = time.perf_counter_ns()
        st = m.runners[0].stats
        m.shutdown()
        return {"exits": st.total_exits, "ns": t1 - t0, "status": m.status,
                "run_ns": st.run_ns, "handler_ns": st.handler_ns}
    finally:
        m.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exits", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    code = guest_code(args.exits)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_c(Path(tmp))
        blob = Path(tmp) / "guest.bin"
        blob.write_bytes(code)
        c_rounds, k_rounds = [], []
        for _ in range(args.rounds):
            c_rounds.append(run_c(exe, blob))
            k_rounds.append(run_kvmkit(code))
    for r in c_rounds + k_rounds:
        if r["status"] != 0 or r["exits"] != args.exits + 1:
            sys.exit(f"exit_cost: a round did not run the guest as expected: {r}")
    c_ns = statistics.median(r["ns"] / r["exits"] for r in c_rounds)
    k_ns = statistics.median(r["ns"] / r["exits"] for r in k_rounds)
    k_handler = statistics.median(r["handler_ns"] / r["exits"] for r in k_rounds)
    result = {
        "benchmark": "exit_cost",
        "exits_per_round": args.exits + 1,
        "rounds": args.rounds,
        "c_ns_per_exit": round(c_ns, 1),
        "kvmkit_ns_per_exit": round(k_ns, 1),
        "kvmkit_handler_ns_per_exit": round(k_handler, 1),
        "ratio_kvmkit_over_c": round(k_ns / c_ns, 3),
        "goal_ratio": 1.2,
    }
    print(json.dumps(result))
    print()
    print(f"{'VMM':<10}{'ns/exit (median)':>20}")
    print(f"{'C':<10}{c_ns:>20.0f}")
    print(f"{'kvmkit':<10}{k_ns:>20.0f}   ({k_handler:.0f} ns of it in kvmkit's handlers)")
    print(f"ratio kvmkit/C = {k_ns / c_ns:.3f}  (goal <= 1.2)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
