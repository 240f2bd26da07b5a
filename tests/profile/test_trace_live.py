"""A trace recorded live from kvmkit agrees with kvmkit's own exit accounting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmkit import VirtualMachine
from kvmkit.profile import ftrace, trace_cli, trace_report

pytestmark = pytest.mark.kvm


@pytest.mark.skipif(os.geteuid() != 0, reason="recording KVM tracepoints needs root")
def test_recorded_userspace_exits_match_exit_accounting(tmp_path: Path) -> None:
    out = tmp_path / "vm.trace"
    holder: dict[str, object] = {}

    def run() -> int:
        with VirtualMachine(script="pio-loop 300 0x80") as vm:
            status = vm.wait(60)
            holder["stats"] = vm.machine.exit_stats()[0]
            holder["kicks"] = vm.machine.exit_stats()[0].kicks
        return status if status is not None else 1

    assert trace_cli.record(run, out) == 0
    analysis = trace_report.analyze(ftrace.parse(out.read_text()))
    doc = trace_report.to_json(analysis)
    assert not analysis.trace.lost and not analysis.trace.overwritten
    stats = holder["stats"]
    io_exits = stats.exits[2]  # KVM_EXIT_IO
    assert io_exits >= 300
    traced = doc["activity"]["userspace_exits"]
    traced_io = sum(n for k, n in traced.items() if "IO" in k)
    assert traced_io == io_exits, (traced, dict(stats.exits))
    # Each port kvmkit saw is in the trace with the same count (kvm_pio events).
    pio = doc["activity"]["accesses"].get("pio", {})
    assert pio.get("write 0x80") == stats.pio[(0x80, "out")] == 300
