"""ext4 root disk images, from a directory or as a small busybox system.

A guest with a root disk exercises what an initramfs never does: a block
driver, a journal, writes that must survive poweroff. The image is built
with e2fsprogs' ``mke2fs -d DIR`` (1.43 and later), which copies a
directory tree into the new file system without mounting anything, so no
root privileges or loop devices are needed. What ``-d`` cannot do as an
ordinary user (device nodes, root ownership) is set afterwards with
``debugfs -w``, which edits the image file directly.

The busybox system boots with busybox init: /etc/inittab runs
/etc/init.d/rcS once, then a shell on the console through ``cttyhack``,
which opens the terminal the kernel's last ``console=`` names (ttyS0,
hvc0, ...) so job control works on either. ``poweroff`` and ``reboot``
signal init, which unmounts the disk cleanly first. An executable
/etc/rc.local, if present, runs at the end of rcS (tests use it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import BootError
from .initramfs import BUSYBOX_APPLETS, busybox_initramfs, read_cpio

ROOTFS_MARKER = "kvmkit rootfs: init started"
_SIZE_RE = re.compile(r"([1-9][0-9]*)([KMGT]?)", re.I)
_SBIN_DIRS = ("/sbin", "/usr/sbin")  # mke2fs lives here, often outside an ordinary user's PATH

INITTAB = """\
# busybox init: id:runlevels:action:process (an empty id means /dev/console).
::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r 2>/dev/null
::restart:/sbin/init
"""

RCS = f"""\
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# An initramfs may have moved its mounts here already; mount what is missing.
[ -e /proc/self ] || mount -t proc proc /proc
mounted() {{ grep -q "^[^ ]* $1 " /proc/mounts; }}
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && (mounted /dev/pts || mount -t devpts devpts /dev/pts)
mounted /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
hostname -F /etc/hostname 2>/dev/null
echo '{ROOTFS_MARKER}'
[ -x /etc/rc.local ] && /etc/rc.local
exit 0
"""

PROFILE = """\
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
"""

FILES: dict[str, tuple[str, int]] = {
    "etc/inittab": (INITTAB, 0o644),
    "etc/init.d/rcS": (RCS, 0o755),
    "etc/profile": (PROFILE, 0o644),
    "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
    "etc/group": ("root:x:0:\n", 0o644),
    "etc/shadow": ("root::0:0:99999:7:::\n", 0o600),  # no password: a test system on a private console
    "etc/hostname": ("kvmkit\n", 0o644),
}
DIRS: dict[str, int] = {
    "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
    "etc": 0o755, "etc/init.d": 0o755, "dev": 0o755, "proc": 0o555, "sys": 0o555,
    "tmp": 0o1777, "root": 0o700, "mnt": 0o755, "run": 0o755, "var": 0o755,
}
# Created with debugfs, since mknod needs root: enough for init before devtmpfs is mounted.
DEVICES = (("dev/console", 5, 1, 0o600), ("dev/null", 1, 3, 0o666))


def find_tool(name: str) -> str | None:
    """An e2fsprogs program, also in the sbin directories a user's PATH may lack; None if absent."""
    return shutil.which(name) or next((f"{d}/{name}" for d in _SBIN_DIRS if os.access(f"{d}/{name}", os.X_OK)), None)


def _tool(name: str) -> str:
    found = find_tool(name)
    if found is None:
        raise BootError(f"{name} is not installed, so no ext4 root image can be built; run 'apt-get install e2fsprogs'.")
    return found


def debugfs(image: Path, request: str) -> str:
    """Run one debugfs request (``cat /etc/passwd``, ``stat /x``) on an ext4 image, read-only; its output."""
    out = _run([_tool("debugfs"), "-R", request, str(image)], f"debugfs {request!r} on {image}")
    return out.stdout


