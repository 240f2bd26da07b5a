#!/usr/bin/env python3
"""Snapshot and restore against a cold boot, side by side in one run.

Bundled guest, for each memory size (default 256M and 1G), ``rounds`` times:

  cold      construct, load and start a VM, until its shell answers a command
  snapshot  ``VirtualMachine.snapshot`` of that VM at its shell: pause, device
            and KVM state, memory (only pages the guest touched are written)
  restore   ``VirtualMachine.restore`` of the snapshot and start, until the
            restored shell answers a command

Figures: seconds (median), restore / cold, snapshot bytes of memory data and
blocks on disk, and whether restore time stays flat when memory grows (it
maps the memory files; it does not read them).

``--linux`` adds the stock Debian kernel with the busybox initramfs (cached
after its first download; several minutes): one cold boot to its shell
prompt, snapshotted there, against ``rounds`` restores to an answered
``uname -r``, each both through ``kvmkit run --restore`` on a pty (Python's
start-up included: what a user waits for) and through the API in-process;
then, after one more API restore, ``uname -r`` twice: the seconds to the first
echoed character and to the answer of each, and (as root, with tracefs) the
guest instructions KVM emulated up to that echo, to show the restored
guest's first steps against its later ones.

    python3 benchmarks/snapshot.py [--mem 256M,1G] [--rounds R] [--linux] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from kvmkit import VirtualMachine  # noqa: E402


def _answer(vm: VirtualMachine, tag: str, timeout: float) -> None:
    vm.console.send(f"echo {tag}\n")
    vm.console.wait_for(f"{tag}\r\n", timeout)


def disk_bytes(directory: Path) -> int:
    """Blocks the snapshot holds on disk (sparse memory files count what they use)."""
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir())


def timed_restore(snap: Path, answered: Callable[[VirtualMachine], None]) -> tuple[float, float]:
    """Seconds from restore() to a built machine, and to ``answered`` returning on the started VM."""
    t0 = time.monotonic()
    vm = VirtualMachine.restore(snap)
    try:
        t_built = time.monotonic() - t0
        vm.start()
        answered(vm)
        return t_built, time.monotonic() - t0
    finally:
        vm.close()


CURSOR_QUERY = "\x1b[6n"  # busybox's line editor asks where the cursor is after each prompt
RELEASE = re.compile(rb"\n(6\.\d+\.\d+[^\r\n]*)\r?\n")


def _answer_cursor_query(vm: VirtualMachine, timeout: float) -> None:
    """Answer the prompt's cursor query as a terminal would (busybox otherwise sleeps 20 ms of
    guest time after the next Enter, waiting for a late answer: 200 ms here at the profile's slow clock)."""
    vm.console.wait_for(CURSOR_QUERY, timeout)
    vm.console.send("\x1b[24;5R")


def _uname(vm: VirtualMachine) -> None:
    vm.console.send("uname -r\r")
    vm.console.wait_for(RELEASE, 120)


def cli_restore_to_uname(snap: Path, timeout: float = 120.0) -> float:
    """Seconds from starting `kvmkit run --restore SNAP` on a new pty (Python start-up included) to
    the answer of `uname -r` typed at once, as a user at a terminal (which answers cursor queries) sees it."""
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kvmkit", "run", "--restore", str(snap)], stdin=slave,
                            stdout=slave, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    os.close(slave)
    try:
        os.write(master, b"uname -r\r")
        buf = bytearray()
        while not RELEASE.search(buf):
            left = t0 + timeout - time.monotonic()
            if left <= 0 or not select.select([master], [], [], left)[0]:
                raise TimeoutError(f"no uname -r answer in {timeout} s; console: {bytes(buf[-500:])!r}")
            data = os.read(master, 65536)
            if not data:
                raise RuntimeError(f"kvmkit ended before the answer; console: {bytes(buf[-500:])!r}")
            buf += data
            if CURSOR_QUERY.encode() in data:
                os.write(master, b"\x1b[24;5R")
        return time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(master)


