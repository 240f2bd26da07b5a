"""newc cpio archives (the Linux initramfs format), written and read in pure Python.

An initramfs is how kvmkit gives a guest a userland without a disk device:
the kernel unpacks the cpio archive into its root tmpfs and runs /init. The
writer needs no external cpio so tests and `kvmkit run` work anywhere; the
reader exists so tests can check what was built. Format: the "new ASCII"
(070701) header of 13 eight-digit hex fields, name and data each padded to
4 bytes, ended by a TRAILER!!! entry (Documentation/driver-api/early-userspace/
buffer-format.rst).
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Sequence

from ..errors import BootError

if TYPE_CHECKING:
    from .modules import ModuleFile

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
          "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")

INIT_MARKER = "kvmkit initramfs: /init started"
ROOT_MARKER = "kvmkit initramfs: switching to root"  # then the device and the init it runs
ROOT_WAIT_S = 5  # how long /init waits for the root device by default (rootdelay= overrides)
BUSYBOX_APPLETS = (
    "sh", "ash", "ls", "cat", "echo", "mount", "umount", "uname", "poweroff", "reboot", "halt",
    "dmesg", "mkdir", "rm", "cp", "mv", "ln", "ps", "kill", "sleep", "grep", "sed", "head",
    "tail", "wc", "stty", "setsid", "cttyhack", "sync", "true", "false", "test", "[", "env",
    "printf", "date", "free", "uptime", "hexdump", "dd", "mknod", "chmod", "top", "vi", "clear",
    "insmod", "lsmod", "rmmod", "switch_root", "findfs", "usleep", "cut", "tr", "chroot",
)


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: ``mode`` includes the file type bits (stat.S_IFREG, ...)."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_chardev(self) -> bool:
        return stat.S_ISCHR(self.mode)


def directory(name: str, mode: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | mode, nlink=2)


def file(name: str, data: bytes, mode: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | mode, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, mode: int = 0o600) -> CpioEntry:
    return CpioEntry(name, stat.S_IFCHR | mode, rdevmajor=major, rdevminor=minor)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _header(ino: int, e: CpioEntry, size: int) -> bytes:
    """A newc header and name for ``e`` with ``size`` data bytes to follow. Names are bytes on
    disk: one that is not UTF-8 comes through os.fsdecode's surrogates and goes back unchanged."""
    name = os.fsencode(e.name.lstrip("/")) + b"\0"
    values = (ino, e.mode, e.uid, e.gid, e.nlink, e.mtime, size, 0, 0,
              e.rdevmajor, e.rdevminor, len(name), 0)
    head = NEWC_MAGIC + b"".join(b"%08X" % (v & 0xFFFFFFFF) for v in values)
    return head + name + b"\0" * _pad4(HEADER_SIZE + len(name))


def _member(ino: int, e: CpioEntry) -> bytes:
    return _header(ino, e, len(e.data)) + e.data + b"\0" * _pad4(len(e.data))


def write_cpio(entries: list[CpioEntry], compress: bool = False) -> bytes:
    """Serialize ``entries`` (parents before children) as a newc archive, optionally gzipped."""
    out = bytearray()
    for ino, e in enumerate(entries, start=1):
        if not e.name.strip("/") or len(e.data) > 0xFFFFFFFF:
            raise BootError(f"cpio entry {e.name!r} has an empty name or is larger than 4 GiB; fix the initramfs contents.")
        out += _member(ino, e)
    out += _member(0, CpioEntry(TRAILER, 0, nlink=1))
    # The kernel reads the archive in 512-byte blocks, like cpio(1) writes it.
    out += b"\0" * _pad_to(len(out), 512)
    return gzip.compress(bytes(out), mtime=0) if compress else bytes(out)


def _pad_to(n: int, block: int) -> int:
    return (block - n % block) % block


MAX_MEMBER = 0xFFFFFFFF  # newc sizes are 32-bit
COPY_CHUNK = 1 << 20


