"""kvmkit's command line: argument parsing only; the work happens in the layers below."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from typing import TYPE_CHECKING, BinaryIO

from .. import __version__
from ..errors import KvmkitError

if TYPE_CHECKING:
    from ..boot.modules import ModuleFile
    from ..machine.config import VmConfig
    from ..machine.machine import Machine

EPILOG_RUN = """\
With no --kernel, kvmkit boots its bundled guest; any words after the options
are a command script for it, e.g.  kvmkit run echo hello \\; poweroff 0
The script stops at the first command that fails and kvmkit exits with its
status; '-cmd' lets cmd fail (put -- before a script that starts with '-').
With --kernel, the words after -- are a command to run in the Linux guest:
  kvmkit run -k vmlinuz -- sh -c 'uname -r; exit 3'   (kvmkit exits 3)
It runs from kvmkit's busybox initramfs, or over your -i initramfs (which
needs a busybox-like sh, mount, printf and dd) as /kvmkit-run.
Serial backends: stdio, file:PATH, unix:PATH, pty, none (present, discards
output), off (no device). On the terminal: Ctrl-A x quits, Ctrl-A s prints
exit statistics, Ctrl-A Ctrl-A sends Ctrl-A.
Exit status: the guest's (exit port or poweroff = 0), 2 triple fault,
1 VMM or KVM error or a guest kernel panic, 130/143 on SIGINT/SIGTERM."""


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", "--kernel", help="bzImage or vmlinux ELF to boot (default: the bundled guest)")
    p.add_argument("-i", "--initrd", help="initrd / initramfs image")
    p.add_argument("-p", "--append", help="kernel command line")
    p.add_argument("-m", "--mem", default="256M", help="guest memory, e.g. 256M, 1G (default 256M)")
    p.add_argument("-c", "--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    p.add_argument("--serial", action="append", default=[], metavar="[COMn=]SPEC",
                   help="serial backend per port, in order COM1..COM4 or named (COM2=file:/tmp/com2)")
    p.add_argument("--serial-nofifo", action="store_true",
                   help="model a FIFO-less 8250 (the old kvm tool's UART), for comparison")
    p.add_argument("--serial-pace", action="store_true",
                   help="send serial output at the baud rate the guest programmed (real timing); off by default")
    p.add_argument("-d", "--disk", action="append", default=[], metavar="PATH[,ro][,serial=ID]",
                   help="a raw disk image or block device as virtio-blk (vda, vdb, ...); repeatable")
    p.add_argument("--share", action="append", default=[], metavar="HOSTDIR[:TAG][,ro]",
                   help="a host directory as virtio-9p; in the guest: mount -t 9p -o trans=virtio TAG /mnt "
                        "(TAG defaults to share0, share1, ...); the guest cannot reach outside it; repeatable")
    p.add_argument("--net", action="append", default=[], metavar="user[,socket=PATH]|tap[,ifname=NAME][,mac=MAC]",
                   help="a virtio-net card: user = user-mode networking through passt (kvmkit starts one, or "
                        "connects to yours at socket=PATH; the guest gets an address by DHCP), tap = a host tap "
                        "interface (needs CAP_NET_ADMIN to create); MAC defaults to a random 02:xx:.. address; "
                        "repeatable (eth0, eth1, ...)")
    p.add_argument("--console", choices=["serial", "virtio"], default="serial",
                   help="the guest's console: COM1 (serial) or virtio-console hvc0 (COM1 keeps early boot messages)")
    p.add_argument("--rng", action="store_true", help="a virtio-rng device fed from the host's getrandom()")
    p.add_argument("--stats", action="store_true", help="print exit statistics when the VM stops")
    p.add_argument("--stats-json", metavar="FILE", help="write exit statistics as JSON to FILE")
    p.add_argument("--cpuid-clear", action="append", default=[], metavar="LEAF:REG:BIT",
                   help="hide a CPU feature from the guest, e.g. 1:ecx:13 (CX16) or 7:ebx:9 (ERMS); repeatable")
    p.add_argument("--quirks", choices=["auto", "nested-pvm", "none"], default="auto",
                   help="host quirk profile (docs/quirks.md); auto picks nested-pvm on a PVM host, none elsewhere")
    p.add_argument("--restore", metavar="DIR", help="continue from a snapshot (kvmkit snapshot NAME -o DIR) instead of booting")
    p.add_argument("--verify", action="store_true", help="with --restore: check the memory files' digests too (reads them whole)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what kvmkit does")
    p.add_argument("-q", "--quiet", action="store_true", help="no line about what is booting (errors are still printed)")
    p.add_argument("--name", help="the VM's name for kvmkit list/pause/resume/stop/stats/snapshot "
                   "(default: an unused vm-XXXX); its control socket is $XDG_RUNTIME_DIR/kvmkit/NAME.sock")
    p.add_argument("script", nargs=argparse.REMAINDER, help="bundled guest: commands to run")


TRACE_HELP = """\
usage: kvmkit trace record [-o FILE] -- <kvmkit run arguments>
       kvmkit trace report FILE [--json] [--plot FILE.svg]