class EmulatedCount:
    """Guest instructions KVM emulated for this process's vCPU threads (the nested-PVM host emulates
    every guest kernel instruction): kvm:kvm_emulate_insn events in a private tracefs instance, counted
    per thread. Every method is a no-op (``count`` gives None) without tracefs, the event or root."""

    def __init__(self) -> None:
        from kvmkit.profile.tracefs import find_tracefs, own_instance_name
        root = find_tracefs()
        self.dir: Path | None = None
        if root is None or not (root / "events/kvm/kvm_emulate_insn").is_dir():
            return
        d = root / "instances" / (own_instance_name() + "-insn")
        try:
            d.mkdir(exist_ok=True)
            self.dir = d
            (d / "buffer_size_kb").write_text("32768\n")   # per CPU: room for a million events
            (d / "events/kvm/kvm_emulate_insn/enable").write_text("1\n")
        except OSError:
            self.close()

    def reset(self) -> None:
        """Empty the buffer and record from now on."""
        if self.dir is not None:
            (self.dir / "trace").write_text("")
            (self.dir / "tracing_on").write_text("1\n")

    def pause(self) -> None:
        """Stop recording (cheap; counting the buffer is not, so it waits for :meth:`count`)."""
        if self.dir is not None:
            (self.dir / "tracing_on").write_text("0\n")

    def count(self) -> int | None:
        """Events of this process's threads since :meth:`reset`."""
        if self.dir is None:
            return None
        ours = {f"-{t} " for t in os.listdir(f"/proc/{os.getpid()}/task")}
        n = 0
        with open(self.dir / "trace") as f:
            for line in f:
                if line.startswith("#"):
                    continue
                m = re.match(r"\s*\S*?(-\d+ )", line)
                n += bool(m and m.group(1) in ours)
        return n

    def close(self) -> None:
        d, self.dir = self.dir, None
        if d is None:
            return
        try:
            (d / "events/kvm/kvm_emulate_insn/enable").write_text("0\n")
        except OSError:
            pass
        try:
            d.rmdir()
        except OSError:
            pass


def first_steps(snap: Path, commands: int = 2) -> list[dict[str, Any]]:
    """A restored guest's first command against its next ones: for each ``uname -r`` typed after an API
    restore, seconds to the first character's echo and to the answer, and (where the host traces it)
    the guest instructions emulated up to that echo."""
    count = EmulatedCount()
    vm = VirtualMachine.restore(snap)
    steps = []
    try:
        vm.start()
        for _ in range(commands):
            count.reset()
            t0 = time.monotonic()
            vm.console.send("u")
            vm.console.wait_for("u", 60)
            echo = time.monotonic() - t0
            count.pause()
            vm.console.send("name -r\r")
            vm.console.wait_for(RELEASE, 120)
            steps.append({"first_echo_s": echo, "answer_s": time.monotonic() - t0,
                          "emulated_to_echo": count.count()})
            _answer_cursor_query(vm, 60)
            time.sleep(0.3)  # idle at the prompt again
    finally:
        vm.close()
        count.close()
    return steps


def bundled_round(mem: str, work: Path) -> dict[str, Any]:
    snap = work / f"snap-{mem}"
    shutil.rmtree(snap, ignore_errors=True)
    t0 = time.monotonic()
    vm = VirtualMachine(script="echo ready; shell", mem=mem)
    try:
        vm.start()
        vm.console.wait_for("ready", 60)
        _answer(vm, "cold-answer", 60)
        cold = time.monotonic() - t0
        taken = vm.snapshot(snap)
    finally:
        vm.close()
    t_built, restore = timed_restore(snap, lambda vm: _answer(vm, "restored-answer", 60))
    return {"cold_s": cold, "snapshot_s": taken["total_s"], "pause_s": taken["pause_s"],
            "state_s": taken["state_s"], "memory_s": taken["memory_s"], "restore_s": restore,
            "restore_build_s": t_built, "memory_bytes": taken["memory_bytes"],
            "state_bytes": taken["state_bytes"], "disk_bytes": disk_bytes(snap)}


