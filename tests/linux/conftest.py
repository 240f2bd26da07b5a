"""Fixtures for the stock Debian kernel: a virtio initramfs, pvce.ko, and one boot saved as a snapshot
that tests restore instead of booting (the kernel and the busybox initramfs are in tests/conftest.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from kvmkit.boot.initramfs import busybox_initramfs
from kvmkit.api import VirtualMachine
from kvmkit.errors import BootError

from _boot import CURSOR_QUERY, REPO, LinuxSnapshot, finish_kvmkit, start_kvmkit


@pytest.fixture(scope="session")
def virtio_initrd(stock_bzimage: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox initramfs with the stock kernel's virtio, ext4, 9P and virtio-net modules (`kvmkit initramfs --modules VERSION`)."""
    from kvmkit.boot.modules import NET_MODULES, SHARE_MODULES, VIRTIO_ROOT_MODULES, find_modules, resolve_modules
    version = stock_bzimage.name.removeprefix("vmlinuz-")
    try:
        modules = resolve_modules(find_modules(version), [*VIRTIO_ROOT_MODULES, *SHARE_MODULES, *NET_MODULES])
        data = busybox_initramfs(modules=modules)
    except BootError as exc:
        pytest.skip(f"no module package or busybox for the virtio initramfs: {exc}")
    path = tmp_path_factory.mktemp("initrd") / "virtio-initrd.img"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def pvce_ko(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """guest/linux/pvce.ko built against the stock kernel's Debian headers (tests/guest/test_linux_module_build.py)."""
    import shutil
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))
    from test_linux_module_build import MODULE_SRC, _stock_version, kernel_headers

    kdir = kernel_headers(_stock_version())
    build = tmp_path_factory.mktemp("pvce") / "pvce"
    shutil.copytree(MODULE_SRC, build)
    out = subprocess.run(["make", f"KDIR={kdir}"], cwd=build, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return build / "pvce.ko"


@pytest.fixture(scope="session")
def timer_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/linux/timer_check.c built static: POSIX timers and nanosleep measured on the guest's clock."""
    import shutil
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build tests/linux/timer_check.c")
    out = tmp_path_factory.mktemp("timer_check") / "timer_check"
    res = subprocess.run(["gcc", "-static", "-O2", "-Wall", str(Path(__file__).parent / "timer_check.c"), "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "cannot find -lc" in res.stderr:
        pytest.skip("no static libc (libc6-dev) to link tests/linux/timer_check.c")
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def snapshot_initrd(tmp_path_factory: pytest.TempPathFactory, pvce_ko: Path, timer_check: Path) -> Path:
    """The busybox initramfs, with /pvce.ko and /timer_check for tests/linux/test_pvce_module.py."""
    from kvmkit.boot.initramfs import file
    try:
        data = busybox_initramfs(extra=[file("pvce.ko", pvce_ko.read_bytes()),
                                        file("timer_check", timer_check.read_bytes(), 0o755)])
    except BootError as exc:
        pytest.skip(f"no static busybox to build the initramfs: {exc}")
    path = tmp_path_factory.mktemp("initrd-snapshot") / "initrd.img"
    path.write_bytes(data)
    return path


# Two vCPUs: every test that restores the snapshot runs an SMP guest (per-CPU pvce devices,
# the soak's loops on both CPUs, snapshot and restore of two vCPUs) at no extra boot.
SNAPSHOT_CPUS = 2


@pytest.fixture(scope="session")
def linux_snapshot(stock_bzimage: Path, snapshot_initrd: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> LinuxSnapshot:
    """The stock kernel booted once per test session with `kvmkit run --name`, saved at its shell.

    Boot once (minutes on an emulating host) and give each test a restored
    copy (seconds): the pattern for tests that need a running Linux and not
    its boot. Before the snapshot the guest writes /tmp/snapfile and starts
    a shell loop that counts into /tmp/count once a guest second (job %1 of
    the shell). The initramfs also carries /pvce.ko and /timer_check. The
    guest has SNAPSHOT_CPUS vCPUs.
    """
    work = tmp_path_factory.mktemp("linux")
    (work / "run").mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(work / "run"))
    snap = work / "at-shell"
    proc, master, ms = start_kvmkit(stock_bzimage, snapshot_initrd, "--name", "snapfixture", "--cpus", str(SNAPSHOT_CPUS),
                                    env=env)
    try:
        t_prompt = ms.wait("shell prompt", re.compile(rb"\n[^\n]*[#$] "), 300)
        ms.run("echo kept-in-ram > /tmp/snapfile", 60, "write a file")
        online = int(ms.run("nproc", 60).strip().splitlines()[-1])
        assert online == SNAPSHOT_CPUS, f"{online} of {SNAPSHOT_CPUS} CPUs online"
        os.write(master, b"(i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 1; done) &\r")
        count = 0
        deadline = time.monotonic() + 120
        while count < 1 and time.monotonic() < deadline:
            count = int(ms.run("cat /tmp/count 2>/dev/null || echo 0", 60, "count") or 0)
        # Save it idle at its prompt, the cursor query answered (as at a terminal), not mid-command.
        ms.wait("prompt before the snapshot", CURSOR_QUERY, 60)
        time.sleep(0.5)
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "kvmkit", "snapshot", "snapfixture", "-o", str(snap)],
                              env=dict(env, PYTHONPATH=str(REPO / "src")), capture_output=True, text=True, timeout=300)
        t_snapshot = time.monotonic() - t0
        assert done.returncode == 0, done.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        finish_kvmkit(proc, master, ms, lambda name, value: None)
    return LinuxSnapshot(snap, env, t_prompt, t_snapshot, count, SNAPSHOT_CPUS)


@pytest.fixture
def linux_vm(linux_snapshot: LinuxSnapshot) -> Iterator[Callable[[], VirtualMachine]]:
    """A factory: each call restores a fresh, started copy of the booted stock kernel (closed after the test)."""
    vms: list[VirtualMachine] = []

    def make() -> VirtualMachine:
        vm = VirtualMachine.restore(linux_snapshot.path).start()
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        if vm.status is None:
            vm.stop(0)
        vm.close()
