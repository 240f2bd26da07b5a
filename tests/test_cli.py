"""The helper commands of the CLI: initramfs and inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvmkit.boot.bundled import bundled_guest
from kvmkit.boot.initramfs import read_cpio

SRC = str(Path(__file__).resolve().parents[1] / "src")


def kvmkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmkit", *args], env={**os.environ, "PYTHONPATH": SRC},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_initramfs_from_directory_reads_back(tmp_path: Path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello from kvmkit\n")
    (root / "init").write_text("#!/bin/sh\n")
    (root / "init").chmod(0o755)
    out = tmp_path / "initrd.img"
    p = kvmkit("initramfs", "-o", str(out), "--directory", str(root), "--gzip")
    assert p.returncode == 0, p.stderr
    entries = {e.name: e for e in read_cpio(out.read_bytes())}
    assert entries["etc/motd"].data == b"hello from kvmkit\n"
    assert entries["init"].mode & 0o111


def test_inspect_the_bundled_guest():
    p = kvmkit("inspect", "--json", str(bundled_guest()))
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["format"] in ("elf", "ELF")
    assert info["entry"] >= 0x100000


import pytest  # noqa: E402


@pytest.mark.kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="recording KVM tracepoints needs root")
def test_trace_record_then_report(tmp_path: Path):
    out = tmp_path / "vm.trace"
    p = kvmkit("trace", "record", "-o", str(out), "--", "run", "pio-loop", "50")
    assert p.returncode == 0, p.stderr
    r = kvmkit("trace", "report", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["activity"]["accesses"]["pio"]["write 0x80"] == 50


def test_cpuid_clear_parsing():
    from kvmkit.machine.config import parse_cpuid_clear as _cpuid_clear
    from kvmkit.errors import KvmkitError
    assert _cpuid_clear(["1:ecx:13", "1:ECX:0", "0x7:ebx:9"]) == {(1, "ecx"): (1 << 13) | 1, (7, "ebx"): 1 << 9}
    for bad in ("1:ecx", "1:exx:3", "1:ecx:32", "x:ecx:1"):
        with pytest.raises(KvmkitError):
            _cpuid_clear([bad])


@pytest.mark.kvm
def test_cpuid_clear_hides_the_feature_from_the_guest():
    """CPUID.1:ECX bit 13 (CX16) is gone from the table kvmkit gives KVM_SET_CPUID2."""
    from kvmkit.machine.cpu import build_cpuid
    from kvmkit.kvm import Kvm
    k = Kvm()
    try:
        sup = k.supported_cpuid()
    finally:
        k.close()
    leaf1 = [e for e in build_cpuid(sup, 0, 1, {(1, "ecx"): 1 << 13}) if e.function == 1][0]
    assert not leaf1.ecx & (1 << 13)
    untouched = [e for e in build_cpuid(sup, 0, 1, {}) if e.function == 1][0]
    assert leaf1.ecx == untouched.ecx & ~(1 << 13)


def test_initramfs_with_modules_from_a_tree(tmp_path: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent / "boot"))
    from test_modules import VERSION, make_tree  # the synthetic module builder of the module tests
    tree = make_tree(tmp_path, {"kernel/drivers/virtio/virtio.ko": {},
                                "kernel/drivers/block/virtio_blk.ko": {"depends": "virtio"}})
    out = tmp_path / "initrd.img"
    p = kvmkit("initramfs", "-o", str(out), "--modules", str(tree.root), "--module", "virtio_blk")
    assert p.returncode == 0, p.stderr
    assert "modules, in load order: virtio virtio_blk" in p.stderr
    names = {e.name for e in read_cpio(out.read_bytes())}
    assert f"lib/modules/{VERSION}/kernel/drivers/block/virtio_blk.ko" in names
    bad = kvmkit("initramfs", "-o", str(out), "--modules", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr


def test_rootfs_builds_an_ext4_image(tmp_path: Path):
    from kvmkit.boot.rootfs import find_tool, read_image_file
    if find_tool("mke2fs") is None or not Path("/bin/busybox").exists():
        import pytest
        pytest.skip("e2fsprogs and busybox-static are needed")
    (tmp_path / "extra" / "etc").mkdir(parents=True)
    (tmp_path / "extra" / "etc" / "motd").write_text("from the host\n")
    out = tmp_path / "root.ext4"
    p = kvmkit("rootfs", "-o", str(out), "--size", "32M", "--directory", str(tmp_path / "extra"), "--busybox", "/bin/busybox")
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size == 32 << 20
    assert read_image_file(out, "/etc/motd") == b"from the host\n"
    assert read_image_file(out, "/bin/busybox")[:4] == b"\x7fELF"


def test_inspect_shows_addresses_in_hex_and_has_help():
    p = kvmkit("inspect", str(bundled_guest()))
    assert p.returncode == 0, p.stderr
    rows = dict(line.split(None, 1) for line in p.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert rows["entry"].startswith("0x") and rows["load_start"].startswith("0x")
    assert "paddr 0x" in rows["segments"]
    h = kvmkit("inspect", "--help")
    assert h.returncode == 0 and "Describe a kernel image without booting it" in h.stdout
    assert "Addresses are in hex" in h.stdout and "--json" in h.stdout


def test_trace_help_is_help():
    for argv, rc in ((["trace", "--help"], 0), (["trace", "-h"], 0), (["trace"], 2)):
        p = kvmkit(*argv)
        assert p.returncode == rc, p.stderr
        assert p.stdout.startswith("usage: kvmkit trace record") and "trace_cmd" not in p.stdout + p.stderr


def test_a_guest_reboot_says_so():
    p = kvmkit("run", "echo", "bye", ";", "reboot")
    assert p.returncode == 0, p.stderr
    assert "kvmkit: guest requested a reset (i8042)" in p.stderr


def test_a_command_for_linux_is_packed_into_the_initramfs(tmp_path: Path):
    """`kvmkit run -k KERNEL -- CMD`: the initramfs kvmkit builds runs CMD and reports its status (the boot
    itself is tests/linux/test_run_command.py)."""
    from kvmkit.boot.initramfs import RUNNER, command_initramfs, command_script
    import shlex
    argv = ["sh", "-c", 'echo "$0" "$1"; exit 3', "it's", '"quoted"']
    script = command_script(argv)
    assert shlex.split(script.splitlines()[0]) == argv
    # the status reaches the exit port through /dev/port; run the script's logic with od in place of dd
    probe = script.replace("dd of=/dev/port bs=1 seek=1281 count=1 2>/dev/null", "od -An -tu1")
    out = subprocess.run(["sh", "-c", probe], capture_output=True, text=True).stdout.split()
    assert out[:2] == ["it's", '"quoted"'] and out[2] == "3"
    init = {e.name: e for e in read_cpio(command_initramfs(argv))}["init"].data.decode()
    assert script in init and init.rstrip().endswith("poweroff -f")
    user = b"070701" + b"0" * 201  # the user's archive comes first, padded to 4 bytes, the runner over it
    combined = command_initramfs(argv, base=user)
    assert combined.startswith(user + b"\0")
    start = len(user) + 1
    assert start % 4 == 0
    overlay = {e.name: e for e in read_cpio(combined[start:])}
    assert script in overlay[RUNNER].data.decode() and overlay[RUNNER].mode & 0o111


def test_the_host_root_command_runs_chrooted_in_the_share_from_the_host_cwd(tmp_path: Path):
    """`kvmkit run -k KERNEL --share /:hostroot,ro -- CMD`: /init mounts the share, puts tmpfs over the
    places a command writes, and runs CMD chrooted there from the host's working directory. The shell
    logic runs here with mount and chroot stubbed (the boot is tests/linux/test_run_command.py)."""
    from kvmkit.boot.initramfs import HOSTROOT_TAG, hostroot_stage
    argv = ["sh", "-c", 'pwd; echo "$0"; exit 4', "a b"]
    stubs = 'mount() { echo "mount $*" >&2; return 0; }\nchroot() { shift; "$@"; }\n'
    stage = hostroot_stage(argv, True, str(tmp_path))
    out = subprocess.run(["sh", "-c", stubs + stage + "echo status=$status"], capture_output=True, text=True)
    assert out.stdout.split("\n")[:3] == [str(tmp_path), "a b", "status=4"], out
    assert f"mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose {HOSTROOT_TAG} /newroot" in out.stderr
    assert "mount --bind /proc /newroot/proc" in out.stderr
    failing = 'mount() { return 32; }\n'
    out = subprocess.run(["sh", "-c", failing + stage + "echo status=$status"], capture_output=True, text=True)
    assert "could not be mounted" in out.stdout and "status=125" in out.stdout
    assert ",ro" not in hostroot_stage(argv, False, "/")
    assert "for d in run var/tmp root;" in hostroot_stage(argv, True, "/tmp/work")   # /tmp stays the host's


def test_the_host_root_command_needs_kvmkits_own_initramfs(tmp_path: Path):
    (tmp_path / "i.img").write_bytes(b"070701" + b"0" * 200)
    p = kvmkit("run", "-k", str(tmp_path / "k"), "-i", str(tmp_path / "i.img"), "--share", "/:hostroot,ro", "--", "true")
    assert p.returncode != 0 and "drop -i" in p.stderr, p.stderr
