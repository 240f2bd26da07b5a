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


@pytest.mark.parametrize("size", ["infG", "1e30G", "9" * 400, "=-5G", "nanM", "1K", "4097K"])
def test_absurd_memory_sizes_are_one_sentence(size: str):
    """Issue 12, item 14: OverflowError tracebacks, and KVM's raw EINVAL for -m 1K."""
    msg = one_sentence(kvmkit("run", f"--mem{size}" if size.startswith("=") else f"--mem={size}"))
    assert "mem" in msg


def test_stats_json_to_an_unwritable_path_fails_before_the_vm_runs(tmp_path: Path):
    p = kvmkit("run", "--stats-json", str(tmp_path / "no" / "such" / "dir" / "s.json"), "poweroff 0")
    msg = one_sentence(p)
    assert "--stats-json" in msg and "kvmkit guest" not in p.stdout


def test_serial_file_that_is_a_planted_symlink_is_one_sentence(tmp_path: Path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / "com2.log").symlink_to(target)
    msg = one_sentence(kvmkit("run", "--serial", f"COM2=file:{tmp_path / 'com2.log'}", "poweroff 0"))
    assert "symbolic link" in msg
    assert target.read_text() == "precious\n"


@pytest.mark.kvm
def test_nohup_keeps_sighup_ignored(tmp_path: Path):
    """Issue 12, item 13: `nohup kvmkit run` must outlive its terminal (an inherited SIG_IGN stays)."""
    import signal
    import time
    e = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "kvmkit", "run", "--serial", f"file:{tmp_path / 'out'}",
                             "echo up; pio-loop 200000; poweroff 7"], env=e, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while b"up" not in (tmp_path / "out").read_bytes() if (tmp_path / "out").exists() else True:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 7
    finally:
        if proc.poll() is None:
            proc.kill()


def test_initramfs_directory_with_odd_and_hostile_contents(tmp_path: Path):
    """Issue 12, item 10: names are bytes, errors are one sentence, files are streamed."""
    root = tmp_path / "root"
    root.mkdir()
    os.mkdir(os.fsencode(root) + b"/caf\xe9-latin1")                         # a name that is not UTF-8
    (root / "zz.sparse").touch()
    os.truncate(root / "zz.sparse", 1 << 30)                                  # streamed, never read whole
    out = tmp_path / "i.img"
    p = subprocess.run(["prlimit", "--as=900000000", sys.executable, "-m", "kvmkit", "initramfs", "-o", str(out),
                        "--directory", str(root)], env={**os.environ, "PYTHONPATH": SRC},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with open(out, "rb") as f:
        head = f.read(4096)
    assert b"caf\xe9-latin1\0" in head and b"zz.sparse\0" in head       # the name went in as its bytes
    assert out.stat().st_size > 1 << 30
    out.unlink()
    os.truncate(root / "zz.sparse", 5 << 30)                                  # past what newc can hold
    msg = one_sentence(kvmkit("initramfs", "-o", str(out), "--directory", str(root)))
    assert "more than a cpio member can hold" in msg and not out.exists()
    os.unlink(root / "zz.sparse")
    msg = one_sentence(kvmkit("initramfs", "-o", str(tmp_path / "no" / "dir" / "x"), "--directory", str(root)))
    assert "cannot write the initramfs" in msg


def test_initramfs_directory_unreadable_parts_are_one_sentence(tmp_path: Path):
    """Without root's file capabilities: an unreadable file or directory is named, never archived empty with status 0."""
    root = tmp_path / "root"
    (root / "locked").mkdir(parents=True)
    (root / "secret").write_text("x")
    os.chmod(root / "secret", 0)
    for p in (tmp_path, root):
        os.chmod(p, 0o755)
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    def no_caps() -> subprocess.CompletedProcess:
        return subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "kvmkit",
                               "initramfs", "-o", str(out / "i.img"), "--directory", str(root)],
                              env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60)
    msg = one_sentence(no_caps())
    assert "secret" in msg and "Permission denied" in msg
    os.unlink(root / "secret")
    os.chmod(root / "locked", 0)
    msg = one_sentence(no_caps())
    assert "locked" in msg and "cannot read directory" in msg