def write_directory_cpio(root: Path, out: BinaryIO, compress: bool = False) -> int:
    """Stream every file, directory, symlink and device under ``root`` into ``out`` as a newc
    archive (gzipped with ``compress``); returns the bytes written before compression.

    Streamed, never held whole: a multi-GiB file costs a copy buffer, not its
    size in memory. Anything that cannot be archived faithfully is one sentence
    (BootError) naming it: an unreadable file or directory, one that vanished
    or changed size during the walk, one larger than a newc member can be.
    """
    root = Path(root)
    if not root.is_dir():
        raise BootError(f"{root} is not a directory, so no initramfs can be built from it; pass a directory.")

    def walk_error(exc: OSError) -> None:
        raise BootError(f"cannot read directory {exc.filename}: {exc.strerror}; fix its permissions or leave it out.")

    sink = gzip.GzipFile(fileobj=out, mode="wb", mtime=0) if compress else out
    written = 0

    def put(data: bytes) -> None:
        nonlocal written
        sink.write(data)
        written += len(data)

    ino = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                st = path.lstat()
            except FileNotFoundError:
                raise BootError(f"{path} disappeared while the initramfs was being built; build it again.") from None
            ino += 1
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            entry = CpioEntry(rel, st.st_mode, b"", st.st_uid, st.st_gid, int(st.st_mtime),
                              os.major(rdev), os.minor(rdev), 2 if stat.S_ISDIR(st.st_mode) else 1)
            if stat.S_ISLNK(st.st_mode):
                target = os.fsencode(os.readlink(path))
                put(_header(ino, entry, len(target)) + target + b"\0" * _pad4(len(target)))
            elif stat.S_ISREG(st.st_mode):
                put(_copy_member(ino, entry, path, st.st_size, put))
            else:
                put(_header(ino, entry, 0))
    trailer = _member(0, CpioEntry(TRAILER, 0, nlink=1))
    put(trailer)
    put(b"\0" * _pad_to(written, 512))  # the kernel reads the archive in 512-byte blocks, like cpio(1) writes it
    if compress:
        sink.close()
    return written


def _copy_member(ino: int, entry: CpioEntry, path: Path, size: int, put: Callable[[bytes], None]) -> bytes:
    """Write a regular file's header and contents through ``put``; returns its padding."""
    if size > MAX_MEMBER:
        raise BootError(f"{path} is {size / (1 << 30):.1f} GiB, more than a cpio member can hold (4 GiB); leave it out.")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BootError(f"{path} disappeared while the initramfs was being built; build it again.") from None
    except OSError as e:
        raise BootError(f"cannot read {path}: {e.strerror}; fix its permissions or leave it out.") from None
    try:
        put(_header(ino, entry, size))
        left = size
        while left:
            chunk = os.read(fd, min(left, COPY_CHUNK))
            if not chunk:
                raise BootError(f"{path} shrank while the initramfs was being built; build it again.")
            put(chunk)
            left -= len(chunk)
    except OSError as e:
        raise BootError(f"cannot read {path}: {e.strerror}; fix it or leave it out.") from None
    finally:
        os.close(fd)
    return b"\0" * _pad4(size)


