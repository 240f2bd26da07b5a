"""newc cpio writer and reader, and the busybox initramfs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.boot.initramfs import (
    INIT_MARKER,
    busybox_initramfs,
    chardev,
    cpio_from_directory,
    directory,
    file,
    read_cpio,
    symlink,
    write_cpio,
)
from kvmkit.errors import BootError

BUSYBOX = next((p for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")) if p.exists()), None)


def test_round_trip_entries() -> None:
    entries = [directory("etc"), file("etc/hello", b"hi\n"), file("odd", b"x" * 5, 0o700),
               symlink("bin/sh", "busybox"), chardev("dev/console", 5, 1)]
    back = read_cpio(write_cpio(entries))
    assert [e.name for e in back] == ["etc", "etc/hello", "odd", "bin/sh", "dev/console"]
    assert back[0].is_dir
    assert back[1].data == b"hi\n" and back[1].mode == stat.S_IFREG | 0o644
    assert back[2].data == b"xxxxx" and back[2].mode & 0o777 == 0o700
    assert back[3].is_symlink and back[3].data == b"busybox"
    assert back[4].is_chardev and (back[4].rdevmajor, back[4].rdevminor) == (5, 1)


def test_layout_is_newc() -> None:
    data = write_cpio([file("a", b"12345")])
    assert data[:6] == b"070701"
    assert int(data[6 + 6 * 8:6 + 7 * 8], 16) == 5  # filesize field
    assert data[110:112] == b"a\0"
    assert data.index(b"12345") % 4 == 0  # data starts 4-byte aligned
    assert b"TRAILER!!!" in data and len(data) % 512 == 0


def test_gzip(tmp_path: Path) -> None:
    data = write_cpio([file("x", b"y" * 1000)], compress=True)
    assert data[:2] == b"\x1f\x8b"
    assert read_cpio(data)[0].data == b"y" * 1000


def test_from_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_bytes(b"content")
    (tmp_path / "top").write_text("t")
    os.symlink("sub/f", tmp_path / "link")
    by_name = {e.name: e for e in read_cpio(cpio_from_directory(tmp_path))}
    assert set(by_name) == {"sub", "sub/f", "top", "link"}
    assert by_name["sub"].is_dir
    assert by_name["sub/f"].data == b"content"
    assert by_name["link"].is_symlink and by_name["link"].data == b"sub/f"


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BootError, match="not a directory"):
        cpio_from_directory(tmp_path / "missing")


def test_truncated_archive() -> None:
    data = write_cpio([file("a", b"z" * 100)])
    with pytest.raises(BootError, match="cpio"):
        read_cpio(data[:150])


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")
def test_busybox_initramfs() -> None:
    entries = {e.name: e for e in read_cpio(busybox_initramfs(BUSYBOX))}
    bb = entries["bin/busybox"]
    assert bb.is_file and bb.mode & 0o111 and bb.data == BUSYBOX.read_bytes()
    for applet in ("sh", "ls", "cat", "mount", "uname", "poweroff", "echo", "dmesg", "setsid", "cttyhack"):
        assert entries[f"bin/{applet}"].is_symlink and entries[f"bin/{applet}"].data == b"busybox"
    console = entries["dev/console"]
    assert console.is_chardev and (console.rdevmajor, console.rdevminor) == (5, 1)
    init = entries["init"]
    assert init.is_file and init.mode & 0o111
    text = init.data.decode()
    assert text.startswith("#!/bin/sh\n")
    assert INIT_MARKER in text
    assert "mount -t proc" in text and "mount -t sysfs" in text and "devtmpfs" in text
    assert "setsid cttyhack sh" in text
    for d in ("proc", "sys", "dev", "tmp"):
        assert entries[d].is_dir


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")
def test_busybox_initramfs_script() -> None:
    init = {e.name: e for e in read_cpio(busybox_initramfs(BUSYBOX, script="uname -r", compress=True))}["init"]
    assert "uname -r\npoweroff -f\n" in init.data.decode()


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")
def test_busybox_initramfs_extra_entries() -> None:
    extra = [directory("lib/modules"), file("lib/modules/pvce.ko", b"\x7fELF module", 0o644), file("timer_check", b"prog", 0o755)]
    entries = read_cpio(busybox_initramfs(BUSYBOX, extra=extra))
    names = [e.name for e in entries]
    assert names.index("init") < names.index("lib/modules") < names.index("lib/modules/pvce.ko")
    by_name = {e.name: e for e in entries}
    assert by_name["lib/modules/pvce.ko"].data == b"\x7fELF module" and by_name["lib/modules/pvce.ko"].is_file
    assert by_name["timer_check"].mode & 0o111 and by_name["lib/modules"].is_dir
    assert "bin/busybox" in by_name  # the base layout is unchanged


def test_busybox_missing(tmp_path: Path) -> None:
    with pytest.raises(BootError, match="busybox-static"):
        busybox_initramfs(tmp_path / "nope")


@pytest.mark.skipif(shutil.which("cpio") is None or BUSYBOX is None, reason="GNU cpio is not installed")
def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    """An independent reader agrees with ours."""
    archive = busybox_initramfs(BUSYBOX)
    out = subprocess.run(["cpio", "-t", "-v"], input=archive, capture_output=True, check=True)
    listing = out.stdout.decode()
    assert "bin/busybox" in listing and "init" in listing and "dev/console" in listing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_reader(data: bytes) -> None:
    try:
        read_cpio(b"070701" + data)
    except BootError:
        pass


def test_signed_size_field_rejected() -> None:
    """int() would accept '-0000001'; a negative size must not walk the reader backwards."""
    data = bytearray(write_cpio([file("a", b"abcd")]))
    data[6 + 6 * 8:6 + 7 * 8] = b"-0000001"
    with pytest.raises(BootError, match="non-hex"):
        read_cpio(bytes(data))
