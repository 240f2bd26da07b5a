"""The stock Debian kernel on kvmkit's PCI bus: an ext4 root on virtio-blk, its console on virtio, entropy from virtio-rng.

One boot (minutes on a nested-PVM host), as a user would run it:

    kvmkit run -k vmlinuz -i virtio-initrd.img --disk root.ext4 --disk ro.ext4,ro --console virtio --rng
               --share DIR:hostshare --share DIR2:roshare,ro --net user --net tap,ifname=kvmkitN
               -p "root=/dev/vda rw"

The initramfs (`kvmkit initramfs --modules VERSION`) loads the virtio and
ext4 modules and switch_roots to /dev/vda. The early boot messages come
through COM1 (earlycon), the shell through hvc0; both reach the same
terminal. In the guest the test writes a file and syncs, checks that the
second, read-only disk refuses every write (the device says so, the block
layer and ext4 obey), reads the entropy source, mounts both 9P shares (writes
a file into one, tries to leave it through symlinks and "..", and is refused
every write to the read-only one), gets an address from passt by DHCP and
fetches a page from a web server on the host's loopback through the
gateway, pings the host's end of a tap (when the machine allows taps: root
and /dev/net/tun), and powers off; on the host
it reads the file back from the image with debugfs and checks that the
read-only image did not change by a byte. A separate boot with ``,ro`` would
check the same enforcement at twice the cost; the second disk shares this one.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest
from _boot import REPO, finish_kvmkit, start_kvmkit

from kvmkit.boot.rootfs import ROOTFS_MARKER, find_tool, make_rootfs, read_image_file

pytestmark = [pytest.mark.slow, pytest.mark.kvm,
              pytest.mark.skipif(find_tool("mke2fs") is None, reason="e2fsprogs is not installed (apt-get install e2fsprogs)")]


TOKEN = "kvmkit-net-" + "ok"
TAP_HOST, TAP_GUEST = "10.213.0.1", "10.213.0.2"


def _tap_name() -> str | None:
    """A tap name for this run when the machine allows taps (root, /dev/net/tun, iproute2), else None."""
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists() or shutil.which("ip") is None:
        return None
    return f"kvmkit{os.getpid() % 100000}"


def _token_server() -> tuple[http.server.ThreadingHTTPServer, int]:
    """A web server on the host's loopback that answers /token: what the guest reaches through passt."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = TOKEN.encode() if self.path == "/token" else b"?"
            self.send_response(200 if self.path == "/token" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def test_ext4_root_on_virtio_blk_with_virtio_console_rng_9p_shares_and_net(stock_bzimage: Path, virtio_initrd: Path, tmp_path: Path,
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
    # The guest's udhcpc script, the one docs/virtio.md gives, handed over through the share.
    script = re.search(r"```sh\n(#!/bin/sh\n# udhcpc's script.*?)```", (REPO / "docs" / "virtio.md").read_text(), re.S)
    assert script, "the udhcpc script is missing from docs/virtio.md"
    (share / "udhcpc.script").write_text(script.group(1))
    (share / "udhcpc.script").chmod(0o755)
    server, port = _token_server()
    tap = _tap_name()
    tap_args = ["--net", f"tap,ifname={tap}"] if tap else []
    proc, master, ms = start_kvmkit(stock_bzimage, virtio_initrd, "--disk", f"{root},serial=kvmkit-root",
                                    "--disk", f"{ro},ro,serial=kvmkit-ro", "--console", "virtio", "--rng",
                                    "--share", f"{share}:hostshare", "--share", f"{ro_share}:roshare,ro",
                                    "--net", "user", *tap_args, append="root=/dev/vda rw")
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
        # The network: a lease from passt by DHCP, then the host's 127.0.0.1 through the gateway.
        net = ms.run("busybox udhcpc -i eth0 -s /mnt/s/udhcpc.script -q -f -n -t 10 2>&1 | tail -3; "
                     "gw=$(ip route | sed -n 's/^default via \\([^ ]*\\).*/\\1/p'); echo gateway=$gw; "
                     f"busybox wget -q -O - http://$gw:{port}/token", 180, "dhcp and tcp")
        pinged = ""
        if tap:   # kvmkit made the tap; the host end gets an address, the guest's eth1 the other
            subprocess.run(["ip", "addr", "add", f"{TAP_HOST}/24", "dev", tap], check=True)
            subprocess.run(["ip", "link", "set", "dev", tap, "up"], check=True)
            pinged = ms.run(f"ip addr add {TAP_GUEST}/24 dev eth1 && ip link set dev eth1 up && "
                            f"busybox ping -c 3 -W 10 {TAP_HOST}", 120, "tap ping")
        ro_share_out = ms.run("cat /mnt/r/keep; touch /mnt/r/x; mkdir /mnt/r/d; rm /mnt/r/keep; "
                              "umount /mnt/s /mnt/r && echo unmounted", 60, "ro share")
        os.write(master, b"poweroff -f\r")
        status = proc.wait(180)
    finally:
        server.shutdown()
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
    assert re.search(r"gateway=\d+\.\d+\.\d+\.\d+", net) and TOKEN in net, net
    if tap:
        assert re.search(r"3 packets transmitted, 3 (packets )?received", pinged), pinged
        assert not Path(f"/sys/class/net/{tap}").exists(), "kvmkit left its tap behind"
    else:
        print("tap: not tried (needs root and /dev/net/tun)", file=sys.stderr)
    frames = re.search(r"^\S+ \([0-9a-f:]{17}, passt.*\): tx (\d+) frames \d+ bytes, rx (\d+) frames", stderr, re.M)
    assert frames and int(frames[1]) > 0 and int(frames[2]) > 0, stderr     # kvmkit --stats: the card's traffic
    assert re.search(r"^pci: [1-9]\d* configuration space accesses$", stderr, re.M), stderr
    assert re.search(r"^hvc0: \d+ bytes out in \d+ host writes", stderr, re.M), stderr
