"""A VM wired together from a :class:`VmConfig`: memory, buses, devices, vCPU threads, the host loop.

The machine is assembly only. What sits where comes from the PC map
(machine/pc.py); how the VM stops, from the lifecycle (machine/lifecycle.py);
the kernel command line, from the builder (machine/cmdline.py); what runs
the guest, from the vCPU runners (machine/vcpu.py), which see two buses and
the lifecycle and nothing of this class. docs/architecture.md draws it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from ..boot.linux import BootInfo, load_linux, open_kernel
from ..devices.cmos import Cmos
from ..devices.cmos import memory_bytes as cmos_memory_bytes
from ..devices.i8042 import I8042
from ..devices.misc import ExitPort, PortSink
from ..errors import KvmkitError
from ..devices.virtio.blk import VirtioBlk
from ..devices.virtio.device import VirtioDevice
from ..devices.virtio.net import MAX_FRAME
from ..devices.virtio.p9 import VirtioP9
from ..devices.virtio.rng import VirtioRng
from ..host.backends import Backend, NullBackend, SharedOutputBackend, parse_backend
from ..host.blockfile import RawImage
from ..host.files import read_user_file
from ..host.loop import EventLoop
from ..host.netuser import open_user_net
from ..host.tap import TapBackend
from ..host.p9server import P9Server, share_fid_limit
from ..kvm.constants import KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MSR_EXIT_REASON_FILTER, Cap
from ..kvm.state import restore_vcpu, restore_vm, save_vcpu, save_vm
from ..kvm.system import Kvm, KvmError, Vm
from ..memory import MiB, GuestMemory
from ..profile.exits import VcpuExitStats, format_exit_table
from ..profile.kvmstats import StatsReader
from .bus import Bus, OffsetWindow
from .cmdline import build_cmdline
from .config import NetSpec, VmConfig
from .cpu import build_cpuid, set_long_mode
from .hvc import VirtioConsoleEnd
from .irq import GsiRoutes, IrqLine
from .console_watch import ConsoleWatch
from .status_line import StatusLine
from .net import NetBackend, VirtioNetEnd
from .lifecycle import (EXIT_PORT, HALT, PANIC, PANIC_STATUS, QUIT, RESET, TRIPLE_FAULT, Lifecycle, Outcome, PoweroffWatch,
                        require_kick_handler)
from .pc import I8042_COMMAND, I8042_DATA, I8042_IRQ_AUX, I8042_IRQ_KBD, IDENTITY_MAP_ADDR, TSS_ADDR, PcMap
from .pci import PciHost
from .pvclockevent import PvClockEvents
from .quirks import Quirks, make_quirks
from .serial import SerialPort
from .snapshot import (Snapshot, SnapshotError, check_disks, config_from_dict, cpuid_entries, cpuid_rows,
                       missing_features, on_loop, prepare_directory, read_snapshot, vcpu_from_dict, vcpu_to_dict,
                       vm_from_dict, vm_to_dict, write_snapshot)
from .vcpu import VcpuRunner
from .virtio import VirtioPciDevice

log = logging.getLogger(__name__)

MSR_IA32_TSC = 0x10

# What kvmkit cannot run without, with the words a user needs.
REQUIRED_CAPS = {Cap.IRQCHIP: "an in-kernel irqchip", Cap.USER_MEMORY: "user memory slots",
                 Cap.IRQFD: "irqfd", Cap.PIT2: "an in-kernel PIT"}


class Stateful(Protocol):
    """A part of the machine a snapshot saves: plain JSON data out, the same back in (checked)."""

    def save_state(self) -> dict: ...

    def load_state(self, state: object) -> None: ...


class Machine:
    """One VM. Build it from a config, :meth:`load` its kernel, :meth:`run` it."""

    def __init__(self, config: VmConfig, backends: dict[str, Backend | None] | None = None,
                 snapshot: Snapshot | None = None) -> None:
        """``backends`` ("COM1".."COM4", "hvc0"; None = no such port) replaces the config's
        serial specs for the ports it names: the Python API hands in socket pairs.
        ``snapshot``: build the machine over a snapshot's memory and CPUID (see :meth:`restore`)."""
        self.config = config
        self._snapshot = snapshot
        self._cpuid: list[list] = []  # per vCPU, the CPUID table it was given (a snapshot records it)
        self.pc = PcMap(config)
        self.lifecycle = Lifecycle()
        self.console_watch = ConsoleWatch()  # the guest's console, read for a kernel panic
        self.cmdline: str | None = None  # what load() gave the kernel
        self.status_line: StatusLine | None = None
        self.kernel_version: str | None = None
        self.lifecycle.judge = self._judge_outcome
        self.kvm = Kvm()
        self.vm: Vm | None = None
        self.mem: GuestMemory | None = None
        self.runners: list[VcpuRunner] = []
        self.serial_ports: list[SerialPort] = []
        self.loop = EventLoop()
        self.pio_bus = Bus("pio", 0x10000)
        self.mmio_bus = Bus("mmio", 1 << 52)
        self.irq_lines: dict[int, IrqLine] = {}
        self.kvm_stats: dict[int, StatsReader] = {}
        self.pvclockevent: PvClockEvents | None = None
        self.pci: PciHost | None = None
        self.virtio: list[VirtioPciDevice] = []
        self.disk_images: list[RawImage] = []
        self.share_servers: list[P9Server] = []
        self.hvc: VirtioConsoleEnd | None = None
        self.net_ends: list[VirtioNetEnd] = []
        self.quirks: Quirks | None = None
        self.boot_info: BootInfo | None = None
        self._watch_poweroff = False
        self.name: str | None = None       # the control socket's name for it (kvmkit run --name)
        self.started_at: float | None = None  # time.time() at start()
        try:
            self._build(backends)
        except BaseException:
            self.close()
            raise

    # --- construction --------------------------------------------------------
    def _build(self, backends: dict[str, Backend | None] | None) -> None:
        cfg = self.config
        kvm = self.kvm
        kvm.require(REQUIRED_CAPS)
        self.vm = vm = kvm.create_vm()
        try:
            vm.set_tss_addr(TSS_ADDR)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        except KvmError:
            pass  # not needed on every host (AMD, PVM)
        try:
            self.mem = GuestMemory(cfg.mem_size, self._snapshot.memory_fds if self._snapshot is not None else None)
        except OSError as e:
            raise KvmkitError(f"cannot allocate {cfg.mem_size // MiB} MiB of guest memory: {e.strerror}; use a smaller --mem.") from None
        for region in self.mem.regions:
            vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address)
        if cfg.irqchip:
            vm.create_irqchip()
            vm.create_pit2()
            if self._snapshot is None:  # a snapshot's irqchip state carries the ELCR
                self._set_level_triggered(self.pc.level_irqs())
        if kvm.check_extension(Cap.EXIT_ON_EMULATION_FAILURE):
            try:
                vm.enable_cap(Cap.EXIT_ON_EMULATION_FAILURE, 1)
            except KvmError:
                pass
        self.gsi_routes = GsiRoutes(vm.set_gsi_routing)
        self._build_devices(backends)
        self.quirks = make_quirks(cfg.quirks, cpus=cfg.cpus, mem=self.mem, tsc_khz=vm.get_tsc_khz())
        self._trap_msr_writes(kvm, vm, self.quirks.msr_write_traps())
        cpuid_clear = dict(self.quirks.cpuid_clear())
        for key, bits in cfg.cpuid_clear.items():
            cpuid_clear[key] = cpuid_clear.get(key, 0) | bits
        supported = kvm.supported_cpuid()
        for i in range(cfg.cpus):
            vcpu = vm.create_vcpu(i)
            cpuid = build_cpuid(supported, i, cfg.cpus, cpuid_clear)
            if self._snapshot is not None:
                cpuid = self._snapshot_cpuid(i, cpuid)
            vcpu.set_cpuid2(cpuid)
            self._cpuid.append(cpuid)
            runner = VcpuRunner(vcpu, self.pio_bus, self.mmio_bus, self.lifecycle, self.mem.read_available)
            self.lifecycle.add(runner)
            self.quirks.install(runner)
            self.runners.append(runner)
            try:
                self.kvm_stats[i] = StatsReader(vcpu.stats_fd())
            except (KvmError, OSError):
                pass

    def _trap_msr_writes(self, kvm: Kvm, vm: Vm, indices: list[int]) -> None:
        """Have the guest's WRMSR to these MSRs exit to the vCPU loop (its msr_write_hooks).
        A KVM without MSR filters leaves them to KVM: the quirks then arm at the next kick."""
        if not indices:
            return
        if not (kvm.check_extension(Cap.X86_USER_SPACE_MSR) and kvm.check_extension(Cap.X86_MSR_FILTER)):
            log.info("this KVM has no MSR filter; MSR writes %s are not trapped", [hex(i) for i in indices])
            return
        try:
            vm.enable_cap(Cap.X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
            vm.deny_msr_writes(indices)
        except KvmError as e:
            log.info("MSR filter refused (%s); MSR writes %s are not trapped", e, [hex(i) for i in indices])

    def _snapshot_cpuid(self, index: int, here: list) -> list:
        """The CPUID the snapshot's guest saw, if this host can give every feature of it."""
        assert self._snapshot is not None
        try:
            saved = cpuid_entries(self._snapshot.state["cpuid"][index])
        except (KeyError, IndexError, TypeError):
            raise SnapshotError("the snapshot's CPUID table is damaged; take the snapshot again.") from None
        missing = missing_features(saved, here)
        if missing:
            raise SnapshotError(f"the snapshot was taken on a CPU this host differs from ({', '.join(missing)}); "
                                "restore it on the same kind of host.")
        return saved

    def _set_level_triggered(self, irqs: tuple[int, ...]) -> None:
        """Program the in-kernel PICs' ELCR for ``irqs``, as PC firmware does for level-triggered lines."""
        assert self.vm is not None
        for chip_id, first in ((KVM_IRQCHIP_PIC_MASTER, 0), (KVM_IRQCHIP_PIC_SLAVE, 8)):
            mask = sum(1 << (irq - first) for irq in irqs if first <= irq < first + 8)
            if mask:
                chip = self.vm.get_irqchip(chip_id)
                chip.chip.pic.elcr |= mask & chip.chip.pic.elcr_mask
                self.vm.set_irqchip(chip)

    def irq_line(self, gsi: int) -> IrqLine:
        line = self.irq_lines.get(gsi)
        if line is None:
            assert self.vm is not None
            setter = self.vm.irq_line if self.config.irqchip else (lambda gsi, level: None)
            line = self.irq_lines[gsi] = IrqLine(gsi, setter)
        return line

    def _place(self, name: str, device: object) -> None:
        p = self.pc[name]
        bus = self.pio_bus if p.space == "pio" else self.mmio_bus
        bus.register(p.base, p.size, device, name)  # type: ignore[arg-type]

    def _build_devices(self, backends: dict[str, Backend | None] | None) -> None:
        cfg = self.config
        assert self.mem is not None and self.vm is not None
        stop = self.lifecycle.stop
        self.exit_port = ExitPort(lambda v: stop(v, f"guest wrote {v} to the exit port", EXIT_PORT))
        self._place("exit-port", self.exit_port)
        self.i8042 = I8042(lambda: stop(0, "guest requested a reset (i8042)", RESET),
                           irq_kbd=self.irq_line(I8042_IRQ_KBD).source(), irq_aux=self.irq_line(I8042_IRQ_AUX).source())
        self._place("i8042-data", OffsetWindow(self.i8042, 0))
        self._place("i8042-cmd", OffsetWindow(self.i8042, I8042_COMMAND - I8042_DATA))
        self.post = PortSink()
        self._place("post", self.post)
        low = sum(r.size for r in self.mem.regions if r.gpa < 1 << 32)
        self.cmos = Cmos(nvram=cmos_memory_bytes(low, self.mem.size - low, cfg.cpus))
        self._place("cmos", self.cmos)
        if self.pc.has_pv_clockevent:
            self.pvclockevent = PvClockEvents(self.vm, self.mem, self.pc, self.mmio_bus, self.loop, self.gsi_routes,
                                              guest_tsc=self._guest_tsc)
        ports = self._console_backends(backends or {})
        for idx, p in self.pc.serial_ports():
            backend = ports.get(p.name)
            if backend is None:
                continue
            assert p.irq is not None
            port = SerialPort(p.name, self.loop, backend, self.irq_line(p.irq).source(), fifo=cfg.serial_fifo,
                              pace=cfg.serial_pace)
            if p.name == "COM1":
                port.stream.watchers.append(self.console_watch.feed)
            self._place(p.name, port)
            self.serial_ports.append(port)
        if cfg.has_pci:
            self._build_pci(ports.get("hvc0"))

    def _console_backends(self, given: dict[str, Backend | None]) -> dict[str, Backend | None]:
        """Each console port's backend: the caller's, else the config's spec. With the console on
        virtio, hvc0 takes COM1's backend and COM1 writes its early messages into it too."""
        cfg = self.config
        out: dict[str, Backend | None] = {}
        for idx, p in self.pc.serial_ports():
            out[p.name] = given[p.name] if p.name in given else parse_backend(cfg.serial[idx], self._console_command, label=p.name)
        if cfg.virtio_console:
            if "hvc0" in given:
                out["hvc0"] = given["hvc0"]
            elif cfg.console == "virtio" and out.get("COM1") is not None:
                owner = out["COM1"]
                assert owner is not None
                out["hvc0"] = owner
                out["COM1"] = SharedOutputBackend(owner)
            else:
                out["hvc0"] = NullBackend()
        return out

    def _build_pci(self, hvc_backend: Backend | None) -> None:
        cfg = self.config
        assert self.mem is not None and self.vm is not None
        self.pci = PciHost(self.pio_bus, self.mmio_bus, self.pc, max(r.end for r in self.mem.regions), self.irq_line)
        for i, disk in enumerate(cfg.disks):
            image = RawImage(disk.path, read_only=disk.read_only, serial=disk.serial)
            self.disk_images.append(image)
            self._add_virtio(f"virtio-blk{i}", VirtioBlk(image, serial=disk.serial), worker=True)
        if cfg.virtio_console:
            self.hvc = VirtioConsoleEnd("hvc0", self.loop, hvc_backend if hvc_backend is not None else NullBackend())
            self.hvc.stream.watchers.append(self.console_watch.feed)
            self._add_virtio("virtio-console", self.hvc.console, worker=False)
        if cfg.rng:
            self._add_virtio("virtio-rng", VirtioRng(os.getrandom), worker=False)
        if cfg.shares:
            max_fids = share_fid_limit(len(cfg.shares))
            for i, share in enumerate(cfg.shares):
                server = P9Server(share.path, readonly=share.read_only, max_fids=max_fids)
                self.share_servers.append(server)
                # A worker thread: file I/O can block, and a vCPU must not wait on it.
                self._add_virtio(f"virtio-9p{i}", VirtioP9(server, share.tag), worker=True)
        for i, net in enumerate(cfg.nets):
            name = f"virtio-net{i}"
            assert net.mac is not None  # the config picked one
            end = VirtioNetEnd(name, self.loop, self._net_backend(net, name), bytes.fromhex(net.mac.replace(":", "")))
            self.net_ends.append(end)  # kept before anything else can fail: close() stops its passt
            # The host loop serves its kicks: frames move between the rings and the backend's
            # non-blocking fd there, in a batch per kick, never on a vCPU.
            self._add_virtio(name, end.device, worker=False)

    @staticmethod
    def _net_backend(net: NetSpec, name: str) -> NetBackend:
        if net.mode == "tap":
            return TapBackend(net.ifname, name=name, max_frame=MAX_FRAME)
        return open_user_net(net.socket, name=name, max_frame=MAX_FRAME)

    def _add_virtio(self, name: str, device: VirtioDevice, worker: bool) -> None:
        assert self.mem is not None and self.vm is not None and self.pci is not None
        self.virtio.append(VirtioPciDevice(name, device, vm=self.vm, mem=self.mem, pci=self.pci,
                                           routes=self.gsi_routes, loop=self.loop, worker=worker))

    def _console_command(self, cmd: str) -> None:
        """A Ctrl-A command typed on the terminal (host/terminal.py)."""
        if cmd == "quit":
            self.lifecycle.stop(0, "quit from the console (Ctrl-A x)", QUIT)
        elif cmd == "stats":
            # The vCPU loops keep their tallies locally and hand them over
            # when kicked: kick, then print once they have.
            self.kick_all()
            self.loop.call_later(0.05, lambda: self._console_note(self.stats_table()))
        elif cmd == "help":
            from ..host.terminal import ESCAPE_HELP
            self._console_note(ESCAPE_HELP)

    def _console_note(self, text: str) -> None:
        if self.hvc is not None and self.config.console == "virtio":
            self.hvc.host_note(text)
        elif self.serial_ports:
            self.serial_ports[0].host_note(text)

    # --- loading ---------------------------------------------------------------
    def load(self) -> BootInfo:
        """Load the configured kernel (or the bundled guest), initrd and command line; point vCPU 0 at it."""
        cfg = self.config
        assert self.mem is not None and self.quirks is not None
        if cfg.kernel is None:
            from ..boot.bundled import bundled_guest
            image = read_user_file(bundled_guest(), "bundled guest", cfg.mem_size)
        else:
            image = read_user_file(cfg.kernel, "kernel", cfg.mem_size)
        initrd = read_user_file(cfg.initrd, "initrd", cfg.mem_size) if cfg.initrd is not None else None
        kernel = open_kernel(image, limit=cfg.mem_size)
        cmdline = build_cmdline(cfg.cmdline, linux=kernel.is_linux, pci=cfg.has_pci,
                                quirk_params=self.quirks.cmdline_params() if kernel.is_linux else (),
                                script=cfg.script, virtio_console=cfg.console == "virtio")
        self.cmdline = cmdline
        self.kernel_version = kernel.kernel_version
        # Poweroff without ACPI: Linux halts with interrupts off on every CPU.
        self._watch_poweroff = kernel.is_linux
        pci_irqs = [(slot, irq) for slot, irq in self.pci.intx.items()] if self.pci is not None else None
        info = load_linux(self.mem, kernel, initrd, cmdline, ncpus=cfg.cpus, pci_irqs=pci_irqs,
                          level_irqs=self.pc.level_irqs(),
                          initrd_name=f"initrd file {cfg.initrd}" if cfg.initrd is not None else "the initrd")
        self.boot_info = info
        set_long_mode(self.runners[0].vcpu, info)
        return info

    # --- running and stopping ------------------------------------------------------
    @property
    def outcome(self) -> Outcome | None:
        return self.lifecycle.outcome

    @property
    def status(self) -> int | None:
        o = self.lifecycle.outcome
        return o.status if o is not None else None

    @property
    def stop_message(self) -> str:
        o = self.lifecycle.outcome
        return o.message if o is not None else ""

    @property
    def reset_requested(self) -> bool:
        o = self.lifecycle.outcome
        return o is not None and o.reset

    @property
    def stopping(self) -> bool:
        return self.lifecycle.stopping

    def request_stop(self, status: int, message: str = "") -> None:
        """Stop the machine with an exit status; the first request wins. Safe from any thread."""
        self.lifecycle.stop(status, message)

    def show_status_line(self, fd: int = 2) -> None:
        """Keep a line on terminal ``fd`` while the guest's console is quiet (a slow boot shows it is alive)."""
        def exits() -> int:
            return sum(s.get("exits", 0) for s in self.in_kernel_stats().values())
        self.status_line = StatusLine(self.loop, self.console_watch, exits, fd)
        streams = [p.stream for p in self.serial_ports if p.name == "COM1"]
        if self.hvc is not None:
            streams.append(self.hvc.stream)
        for stream in streams:
            stream.before_write = self.status_line.clear
        self.status_line.start()

    def _judge_outcome(self, outcome: Outcome) -> Outcome:
        """A reset, triple fault or halt after the kernel's panic line is the panic (status PANIC_STATUS)."""
        if outcome.kind in (RESET, TRIPLE_FAULT, HALT):
            line = self.console_watch.panic_line
            if line is not None:
                return Outcome(PANIC_STATUS, f"guest kernel panicked: {line}", PANIC)
        return outcome

    def request_shutdown(self) -> bool:
        """Ask the guest to shut down as a PC without ACPI is asked: Ctrl-Alt-Del on its keyboard.

        True if a keyboard driver was there to hear it (Linux reboots, or
        hands the key to init, and kvmkit ends the VM on the reset that
        follows); False for a guest with no keyboard driver, or one not
        running. Nothing is forced: :meth:`request_stop` does that.
        """
        if self.state != "running":
            return False
        return self.i8042.send_ctrl_alt_del()

    def kick_all(self) -> None:
        """Bring every vCPU out of KVM_RUN once (it re-enters at once): hooks run, tallies are flushed."""
        self.lifecycle.kick_all()

    @property
    def state(self) -> str:
        """"created" (not started), "running", "paused" or "stopped"."""
        if self.lifecycle.stopping:
            return "stopped"
        if self.started_at is None:
            return "created"
        return "paused" if self.lifecycle.pausing else "running"

    def pause(self, timeout: float = 5.0) -> None:
        """Stop every vCPU at an instruction boundary and keep it there until :meth:`resume`.

        Devices and the host loop go on (a timer that expires meanwhile is
        delivered when the vCPUs resume), so the guest sees a pause as time
        that passed while it did not run, as after a host suspend.
        """
        if self.lifecycle.stopping:
            raise KvmkitError("the VM has stopped; there is nothing to pause.")
        if not self.lifecycle.pause(timeout):
            if self.lifecycle.stopping:
                raise KvmkitError("the VM stopped while it was being paused.")
            self.lifecycle.resume()
            raise KvmkitError(f"the vCPUs did not stop within {timeout:.0f} s; the VM keeps running.")
        for runner in self.runners:
            # The guest's soft-lockup watchdog would otherwise see the pause as a hung CPU.
            self.lifecycle.on_vcpu(runner, runner.vcpu.kvmclock_ctrl)

    def resume(self) -> None:
        """Let paused vCPUs run again (a no-op on a running VM)."""
        self.lifecycle.resume()

    # --- snapshot and restore (machine/snapshot.py) -------------------------------------------
    def snapshot(self, directory: Path | str) -> dict[str, object]:
        """Save the running or paused VM into a new directory; it goes on running (or stays paused).

        Returns what was written and how long it took (seconds for the device
        and KVM state, for memory, and in all; bytes of memory and state).
        """
        directory = Path(directory)
        if self.state not in ("running", "paused"):
            raise SnapshotError(f"the VM is {self.state}; only a running or paused VM can be snapshotted.")
        prepare_directory(directory)
        was_paused = self.lifecycle.pausing
        t0 = time.monotonic()
        self.pause()
        t_paused = time.monotonic()
        try:
            with contextlib.ExitStack() as quiet:
                for dev in self.virtio:
                    quiet.enter_context(dev.quiesced())
                result = on_loop(self, lambda: write_snapshot(self, directory))
        finally:
            if not was_paused:
                self.resume()
        result["pause_s"] = round(t_paused - t0, 4)
        return result

    def collect_state(self) -> dict[str, object]:
        """Everything a snapshot holds but memory (vCPUs parked, on the host loop thread)."""
        assert self.vm is not None
        msr_list = self.kvm.msr_index_list()
        vcpus = [vcpu_to_dict(self.lifecycle.on_vcpu(r, lambda r=r: save_vcpu(r.vcpu, msr_list)))  # type: ignore[misc]
                 for r in self.runners]
        devices = {name: part.save_state() for name, part in self.state_parts().items()}
        return {
            "vm": vm_to_dict(save_vm(self.vm)), "vcpus": vcpus, "cpuid": [cpuid_rows(c) for c in self._cpuid],
            "devices": devices, "quirks": self.quirks.save_state() if self.quirks is not None else {},
            "linux": self._watch_poweroff,
        }

    def _guest_tsc(self) -> int:
        """vCPU 0's TSC (on its own thread once the machine runs: call it paused, or before start)."""
        runner = self.runners[0]

        def read() -> int:
            return runner.vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        if self.started_at is None:
            return read()
        return int(self.lifecycle.on_vcpu(runner, read))  # type: ignore[call-overload]

    def state_parts(self) -> dict[str, Stateful]:
        """Every part of the machine whose state a snapshot carries, by a stable name."""
        parts: dict[str, Stateful] = {"cmos": self.cmos, "i8042": self.i8042}
        for port in self.serial_ports:
            parts[port.name] = port
        if self.pvclockevent is not None:
            parts["pvclockevent"] = self.pvclockevent
        if self.pci is not None:
            parts["pci"] = self.pci
        for dev in self.virtio:
            parts[dev.name] = dev
        return parts

    @classmethod
    def restore(cls, directory: Path | str, backends: dict[str, Backend | None] | None = None,
                serial: list[str] | None = None, verify: bool = False) -> "Machine":
        """A new machine that continues from a snapshot; :meth:`start` (or :meth:`run`) it.

        ``serial`` (specs, COM1 first) and ``backends`` name this run's console
        ends; the snapshot's are not reused. ``verify`` checks the memory
        files' digests too (it reads all their data: slower, for suspect copies).
        """
        snap = read_snapshot(Path(directory), verify_memory=verify)
        try:
            check_disks(snap.manifest)
            config = config_from_dict(snap.manifest["config"], serial)
            machine = cls(config, backends, snapshot=snap)
        except BaseException:
            snap.close()
            raise
        try:
            machine._apply_state(snap.state)
        except BaseException:
            machine.close()
            raise
        return machine

    def _apply_state(self, state: dict[str, object]) -> None:
        assert self.vm is not None
        if not isinstance(state.get("vcpus"), list) or len(state["vcpus"]) != len(self.runners):  # type: ignore[arg-type]
            raise SnapshotError("the snapshot's vCPU list does not match its configuration; the snapshot is damaged.")
        try:
            restore_vm(self.vm, vm_from_dict(state.get("vm")))
            for runner, saved in zip(self.runners, state["vcpus"]):  # type: ignore[arg-type]
                restore_vcpu(runner.vcpu, vcpu_from_dict(saved))
        except (ValueError, KvmError) as e:
            raise SnapshotError(f"KVM refused the snapshot's state ({e}); restore it on the same kind of host "
                                "with the kvmkit that made it.") from None
        devices = state.get("devices")
        parts = self.state_parts()
        if not isinstance(devices, dict) or set(devices) != set(parts):
            raise SnapshotError("the snapshot's devices do not match its configuration; the snapshot is damaged.")
        for name, part in parts.items():
            part.load_state(devices[name])
        if self.quirks is not None:
            self.quirks.load_state(state.get("quirks", {}), [r.vcpu for r in self.runners])
        self._watch_poweroff = bool(state.get("linux", False))
        for part in parts.values():
            resync = getattr(part, "resync", None)
            if resync is not None:
                resync()

    def start(self) -> None:
        """Start the host loop, the serial ports and the vCPU threads."""
        require_kick_handler()
        self.started_at = time.time()
        if self.hvc is not None:
            self.hvc.start()  # it opens the backend COM1 may share
        for port in self.serial_ports:
            port.start()
        for end in self.net_ends:
            end.start()
        self.loop.start()
        if self._watch_poweroff:
            watch = PoweroffWatch(self.lifecycle, [r.vcpu.id for r in self.runners])
            for runner in self.runners:
                runner.kick_hooks.append(watch)
        for runner in self.runners:
            runner.start()
        if any(runner.kick_hooks for runner in self.runners):
            self.lifecycle.watch()

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the machine stops (or ``timeout``); returns the exit status or None."""
        outcome = self.lifecycle.wait(timeout)
        return outcome.status if outcome is not None else None

    def run(self, handle_signals: bool = True) -> int:
        """Start, wait for the stop, tear down; SIGINT/SIGTERM/SIGHUP stop the guest cleanly."""
        with self.lifecycle.signals() if handle_signals else contextlib.nullcontext():
            try:
                self.start()
                while self.wait(0.2) is None:
                    pass
                return self.status if self.status is not None else 1
            finally:
                self.shutdown()

    def shutdown(self) -> None:
        """Stop everything that runs; flush and close the host ends."""
        if not self.stopping:
            self.lifecycle.stop(0, "shut down by kvmkit")
        self.wait(10)
        self.loop.stop()
        if self.status_line is not None:
            self.status_line.stop()  # erased before the ports' last output is flushed
        for port in [*self.serial_ports, *([self.hvc] if self.hvc is not None else [])]:
            try:
                port.close()
            except Exception:
                log.exception("closing %s failed", port.name)

    # --- measurement -----------------------------------------------------------------
    def exit_stats(self) -> list[VcpuExitStats]:
        return [r.stats for r in self.runners]

    def in_kernel_stats(self) -> dict[int, dict[str, int]]:
        out = {}
        for vid, reader in self.kvm_stats.items():
            try:
                out[vid] = reader.read()
            except OSError:
                pass
        return out

    def stats_dict(self) -> dict[str, object]:
        """The exit accounting as plain data (``kvmkit stats --json``, the control socket), current to the
        last kick: call :meth:`kick_all` and wait a moment first for figures to the moment."""
        return {
            "vcpus": [st.as_dict() for st in self.exit_stats()],
            "kvm": {str(k): v for k, v in self.in_kernel_stats().items()},
            "ports": {p.name: p.counters.as_dict() for p in [*self.serial_ports, *([self.hvc] if self.hvc else [])]},
            "net": {end.name: end.counters() for end in self.net_ends},
        }

    def stats_table(self) -> str:
        lines = [format_exit_table(self.exit_stats(), self.in_kernel_stats())]
        lines += [s for s in (self.pio_bus.summary(), self.mmio_bus.summary()) if s]
        lines += [p.counters.summary(p.name) for p in [*self.serial_ports, *([self.hvc] if self.hvc else [])]
                  if p.counters.host_bytes_out or p.counters.host_bytes_in]
        if self.pci is not None:
            lines.append(f"pci: {self.pci.config_accesses()} configuration space accesses")
            lines += [d.stats() for d in self.virtio]
            lines += [end.summary() for end in self.net_ends]
        return "\n".join(lines)

    # --- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        self.loop.stop()  # no host callback runs while device host ends go
        if self.pvclockevent is not None:
            self.pvclockevent.close()
        for dev in self.virtio:
            try:
                dev.close()  # before RAM goes: no device may hold a view of it
            except Exception:
                log.exception("closing %s failed", dev.name)
        self.virtio = []
        for end in self.net_ends:
            try:
                end.close()  # a passt kvmkit started is stopped here, on every way out
            except Exception:
                log.exception("closing %s failed", end.name)
        self.net_ends = []
        for image in self.disk_images:
            image.close()
        self.disk_images = []
        for server in self.share_servers:
            server.close()
        self.share_servers = []
        try:
            self.loop.close()
        except Exception:
            pass
        for reader in self.kvm_stats.values():
            reader.close()
        self.kvm_stats = {}
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self._snapshot is not None:
            self._snapshot.close()
        self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