Record the KVM tracepoints (kvm_entry, kvm_exit, kvm_pio, ...) of one VM run
into an ftrace text file (default kvmkit.trace), then report guest and host
time per exit, per access and per sequence. Needs root (tracefs).
'kvmkit trace record --help' and 'kvmkit trace report --help' say more.
"""


def run_config(args: argparse.Namespace) -> "VmConfig":
    """The VmConfig that ``kvmkit run``'s options describe."""
    from ..machine.config import (VmConfig, parse_cpuid_clear, parse_disk, parse_net, parse_serial_specs, parse_share,
                                  parse_size)

    script = " ".join(w for w in args.script if w != "--").strip() or None
    return VmConfig(kernel=Path(args.kernel) if args.kernel else None, initrd=Path(args.initrd) if args.initrd else None,
                    cmdline=args.append, script=script, mem_size=parse_size(args.mem), cpus=args.cpus,
                    serial=parse_serial_specs(args.serial), serial_fifo=not args.serial_nofifo,
                    serial_pace=args.serial_pace, quirks=args.quirks, cpuid_clear=parse_cpuid_clear(args.cpuid_clear),
                    disks=[parse_disk(d) for d in args.disk], console=args.console, rng=args.rng,
                    shares=[parse_share(x, i) for i, x in enumerate(args.share)],
                    nets=[parse_net(x) for x in args.net])


