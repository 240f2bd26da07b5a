"""The stock Debian kernel boots to an ext4 root on virtio-blk through kvmkit's initramfs, under QEMU.

QEMU (TCG, so no /dev/kvm is needed) supplies the virtio-pci devices here,
which makes this a check of the initramfs and the root image alone: the
modules resolved from Debian's linux-image package load in order, /init
finds /dev/vda, switch_roots to busybox init, and a file written in the
guest is on the disk after poweroff. kvmkit's own PCI and virtio devices
must later pass the same boot.

Each milestone's host time is printed (``pytest -s``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmkit.boot import rootfs
from kvmkit.boot.initramfs import INIT_MARKER, ROOT_MARKER, busybox_initramfs
from kvmkit.boot.modules import VIRTIO_ROOT_MODULES, find_modules, resolve_modules
from kvmkit.boot.rootfs import ROOTFS_MARKER, make_rootfs
from kvmkit.errors import BootError

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

QEMU = shutil.which("qemu-system-x86_64")


DEBUGFS = rootfs.find_tool("debugfs")
BOOT_LIMIT = 90.0  # seconds from QEMU's start to poweroff; about 20-30 s on a shared 2-core machine


class Console:
    """QEMU's serial port on a pipe: everything read, and the time of each awaited line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.t0 = time.monotonic()
        self.buf = bytearray()
        self.pos = 0
        self.cond = threading.Condition()
        self.eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while data := os.read(self.proc.stdout.fileno(), 65536):
            with self.cond:
                self.buf += data
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait(self, pattern: str | re.Pattern[bytes], timeout: float) -> float:
        rx = re.compile(re.escape(pattern.encode())) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (m := rx.search(self.buf, self.pos)):
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise AssertionError(f"{pattern!r} not seen within {timeout} s; console tail:\n{self.text[-3000:]}")
                self.cond.wait(min(left, 1.0))
            self.pos = m.end()
        t = time.monotonic() - self.t0
        print(f"milestone {t:6.1f} s  {pattern if isinstance(pattern, str) else pattern.pattern!r}", file=sys.stderr)
        return t

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    @property
    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def virtio_initrd(stock_bzimage: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    version = stock_bzimage.name.removeprefix("vmlinuz-")
    try:
        modules = resolve_modules(find_modules(version), VIRTIO_ROOT_MODULES)
        data = busybox_initramfs(modules=modules, compress=True)
    except BootError as exc:
        pytest.skip(f"no initramfs with the stock kernel's modules: {exc}")
    print("load order: " + " ".join(m.name + ("?" if m.soft else "") for m in modules), file=sys.stderr)
    path = tmp_path_factory.mktemp("virtio") / "initrd.img"
    path.write_bytes(data)
    return path


def qemu(kernel: Path, initrd: Path, disk: Path, append: str, *extra: str) -> tuple[subprocess.Popen[bytes], Console]:
    argv = [QEMU, "-machine", "pc", "-accel", "tcg", "-m", "256", "-display", "none", "-serial", "stdio",
            "-monitor", "none", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
            "-device", "virtio-rng-pci,disable-legacy=on", *extra]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # type: ignore[arg-type]
    return proc, Console(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(QEMU is None or DEBUGFS is None, reason="needs qemu-system-x86 and e2fsprogs")
def test_switch_root_to_virtio_blk_write_and_poweroff(stock_bzimage: Path, virtio_initrd: Path, tmp_path: Path) -> None:
    disk = make_rootfs(tmp_path / "root.ext4", "32M")
    hvc_log = tmp_path / "hvc0.log"
    proc, con = qemu(stock_bzimage, virtio_initrd, disk, "console=ttyS0 root=/dev/vda rw",
                     "-device", "virtio-serial-pci,disable-legacy=on",
                     "-chardev", f"file,id=hvc,path={hvc_log}", "-device", "virtconsole,chardev=hvc")
    try:
        con.wait(INIT_MARKER, 120)
        con.wait(f"{ROOT_MARKER} /dev/vda (rw), running /sbin/init", 30)
        con.wait(ROOTFS_MARKER, 30)
        con.wait(re.compile(rb"# "), 30)  # busybox ash's prompt on ttyS0
        con.send("echo \"guest $(uname -r) rng=$(cat /sys/class/misc/hw_random/rng_current)\" > /root/proof;"
                 " echo via-hvc0 > /dev/hvc0; sync; poweroff")
        con.wait("reboot: Power down", 60)
        status = proc.wait(30)
        elapsed = time.monotonic() - con.t0
    finally:
        stop(proc)
    print(f"QEMU boot to poweroff: {elapsed:.1f} s", file=sys.stderr)
    text = con.text
    assert status == 0
    assert "Kernel panic" not in text
    failures = re.findall(r"kvmkit initramfs: insmod (\S+) failed( \(a soft dependency\))?", text)
    assert all(soft for _, soft in failures), failures  # only an optional crc32c-intel may miss its CPU feature
    version = stock_bzimage.name.removeprefix("vmlinuz-")
    assert rootfs.read_image_file(disk, "/root/proof") == f"guest {version} rng=virtio_rng.0\n".encode()
    assert hvc_log.read_text() == "via-hvc0\n"  # virtio_console's hvc0 works too
    assert elapsed < BOOT_LIMIT


@pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86")
def test_unmountable_root_leaves_the_initramfs_shell(stock_bzimage: Path, virtio_initrd: Path, tmp_path: Path) -> None:
    """A disk without a file system: one line saying so, then the initramfs shell, no panic."""
    disk = tmp_path / "blank.img"
    disk.write_bytes(b"\0" * (1 << 20))
    proc, con = qemu(stock_bzimage, virtio_initrd, disk, "console=ttyS0 root=/dev/vda rootfstype=ext4 rw")
    try:
        con.wait("kvmkit initramfs: cannot mount root /dev/vda", 150)
        con.wait("kvmkit initramfs: staying in the initramfs shell", 10)
        con.wait(re.compile(rb"# "), 30)
        con.send("echo shell-$((6 * 7)); poweroff -f")
        con.wait("shell-42", 30)
        proc.wait(60)
    finally:
        stop(proc)
    assert "Kernel panic" not in con.text
