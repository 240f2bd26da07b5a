"""ext4 root images: built with mke2fs -d, read back with debugfs (no mounting, no root needed)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from kvmkit.boot import rootfs
from kvmkit.boot.rootfs import ROOTFS_MARKER, busybox_tree, make_rootfs
from kvmkit.errors import BootError

BUSYBOX = next((p for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")) if p.exists()), None)


DEBUGFS = rootfs.find_tool("debugfs")
needs_e2fsprogs = pytest.mark.skipif(DEBUGFS is None, reason="e2fsprogs is not installed (apt-get install e2fsprogs)")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed (apt-get install busybox-static)")


debugfs = rootfs.debugfs


def stat_of(image: Path, path: str) -> dict[str, str]:
    text = debugfs(image, f"stat {path}")
    assert "Inode:" in text, f"{path} is not in the image"
    fields = dict(re.findall(r"(Type|Mode|User|Group):\s+(\S+)", text))
    m = re.search(r"Device major/minor number: (\d+):(\d+)", text)
    if m:
        fields["rdev"] = f"{int(m.group(1))}:{int(m.group(2))}"
    m = re.search(r'Fast link dest: "([^"]*)"', text)
    if m:
        fields["link"] = m.group(1)
    return fields


@needs_e2fsprogs
@needs_busybox
def test_busybox_rootfs(tmp_path: Path) -> None:
    image = make_rootfs(tmp_path / "root.ext4", "32M", busybox=BUSYBOX)
    assert image.stat().st_size == 32 << 20
    assert debugfs(image, "cat /etc/passwd") == "root:x:0:0:root:/root:/bin/sh\n"
    debugfs(image, f"dump /bin/busybox {tmp_path / 'busybox'}")
    assert (tmp_path / "busybox").read_bytes() == BUSYBOX.read_bytes()  # type: ignore[union-attr]
    assert stat_of(image, "/bin/busybox")["Mode"] == "0755"
    init = stat_of(image, "/sbin/init")
    assert init["Type"] == "symlink" and init["link"] == "/bin/busybox"
    for applet in ("/bin/sh", "/sbin/poweroff", "/bin/mount", "/sbin/switch_root"):
        assert stat_of(image, applet)["Type"] == "symlink", applet
    console = stat_of(image, "/dev/console")
    assert console["Type"] == "character" and console["rdev"] == "5:1" and console["Mode"] == "0600"
    assert stat_of(image, "/dev/null")["Mode"] == "0666"
    assert stat_of(image, "/tmp")["Mode"] == "01777"
    assert stat_of(image, "/root")["Mode"] == "0700"
    for d in ("/proc", "/sys", "/dev", "/etc/init.d"):
        assert stat_of(image, d)["Type"] == "directory", d
    rcs = stat_of(image, "/etc/init.d/rcS")
    assert rcs["Mode"] == "0755" and rcs["User"] == "0"
    assert ROOTFS_MARKER in debugfs(image, "cat /etc/init.d/rcS")
    inittab = debugfs(image, "cat /etc/inittab")
    assert "::sysinit:/etc/init.d/rcS" in inittab and "cttyhack /bin/sh" in inittab and "::shutdown:" in inittab
    features = re.search(r"Filesystem features:(.*)", debugfs(image, "stats")).group(1).split()  # type: ignore[union-attr]
    assert "has_journal" in features and "extent" in features  # ext4, not ext2
    assert "Filesystem volume name:   kvmkit-root" in debugfs(image, "stats")


@needs_e2fsprogs
def test_rootfs_from_directory_keeps_modes_and_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sbin").mkdir(parents=True)
    (src / "sbin" / "init").write_text("#!/bin/sh\nexec sh\n")
    os.chmod(src / "sbin" / "init", 0o750)
    (src / "secret").write_text("s")
    os.chmod(src / "secret", 0o600)
    os.symlink("sbin/init", src / "init")
    image = make_rootfs(tmp_path / "r.ext4", 16 << 20, directory=src)
    assert stat_of(image, "/sbin/init")["Mode"] == "0750"
    assert stat_of(image, "/secret")["Mode"] == "0600"
    assert stat_of(image, "/init")["link"] == "sbin/init"
    assert debugfs(image, "cat /sbin/init") == "#!/bin/sh\nexec sh\n"
    assert "Inode:" not in debugfs(image, "stat /bin/busybox")  # the directory alone, no busybox system


@needs_e2fsprogs
@needs_busybox
def test_directory_over_busybox_system(tmp_path: Path) -> None:
    src = tmp_path / "overlay" / "etc"
    src.mkdir(parents=True)
    (src / "rc.local").write_text("#!/bin/sh\necho hello\n")
    os.chmod(src / "rc.local", 0o755)
    image = make_rootfs(tmp_path / "r.ext4", "32M", directory=tmp_path / "overlay", busybox=BUSYBOX)
    assert stat_of(image, "/etc/rc.local")["Mode"] == "0755"
    assert debugfs(image, "cat /etc/passwd").startswith("root:")


@needs_e2fsprogs
@needs_busybox
def test_files_become_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As an ordinary user, mke2fs -d copies the user's uid; the image must say root."""
    uid = os.geteuid()
    if uid == 0:  # pretend to be user 4242, whose files these are
        src = busybox_tree(tmp_path / "tree", BUSYBOX)
        for dirpath, dirnames, filenames in os.walk(src):
            for name in dirnames + filenames:
                os.lchown(Path(dirpath) / name, 4242, 4242)
        monkeypatch.setattr(os, "geteuid", lambda: 4242)
        monkeypatch.setattr(os, "getegid", lambda: 4242)
        image = make_rootfs(tmp_path / "r.ext4", "32M", directory=src)
    else:
        image = make_rootfs(tmp_path / "r.ext4", "32M", busybox=BUSYBOX)
    for path in ("/etc/passwd", "/bin/busybox", "/bin/sh", "/etc"):
        st = stat_of(image, path)
        assert (st["User"], st["Group"]) == ("0", "0"), path


