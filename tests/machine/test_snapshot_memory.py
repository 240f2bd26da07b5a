"""Snapshot memory files: only touched, non-zero blocks are written; a restored mapping is copy-on-write.

No KVM here: GuestMemory is plain mmap, so the sparse writer, its digest
and the MAP_PRIVATE restore can be checked on their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmkit.machine.snapshot import BLOCK, SnapshotError, read_snapshot, region_digest, save_region
from kvmkit.memory import MiB, GuestMemory


def _data_bytes(path: Path) -> int:
    """Bytes the file system actually stores (holes excluded)."""
    return os.stat(path).st_blocks * 512


def test_untouched_memory_is_a_hole_and_touched_blocks_are_written(tmp_path: Path) -> None:
    mem = GuestMemory(64 * MiB)
    mem.write(0x1000, b"kernel")
    mem.write(40 * MiB + 7, b"\xff" * 100)
    mem.write(20 * MiB, bytes(4096))            # touched but zero: stays a hole
    out = save_region(mem.regions[0], tmp_path / "memory-0.raw")
    assert out["size"] == 64 * MiB and os.path.getsize(tmp_path / "memory-0.raw") == 64 * MiB
    assert out["data_bytes"] == 2 * BLOCK
    assert _data_bytes(tmp_path / "memory-0.raw") <= 4 * BLOCK
    fd = os.open(tmp_path / "memory-0.raw", os.O_RDONLY)
    try:
        assert region_digest(fd, 64 * MiB) == out["sha256"]
        assert os.pread(fd, 6, 0x1000) == b"kernel"
        assert os.pread(fd, 100, 40 * MiB + 7) == b"\xff" * 100
    finally:
        os.close(fd)
    mem.close()


def test_a_restored_mapping_is_copy_on_write_and_snapshots_again_whole(tmp_path: Path) -> None:
    mem = GuestMemory(16 * MiB)
    mem.write(3 * MiB, b"first")
    save_region(mem.regions[0], tmp_path / "a.raw")
    mem.close()
    fd = os.open(tmp_path / "a.raw", os.O_RDONLY)
    restored = GuestMemory(16 * MiB, backing=[fd])
    assert restored.read(3 * MiB, 5) == b"first"
    restored.write(3 * MiB, b"SECOND")
    restored.write(9 * MiB, b"new")
    with open(tmp_path / "a.raw", "rb") as f:     # the snapshot itself never changes
        f.seek(3 * MiB)
        assert f.read(6) == b"first\0"
    # A snapshot of the restored VM holds the pages it never touched (still the file's) and its own.
    out = save_region(restored.regions[0], tmp_path / "b.raw")
    with open(tmp_path / "b.raw", "rb") as f:
        f.seek(3 * MiB)
        assert f.read(6) == b"SECOND"
        f.seek(9 * MiB)
        assert f.read(3) == b"new"
    assert out["data_bytes"] == 2 * BLOCK
    restored.close()
    os.close(fd)


def test_a_digest_changes_with_one_byte(tmp_path: Path) -> None:
    mem = GuestMemory(8 * MiB)
    mem.write(5 * MiB, b"abc")
    out = save_region(mem.regions[0], tmp_path / "m.raw")
    with open(tmp_path / "m.raw", "r+b") as f:
        f.seek(5 * MiB + 1)
        f.write(b"X")
    fd = os.open(tmp_path / "m.raw", os.O_RDONLY)
    try:
        assert region_digest(fd, 8 * MiB) != out["sha256"]
    finally:
        os.close(fd)
    mem.close()


def test_not_a_snapshot_is_refused_in_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not a kvmkit snapshot|cannot open"):
        read_snapshot(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(SnapshotError, match="not a kvmkit snapshot"):
        read_snapshot(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "kvmkit-snapshot", "version": 99}')
    with pytest.raises(SnapshotError, match="version 99"):
        read_snapshot(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").symlink_to("/etc/passwd")
    with pytest.raises(SnapshotError, match="symbolic link"):
        read_snapshot(tmp_path)