def _check_writable(path: str, what: str) -> None:
    """Fail before the VM runs, not after, when a file the run ends by writing cannot be written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise KvmkitError(f"cannot write the {what} to {path}: {e.strerror}; choose a writable path.") from None
    os.close(fd)


# What a snapshot fixes: with --restore these come from it, and giving them is a mistake worth one sentence.
_FIXED_BY_SNAPSHOT = (("kernel", "-k"), ("initrd", "-i"), ("append", "-p"), ("disk", "--disk"), ("share", "--share"),
                      ("net", "--net"),
                      ("serial_nofifo", "--serial-nofifo"), ("serial_pace", "--serial-pace"), ("rng", "--rng"),
                      ("cpuid_clear", "--cpuid-clear"), ("script", "guest commands"))


def _check_restore_options(args: argparse.Namespace) -> None:
    def present(attr: str) -> bool:
        value = getattr(args, attr)
        return any(w != "--" for w in value) if attr == "script" else bool(value)

    given = [flag for attr, flag in _FIXED_BY_SNAPSHOT if present(attr)]
    if args.mem != "256M":
        given.append("-m")
    if args.cpus != 1:
        given.append("-c")
    if args.console != "serial" or args.quirks != "auto":
        given.append("--console/--quirks")
    if given:
        raise KvmkitError(f"--restore continues the snapshot's machine as it was; drop {', '.join(given)} "
                          "(only the serial backends, --name and the statistics options apply).")


def cmd_run(args: argparse.Namespace) -> int:
    command = _guest_command(args)
    workdir = tempfile.mkdtemp(prefix="kvmkit-run-") if command else None
    try:
        return _run(args, command, Path(workdir) if workdir else None)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _guest_command(args: argparse.Namespace) -> list[str] | None:
    """With a Linux kernel, the words after ``--``: a command to run in the guest, whose status kvmkit exits with."""
    if not args.kernel or args.restore:
        return None
    words = list(args.script)
    if words[:1] == ["--"]:
        words = words[1:]
    return words or None


def _command_initrd(args: argparse.Namespace, command: list[str], workdir: Path) -> Path:
    """The initramfs that runs ``command`` (kvmkit's busybox, or the user's -i with /kvmkit-run over it)."""
    from ..boot import initramfs as ir
    from ..host.files import read_user_file
    from ..machine.config import parse_share, parse_size
    base = read_user_file(Path(args.initrd), "initrd", parse_size(args.mem)) if args.initrd else None
    if base is not None:
        from ..boot.linux import check_initrd
        check_initrd(base, f"initrd file {args.initrd}")  # before the overlay hides what the user gave
    modules, hostroot = None, None
    share = next((x for x in (parse_share(t, i) for i, t in enumerate(args.share)) if x.tag == ir.HOSTROOT_TAG), None)
    if share is not None:
        if base is not None:
            raise KvmkitError(f"a --share tagged {ir.HOSTROOT_TAG} runs the command in the host's root from kvmkit's "
                              "own initramfs; drop -i.")
        modules = _share_modules(Path(args.kernel))
        hostroot = (share.read_only, _guest_cwd(share.path))
    data = ir.command_initramfs(command, base, modules=modules, hostroot=hostroot)
    path = workdir / "initrd.img"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _share_modules(kernel: Path) -> list["ModuleFile"]:
    """The kernel's virtio-pci and 9P modules: from the host's /lib/modules/<version> if it has that
    version (the kernel the host runs, the usual case for a developer), else from Debian's package."""
    from ..boot.inspect import describe_kernel
    from ..boot.modules import SHARE_MODULES, find_modules, resolve_modules
    version = (describe_kernel(kernel).get("kernel_version") or "").split(" ")[0]
    if not version:
        raise KvmkitError(f"{kernel} does not say its version, so kvmkit cannot find its 9P modules; "
                          "build an initramfs with 'kvmkit initramfs --modules DIR' and mount the share yourself.")
    host_tree = Path("/lib/modules") / version
    tree = find_modules(host_tree if (host_tree / "modules.order").exists() else version)
    return resolve_modules(tree, ["virtio_pci", *SHARE_MODULES])


def _guest_cwd(share_root: Path) -> str:
    """Where the command starts in the guest: the host's working directory as the share shows it, else /."""
    cwd, root = Path.cwd().resolve(), share_root.resolve()
    try:
        return "/" + str(cwd.relative_to(root)).removeprefix(".")
    except ValueError:
        return "/"


def _booting_line(machine: "Machine", args: argparse.Namespace, command: list[str] | None) -> str:
    """One line on what a Linux boot is made of, so that a slow or silent boot is not a mystery."""
    from ..machine.control import format_size
    cfg = machine.config
    version = (machine.kernel_version or "").split(" ")[0] or "of unknown version"
    if command:
        given = getattr(args, "initrd_given", None)
        initrd = f"{given} with kvmkit's /kvmkit-run" if given else "kvmkit's busybox initramfs"
        what = f"; running: {shlex.join(command)}"
    else:
        initrd = str(cfg.initrd) if cfg.initrd else "no initrd"
        what = ""
    cpus = f"{cfg.cpus} vCPU" + ("s" if cfg.cpus != 1 else "")
    return (f"kvmkit: booting Linux {version} from {cfg.kernel}, {initrd}, {format_size(cfg.mem_size)}, {cpus}; "
            f"command line: {machine.cmdline}{what}")


