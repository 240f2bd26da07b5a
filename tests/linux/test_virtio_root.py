"""The stock Debian kernel on kvmkit's PCI bus: an ext4 root on virtio-blk, its console on virtio, entropy from virtio-rng.

One boot (minutes on a nested-PVM host), as a user would run it:

    kvmkit run -k vmlinuz -i virtio-initrd.img --disk root.ext4 --disk ro.ext4,ro --console virtio --rng
               --share DIR:hostshare --share DIR2:roshare,ro -p "root=/dev/vda rw"

The initramfs (`kvmkit initramfs --modules VERSION`) loads the virtio and
ext4 modules and switch_roots to /dev/vda. The early boot messages come
through COM1 (earlycon), the shell through hvc0; both reach the same
terminal. In the guest the test writes a file and syncs, checks that the
second, read-only disk refuses every write (the device says so, the block
layer and ext4 obey), reads the entropy source, mounts both 9P shares (writes
a file into one, tries to leave it through symlinks and "..", and is refused
every write to the read-only one), and powers off; on the host
it reads the file back from the image with debugfs and checks that the
read-only image did not change by a byte. A separate boot with ``,ro`` would
check the same enforcement at twice the cost; the second disk shares this one.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Callable

import pytest
from _boot import finish_kvmkit, start_kvmkit

from kvmkit.boot.rootfs import ROOTFS_MARKER, find_tool, make_rootfs, read_image_file

pytestmark = [pytest.mark.slow, pytest.mark.kvm,
              pytest.mark.skipif(find_tool("mke2fs") is None, reason="e2fsprogs is not installed (apt-get install e2fsprogs)")]


def test_ext4_root_on_virtio_blk_with_virtio_console_rng_and_9p_shares(stock_bzimage: Path, virtio_initrd: Path, tmp_path: Path,
                                                             record_property: Callable[[str, object], None]) -> None:
    root = make_rootfs(tmp_path / "root.ext4", "64M")
    (tmp_path / "ro" / "etc").mkdir(parents=True)
    (tmp_path / "ro" / "etc" / "motd").write_text("read-only disk\n")
    ro = make_rootfs(tmp_path / "ro.ext4", "16M", directory=tmp_path / "ro")
    ro_digest = hashlib.sha256(ro.read_bytes()).hexdigest()
    share, ro_share = tmp_path / "share", tmp_path / "ro-share"
    share.mkdir()
    ro_share.mkdir()
    (share / "from-host").write_text("host-data\n")
    (tmp_path / "outside").write_text("SECRET-OF-THE-HOST\n")    # beside the share: the guest must not reach it
    (share / "up").symlink_to("../outside")
    (share / "abs").symlink_to(tmp_path / "outside")
    (ro_share / "keep").write_text("kept\n")
    proc, master, ms = start_kvmkit(stock_bzimage, virtio_initrd, "--disk", f"{root},serial=kvmkit-root",
                                    "--disk", f"{ro},ro,serial=kvmkit-ro", "--console", "virtio", "--rng",
                                    "--share", f"{share}:hostshare", "--share", f"{ro_share}:roshare,ro",
                                    append="root=/dev/vda rw")
    try:
        ms.wait("banner", "Linux version 6.1", 120)
        ms.wait("virtio-blk vda", "virtio_blk virtio0: [vda]", 900)
        ms.wait("ext4 root mounted", "switching to root /dev/vda (rw)", 600)
        ms.wait("root init", ROOTFS_MARKER, 120)
        ms.wait("shell prompt", re.compile(rb"\n[^\n]*[#$] "), 120)
        consoles = ms.run("cat /proc/consoles", 60, "consoles")
        pci = ms.run("for d in /sys/bus/pci/devices/*; do echo $(cat $d/vendor):$(cat $d/device); done", 60, "pci")
        msi = ms.run("grep -c PCI-MSI /proc/interrupts", 60, "msi")
        serial = ms.run("for f in vda/serial vdb/serial vdb/ro; do cat /sys/block/$f; echo; done", 60, "serials")
        written = ms.run("echo kvmkit-$((6 * 7)) > /root/proof && sync && cat /root/proof", 60, "write")
        refused = ms.run("mount -o ro /dev/vdb /mnt && cat /mnt/etc/motd; touch /mnt/x; "
                         "dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync; umount /mnt", 120, "ro disk")
        rng = ms.run("cat /sys/class/misc/hw_random/rng_current; head -c 64 /dev/hwrng | od -An -tx1 | wc -w", 60, "rng")
        opts = "-t 9p -o trans=virtio,version=9p2000.L"
        shared = ms.run(f"mkdir -p /mnt/s /mnt/r && mount {opts} hostshare /mnt/s && mount {opts} roshare /mnt/r && "
                        "cat /mnt/s/from-host && echo guest-$((6 * 7)) > /mnt/s/from-guest && sync && ls /mnt/s", 120,
                        "9p share")
        escapes = ms.run("cat /mnt/s/up /mnt/s/abs /mnt/s/../outside; ls /mnt/s/..; readlink /mnt/s/up", 60, "escapes")
        ro_share_out = ms.run("cat /mnt/r/keep; touch /mnt/r/x; mkdir /mnt/r/d; rm /mnt/r/keep; "
                              "umount /mnt/s /mnt/r && echo unmounted", 60, "ro share")
        os.write(master, b"poweroff -f\r")
        status = proc.wait(180)
    finally:
        stderr = finish_kvmkit(proc, master, ms, record_property)
        print(stderr, file=sys.stderr)

    assert status == 0, stderr
    assert "Kernel panic" not in ms.text
    assert re.search(r"^hvc0\s", consoles, re.M), consoles              # the console is virtio's
    ids = set(pci.split())
    assert {"0x1af4:0x1042", "0x1af4:0x1043", "0x1af4:0x1044", "0x1af4:0x1049", "0x8086:0x1237"} <= ids, pci
    assert int(msi.strip().splitlines()[-1]) >= 4, msi                 # config + queue vectors through MSI-X
    assert serial.split() == ["kvmkit-root", "kvmkit-ro", "1"], serial
    assert written.strip() == "kvmkit-42"
    assert "read-only disk" in refused and "Read-only file system" in refused, refused
    assert re.search(r"dd: .*(Operation not permitted|Read-only file system|Input/output error)", refused), refused
    lines = rng.split()
    assert lines[0] == "virtio_rng.0" and int(lines[-1]) == 64, rng
    assert read_image_file(root, "/root/proof") == b"kvmkit-42\n"
    assert hashlib.sha256(ro.read_bytes()).hexdigest() == ro_digest, "the read-only image changed"
    # The shares: the guest reads and writes the host directory, cannot leave it (a symlink is
    # resolved in the guest's own tree, never on the host), and the read-only one refuses writes.
    assert "host-data" in shared and "from-guest" in shared, shared
    assert (share / "from-guest").read_text() == "guest-42\n"
    assert "SECRET" not in escapes and "../outside" in escapes, escapes
    assert "kept" in ro_share_out and ro_share_out.count("Read-only file system") == 3, ro_share_out
    assert "unmounted" in ro_share_out, ro_share_out
    assert sorted(p.name for p in ro_share.iterdir()) == ["keep"]
    assert re.search(r"^pci: [1-9]\d* configuration space accesses$", stderr, re.M), stderr
    assert re.search(r"^hvc0: \d+ bytes out in \d+ host writes", stderr, re.M), stderr
