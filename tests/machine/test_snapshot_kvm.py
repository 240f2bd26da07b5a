"""Snapshot and restore of the bundled guest under KVM: the guest goes on from where it stood.

* a CPL3 `pio-loop` snapshotted mid-way: the restored VM does exactly the
  outb's that were left (its own exit count plus the original's at the
  snapshot is the loop count), then prints the loop's result line;
* a PV clock event timer benchmark snapshotted mid-way: the timer keeps
  firing after the restore and the benchmark finishes;
* two VMs restored from one snapshot at the same time run independently,
  and the snapshot's files do not change;
* a damaged snapshot is refused in one sentence.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path

import pytest

from kvmkit.api import VirtualMachine
from kvmkit.machine.snapshot import SnapshotError

pytestmark = pytest.mark.kvm

LOOP = 400_000


def _outb_80(vm: VirtualMachine) -> int:
    vm.machine.kick_all()
    time.sleep(0.05)
    return sum(st.pio.get((0x80, "out"), 0) for st in vm.machine.exit_stats())


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _snapshot_mid_loop(tmp_path: Path) -> tuple[Path, int]:
    snap = tmp_path / "snap"
    with VirtualMachine(script=f"echo start; pio-loop {LOOP}; echo after-loop; poweroff 7") as vm:
        vm.console.wait_for("start", 60)
        deadline = time.monotonic() + 60
        while _outb_80(vm) < LOOP // 10:
            assert time.monotonic() < deadline, "the loop did not get going"
            time.sleep(0.05)
        vm.pause()
        done_before = _outb_80(vm)
        assert 0 < done_before < LOOP
        result = vm.snapshot(snap)
        assert _outb_80(vm) == done_before, "the snapshot let the paused guest run"
        vm.stop(0)
    assert result["memory_bytes"] > 0 and (snap / "manifest.json").exists()
    return snap, done_before


def test_a_loop_snapshotted_mid_way_finishes_exactly_once_after_restore(tmp_path: Path) -> None:
    snap, done_before = _snapshot_mid_loop(tmp_path)
    vm = VirtualMachine.restore(snap)
    try:
        vm.start()
        vm.console.wait_for(f"pio-loop: {LOOP} x outb 0x80", 120)
        vm.console.wait_for("after-loop", 30)
        assert vm.wait(30) == 7
        assert _outb_80(vm) + done_before == LOOP
    finally:
        vm.close()


def test_two_restores_of_one_snapshot_run_at_once_and_leave_it_unchanged(tmp_path: Path) -> None:
    snap, _ = _snapshot_mid_loop(tmp_path)
    before = _digests(snap)
    vms = [VirtualMachine.restore(snap) for _ in range(2)]
    statuses: list[int | None] = [None, None]
    try:
        def run(i: int) -> None:
            vms[i].console.wait_for("after-loop", 120)
            statuses[i] = vms[i].wait(30)
        for vm in vms:
            vm.start()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert statuses == [7, 7]
    finally:
        for vm in vms:
            vm.close()
    assert _digests(snap) == before


def test_a_pv_timer_keeps_firing_after_restore(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    with VirtualMachine(script="timer-bench pv 3000 200; echo bench-done; poweroff 0") as vm:
        vm.console.wait_for("timer-bench: tsc", 60)
        time.sleep(0.3)  # well inside the 3000 timer cycles
        vm.snapshot(snap)
        vm.stop(0)
    vm = VirtualMachine.restore(snap)
    try:
        vm.start()
        line = vm.console.wait_for("bench-done", 120)
        assert "timer-bench: pv cycles=3000" in line, line
        # The device's clock offset was moved to the restored run's clocks:
        # the guest's own check after the runs finds it still in step.
        error = re.search(r"pv clock after the runs: offset error (-?\d+) ns", line)
        assert error and abs(int(error.group(1))) < 5_000_000, line
        assert vm.wait(30) == 0
    finally:
        vm.close()


def test_a_damaged_snapshot_is_refused(tmp_path: Path) -> None:
    snap, _ = _snapshot_mid_loop(tmp_path)
    state = snap / "state.json"
    data = json.loads(state.read_text())
    data["vcpus"][0]["regs"] = "AAAA"
    state.write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match="does not match its checksum"):
        VirtualMachine.restore(snap)
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["files"]["state.json"]["sha256"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (snap / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="damaged|refused"):
        VirtualMachine.restore(snap)
    (snap / "memory-0.raw").write_bytes(b"short")
    with pytest.raises(SnapshotError):
        VirtualMachine.restore(snap)