def read_image_file(image: Path, path: str) -> bytes:
    """The contents of ``path`` inside an ext4 image, as the guest left it (debugfs ``cat``)."""
    out = subprocess.run([_tool("debugfs"), "-R", f"cat {path}", str(image)], capture_output=True, timeout=60)
    if out.returncode != 0:
        raise BootError(f"debugfs could not read {path} from {image}: {out.stderr.decode(errors='replace').strip()}.")
    return out.stdout


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise BootError(f"{what} took longer than 5 minutes; build a smaller image or check the disk.") from exc
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise BootError(f"{what} failed ({msg[-1] if msg else f'status {out.returncode}'}); check the size and the source directory.")
    return out


def _check_mke2fs(mke2fs: str) -> None:
    """``-d`` appeared in e2fsprogs 1.43 (2016); older ones fail with a confusing usage message."""
    out = subprocess.run([mke2fs, "-V"], capture_output=True, text=True, timeout=30)
    m = re.search(r"mke2fs (\d+)\.(\d+)", out.stdout + out.stderr)
    if m and (int(m.group(1)), int(m.group(2))) < (1, 43):
        raise BootError(f"{mke2fs} is e2fsprogs {m.group(1)}.{m.group(2)}, which cannot copy a directory into an image (-d); install e2fsprogs 1.43 or later.")


def _size_arg(size: int | str) -> str:
    """A size for mke2fs: bytes as an int, or a string like '64M'."""
    if isinstance(size, int):
        if size < 1 << 20:
            raise BootError(f"a root image of {size} bytes is too small for ext4; give at least 1 MiB (8 MiB or more in practice).")
        return f"{size // 1024}k"
    m = _SIZE_RE.fullmatch(size.strip())
    if m is None:
        raise BootError(f"{size!r} is not a size like 64M or 1G; give the image size in bytes or with a K, M, G or T suffix.")
    return f"{m.group(1)}{m.group(2).lower()}"


