"""`kvmkit run -k KERNEL -- CMD`: one command in a Linux guest, and kvmkit exits with its status.

What kernel developers and CI get from `lkvm sandbox -- cmd` or `vng -- cmd`:
kvmkit builds a busybox initramfs whose /init runs the command with its
output on the console and writes its exit status to the exit port through
/dev/port. The first test runs it the way `vng` does, in the host's own
root shared read-only over virtio-9p (`--share /:hostroot,ro`), which
covers the runner and the share in one boot. The second test is the other way a boot ends badly: no initramfs
at all, so the kernel panics at mounting root; kvmkit's default `panic=-1`
resets it, and kvmkit reads the panic line from the console and fails with
it instead of calling the reset a clean reboot.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _boot import MEM, REPO

pytestmark = [pytest.mark.slow, pytest.mark.kvm]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmkit", "run", "--mem", MEM, *args],
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=600)


def test_a_command_runs_in_the_hosts_root_and_gives_kvmkit_its_status(stock_bzimage: Path, tmp_path: Path) -> None:
    """`--share /:hostroot,ro -- CMD`: the command runs on the guest kernel with the host's own programs
    (its sh, uname and touch, read over 9P), from the host's working directory, writing only to tmpfs;
    on two vCPUs, both online (tests/linux/test_boot_stock.py boots four)."""
    here = tmp_path / "work dir"
    here.mkdir()
    (here / "marker").write_text("host file\n")
    script = ('echo "from the guest: $(uname -r) $0 in $(pwd)"; cat marker; '
              'touch /var/tmp/w && echo tmp-writable; touch marker2 || echo root-read-only; '
              'test -r /proc/1/environ && echo guest-proc; echo "cpus $(nproc) $(grep -c ^processor /proc/cpuinfo)"; exit 3')
    p = subprocess.run([sys.executable, "-m", "kvmkit", "run", "--mem", MEM, "-k", str(stock_bzimage), "--cpus", "2",
                        "--share", "/:hostroot,ro", "--", "sh", "-c", script, "it's"],
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stdin=subprocess.DEVNULL, cwd=here,
                       capture_output=True, text=True, errors="replace", timeout=900)
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "from the guest: 6.1.0-" in out and f"it's in {here}" in out, out[-3000:]
    assert "host file" in out and "tmp-writable" in out and "root-read-only" in out, out[-3000:]
    assert "guest-proc" in out, out[-3000:]          # /proc is the guest's own, bound over the host's
    assert "cpus 2 2" in out, out[-3000:]
    assert not (here / "marker2").exists()
    first = p.stderr.splitlines()[0]
    assert first.startswith("kvmkit: booting Linux 6.1.0-") and "kvmkit's busybox initramfs" in first, first
    assert "running: sh -c" in first and "panic=-1" in first
    assert "Linux version 6.1" in out  # the early console is on by default: the boot is not silent


def test_a_kernel_panic_fails_with_the_panic_line(stock_bzimage: Path) -> None:
    p = _run("-k", str(stock_bzimage))
    assert "no initrd (-i) and no root disk" in p.stderr
    assert p.returncode == 1, p.stderr[-3000:]
    assert "kvmkit: guest kernel panicked: Kernel panic - not syncing: VFS: Unable to mount root fs" in p.stderr, \
        p.stderr[-3000:]