def _run(args: argparse.Namespace, command: list[str] | None, workdir: Path | None) -> int:
    from ..host.backends import PtyBackend
    from ..host.control import validate_name
    from ..machine.control import ControlServer
    from ..machine.machine import Machine

    if command:
        from ..boot.initramfs import RUNNER
        assert workdir is not None
        args.initrd_given = args.initrd
        args.initrd = str(_command_initrd(args, command, workdir))
        args.script = []
        if args.initrd_given:
            args.append = f"{args.append or ''} rdinit=/{RUNNER}".strip()
    if args.restore:
        _check_restore_options(args)
    else:
        config = run_config(args)
    if args.stats_json:
        _check_writable(args.stats_json, "statistics (--stats-json)")
    if getattr(args, "name", None) is not None:
        validate_name(args.name)
    if args.restore:
        from ..machine.config import parse_serial_specs
        machine = Machine.restore(args.restore, serial=parse_serial_specs(args.serial), verify=args.verify)
    else:
        machine = Machine(config)  # KVM problems first: they are the most basic
    control = ControlServer(machine, getattr(args, "name", None))
    try:
        if not args.restore:
            machine.load()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)  # the initramfs is in guest RAM now
            if machine.kernel_version is not None and args.kernel and not args.quiet:
                print(_booting_line(machine, args, command), file=sys.stderr)
                if machine.quirks is not None and machine.quirks.name == "nested-pvm" and sys.stderr.isatty():
                    machine.show_status_line()  # an emulating host: a long quiet boot shows it is alive
        if args.kernel and not args.initrd and not args.disk:
            print("kvmkit: warning: a Linux kernel with no initrd (-i) and no root disk (--disk) panics when it mounts "
                  "root; build one with 'kvmkit initramfs -o initrd.img' (add --modules VERSION for a virtio root disk).",
                  file=sys.stderr)
        for port in machine.serial_ports:
            # A pty opens now, while the terminal is still cooked: its path is said on a line of its own.
            open_early = getattr(port.backend, "open", None)
            if isinstance(port.backend, PtyBackend) and open_early is not None:
                open_early()
        control.start()
        if args.verbose:
            print(f"kvmkit: control socket {control.path}", file=sys.stderr)
        status = machine.run()
    finally:
        control.close()  # the socket goes on every way out; a stale one would only be replaced later
        stats_text = machine.stats_table() if (args.stats or machine.status not in (0, None)) else ""
        stats_data = [s.as_dict() for s in machine.exit_stats()] if args.stats_json else None
        kstats = machine.in_kernel_stats() if args.stats_json else None
        message = machine.stop_message
        reset = machine.reset_requested  # a reboot looks like a clean exit: say what it was
        quirk_text = machine.quirks.summary() if machine.quirks is not None else ""
        status = machine.status if machine.status is not None else 1
        machine.close()
    if message and (status != 0 or args.verbose or args.stats or reset):
        print(f"\nkvmkit: {message}", file=sys.stderr)
    if args.stats and stats_text:
        print(stats_text, file=sys.stderr)
    if (args.stats or args.verbose) and quirk_text:
        print(quirk_text, file=sys.stderr)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps({"status": status, "vcpus": stats_data, "kvm": kstats}, indent=2))
    return status


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..boot.inspect import describe_kernel
    info = describe_kernel(Path(args.kernel))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info) if info else 0
        for k, v in info.items():
            print(f"{k:<{width}}  {_inspect_value(k, v)}")
    return 0


# inspect's numbers that are addresses, sizes of alignment or offsets: shown in hex, as in the boot protocol
_HEX_KEYS = {"entry", "entry_phys", "load_start", "load_end", "pref_address", "kernel_alignment",
             "initrd_addr_max", "paddr", "vaddr", "offset", "filesz", "memsz", "init_size"}


def _inspect_value(key: str, value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) and key in _HEX_KEYS:
        return f"{value:#x}"
    if isinstance(value, int) and key == "protocol_version":
        return f"{value >> 8}.{value & 0xFF:02d}"
    if isinstance(value, list):
        return "; ".join(", ".join(f"{k} {_inspect_value(k, v)}" for k, v in item.items())
                         if isinstance(item, dict) else str(item) for item in value)
    return str(value)