def _applet_paths(busybox: Path) -> list[str]:
    """Where each applet lives (``usr/bin/env``, ``sbin/init``), asked of the binary itself when it runs here."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30)
        paths = [p.strip() for p in out.stdout.splitlines() if p.strip()] if out.returncode == 0 else []
    except OSError:
        paths = []
    if not paths:  # a busybox for another machine: the initramfs's list, plus init
        paths = [f"bin/{a}" for a in BUSYBOX_APPLETS] + ["sbin/init"]
    return [p for p in paths if re.fullmatch(r"(usr/)?s?bin/[\w.\[-]+", p) and p != "bin/busybox"]


def busybox_tree(dest: Path, busybox: Path | None = None) -> Path:
    """Write a bootable busybox system into the directory ``dest`` (created if needed)."""
    # The initramfs builder already finds and vets busybox (static, readable); reuse its answer.
    busybox = Path(busybox) if busybox is not None else next(
        (p for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")) if p.exists()), Path("/bin/busybox"))
    vetted = {e.name: e for e in read_cpio(busybox_initramfs(busybox))}["bin/busybox"].data
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for d, mode in DIRS.items():
        (dest / d).mkdir(parents=True, exist_ok=True)
        os.chmod(dest / d, mode)
    binary = dest / "bin" / "busybox"
    binary.unlink(missing_ok=True)  # never write through a link that is already there
    binary.write_bytes(vetted)
    os.chmod(binary, 0o755)
    for applet in _applet_paths(busybox):
        link = dest / applet
        if not link.exists() and not link.is_symlink():
            os.symlink("/bin/busybox", link)
    for name, (text, mode) in FILES.items():
        path = dest / name
        path.unlink(missing_ok=True)
        path.write_text(text)
        os.chmod(path, mode)
    return dest


def make_rootfs(output: Path, size: int | str, *, directory: Path | None = None,
                busybox: Path | None = None, label: str = "kvmkit-root") -> Path:
    """Build an ext4 image at ``output`` of ``size`` (bytes, or '64M') and return its path.

    With ``directory`` alone the image holds that tree. Without it, the image
    is a busybox system (:func:`busybox_tree`) from ``busybox`` or the host's
    busybox-static; with both, ``directory`` is copied over that system (an
    /etc/rc.local, a test program). Files keep their modes; as an ordinary
    user the caller's files become root's in the image, as they would be on
    an installed system.
    """
    mke2fs = _tool("mke2fs")
    debugfs = _tool("debugfs")
    _check_mke2fs(mke2fs)
    size_arg = _size_arg(size)
    if directory is not None and not Path(directory).is_dir():
        raise BootError(f"{directory} is not a directory, so no root image can be built from it; pass a directory.")
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="kvmkit-rootfs-") as tmp:
        if directory is not None and busybox is None:
            source = Path(directory)
        else:
            source = busybox_tree(Path(tmp) / "root", busybox)
            if directory is not None:
                _overlay(Path(directory), source)
        partial = output.with_name(output.name + ".partial")
        partial.unlink(missing_ok=True)
        try:
            _run([mke2fs, "-q", "-F", "-t", "ext4", "-L", label, "-d", str(source), str(partial), size_arg],
                 f"mke2fs -t ext4 -d {source} {output} {size_arg}")
            script = _fixups(source, busybox_system=directory is None or busybox is not None)
            if script:
                cmds = Path(tmp) / "debugfs.cmds"
                cmds.write_text(script)
                out = _run([debugfs, "-w", "-f", str(cmds), str(partial)], f"debugfs -w on {output}")
                # debugfs exits 0 whatever its commands do; a failing one says so on stderr.
                errors = [line for line in out.stderr.splitlines() if line.strip() and not re.match(r"debugfs \d", line)]
                if errors:
                    raise BootError(f"debugfs could not finish the root image ({errors[0].strip()}); check that e2fsprogs is intact.")
            partial.replace(output)  # only a finished image gets the name
        finally:
            partial.unlink(missing_ok=True)
    return output


def _overlay(src: Path, dest: Path) -> None:
    """Copy ``src`` over ``dest``, replacing what is there.

    Not shutil.copytree: copying a file onto one of the tree's applet links
    would write through the link's absolute target, /bin/busybox, which here
    is the host's.
    """
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for name in sorted(dirnames) + sorted(filenames):
            s, d = Path(dirpath) / name, dest / rel / name
            is_dir = s.is_dir() and not s.is_symlink()
            if d.is_symlink() or (d.exists() and not (is_dir and d.is_dir())):
                shutil.rmtree(d) if d.is_dir() and not d.is_symlink() else d.unlink()
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
            elif is_dir:
                d.mkdir(exist_ok=True)
                shutil.copystat(s, d)
            else:
                shutil.copy2(s, d)


def _quote(path: str) -> str:
    if '"' in path or "\n" in path:
        raise BootError(f"the file name {path!r} has a quote or newline, which debugfs cannot be given; rename it.")
    return f'"/{path}"'


def _fixups(source: Path, busybox_system: bool) -> str:
    """debugfs commands: device nodes for the busybox system, and root ownership when we are not root."""
    lines: list[str] = []
    if busybox_system:
        for name, major, minor, mode in DEVICES:
            if not (source / name).exists() and not (source / name).is_symlink():
                parent, base = name.rsplit("/", 1)
                lines.append(f"cd {_quote(parent)}")  # mknod takes a name in the current directory
                lines.append(f"mknod {base} c {major} {minor}")
                lines.append(f"sif {_quote(name)} mode 0{0o20000 | mode:o}")
        lines.append("cd /")
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        for dirpath, dirnames, filenames in os.walk(source):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                rel = path.relative_to(source).as_posix()
                if st.st_uid == uid:
                    lines.append(f"sif {_quote(rel)} uid 0")
                if st.st_gid == gid:
                    lines.append(f"sif {_quote(rel)} gid 0")
        lines += ["sif / uid 0", "sif / gid 0"]
    return "".join(line + "\n" for line in lines)
