"""Every user-facing failure is one plain sentence on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def kvmkit(*args: str, env: dict | None = None, user: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kvmkit", *args], env=e, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, user=user)


def one_sentence(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("kvmkit: ")
    return lines[0]


def test_no_dev_kvm():
    msg = one_sentence(kvmkit("run", env={"KVMKIT_KVM_DEVICE": "/nonexistent/kvm"}))
    assert "does not exist" in msg and "KVM" in msg


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/dev/kvm").exists() or not shutil.which("setpriv"),
                    reason="needs root and setpriv to make a device node kvmkit may not open")
def test_permission_denied_on_dev_kvm(tmp_path: Path):
    node = tmp_path / "kvm"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)
    os.chown(node, 12345, 12345)  # someone else's, and root below has no CAP_DAC_OVERRIDE
    e = {**os.environ, "PYTHONPATH": SRC, "KVMKIT_KVM_DEVICE": str(node)}
    p = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "kvmkit",
                        "run", "-k", "/etc/hostname"], env=e, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60)
    msg = one_sentence(p)
    assert "permission denied" in msg and "kvm" in msg


@pytest.mark.kvm
def test_kernel_that_is_not_a_kernel(tmp_path: Path):
    bad = tmp_path / "notakernel"
    bad.write_bytes(b"hello, I am a text file\n" * 100)
    msg = one_sentence(kvmkit("run", "-k", str(bad)))
    assert "kernel" in msg.lower()


@pytest.mark.kvm
def test_missing_kernel_file():
    msg = one_sentence(kvmkit("run", "-k", "/nonexistent/bzImage"))
    assert "does not exist" in msg


@pytest.mark.kvm
def test_initrd_that_does_not_fit(tmp_path: Path):
    big = tmp_path / "initrd.img"
    with open(big, "wb") as f:
        f.truncate(80 << 20)
    msg = one_sentence(kvmkit("run", "-m", "64M", "-i", str(big), "echo", "x"))
    assert "initrd" in msg.lower()


def test_bad_memory_size():
    msg = one_sentence(kvmkit("run", "-m", "lots"))
    assert "memory size" in msg


def test_unknown_serial_backend():
    msg = one_sentence(kvmkit("run", "--serial", "carrier-pigeon"))
    assert "serial backend" in msg