@pytest.mark.parametrize("size, message", [("64Q", "not a size"), ("-1M", "not a size"), (4096, "too small")])
def test_bad_size(tmp_path: Path, size: int | str, message: str) -> None:
    if DEBUGFS is None:
        pytest.skip("e2fsprogs is not installed")
    with pytest.raises(BootError, match=message):
        make_rootfs(tmp_path / "r.ext4", size)


def test_without_e2fsprogs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(rootfs, "_SBIN_DIRS", ())
    with pytest.raises(BootError, match=r"apt-get install e2fsprogs"):
        make_rootfs(tmp_path / "r.ext4", "16M")


@needs_e2fsprogs
def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BootError, match="not a directory"):
        make_rootfs(tmp_path / "r.ext4", "16M", directory=tmp_path / "missing")
    assert not (tmp_path / "r.ext4").exists()


@needs_e2fsprogs
def test_too_small_for_contents(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    with pytest.raises(BootError, match="mke2fs"):
        make_rootfs(tmp_path / "r.ext4", "2M", directory=src)
    assert list(tmp_path.glob("r.ext4*")) == []


@needs_e2fsprogs
@needs_busybox
def test_overlay_replaces_applet_links_without_following_them(tmp_path: Path) -> None:
    """An overlay's own /sbin/init replaces the busybox link; the host's busybox stays untouched."""
    before = BUSYBOX.read_bytes()  # type: ignore[union-attr]
    over = tmp_path / "over"
    (over / "sbin").mkdir(parents=True)
    (over / "sbin" / "init").write_text("#!/bin/sh\nexec /bin/sh\n")
    os.chmod(over / "sbin" / "init", 0o755)
    os.symlink("/bin/busybox", over / "sbin" / "reboot")
    image = make_rootfs(tmp_path / "r.ext4", "32M", directory=over, busybox=BUSYBOX)
    assert BUSYBOX.read_bytes() == before  # type: ignore[union-attr]
    assert stat_of(image, "/sbin/init")["Type"] == "regular"
    assert debugfs(image, "cat /sbin/init") == "#!/bin/sh\nexec /bin/sh\n"
    assert stat_of(image, "/sbin/reboot")["link"] == "/bin/busybox"
