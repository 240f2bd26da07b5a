"""Fixtures for booting the stock Debian kernel with modules: a virtio initramfs and pvce.ko (the kernel,
the busybox initramfs and the booted-guest snapshot are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.boot.initramfs import busybox_initramfs
from kvmkit.errors import BootError


@pytest.fixture(scope="session")
def virtio_initrd(stock_bzimage: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox initramfs with the stock kernel's virtio and ext4 modules (`kvmkit initramfs --modules VERSION`)."""
    from kvmkit.boot.modules import find_modules, resolve_modules
    version = stock_bzimage.name.removeprefix("vmlinuz-")
    try:
        modules = resolve_modules(find_modules(version))
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
