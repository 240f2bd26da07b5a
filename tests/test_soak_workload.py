"""benchmarks/soak.py's guest workload, run by the host's busybox: the shell line and its parsing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="needs busybox (tools/install-deps --test installs it)")


def run_loop(execs: int, cpus: int, program: str = "busybox true") -> dict[int, tuple[int, int]]:
    out = subprocess.run([BUSYBOX, "sh", "-c", soak.exec_loop(execs, cpus, program)],  # type: ignore[list-item]
                         capture_output=True, text=True, timeout=120)
    return soak.parse_loops(out.stdout)


def test_the_runs_are_split_over_the_cpus_and_counted() -> None:
    cpus = min(2, os.cpu_count() or 1)
    assert run_loop(7, cpus) == ({0: (4, 0), 1: (3, 0)} if cpus == 2 else {0: (7, 0)})


def test_a_run_that_dies_on_a_signal_is_a_crash(tmp_path: Path) -> None:
    crasher = tmp_path / "crash"
    crasher.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crasher.chmod(0o755)
    failer = tmp_path / "fail"
    failer.write_text("#!/bin/sh\nexit 3\n")  # a plain failure is not a crash
    failer.chmod(0o755)
    assert run_loop(3, 1, str(crasher)) == {0: (3, 3)}
    assert run_loop(3, 1, str(failer)) == {0: (3, 0)}


def test_summary_figures() -> None:
    boots = [{"cpus": 2, "online": 2, "boot_s": 200.0, "exec_s": 100.0, "execs": 100, "crashed": 1,
              "kernel_segfault_lines": ["x"]},
             {"cpus": 2, "online": 2, "boot_s": 220.0, "exec_s": 50.0, "execs": 100, "crashed": 0,
              "kernel_segfault_lines": []}]
    sm = soak.summarise(boots)
    assert sm["crashed_per_boot"] == 0.5 and sm["crashed_per_kexec"] == 5.0
    assert sm["boot_s_median"] == 210.0 and sm["exec_per_s_median"] == 1.5 and sm["all_online"]


def test_the_line_waits_for_its_own_loops_only() -> None:
    """A shell with a job of its own running (the slow tests' snapshot has one) still ends the line."""
    line = f"(while true; do sleep 1; done) & {soak.exec_loop(2, 1)}; echo ended; kill %1"
    out = subprocess.run([BUSYBOX, "sh", "-c", line], capture_output=True, text=True, timeout=60)  # type: ignore[list-item]
    assert "soak-cpu0 2 0\nended" in out.stdout, out


def test_a_boot_that_failed_is_counted_not_averaged() -> None:
    ok = {"cpus": 2, "online": 2, "boot_s": 200.0, "exec_s": 25.0, "execs": 50, "crashed": 1,
          "kernel_segfault_lines": ["x[1]: segfault at 0"]}
    failed = {"cpus": 2, "online": 0, "boot_s": float("nan"), "exec_s": 0.0, "execs": 0, "crashed": 0,
              "kernel_segfault_lines": [], "error": "AssertionError: no prompt"}
    sm = soak.summarise([ok, failed])
    assert (sm["boots"], sm["failed_boots"], sm["execs"], sm["crashed"]) == (2, 1, 50, 1)
    assert sm["boot_s_median"] == 200.0 and sm["exec_per_s_median"] == 2.0
    assert sm["crashed_per_kexec"] == 20.0 and sm["kernel_segfault_lines"] == 1
    assert not sm["all_online"]