def linux_round(work: Path, rounds: int) -> dict[str, Any]:
    from kvmkit.boot.fetch import stock_kernel
    from kvmkit.boot.initramfs import busybox_initramfs
    kernel = stock_kernel()  # cached after the first download
    initrd = work / "initrd.img"
    initrd.write_bytes(busybox_initramfs())
    snap = work / "snap-linux"
    shutil.rmtree(snap, ignore_errors=True)
    t0 = time.monotonic()
    vm = VirtualMachine(kernel=kernel, initrd=initrd)
    try:
        vm.start()
        vm.console.wait_for("# ", 600)
        cold = time.monotonic() - t0
        _answer_cursor_query(vm, 60)
        vm.console.send("uname -r\r")
        release = vm.console.wait_for(RELEASE, 120).strip().splitlines()[-1]  # the cold run keeps the text
        _answer_cursor_query(vm, 60)
        time.sleep(0.5)  # idle at the prompt, the answer taken in
        taken = vm.snapshot(snap)
    finally:
        vm.close()
    # Bytecode compiled as an installed package has it (PYTHONDONTWRITEBYTECODE would
    # otherwise make every start compile kvmkit again: about 0.15 s here).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "src" / "kvmkit")], check=False)
    api, built, cli = [], [], []
    for _ in range(rounds):
        t_built, t_api = timed_restore(snap, _uname)
        api.append(t_api)
        built.append(t_built)
        cli.append(cli_restore_to_uname(snap))
    restore = statistics.median(cli)
    steps = first_steps(snap)
    return {"first_steps": steps, "release": release, "cold_to_prompt_s": cold, "snapshot_s": taken["total_s"],
            "restore_to_uname_s": restore, "restore_to_uname_cli_s": cli,
            "restore_to_uname_api_s": api, "restore_build_s": built,
            "cold_over_restore": cold / restore,
            "memory_bytes": taken["memory_bytes"], "disk_bytes": disk_bytes(snap)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem", default="256M,1G", help="guest memory sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--linux", action="store_true", help="also the stock kernel: cold boot against restore")
    ap.add_argument("--json", type=Path, help="write all rounds here too")
    args = ap.parse_args()
    sizes = [m.strip() for m in args.mem.split(",") if m.strip()]
    result: dict[str, Any] = {"rounds": {}, "median": {}}
    with tempfile.TemporaryDirectory(prefix="kvmkit-snapbench-", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        for _ in range(args.rounds):
            for mem in sizes:  # interleaved: the sizes see the same host noise
                result["rounds"].setdefault(mem, []).append(bundled_round(mem, work))
        for mem, rounds in result["rounds"].items():
            med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            med["restore_over_cold"] = statistics.median(r["restore_s"] / r["cold_s"] for r in rounds)
            result["median"][mem] = med
        if len(sizes) > 1:
            first, last = result["median"][sizes[0]], result["median"][sizes[-1]]
            result["restore_growth"] = last["restore_s"] / first["restore_s"]
        if args.linux:
            result["linux"] = linux_round(work, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    print(f"\nbundled guest, median of {args.rounds} (seconds; bytes of memory data / on disk):")
    print(f"{'mem':>5} {'cold':>7} {'snapshot':>9} {'pause':>7} {'restore':>8} {'rest/cold':>9} {'mem data':>10} {'on disk':>10}")
    for mem, m in result["median"].items():
        print(f"{mem:>5} {m['cold_s']:7.3f} {m['snapshot_s']:9.3f} {m['pause_s']:7.4f} {m['restore_s']:8.3f} "
              f"{m['restore_over_cold']:9.2f} {m['memory_bytes']:10d} {m['disk_bytes']:10d}")
    if "restore_growth" in result:
        print(f"restore time {sizes[-1]} / {sizes[0]}: {result['restore_growth']:.2f}x")
    if "linux" in result:
        lx = result["linux"]
        print(f"\nstock kernel {lx['release']}: cold boot to the prompt {lx['cold_to_prompt_s']:.1f} s, "
              f"snapshot {lx['snapshot_s']:.2f} s, {lx['memory_bytes'] / 2**20:.1f} MiB of memory data")
        print(f"restore to an answered uname -r, median of {args.rounds}: `kvmkit run --restore` "
              f"{lx['restore_to_uname_s']:.2f} s ({lx['cold_over_restore']:.0f}x faster than the boot), "
              f"of which Machine.restore {statistics.median(lx['restore_build_s']) * 1000:.0f} ms; "
              f"in-process API {statistics.median(lx['restore_to_uname_api_s']):.2f} s")
        for i, st in enumerate(lx["first_steps"]):
            insns = f", {st['emulated_to_echo']} guest instructions emulated to it" if st["emulated_to_echo"] is not None else ""
            print(f"  command {i + 1} after the restore: first echo {st['first_echo_s']:.3f} s{insns}; "
                  f"answered at {st['answer_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
