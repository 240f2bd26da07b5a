"""The vCPU loop: the only code that reads kvm_run.

Each vCPU runs on its own thread. KVM_RUN is called through ctypes, which
drops the GIL, so a guest executing or halted in the kernel costs the rest
of kvmkit nothing. An exit is decoded here and handed to a bus; an exit that
ends the VM becomes an :class:`~kvmkit.machine.lifecycle.Outcome` that the
loop returns (its thread hands it to the lifecycle). The runner knows two
buses, the lifecycle and a way to read guest RAM, nothing of the machine.
The hot path (port I/O) avoids allocation and attribute lookups beyond the
few it needs, because on a nested host each exit already costs tens of
microseconds before Python sees it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..kvm import constants as c
from ..kvm import structs as s
from ..kvm.system import KvmError, Vcpu, run_ioctl
from ..profile.exits import VcpuExitStats, tally
from .bus import Bus
from .lifecycle import ERROR, HALT, POWEROFF, RESET, TRIPLE_FAULT, Lifecycle, Outcome

log = logging.getLogger(__name__)

EXIT_IO = int(c.ExitReason.IO)
EXIT_MMIO = int(c.ExitReason.MMIO)
# struct kvm_run: the exit union starts at byte 32; for KVM_EXIT_IO it holds
# direction (u8), size (u8), port (u16), count (u32), data_offset (u64).
IO_OFFSET = s.kvm_run.exit.offset
_IO_STRUCT = struct.Struct("<BBHIQ")
assert s.kvm_run.exit_reason.offset == 8 and _IO_STRUCT.size == 16


@dataclass(frozen=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR as read from kvm_run: the suberror, the instruction bytes KVM
    reported (empty when it gave none) and the extra data words."""

    suberror: int
    insn: bytes
    data: tuple[int, ...]

    @classmethod
    def from_run(cls, run: s.kvm_run) -> "InternalError":
        sub = run.internal.suberror
        insn = b""
        ef = run.emulation_failure
        if sub == c.InternalErrorSuberror.EMULATION and ef.ndata >= 2 and ef.flags & c.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            insn = bytes(ef.insn_bytes[: min(ef.insn_size, 15)])
        data = tuple(run.internal.data[i] for i in range(min(run.internal.ndata, 16)))
        return cls(sub, insn, data)


# A hook gets the vCPU and, for KVM_EXIT_INTERNAL_ERROR, what KVM said (None for
# other exits); it returns True when it handled the exit (the loop re-enters
# the guest), False to fall through.
ExitHook = Callable[[Vcpu, "InternalError | None"], bool]


def describe_internal_error(vcpu: Vcpu, info: InternalError, read_guest: Callable[[int, int], bytes]) -> str:
    """One sentence for KVM_EXIT_INTERNAL_ERROR: suberror, RIP and the instruction bytes."""
    sub = info.suberror
    try:
        sub_name = c.InternalErrorSuberror(sub).name.lower().replace("_", " ")
    except ValueError:
        sub_name = f"suberror {sub}"
    insn = info.insn
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        rip = regs.rip
        linear = (sregs.cs.base + rip) & 0xFFFF_FFFF_FFFF_FFFF
        if not insn:
            try:
                tr = vcpu.translate(linear)
                if tr.valid:
                    insn = read_guest(tr.physical_address, 15)
            except Exception:
                insn = b""
        where = f"rip={rip:#x} (cs={sregs.cs.selector:#x}, cpl={sregs.cs.dpl})"
    except Exception as e:  # the vCPU may be in a state KVM refuses to report
        where = f"rip unknown ({e})"
    data = " ".join(f"{d:#x}" for d in info.data)
    insn_text = insn.hex(" ") if insn else "unavailable"
    return (f"KVM could not run the guest (KVM_EXIT_INTERNAL_ERROR, {sub_name}) on vCPU {vcpu.id} at {where}; "
            f"instruction bytes: {insn_text}" + (f"; data: {data}" if data else "")
            + ". The guest executed something this host's KVM cannot handle: check the kernel and CPU features (see --quirks).")


