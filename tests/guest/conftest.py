"""Fixtures for the bundled guest's virtio tests (QEMU's devices and kvmkit's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _virtio import DISK_BYTES


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An empty raw disk image of DISK_BYTES."""
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    return path
