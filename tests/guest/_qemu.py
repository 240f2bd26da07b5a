"""The bundled guest under QEMU TCG (its Xen PVH entry): what the QEMU guest tests share."""

from __future__ import annotations

import shutil

import pytest

QEMU = shutil.which("qemu-system-x86_64")

# Module marks for a test file that boots the bundled guest under QEMU.
QEMU_GUEST = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is missing (apt-get install qemu-system-x86)"),
    pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None,
                       reason="gcc and make are needed to build the bundled guest"),
]


def qemu_status(guest_status: int) -> int:
    """QEMU's exit status for a guest `outb v, 0x501` (isa-debug-exit: (v << 1) | 1)."""
    return (guest_status << 1) | 1
