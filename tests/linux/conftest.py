"""Fixtures for booting the stock Debian kernel: the kernel itself and a busybox initramfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.boot.initramfs import busybox_initramfs
from kvmkit.errors import BootError


@pytest.fixture(scope="session")
def busybox_initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox initramfs (kvmkit initramfs) whose /init gives a shell on the console."""
    try:
        data = busybox_initramfs()
    except BootError as exc:
        pytest.skip(f"no static busybox to build the initramfs: {exc}")
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(data)
    return path