def cmd_initramfs(args: argparse.Namespace) -> int:
    if args.directory and args.modules:
        raise KvmkitError("--modules packs a busybox system; it does not combine with --directory.")
    try:
        out = open(args.output, "wb")
    except OSError as e:
        raise KvmkitError(f"cannot write the initramfs to {args.output}: {e.strerror}; choose a writable path.") from None
    try:
        with out:
            size = _write_initramfs(args, out)
    except BaseException:
        try:
            os.unlink(args.output)  # no half-written archive left behind to be booted by mistake
        except OSError:
            pass
        raise
    print(f"kvmkit: wrote {size} bytes of archive to {args.output}", file=sys.stderr)
    return 0


def _write_initramfs(args: argparse.Namespace, out: BinaryIO) -> int:
    from ..boot import initramfs as ir
    if args.directory:
        return ir.write_directory_cpio(Path(args.directory), out, compress=args.gzip)
    modules = None
    if args.modules:
        from ..boot.modules import NET_MODULES, SHARE_MODULES, VIRTIO_ROOT_MODULES, find_modules, resolve_modules
        modules = resolve_modules(find_modules(args.modules),
                                  args.module or [*VIRTIO_ROOT_MODULES, *SHARE_MODULES, *NET_MODULES])
        print(f"kvmkit: modules, in load order: {' '.join(m.name for m in modules)}", file=sys.stderr)
    data = ir.busybox_initramfs(Path(args.busybox) if args.busybox else None, compress=args.gzip, modules=modules)
    out.write(data)
    return len(data)


def cmd_rootfs(args: argparse.Namespace) -> int:
    from ..boot.rootfs import make_rootfs
    out = make_rootfs(Path(args.output), args.size, directory=Path(args.directory) if args.directory else None,
                      busybox=Path(args.busybox) if args.busybox else None)
    print(f"kvmkit: wrote an ext4 root image to {out}; boot it with --disk {out} -p 'root=/dev/vda rw'", file=sys.stderr)
    return 0


def cmd_trace(args: argparse.Namespace, rest: list[str]) -> int:
    from ..profile import trace_cli
    if args.trace_cmd == "report":
        return trace_cli.report_main(rest)
    # record: everything after "--" is a `kvmkit run` command line
    output, run_argv = trace_cli.parse_record_args(rest)
    if run_argv[:1] == ["run"]:
        run_argv = run_argv[1:]
    run_parser = argparse.ArgumentParser(prog="kvmkit run")
    add_run_arguments(run_parser)
    run_args = run_parser.parse_args(run_argv)
    status = trace_cli.record(lambda: cmd_run(run_args), output)
    print(f"kvmkit: trace saved to {output}; read it with: kvmkit trace report {output}", file=sys.stderr)
    return status


