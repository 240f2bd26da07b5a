"""`kvmkit run SCRIPT` exits with the status of the first guest command that fails.

README promises that kvmkit exits with the guest's status; a script that
carried on past a failed command and powered off with 0 broke that promise
for every CI job that runs one. The guest now runs a script like `sh -e`,
and a `-` before a command lets that command fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None,
                       reason="gcc and make are needed to build the bundled guest"),
]

SRC = str(Path(__file__).resolve().parents[2] / "src")


def kvmkit_run(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmkit", "run", "-m", "64M", *words],
                          env={**os.environ, "PYTHONPATH": SRC}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=120)


def lines(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in p.stdout.splitlines()]


@pytest.mark.parametrize("second, status, message", [
    ("frobnicate", 127, "unknown command 'frobnicate'"),
    ("poweroff 999", 2, "usage: poweroff"),           # a usage error
])
def test_the_second_command_fails_so_kvmkit_exits_with_its_status(second: str, status: int, message: str) -> None:
    p = kvmkit_run(f"echo first-ran; {second}; echo third-ran")
    out = lines(p)
    assert p.returncode == status, (p.stdout, p.stderr)
    assert "first-ran" in out and message in p.stdout
    name = second.split()[0]
    assert f"'{name}' failed with status {status}, so the script stops (write '-{name}' to let it fail)" in out
    assert "third-ran" not in out and "+ echo third-ran" not in out, p.stdout


def test_script_words_on_the_command_line_stop_the_same_way() -> None:
    p = kvmkit_run("echo", "first-ran", ";", "frobnicate", ";", "echo", "third-ran")
    assert p.returncode == 127, (p.stdout, p.stderr)
    assert "third-ran" not in lines(p)


def test_a_dash_prefixed_failing_command_is_ignored() -> None:
    p = kvmkit_run("echo first-ran; -frobnicate; - poweroff 999; echo third-ran; poweroff 5")
    out = lines(p)
    assert p.returncode == 5, (p.stdout, p.stderr)
    assert "'frobnicate' failed with status 127 (ignored: it has a '-')" in out
    assert "'poweroff' failed with status 2 (ignored: it has a '-')" in out
    assert "first-ran" in out and "third-ran" in out


def test_a_script_that_starts_with_a_dash_command_after_double_dash() -> None:
    p = kvmkit_run("--", "-frobnicate; echo second-ran")
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "second-ran" in lines(p)


def test_help_says_how_a_script_treats_failures() -> None:
    p = kvmkit_run("help")
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "stops at the first command that fails" in p.stdout and "'-cmd' lets cmd fail" in p.stdout
