"""benchmarks/soak.py's exec-heavy workload, small, on a restored stock kernel (no boot of its own).

The soak benchmark boots the stock kernel again and again and counts guest
processes that crash (docs/quirks.md, "the TLS crash"); on these machines a
fork and exec costs about a second of emulated guest kernel, so CI runs its
workload once, on the session's snapshot (tests/linux/conftest.py): busybox
runs from a shell loop on each of its CPUs, a pipeline, and the kernel's "segfault at" lines.
Nothing retries (tests/linux/_boot.py): a crash fails the test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

from _boot import LinuxSnapshot, finish_kvmkit, start_kvmkit_argv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

EXECS = 60


def test_exec_heavy_work_crashes_no_guest_process(linux_snapshot: LinuxSnapshot,
                                                  record_property: Callable[[str, object], None]) -> None:
    proc, master, ms = start_kvmkit_argv(["--restore", str(linux_snapshot.path), "--stats"], linux_snapshot.env)
    try:
        loops = ms.run(soak.exec_loop(EXECS, linux_snapshot.cpus), 600, f"{EXECS} busybox runs")
        pipeline = ms.run("busybox seq 1 5000 | busybox sort -rn | busybox head -n 1", 300, "pipeline")
        segv = ms.run("busybox dmesg | busybox grep -c 'segfault at'", 60, "segfault lines")
    finally:
        stderr = finish_kvmkit(proc, master, ms, record_property)
    print(stderr, file=sys.stderr)
    runs = soak.parse_loops(loops)
    record_property("busybox runs, crashed", runs)
    cpus = linux_snapshot.cpus
    assert runs == {c: (EXECS // cpus + (c < EXECS % cpus), 0) for c in range(cpus)}, loops  # every CPU ran its share
    assert pipeline.strip().splitlines()[-1:] == ["5000"], pipeline
    assert segv.strip().splitlines()[-1:] == ["0"], segv
    assert "Segmentation fault" not in ms.text