def cmd_list(args: argparse.Namespace) -> int:
    from ..host.control import running
    from ..machine.control import format_vm_table
    infos = running()
    print(json.dumps(infos, indent=2) if args.json else format_vm_table(infos))
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    """pause, resume, stop: one command to the named VM; stop waits (a while) for it to be gone."""
    from ..host.control import call, control_dir, socket_path
    if args.command != "stop":
        call(args.name, args.command, timeout=20.0)
        return 0
    if not 0 <= args.timeout <= 600:
        raise KvmkitError(f"--timeout must be 0 to 600 seconds, not {args.timeout}.")
    reply = call(args.name, "stop", timeout=args.timeout + 20.0, params={"timeout": args.timeout, "force": args.force})
    path = socket_path(control_dir(), args.name)
    deadline = time.monotonic() + 15
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    how = "the guest shut down" if reply.get("by") == "guest" else "stopped from the host"
    print(f"kvmkit: {args.name}: {how} ({reply.get('message', '')})", file=sys.stderr)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..host.control import call
    from ..machine.control import format_stats
    stats = call(args.name, "stats")["stats"]
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from ..host.control import call
    out = os.path.abspath(args.output)  # the VM's working directory is not ours
    call(args.name, "snapshot", timeout=600.0, dir=out)
    print(f"kvmkit: snapshot of {args.name} written to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmkit", description="A small KVM virtual machine monitor for reading, scripting and measuring your VM.")
    p.add_argument("--version", action="version", version=f"kvmkit {__version__}")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="boot a kernel (default: the bundled guest)", epilog=EPILOG_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(run)
    ins = sub.add_parser("inspect", help="describe a kernel image",
                         description="Describe a kernel image without booting it: format (bzImage or ELF), boot "
                                     "protocol, compression, kernel version, where it loads and how much memory "
                                     "it claims. Addresses are in hex.")
    ins.add_argument("kernel", help="a bzImage, a vmlinux ELF, or another ELF kernel")
    ins.add_argument("--json", action="store_true", help="print JSON (numbers as numbers) instead of a table")
    ir = sub.add_parser("initramfs", help="build an initramfs (busybox system or a directory)")
    ir.add_argument("-o", "--output", required=True)
    ir.add_argument("--busybox", help="static busybox binary (default: the host's /bin/busybox)")
    ir.add_argument("--directory", help="pack this directory instead")
    ir.add_argument("--gzip", action="store_true", help="gzip-compress the archive")
    ir.add_argument("--modules", metavar="DIR|VERSION",
                    help="pack kernel modules and load them at boot, then mount root= if the command line names one: "
                         "a /lib/modules/<version> tree, or a Debian kernel version whose package is fetched "
                         "(default modules: virtio_pci, virtio_blk, virtio_console, virtio-rng, ext4, 9p, 9pnet_virtio, "
                         "virtio_net)")
    ir.add_argument("--module", action="append", default=[], metavar="NAME",
                    help="with --modules: a module to pack instead of the default set (repeatable)")
    rf = sub.add_parser("rootfs", help="build an ext4 root disk image (a busybox system, or a directory)")
    rf.add_argument("-o", "--output", required=True, help="the image file to write")
    rf.add_argument("--size", default="64M", help="image size, e.g. 64M (default)")
    rf.add_argument("--directory", help="put this directory in the image (over the busybox system with --busybox)")
    rf.add_argument("--busybox", help="static busybox binary (default: the host's)")
    tr = sub.add_parser("trace", help="record KVM tracepoints for a VM, or report on a trace", add_help=False)
    tr.add_argument("trace_cmd", choices=["record", "report"])
    ls = sub.add_parser("list", help="the running VMs (name, pid, state, vCPUs, memory, uptime)")
    ls.add_argument("--json", action="store_true")
    for verb, text in (("pause", "pause a running VM's vCPUs"), ("resume", "resume a paused VM")):
        sub.add_parser(verb, help=text).add_argument("name")
    sp = sub.add_parser("stop", help="stop a VM: Ctrl-Alt-Del for its own shutdown first, then from the host")
    sp.add_argument("name")
    sp.add_argument("--timeout", type=int, default=30, metavar="S",
                    help="seconds to wait for the guest's own shutdown before stopping it from the host (default 30)")
    sp.add_argument("--force", action="store_true", help="stop it from the host at once (the console is still flushed)")
    st = sub.add_parser("stats", help="a running VM's exit statistics")
    st.add_argument("name")
    st.add_argument("--json", action="store_true")
    sn = sub.add_parser("snapshot", help="save a running VM's state to a directory")
    sn.add_argument("name")
    sn.add_argument("-o", "--output", required=True, metavar="DIR", help="the snapshot directory")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["run"]
    try:
        if argv[0] == "trace":
            if len(argv) == 1 or argv[1] in ("-h", "--help"):
                print(TRACE_HELP, end="")
                return 0 if len(argv) > 1 else 2
            args, rest = parser.parse_known_args(argv)
            return cmd_trace(args, rest)
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                            format="kvmkit: %(message)s")
        if args.command == "run":
            return cmd_run(args)
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "initramfs":
            return cmd_initramfs(args)
        if args.command == "rootfs":
            return cmd_rootfs(args)
        if args.command == "list":
            return cmd_list(args)
        if args.command in ("pause", "resume", "stop"):
            return cmd_control(args)
        if args.command == "stats":
            return cmd_stats(args)
        if args.command == "snapshot":
            return cmd_snapshot(args)
        parser.print_help()
        return 2
    except KvmkitError as e:
        print(f"kvmkit: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
