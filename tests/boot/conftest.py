"""Fixtures for the boot tests: the real Debian kernel, and builders of crafted images.

The crafted images are the smallest files that pass (or, deliberately, fail)
each validation step, so every error path can be reached without a real
kernel build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from _images import build_bzimage, build_elf, compress
from kvmkit.boot.bzimage import open_bzimage, BzImage


@pytest.fixture(scope="session")
def stock_image(stock_bzimage: Path) -> bytes:
    return stock_bzimage.read_bytes()


@pytest.fixture(scope="session")
def stock_parsed(stock_image: bytes) -> BzImage:
    return open_bzimage(stock_image)


@pytest.fixture(scope="session")
def make_elf() -> Callable[..., bytes]:
    return build_elf


@pytest.fixture(scope="session")
def make_bzimage() -> Callable[..., bytes]:
    return build_bzimage


@pytest.fixture(scope="session")
def compress_payload() -> Callable[[bytes, str], bytes]:
    return compress