def cpio_from_directory(root: Path, compress: bool = False) -> bytes:
    """:func:`write_directory_cpio` into memory (for tests and small trees)."""
    buf = io.BytesIO()
    write_directory_cpio(root, buf, compress)
    return buf.getvalue()


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a (possibly gzipped) newc archive up to its trailer."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise BootError(f"the gzipped initramfs is corrupt ({exc}); rebuild it.") from exc
    out: list[CpioEntry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(data) or data[pos:pos + 6] != NEWC_MAGIC:
            raise BootError(f"no newc cpio header at offset {pos:#x} of the initramfs, so it is truncated or not newc; rebuild it.")
        raw = bytes(data[pos + 6:pos + HEADER_SIZE])
        if raw.strip(b"0123456789abcdefABCDEF"):
            raise BootError(f"the cpio header at offset {pos:#x} has a non-hex field; rebuild the initramfs.")
        f = dict(zip(FIELDS, (int(raw[8 * i:8 * i + 8], 16) for i in range(13))))
        name_start = pos + HEADER_SIZE
        name_end = name_start + f["namesize"]
        data_start = name_end + _pad4(HEADER_SIZE + f["namesize"])
        data_end = data_start + f["filesize"]
        if f["namesize"] == 0 or data_end > len(data):
            raise BootError(f"the cpio member at offset {pos:#x} runs past the end of the archive; rebuild the initramfs.")
        name = data[name_start:name_end].rstrip(b"\0").decode("utf-8", "replace")
        if name == TRAILER:
            return out
        out.append(CpioEntry(name, f["mode"], bytes(data[data_start:data_end]), f["uid"], f["gid"],
                             f["mtime"], f["rdevmajor"], f["rdevminor"], f["nlink"]))
        pos = data_end + _pad4(f["filesize"])


# The part of /init that loads modules and switches to the root disk. Shell,
# kept as one readable block; @KVER@, @LOADS@ and @WAIT@ are filled in.
ROOT_STAGE = r"""say() { echo "kvmkit initramfs: $*"; }
load() {  # one line per module that will not load, then carry on: a later one may still work
    out=$(insmod "/lib/modules/$KVER/$1" 2>&1) || say "insmod $1 failed${2:+ ($2)}: ${out##*: }; going on"
}
KVER='@KVER@'
@LOADS@
# A console that came with a module (console=hvc0 with virtio_console) did
# not exist when the kernel opened /init's stdio: take it now. Tried in a
# subshell first, since a failed exec redirection would end /init.
if (exec 0<>/dev/console) 2>/dev/null; then exec 0<>/dev/console 1>&0 2>&0; fi
root='' fstype='' flags='' mode=ro init=/sbin/init delay=@WAIT@
set -f  # a * in the command line stays a *
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root=${arg#root=} ;;
        rootfstype=*) fstype=${arg#rootfstype=} ;;
        rootflags=*) flags=${arg#rootflags=} ;;
        rootdelay=*) delay=${arg#rootdelay=} ;;
        init=*) init=${arg#init=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
    esac
done
set +f
case "$delay" in ''|*[!0-9]*) delay=@WAIT@ ;; esac  # whole seconds, or the arithmetic below fails
mount_root() {
    # Devices appear as their drivers probe them, asynchronously: poll, bounded.
    dev=$root tries=$((delay * 10))
    while :; do
        case "$root" in
            UUID=*|LABEL=*|PARTUUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
        esac
        [ -n "$dev" ] && [ -b "$dev" ] && break
        if [ "$tries" -le 0 ]; then
            say "root device $root did not appear within $delay s; check the disk and its driver (dmesg)"
            return 1
        fi
        tries=$((tries - 1))
        usleep 100000
    done
    mkdir -p /newroot
    if ! out=$(mount ${fstype:+-t "$fstype"} -o "$mode${flags:+,$flags}" "$dev" /newroot 2>&1); then
        say "cannot mount root $dev: ${out##*: }"
        return 1
    fi
    # -L first: an absolute link (/sbin/init -> /bin/busybox) would be followed into the initramfs.
    if [ ! -L "/newroot$init" ] && [ ! -x "/newroot$init" ]; then
        say "root $dev has no executable $init; pass init= or fix the root file system"
        umount /newroot
        return 1
    fi
}
if [ -n "$root" ]; then
    if mount_root; then
        say "switching to root $dev ($mode), running $init"
        for fs in dev proc sys; do
            mount --move /$fs /newroot/$fs 2>/dev/null || umount /$fs 2>/dev/null
        done
        exec switch_root /newroot "$init" "$@"
    fi
    say "staying in the initramfs shell"
fi
"""


def _root_stage(version: str, modules: Sequence["ModuleFile"]) -> str:
    """Shell that loads ``modules`` in order, then mounts ``root=`` and switch_roots to it.

    Everything that can fail is checked before ``exec switch_root``: once
    PID 1 has exec'd, a failure is a kernel panic, while a failure before it
    is one line on the console and the initramfs shell, where it can be
    looked into.
    """
    loads = []
    for m in modules:
        if "'" in m.relpath:
            raise BootError(f"module path {m.relpath!r} has a quote, which the /init script cannot carry; rename the module file.")
        loads.append(f"load '{m.relpath}'" + (" 'a soft dependency'" if m.soft else ""))
    return (ROOT_STAGE.replace("@KVER@", version).replace("@WAIT@", str(ROOT_WAIT_S))
            .replace("@LOADS@\n", "".join(line + "\n" for line in loads)))


def init_script(script: str | None = None, modules: Sequence["ModuleFile"] | None = None,
                version: str | None = None) -> str:
    """The /init shell script: mount the pseudo filesystems, say so, then run a shell or ``script``.

    The marker line lets a test see userspace start without a prompt to parse.
    After the shell (or the script) exits it powers off, because /init
    exiting would make the kernel panic.

    With ``modules`` (a load order from :func:`kvmkit.boot.modules.resolve_modules`,
    possibly empty) it also insmods them, one line per failure, and when the
    command line has ``root=`` mounts that device and switch_roots to its
    init; if that fails it says why in one line and carries on as above.
    """
    body = script if script is not None else (
        "# A shell with a controlling terminal, so job control and ^C work.\n"
        "setsid cttyhack sh || sh\n")
    stage = ""
    if modules is not None:
        version = version or (modules[0].version if modules else "")
        if any(m.version != version for m in modules):
            raise BootError("the modules given for the initramfs belong to different kernel versions; resolve them from one module tree.")
        if "'" in version or "/" in version:
            raise BootError(f"{version!r} is not a kernel version /init can use; pass the version 'uname -r' prints.")
        stage = _root_stage(version, modules)
    return (
        "#!/bin/sh\n"
        "export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n"
        "mount -t proc proc /proc\n"
        "mount -t sysfs sysfs /sys\n"
        "mount -t devtmpfs devtmpfs /dev 2>/dev/null\n"
        f"echo '{INIT_MARKER}'\n"
        f"{stage}"
        f"{body.rstrip()}\n"
        "poweroff -f\n"
    )


def module_entries(modules: Sequence["ModuleFile"]) -> list[CpioEntry]:
    """The modules as plain .ko files under lib/modules/<version>/, each directory before its files."""
    out: list[CpioEntry] = []
    made: set[str] = {"lib"}
    out.append(directory("lib"))
    for m in modules:
        parts = m.dest.split("/")[:-1]
        for i in range(2, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                out.append(directory(d))
        out.append(file(m.dest, m.read(), 0o644))
    return out


def busybox_initramfs(busybox: Path | None = None, script: str | None = None, compress: bool = False,
                      extra: list[CpioEntry] | None = None,
                      modules: Sequence["ModuleFile"] | None = None) -> bytes:
    """A minimal system from a static busybox: /bin/busybox, applet links, /dev/console and /init.

    The binary must be static (Debian's busybox-static), since the archive
    carries no libc; ``script`` replaces the interactive shell, for tests.
    ``extra`` entries (a module, a test program) are appended after /init;
    a directory they live in must come before them in ``extra`` unless the
    base layout already has it.

    ``modules`` (from :func:`kvmkit.boot.modules.resolve_modules`) are packed
    decompressed under /lib/modules/<version>/ and /init loads them, then
    mounts ``root=`` if the command line has one (see :func:`init_script`):
    a distribution kernel needs its virtio and ext4 modules before it can
    see a root disk. Without ``modules`` /init is what it always was.
    """
    if busybox is None:
        busybox = next((p for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")) if p.exists()), Path("/bin/busybox"))
    busybox = Path(busybox)
    try:
        binary = busybox.read_bytes()
    except OSError as exc:
        raise BootError(f"cannot read busybox at {busybox} ({exc.strerror}); install it with 'apt-get install busybox-static'.") from exc
    if binary[:4] != b"\x7fELF":
        raise BootError(f"{busybox} is not an ELF executable; install the static busybox with 'apt-get install busybox-static'.")
    if b"/lib64/ld-linux" in binary[:4096]:
        raise BootError(f"{busybox} is dynamically linked and would not run without a libc; install 'busybox-static'.")
    entries = [directory(d) for d in ("bin", "dev", "etc", "proc", "root", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin")]
    entries.append(chardev("dev/console", 5, 1))
    entries.append(chardev("dev/null", 1, 3, 0o666))
    entries.append(file("bin/busybox", binary, 0o755))
    entries += [symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS]
    entries.append(file("init", init_script(script, modules).encode(), 0o755))
    if modules is not None:
        entries.append(directory("newroot"))
        entries += module_entries(modules)
    entries += extra or []
    return write_cpio(entries, compress)


# --- running one command: `kvmkit run -k KERNEL -- CMD ARGS...` ------------------------------------

RUNNER = "kvmkit-run"  # the overlay's init, for a user's initramfs (rdinit=/kvmkit-run)
EXIT_PORT_OFFSET = 0x501  # kvmkit's exit port, as an offset into /dev/port


HOSTROOT_TAG = "hostroot"  # a --share with this tag becomes the command's root filesystem
HOSTROOT_TMPFS = ("tmp", "run", "var/tmp", "root")  # writable over a read-only host root
HOSTROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def hostroot_stage(argv: Sequence[str], read_only: bool, cwd: str = "/") -> str:
    """Shell that mounts the ``hostroot`` share at /newroot and runs ``argv`` chrooted in it; sets ``status``.

    The kernel developer's loop (lkvm sandbox, virtme-ng): the command runs
    with the host's own programs and libraries, read over 9P, while the
    guest's writes to /tmp, /run, /var/tmp and /root go to tmpfs and vanish
    with the VM (except the one holding ``cwd``, which stays the host's).
    The pseudo filesystems are bind-mounted in; the command starts in
    ``cwd`` (the host's working directory) when the guest sees it.
    """
    import shlex
    # Read-only, the guest may cache what it reads (the host's files do not change under a test run).
    opts = "trans=virtio,version=9p2000.L" + (",ro,cache=loose" if read_only else "")
    # tmpfs hides what is below it: never over the directory the command starts in.
    tmpfs = " ".join(d for d in HOSTROOT_TMPFS if not (cwd == f"/{d}" or cwd.startswith(f"/{d}/")))
    return (
        f"if mount -t 9p -o {opts} {HOSTROOT_TAG} /newroot; then\n"
        f"    for d in {tmpfs}; do [ -d /newroot/$d ] && mount -t tmpfs -o mode=1777 tmpfs /newroot/$d; done\n"
        "    for fs in proc sys dev; do mount --bind /$fs /newroot/$fs; done\n"
        f"    PATH={HOSTROOT_PATH} HOME=/root chroot /newroot /bin/sh -c "
        "'cd \"$1\" 2>/dev/null || cd /; shift; exec \"$@\"' kvmkit-run "
        f"{shlex.quote(cwd)} {shlex.join(argv)}\n"
        "    status=$?\n"
        "else\n"
        f"    echo 'kvmkit-run: the host root (--share ...:{HOSTROOT_TAG}) could not be mounted'\n"
        "    status=125\n"
        "fi\n"
    )


def command_script(argv: Sequence[str], hostroot: tuple[bool, str] | None = None) -> str:
    """Shell that runs ``argv`` and hands its exit status to kvmkit through the exit port.

    The words are quoted for the shell here, on the host, so any argument
    reaches the command intact (nothing travels on the kernel command line,
    whose quoting is weaker). The status byte goes out through /dev/port at
    the exit port, which ends the VM with that status; ``poweroff -f`` after
    it is the fallback when /dev/port is missing, and ends it with 0.
    ``hostroot`` (read_only, cwd) runs it chrooted in the ``hostroot`` share
    instead (:func:`hostroot_stage`).
    """
    if not argv:
        raise BootError("no command was given after --; give one, e.g. kvmkit run -k KERNEL -- uname -a.")
    import shlex
    run = (hostroot_stage(argv, *hostroot) if hostroot is not None
           else f"{shlex.join(argv)}\nstatus=$?\n")
    return (
        f"{run}"
        "printf \"$(printf '\\\\%03o' $((status & 255)))\" | "
        f"dd of=/dev/port bs=1 seek={EXIT_PORT_OFFSET} count=1 2>/dev/null\n"
        "echo \"kvmkit-run: the command exited with status $status, and /dev/port could not report it\"\n"
    )


def command_initramfs(argv: Sequence[str], base: bytes | None = None, busybox: Path | None = None,
                      modules: Sequence["ModuleFile"] | None = None,
                      hostroot: tuple[bool, str] | None = None) -> bytes:
    """An initramfs that runs ``argv`` at boot and ends the VM with its status.

    Without ``base``: kvmkit's busybox system with the command as /init's
    script (loading ``modules`` first, and with ``hostroot`` running it in
    the host's root shared over 9P). With ``base`` (the user's own
    initramfs, which must have a busybox-like /bin/sh, mount, printf and
    dd): that archive followed by a second one holding /kvmkit-run, which
    the kernel unpacks over the first; boot it with ``rdinit=/kvmkit-run``.
    """
    script = command_script(argv, hostroot)
    if base is None:
        return busybox_initramfs(busybox, script=script, modules=modules)
    overlay = write_cpio([file(RUNNER, init_script(script).encode(), 0o755)])
    return base + b"\0" * _pad_to(len(base), 4) + overlay