class VcpuRunner:
    """Runs one vCPU until the machine stops."""

    def __init__(self, vcpu: Vcpu, pio_bus: Bus, mmio_bus: Bus, lifecycle: Lifecycle,
                 read_guest: Callable[[int, int], bytes]) -> None:
        self.vcpu = vcpu
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.lifecycle = lifecycle
        self.read_guest = read_guest  # for error messages: the bytes at a guest address, short when not RAM
        self.stats = VcpuExitStats(vcpu.id)
        self.thread: threading.Thread | None = None
        self.exit_hooks: dict[int, list[ExitHook]] = {}
        # Called on the vCPU thread each time a kick (a signal, not a stop)
        # brings the vCPU out of KVM_RUN: the one moment its state can be read.
        self.kick_hooks: list[Callable[[Vcpu], None]] = []
        # A guest WRMSR that the VM's MSR filter refuses (KVM_EXIT_X86_WRMSR): the hook gets the
        # value and returns True when it took the write, False to have KVM inject #GP.
        self.msr_write_hooks: dict[int, Callable[[Vcpu, int], bool]] = {}

    def add_exit_hook(self, reason: int, hook: ExitHook) -> None:
        self.exit_hooks.setdefault(int(reason), []).append(hook)

    def interrupt(self) -> None:
        """Make KVM_RUN return at once (immediate_exit); the lifecycle then signals the thread."""
        self.vcpu.run.immediate_exit = 1

    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"kvmkit-vcpu{self.vcpu.id}", daemon=True)
        self.thread.start()

    def _thread_main(self) -> None:
        try:
            outcome = self.loop()
        except BaseException as e:  # report, never die silently
            log.exception("vCPU %d loop failed", self.vcpu.id)
            outcome = Outcome(1, f"vCPU {self.vcpu.id} stopped on an internal kvmkit error: {e}", ERROR)
        if outcome is not None:
            self.lifecycle.finish(outcome)

    def loop(self) -> Outcome | None:
        """Run the guest until an exit ends the VM (its Outcome) or the lifecycle stops it (None)."""
        vcpu = self.vcpu
        run = vcpu.run
        mm = vcpu.run_mmap
        lifecycle = self.lifecycle
        pio_read = self.pio_bus.read
        pio_write = self.pio_bus.write
        mmio_read = self.mmio_bus.read
        mmio_write = self.mmio_bus.write
        stats = self.stats
        exit_counts = [0] * 256
        pio_out: dict[int, int] = {}
        pio_in: dict[int, int] = {}
        mmio_counts = stats.mmio
        mmio = run.mmio
        unpack_io = _IO_STRUCT.unpack_from
        fd = vcpu.fd
        ioctl = run_ioctl
        pio_bus = self.pio_bus
        # port -> [io_write or io_read, offset inside the device, count]:
        # one dict lookup per byte-wide port exit instead of a bus search.
        out_fast: dict[int, list] = {}
        in_fast: dict[int, list] = {}
        KVM_RUN = c.KVM_RUN
        clock = time.perf_counter_ns
        mmap_size = len(mm)
        run_ns = 0
        handler_ns = 0

        def flush() -> None:
            """Move the loop's local tallies into self.stats (on a kick and at the end)."""
            nonlocal run_ns, handler_ns
            stats.run_ns += run_ns
            stats.handler_ns += handler_ns
            run_ns = handler_ns = 0
            for reason, n in enumerate(exit_counts):
                if n:
                    stats.exits[reason] += n
                    exit_counts[reason] = 0
            for fast, d in ((out_fast, "out"), (in_fast, "in")):
                for port, h in fast.items():
                    if h[2]:
                        stats.pio[(port, d)] += h[2]
                        h[2] = 0
            for slow, d in ((pio_out, "out"), (pio_in, "in")):
                for port, n in slow.items():
                    stats.pio[(port, d)] += n
                slow.clear()

        t_exit = clock()
        try:
            # A stop sets immediate_exit and kicks every vCPU, so KVM_RUN
            # returns EINTR and the flag is checked there, off the hot path.
            while True:
                t_enter = clock()
                handler_ns += t_enter - t_exit
                ret = ioctl(fd, KVM_RUN, None)
                t_exit = clock()
                run_ns += t_exit - t_enter
                if ret < 0:
                    err = ctypes.get_errno()
                    if err not in (errno.EINTR, errno.EAGAIN):
                        raise KvmError(KVM_RUN, err)
                    stats.kicks += 1
                    # Clear first, then look: a stop that lands in between
                    # sets immediate_exit again, so it is never lost.
                    run.immediate_exit = 0
                    if lifecycle.stopping:
                        return None
                    flush()  # so that statistics read while the VM runs are current
                    if lifecycle.pausing:
                        # KVM_RUN returned through immediate_exit, so an I/O exit
                        # handled just before is complete: a clean point to stop at.
                        lifecycle.park(self)
                        if lifecycle.stopping:
                            return None
                        t_exit = clock()  # the time parked is neither guest nor handler time
                        continue
                    for kick_hook in self.kick_hooks:
                        kick_hook(vcpu)
                    continue
                reason = mm[8]  # kvm_run.exit_reason: every reason KVM defines is < 256
                exit_counts[reason] += 1
                if reason == EXIT_IO:
                    direction, size, port, count, off = unpack_io(mm, IO_OFFSET)
                    if count == 1 and size == 1:
                        if direction:  # KVM_EXIT_IO_OUT
                            h = out_fast.get(port)
                            if h is None:
                                target = pio_bus.resolve(port)
                                if target is None:
                                    pio_out[port] = pio_out.get(port, 0) + 1
                                    pio_write(port, 1, mm[off])
                                    continue
                                h = out_fast[port] = [target[0].io_write, target[1], 0]
                            h[2] += 1
                            try:
                                h[0](h[1], 1, mm[off])
                            except Exception:
                                pio_bus.device_failed(port, "write")
                        else:
                            h = in_fast.get(port)
                            if h is None:
                                target = pio_bus.resolve(port)
                                if target is None:
                                    pio_in[port] = pio_in.get(port, 0) + 1
                                    mm[off] = pio_read(port, 1)
                                    continue
                                h = in_fast[port] = [target[0].io_read, target[1], 0]
                            h[2] += 1
                            try:
                                mm[off] = h[0](h[1], 1) & 0xFF
                            except Exception:
                                pio_bus.device_failed(port, "read")
                                mm[off] = 0xFF
                        continue
                    if size not in (1, 2, 4) or off + size * count > mmap_size or count > 4096:
                        return Outcome(1, f"KVM reported a malformed I/O exit (port {port:#x}, size {size}, count {count})", ERROR)
                    if direction == c.KVM_EXIT_IO_OUT:
                        pio_out[port] = pio_out.get(port, 0) + 1
                        for i in range(count):
                            p = off + i * size
                            pio_write(port, size, int.from_bytes(mm[p:p + size], "little"))
                    else:
                        pio_in[port] = pio_in.get(port, 0) + 1
                        for i in range(count):
                            p = off + i * size
                            mm[p:p + size] = pio_read(port, size).to_bytes(size, "little")
                    continue
                if reason == EXIT_MMIO:
                    length = mmio.len
                    addr = mmio.phys_addr
                    if not 1 <= length <= 8:
                        return Outcome(1, f"KVM reported a malformed MMIO exit (address {addr:#x}, length {length})", ERROR)
                    if mmio.is_write:
                        tally(mmio_counts, (addr & ~0xFFF, "w"))
                        mmio_write(addr, length, int.from_bytes(bytes(mmio.data[:length]), "little"))
                    else:
                        tally(mmio_counts, (addr & ~0xFFF, "r"))
                        value = mmio_read(addr, length)
                        ctypes.memmove(mmio.data, value.to_bytes(8, "little"), 8)
                    continue
                outcome = self._slow_exit(reason)
                if outcome is not None:
                    return outcome
        finally:
            handler_ns += clock() - t_exit
            flush()

    def _slow_exit(self, reason: int) -> Outcome | None:
        """Exits that are rare enough for readable code: None to re-enter the guest, else how the VM ends."""
        run = self.vcpu.run
        if reason == c.ExitReason.X86_WRMSR:
            self._wrmsr(run.msr)
            return None
        info = InternalError.from_run(run) if reason == c.ExitReason.INTERNAL_ERROR else None
        for hook in self.exit_hooks.get(reason, ()):
            if hook(self.vcpu, info):
                return None
        vid = self.vcpu.id
        if reason == c.ExitReason.HLT:
            return Outcome(0, f"vCPU {vid} halted with interrupts off (guest stopped)", HALT)
        if reason == c.ExitReason.SHUTDOWN:
            return Outcome(2, f"the guest triple-faulted on vCPU {vid} (KVM_EXIT_SHUTDOWN, last rip={self._rip()}); "
                              "this is how a crashing kernel (or reboot=t) resets the machine", TRIPLE_FAULT)
        if reason == c.ExitReason.SYSTEM_EVENT:
            etype = run.system_event.type
            if etype == c.SystemEvent.SHUTDOWN:
                return Outcome(0, "guest powered off", POWEROFF)
            if etype == c.SystemEvent.RESET:
                return Outcome(0, "guest requested a reset", RESET)
            if etype == c.SystemEvent.CRASH:
                return Outcome(1, f"guest reported a crash (system event) on vCPU {vid}", ERROR)
            return Outcome(1, f"guest system event {etype} on vCPU {vid}", ERROR)
        if info is not None:
            return Outcome(1, describe_internal_error(self.vcpu, info, self.read_guest), ERROR)
        if reason == c.ExitReason.FAIL_ENTRY:
            fe = run.fail_entry
            return Outcome(1, f"KVM could not enter the guest on vCPU {vid} (KVM_EXIT_FAIL_ENTRY, hardware reason "
                              f"{fe.hardware_entry_failure_reason:#x} on host CPU {fe.cpu}); the vCPU state is invalid.", ERROR)
        if reason in (c.ExitReason.INTR, c.ExitReason.IRQ_WINDOW_OPEN):
            return None
        return Outcome(1, f"unexpected exit {c.exit_reason_name(reason)} on vCPU {vid} at rip={self._rip()}", ERROR)

    def _wrmsr(self, msr: s.kvm_run_msr) -> None:
        """A filtered WRMSR: its hook decides; with none (or one that fails) the guest gets #GP,
        as it would for an MSR the CPU refuses."""
        hook = self.msr_write_hooks.get(msr.index)
        ok = False
        if hook is not None:
            try:
                ok = hook(self.vcpu, msr.data)
            except Exception:
                log.exception("vCPU %d: WRMSR %#x hook failed", self.vcpu.id, msr.index)
        msr.error = 0 if ok else 1

    def _rip(self) -> str:
        try:
            return f"{self.vcpu.get_regs().rip:#x}"
        except Exception:
            return "unknown"
