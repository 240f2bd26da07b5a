"""A VM wired together: memory, buses, devices, vCPU threads and the host loop.

This is the one place that knows the machine's shape (what sits at which
port or address); devices know nothing of each other, and the vCPU loop
knows only buses. A machine stops exactly once, through
:meth:`Machine.request_stop`, whoever asks (a guest poweroff, a reset, a
VMM error, Ctrl-A x, SIGINT, SIGTERM): every vCPU is kicked out of KVM_RUN
with ``immediate_exit`` plus a signal, the host loop is stopped and the
terminal is restored.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..devices.cmos import CMOS_INDEX, Cmos
from ..devices.cmos import memory_bytes as cmos_memory_bytes
from ..devices.misc import EXIT_PORT, I8042, ExitPort, PortSink
from ..errors import KvmkitError
from ..host.backends import Backend, parse_backend
from ..host.loop import EventLoop
from ..kvm.constants import KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED, Cap
from ..kvm.system import Kvm, KvmError, Vcpu, Vm
from ..memory import GuestMemory
from ..profile.exits import VcpuExitStats, format_exit_table
from ..profile.kvmstats import StatsReader
from .bus import Bus
from .cpu import LongModeEntry, build_cpuid, set_long_mode
from .irq import IrqLine
from .quirks import make_quirks
from .serial import SerialPort
from .vcpu import VcpuRunner

if TYPE_CHECKING:
    from ..boot.linux import BootInfo

log = logging.getLogger(__name__)

MiB = 1 << 20

# Addresses KVM needs for its own use on Intel hosts: three pages for the
# real-mode TSS and one for the identity map, just below the BIOS area.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

# COM1..COM4: (I/O base, ISA IRQ), as every PC BIOS assigns them.
COM_PORTS = [(0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3)]

KICK_SIGNAL = signal.SIGUSR1
WATCH_INTERVAL = 1.0  # seconds between kicks when a kick hook wants to look at the vCPUs
RFLAGS_IF = 1 << 9


def _install_kick_handler() -> bool:
    """A no-op handler, so a signal sent to a vCPU thread interrupts KVM_RUN (EINTR)."""
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    return True


@dataclass
class MachineConfig:
    mem_size: int = 256 * MiB
    cpus: int = 1
    serial: list[str] = field(default_factory=lambda: ["stdio", "none", "none", "none"])
    serial_fifo: bool = True
    serial_pace: bool = False
    stats: bool = False
    # The in-kernel PIC/IOAPIC/LAPIC and PIT. Without them HLT exits to user
    # space (KVM_EXIT_HLT) and no interrupt can be delivered: only for tiny
    # test guests.
    irqchip: bool = True
    cpuid_clear: dict[tuple[int, str], int] = field(default_factory=dict)
    quirks: str = "auto"  # host quirk profile: auto, nested-pvm, none (machine/quirks.py)
    pv_timer: bool = True  # paravirtual clock event device (docs/pv-clockevent.md); needs irqchip


class Machine:
    """One VM. Build it, :meth:`boot` something into it, :meth:`run` it."""

    def __init__(self, config: MachineConfig, backends: list[Backend] | None = None) -> None:
        if config.cpus < 1 or config.cpus > 255:
            raise KvmkitError(f"--cpus {config.cpus} is out of range; choose 1 to 255.")
        self.config = config
        self.stopping = False
        self.status: int | None = None
        self.stop_message = ""
        self.reset_requested = False
        self._stop_lock = threading.Lock()
        self._done = threading.Event()
        self.on_stop: list[Callable[[int, str], None]] = []
        self.kvm = Kvm()
        self.vm: Vm | None = None
        self.mem: GuestMemory | None = None
        self.runners: list[VcpuRunner] = []
        self.serial_ports: list[SerialPort] = []
        self.loop = EventLoop()
        self.pio_bus = Bus("pio", 0x10000)
        self.mmio_bus = Bus("mmio", 1 << 52)
        self.kvm_stats: dict[int, StatsReader] = {}
        self._watch_halt = False
        self._halted: dict[int, bool] = {}
        try:
            self._build(backends)
        except BaseException:
            self.close()
            raise

    # --- construction --------------------------------------------------------
    def _build(self, backends: list[Backend] | None) -> None:
        cfg = self.config
        kvm = self.kvm
        for cap, what in ((Cap.IRQCHIP, "an in-kernel irqchip"), (Cap.USER_MEMORY, "user memory slots"),
                          (Cap.IRQFD, "irqfd"), (Cap.PIT2, "an in-kernel PIT")):
            if not kvm.check_extension(cap):
                raise KvmkitError(f"this host's KVM lacks {what} (KVM_CAP_{cap.name}); kvmkit needs a newer host kernel.")
        self.vm = vm = kvm.create_vm()
        try:
            vm.set_tss_addr(TSS_ADDR)
            vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        except KvmError:
            pass  # not needed on every host (AMD, PVM)
        try:
            self.mem = GuestMemory(cfg.mem_size)
        except OSError as e:
            raise KvmkitError(f"cannot allocate {cfg.mem_size // MiB} MiB of guest memory: {e.strerror}; use a smaller --mem.") from None
        for region in self.mem.regions:
            vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address)
        if cfg.irqchip:
            vm.create_irqchip()
            vm.create_pit2()
        if kvm.check_extension(Cap.EXIT_ON_EMULATION_FAILURE):
            try:
                vm.enable_cap(Cap.EXIT_ON_EMULATION_FAILURE, 1)
            except KvmError:
                pass
        self.irq_lines: dict[int, IrqLine] = {}
        self._build_devices(backends)
        supported = kvm.supported_cpuid()
        self.quirks = make_quirks(cfg.quirks, self)
        cpuid_clear = dict(self.quirks.cpuid_clear())
        for key, bits in cfg.cpuid_clear.items():
            cpuid_clear[key] = cpuid_clear.get(key, 0) | bits
        for i in range(cfg.cpus):
            vcpu = vm.create_vcpu(i)
            vcpu.set_cpuid2(build_cpuid(supported, i, cfg.cpus, cpuid_clear))
            self.runners.append(VcpuRunner(self, vcpu))
            self.quirks.install(self.runners[-1])
            try:
                self.kvm_stats[i] = StatsReader(vcpu.stats_fd())
            except (KvmError, OSError):
                pass

    def irq_line(self, gsi: int) -> IrqLine:
        line = self.irq_lines.get(gsi)
        if line is None:
            assert self.vm is not None
            setter = self.vm.irq_line if self.config.irqchip else (lambda gsi, level: None)
            line = self.irq_lines[gsi] = IrqLine(gsi, setter)
        return line

    def _build_devices(self, backends: list[Backend] | None) -> None:
        cfg = self.config
        self.exit_port = ExitPort(lambda v: self.request_stop(v, f"guest wrote {v} to the exit port"))
        self.pio_bus.register(EXIT_PORT, 1, self.exit_port, "exit-port")
        self.i8042 = I8042(lambda: self.request_stop(0, "guest requested a reset (i8042)", reset=True))
        self.pio_bus.register(0x60, 1, _Window(self.i8042, 0), "i8042-data")
        self.pio_bus.register(0x64, 1, _Window(self.i8042, 4), "i8042-cmd")
        self.post = PortSink()
        self.pio_bus.register(0x80, 1, self.post, "post")
        assert self.mem is not None
        low = sum(r.size for r in self.mem.regions if r.gpa < 1 << 32)
        self.cmos = Cmos(nvram=cmos_memory_bytes(low, self.mem.size - low, cfg.cpus))
        self.pio_bus.register(CMOS_INDEX, 2, self.cmos, "cmos")
        self.pv_timer = None  # kvmkit.machine.pvtimer.PvTimer
        if cfg.pv_timer and cfg.irqchip:
            from .pvtimer import PvTimer
            self.pv_timer = PvTimer(self, cfg.cpus)
        for idx, (base, irq) in enumerate(COM_PORTS):
            if backends is not None:
                backend = backends[idx] if idx < len(backends) else None
            else:
                spec = cfg.serial[idx] if idx < len(cfg.serial) else "none"
                backend = None if spec == "off" else parse_backend(spec, self._escape_command)
            if backend is None:
                continue
            port = SerialPort(f"COM{idx + 1}", self.loop, backend, self.irq_line(irq).source(), fifo=cfg.serial_fifo,
                              pace=cfg.serial_pace)
            self.pio_bus.register(base, 8, port, f"COM{idx + 1}")
            self.serial_ports.append(port)

    def _escape_command(self, cmd: str) -> None:
        if cmd == "quit":
            self.request_stop(0, "quit from the console (Ctrl-A x)")
        elif cmd == "stats":
            # The vCPU loops keep their tallies locally and hand them over
            # when kicked: kick, then print once they have.
            self.kick_all()
            self.loop.call_later(0.05, lambda: self._console_note(self.stats_table()))
        elif cmd == "help":
            from ..host.terminal import ESCAPE_HELP
            self._console_note(ESCAPE_HELP)

    def _console_note(self, text: str) -> None:
        if self.serial_ports:
            port = self.serial_ports[0]
            with port.lock:
                port.outbuf += ("\r\n" + text.replace("\n", "\r\n") + "\r\n").encode()
            self.loop.call_soon(port._flush_output)

    # --- loading ---------------------------------------------------------------
    def boot(self, kernel: bytes, initrd: bytes | None = None, cmdline: str = "") -> "BootInfo":
        """Load a bzImage or ELF kernel (Linux or the bundled guest) and point vCPU 0 at it."""
        from ..boot.bzimage import is_bzimage
        from ..boot.elf import is_elf, linux_banner
        from ..boot.linux import load_linux
        assert self.mem is not None
        is_linux = is_bzimage(kernel) or (is_elf(kernel) and linux_banner(kernel) is not None)
        if is_linux:
            cmdline = self.quirks.linux_cmdline(cmdline)
            self._watch_halt = True  # poweroff without ACPI: Linux halts with interrupts off
        info = load_linux(self.mem, kernel, initrd, cmdline, ncpus=self.config.cpus)
        self.boot_info = info
        self.set_entry(LongModeEntry(
            rip=info.rip, rsi=info.rsi, cr3=info.cr3, gdt_base=info.gdt_base, gdt_limit=info.gdt_limit,
            code_selector=info.code_selector, data_selector=info.data_selector, rsp=info.rsp,
            cr0=info.cr0, cr4=info.cr4, efer=info.efer))
        return info

    # --- guest halted for good (poweroff -f without ACPI) -----------------------------
    def kick_all(self) -> None:
        """Bring every vCPU out of KVM_RUN once (it re-enters at once): hooks run, tallies are flushed."""
        for runner in self.runners:
            t = runner.thread
            if t is not None and t.is_alive() and t.ident is not None and t is not threading.current_thread():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def _watch_kicks(self) -> None:
        """Kick every vCPU out of KVM_RUN now and then, so kick hooks can look at it."""
        while not self._done.wait(WATCH_INTERVAL):
            self.kick_all()

    def _check_halted(self, vcpu: Vcpu) -> None:
        """Linux's poweroff (and halt) without ACPI ends in cli; hlt on every CPU: stop with status 0."""
        try:
            state = vcpu.get_mp_state()
            halted = state == KVM_MP_STATE_HALTED and not vcpu.get_regs().rflags & RFLAGS_IF
        except KvmError:
            return
        # A vCPU the guest never started (waiting for INIT/SIPI) counts as stopped too.
        self._halted[vcpu.id] = halted or (vcpu.id != 0 and state in (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED))
        if halted and all(self._halted.get(r.vcpu.id) for r in self.runners):
            self.request_stop(0, "the guest halted with interrupts off on every vCPU (Linux's poweroff without ACPI)")

    def set_entry(self, entry: LongModeEntry) -> None:
        """Start every vCPU at a 64-bit entry (APs are parked by the guest's own SMP bring-up)."""
        set_long_mode(self.runners[0].vcpu, entry)

    def read_guest_safe(self, gpa: int, size: int) -> bytes:
        assert self.mem is not None
        out = bytearray()
        for i in range(size):
            if not self.mem.is_ram(gpa + i):
                break
            out += self.mem.read(gpa + i, 1)
        return bytes(out)

    # --- running and stopping ------------------------------------------------------
    def request_stop(self, status: int, message: str = "", reset: bool = False) -> None:
        """Stop the machine with an exit status; the first request wins. Safe from any thread."""
        with self._stop_lock:
            if self.stopping:
                return
            self.stopping = True
            self.status = status
            self.stop_message = message
            self.reset_requested = reset
        for runner in self.runners:
            runner.vcpu.run.immediate_exit = 1
        self.kick_all()
        self._done.set()
        for cb in self.on_stop:
            try:
                cb(status, message)
            except Exception:
                log.exception("stop callback failed")

    def start(self) -> None:
        """Start the host loop, the serial ports and the vCPU threads."""
        if not _install_kick_handler():
            raise KvmkitError("kvmkit must be started from the main thread the first time (it installs a signal handler).")
        for port in self.serial_ports:
            port.start()
        self.loop.start()
        if self._watch_halt:
            for runner in self.runners:
                runner.kick_hooks.append(self._check_halted)
        for runner in self.runners:
            runner.start()
        if any(runner.kick_hooks for runner in self.runners):
            threading.Thread(target=self._watch_kicks, name="kvmkit-watch", daemon=True).start()

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the machine stops (or ``timeout``); returns the exit status or None."""
        if not self._done.wait(timeout):
            return None
        for runner in self.runners:
            if runner.thread is not None and runner.thread is not threading.current_thread():
                runner.thread.join(timeout=5)
                if runner.thread.is_alive():
                    # A vCPU that did not leave KVM_RUN: kick again.
                    try:
                        signal.pthread_kill(runner.thread.ident, KICK_SIGNAL)  # type: ignore[arg-type]
                    except OSError:
                        pass
                    runner.thread.join(timeout=5)
        return self.status

    def run(self, handle_signals: bool = True) -> int:
        """Start, wait for the stop, tear down; SIGINT/SIGTERM stop the guest cleanly."""
        old: dict[int, object] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)):
                old[sig] = signal.signal(sig, lambda s, f, st=status: self.request_stop(st, f"stopped by signal {signal.Signals(s).name}"))
        try:
            self.start()
            while self.wait(0.2) is None:
                pass
            return self.status if self.status is not None else 1
        finally:
            self.shutdown()
            for sig, handler in old.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]

    def shutdown(self) -> None:
        """Stop everything that runs; flush and close the host ends."""
        if not self.stopping:
            self.request_stop(0, "shut down by kvmkit")
        self.wait(10)
        self.loop.stop()
        for port in self.serial_ports:
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

    def stats_table(self) -> str:
        table = format_exit_table(self.exit_stats(), self.in_kernel_stats())
        extra = []
        for bus in (self.pio_bus, self.mmio_bus):
            if bus.unclaimed_reads or bus.unclaimed_writes or bus.device_errors:
                top = sorted(bus.unclaimed.items(), key=lambda kv: -kv[1])[:5]
                extra.append(f"{bus.name}: {bus.unclaimed_reads} unclaimed reads, {bus.unclaimed_writes} unclaimed writes"
                             + (f", {bus.device_errors} device errors" if bus.device_errors else "")
                             + (" (" + ", ".join(f"{a:#x}x{n}" for a, n in top) + ")" if top else ""))
        for port in self.serial_ports:
            c = port.counters
            if c.host_bytes_out or c.host_bytes_in:
                extra.append(f"{port.name}: {c.host_bytes_out} bytes out in {c.host_writes} host writes, "
                             f"{c.host_bytes_in} bytes in, {c.input_pauses} input pauses, {c.output_stalls} output stalls")
        return table + ("\n" + "\n".join(extra) if extra else "")

    # --- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "pv_timer", None) is not None:
            self.pv_timer.close()
        for reader in self.kvm_stats.values():
            reader.close()
        self.kvm_stats = {}
        try:
            self.loop.close()
        except Exception:
            pass
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Window:
    """Presents one register of a device that spans several ports at a fixed offset."""

    def __init__(self, device: I8042, offset: int) -> None:
        self.device = device
        self.offset = offset

    def io_read(self, offset: int, size: int) -> int:
        return self.device.io_read(self.offset + offset, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.device.io_write(self.offset + offset, size, value)



def parse_size(text: str | int) -> int:
    """``256M``, ``1G``, ``512K`` or a bare number of MiB (as lkvm takes it) -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t) * MiB
    except ValueError:
        raise KvmkitError(f"cannot read memory size {text!r}; write it like 256M or 1G.") from None
