"""Typed handles for /dev/kvm, a VM and a vCPU.

Every ioctl goes through :func:`_ioctl`, which calls libc directly through
ctypes: the GIL is released for the duration of the call, so a vCPU thread
sitting in KVM_RUN never stops the host event loop or other vCPUs. Failures
become :class:`KvmError` carrying the ioctl's name and the errno text.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from ctypes import Structure
from typing import Iterable

from ..errors import KvmkitError
from . import constants as c
from . import structs as s

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.restype = ctypes.c_int
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
# The same function without argtypes, for KVM_RUN only: its arguments are
# small ints and NULL, and skipping argument conversion saves ~0.2 us on
# every exit (the hot path, see benchmarks/exit_cost.py). Public because the
# vCPU loop calls it directly, as ``run_ioctl(vcpu.fd, KVM_RUN, None)``: a
# bound-method call per exit would cost as much again.
run_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
run_ioctl.restype = ctypes.c_int

_NAMES = {v: k for k, v in vars(c).items() if k.startswith("KVM_") and isinstance(v, int) and v > 0xFFFF}
_NAMES.update({c.KVM_RUN: "KVM_RUN", c.KVM_CREATE_VCPU: "KVM_CREATE_VCPU", c.KVM_CREATE_IRQCHIP: "KVM_CREATE_IRQCHIP",
               c.KVM_CREATE_VM: "KVM_CREATE_VM", c.KVM_CHECK_EXTENSION: "KVM_CHECK_EXTENSION",
               c.KVM_GET_API_VERSION: "KVM_GET_API_VERSION", c.KVM_GET_VCPU_MMAP_SIZE: "KVM_GET_VCPU_MMAP_SIZE",
               c.KVM_SET_TSS_ADDR: "KVM_SET_TSS_ADDR", c.KVM_GET_STATS_FD: "KVM_GET_STATS_FD"})


class KvmError(KvmkitError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""

    def __init__(self, request: int, err: int, detail: str = "") -> None:
        self.request = request
        self.errno = err
        self.ioctl_name = _NAMES.get(request, f"ioctl {request:#x}")
        msg = f"{self.ioctl_name} failed: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})"
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)


class KvmUnavailable(KvmkitError):
    """/dev/kvm is missing or cannot be opened."""


def _ioctl(fd: int, request: int, arg: int | Structure | ctypes.Array | None = 0) -> int:
    if isinstance(arg, (Structure, ctypes.Array)):
        ptr: int | None = ctypes.addressof(arg)
    else:
        ptr = arg
    ret = _libc_ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmError(request, ctypes.get_errno())
    return ret


def open_kvm_device(path: str = "/dev/kvm") -> int:
    """Open /dev/kvm, turning the usual failures into one plain sentence."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailable(
            f"{path} does not exist: this host has no KVM; enable virtualization in the firmware "
            "and load the kvm_intel or kvm_amd module (or run on a host that offers nested KVM)."
        ) from None
    except PermissionError:
        raise KvmUnavailable(
            f"permission denied opening {path}: add your user to the 'kvm' group "
            "(sudo usermod -aG kvm $USER, then log in again) or run as root."
        ) from None
    except OSError as e:
        raise KvmUnavailable(f"cannot open {path}: {e.strerror}; check that KVM is loaded and usable.") from None


class Kvm:
    """The KVM system handle: API version, capabilities, supported CPUID."""

    def __init__(self, path: str | None = None) -> None:
        # KVMKIT_KVM_DEVICE points kvmkit at another device node (tests use
        # it to show the error for a host without KVM).
        path = path or os.environ.get("KVMKIT_KVM_DEVICE", "/dev/kvm")
        self.path = path
        self.fd = open_kvm_device(path)
        version = _ioctl(self.fd, c.KVM_GET_API_VERSION)
        if version != c.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} speaks KVM API version {version}, kvmkit needs {c.KVM_API_VERSION}; update the host kernel.")
        self.vcpu_mmap_size = _ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap))

    def require(self, needs: dict[c.Cap, str]) -> None:
        """Raise one sentence for the first capability (with what it is for) this host lacks."""
        for cap, what in needs.items():
            if not self.check_extension(cap):
                raise KvmUnavailable(f"this host's KVM lacks {what} (KVM_CAP_{cap.name}); kvmkit needs a newer host kernel.")

    def supported_cpuid(self, max_entries: int = 256) -> list[s.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits (E2BIG)."""
        n = max_entries
        while True:
            buf = s.cpuid2_buffer(n)()
            buf.nent = n
            try:
                _ioctl(self.fd, c.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [buf.entries[i] for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs whose state a snapshot must carry (msrs_to_save and emulated ones)."""
        n = 256
        while True:
            buf = (ctypes.c_uint32 * (n + 1))()
            buf[0] = n
            try:
                _ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 16384:
                    n = max(n * 2, buf[0])
                    continue
                raise
            return list(buf[1:1 + buf[0]])

    def create_vm(self) -> "Vm":
        return Vm(self, _ioctl(self.fd, c.KVM_CREATE_VM, 0))

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    """A VM file descriptor: memory slots, irqchip, PIT, interrupt lines, eventfds."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []
        self._irq_level = s.kvm_irq_level()

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap))

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = s.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                               memory_size=size, userspace_addr=host_addr)
        _ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, c.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ctypes.c_uint64(addr)
        _ioctl(self.fd, c.KVM_SET_IDENTITY_MAP_ADDR, ctypes.addressof(value))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, c.KVM_CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        """KVM_GET_IRQCHIP: the in-kernel PIC (master 0, slave 1) or IOAPIC (2) state."""
        chip = s.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, c.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        _ioctl(self.fd, c.KVM_SET_IRQCHIP, chip)

    def create_pit2(self, flags: int = c.KVM_PIT_SPEAKER_DUMMY) -> None:
        _ioctl(self.fd, c.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: bool) -> None:
        """Set a GSI's level (in-kernel PIC and IOAPIC both see it)."""
        lv = self._irq_level
        lv.irq = irq
        lv.level = 1 if level else 0
        _ioctl(self.fd, c.KVM_IRQ_LINE, lv)

    def irqfd(self, fd: int, gsi: int, resamplefd: int | None = None, deassign: bool = False) -> None:
        flags = c.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        arg = s.kvm_irqfd(fd=fd, gsi=gsi, flags=flags)
        if resamplefd is not None:
            arg.flags |= c.KVM_IRQFD_FLAG_RESAMPLE
            arg.resamplefd = resamplefd
        _ioctl(self.fd, c.KVM_IRQFD, arg)

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        flags = (c.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (c.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= c.KVM_IOEVENTFD_FLAG_DATAMATCH
        arg = s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        _ioctl(self.fd, c.KVM_IOEVENTFD, arg)

    def set_gsi_routing(self, entries: Iterable[s.kvm_irq_routing_entry]) -> None:
        items = list(entries)
        buf = s.irq_routing_buffer(len(items))()
        buf.nr = len(items)
        for i, e in enumerate(items):
            buf.entries[i] = e
        _ioctl(self.fd, c.KVM_SET_GSI_ROUTING, buf)

    def get_clock(self) -> s.kvm_clock_data:
        data = s.kvm_clock_data()
        _ioctl(self.fd, c.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, clock_ns: int) -> None:
        _ioctl(self.fd, c.KVM_SET_CLOCK, s.kvm_clock_data(clock=clock_ns))

    def get_pit2(self) -> s.kvm_pit_state2:
        st = s.kvm_pit_state2()
        _ioctl(self.fd, c.KVM_GET_PIT2, st)
        return st

    def set_pit2(self, st: s.kvm_pit_state2) -> None:
        _ioctl(self.fd, c.KVM_SET_PIT2, st)

    def enable_cap(self, cap: int, *args: int) -> None:
        arg = s.kvm_enable_cap(cap=int(cap))
        for i, a in enumerate(args):
            arg.args[i] = a
        _ioctl(self.fd, c.KVM_ENABLE_CAP, arg)

    def deny_msr_writes(self, indices: Iterable[int]) -> None:
        """KVM_X86_SET_MSR_FILTER: the guest's WRMSR to these MSRs is refused by KVM (and, with
        KVM_CAP_X86_USER_SPACE_MSR's FILTER reason enabled, exits to userspace); every other
        access is allowed. The VMM's own KVM_SET_MSRS is never filtered."""
        idx = sorted(set(indices))
        if len(idx) > s.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"at most {s.KVM_MSR_FILTER_MAX_RANGES} MSRs can be filtered, not {len(idx)}")
        deny = (ctypes.c_uint8 * 1)(0)  # one MSR per range, its bit clear: refused
        flt = s.kvm_msr_filter(flags=c.KVM_MSR_FILTER_DEFAULT_ALLOW)
        for i, index in enumerate(idx):
            flt.ranges[i] = s.kvm_msr_filter_range(flags=c.KVM_MSR_FILTER_WRITE, nmsrs=1, base=index,
                                                   bitmap=ctypes.addressof(deny))
        _ioctl(self.fd, c.KVM_X86_SET_MSR_FILTER, flt)  # KVM copies the bitmaps before returning

    def stats_fd(self) -> int:
        return _ioctl(self.fd, c.KVM_GET_STATS_FD)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ on the VM: the TSC frequency new vCPUs get (0 when this KVM cannot say)."""
        try:
            return _ioctl(self.fd, c.KVM_GET_TSC_KHZ)
        except KvmError:
            return 0

    def create_vcpu(self, vcpu_id: int) -> "Vcpu":
        fd = _ioctl(self.fd, c.KVM_CREATE_VCPU, vcpu_id)
        vcpu = Vcpu(self, vcpu_id, fd)
        self.vcpus.append(vcpu)
        return vcpu


class Vcpu:
    """A vCPU: its kvm_run page and register state.

    Only the vCPU loop reads the exit fields of :attr:`run`; everything else
    goes through the typed getters and setters here.
    """

    def __init__(self, vm: Vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self.run_mmap = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = s.kvm_run.from_buffer(self.run_mmap)
        self.run_address = ctypes.addressof(self.run)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run
            try:
                self.run_mmap.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

    def kvm_run(self) -> int:
        """One KVM_RUN; returns 0, or -errno for EINTR/EAGAIN (a kick), raises otherwise."""
        ret = run_ioctl(self.fd, c.KVM_RUN, None)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return -err
            raise KvmError(c.KVM_RUN, err)
        return ret

    def io_data(self, offset: int, size: int) -> ctypes.Array:
        """The kvm_run page bytes at a KVM-given data offset, bounds-checked."""
        if offset < 0 or offset + size > self.vm.kvm.vcpu_mmap_size:
            raise KvmError(c.KVM_RUN, errno.EFAULT, f"data offset {offset:#x}+{size} outside the kvm_run mapping")
        return (ctypes.c_uint8 * size).from_buffer(self.run_mmap, offset)

    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        _ioctl(self.fd, c.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        _ioctl(self.fd, c.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        _ioctl(self.fd, c.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        _ioctl(self.fd, c.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        _ioctl(self.fd, c.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        _ioctl(self.fd, c.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        idx = list(indices)
        buf = s.msrs_buffer(len(idx))()
        buf.nmsrs = len(idx)
        for i, index in enumerate(idx):
            buf.entries[i].index = index
        n = _ioctl(self.fd, c.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        buf = s.msrs_buffer(len(values))()
        buf.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return _ioctl(self.fd, c.KVM_SET_MSRS, buf)

    def set_cpuid2(self, entries: list[s.kvm_cpuid_entry2]) -> None:
        buf = s.cpuid2_buffer(len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, c.KVM_SET_CPUID2, buf)

    def get_lapic(self) -> s.kvm_lapic_state:
        st = s.kvm_lapic_state()
        _ioctl(self.fd, c.KVM_GET_LAPIC, st)
        return st

    def set_lapic(self, st: s.kvm_lapic_state) -> None:
        _ioctl(self.fd, c.KVM_SET_LAPIC, st)

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        ev = s.kvm_vcpu_events()
        _ioctl(self.fd, c.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, ev: s.kvm_vcpu_events) -> None:
        _ioctl(self.fd, c.KVM_SET_VCPU_EVENTS, ev)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: KVM_MP_STATE_RUNNABLE, _HALTED, ... (call it with the vCPU outside KVM_RUN)."""
        st = s.kvm_mp_state()
        _ioctl(self.fd, c.KVM_GET_MP_STATE, st)
        return st.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, c.KVM_SET_MP_STATE, s.kvm_mp_state(mp_state=mp_state))

    def get_xsave(self) -> bytes:
        """The vCPU's XSAVE area (FPU, SSE, AVX... state): KVM_GET_XSAVE2 where the host's area
        is larger than 4 KiB (AMX), else KVM_GET_XSAVE."""
        size = self.vm.check_extension(c.Cap.XSAVE2)
        if size > 4096:
            buf = s.xsave_buffer(size)()
            _ioctl(self.fd, c.KVM_GET_XSAVE2, buf)
        else:
            buf = s.kvm_xsave()
            _ioctl(self.fd, c.KVM_GET_XSAVE, buf)
        return bytes(buf)

    def set_xsave(self, area: bytes) -> None:
        buf = s.xsave_buffer(len(area)).from_buffer_copy(area.ljust(4096, b"\0"))
        _ioctl(self.fd, c.KVM_SET_XSAVE, buf)

    def get_xcrs(self) -> s.kvm_xcrs:
        st = s.kvm_xcrs()
        _ioctl(self.fd, c.KVM_GET_XCRS, st)
        return st

    def set_xcrs(self, st: s.kvm_xcrs) -> None:
        _ioctl(self.fd, c.KVM_SET_XCRS, st)

    def get_debugregs(self) -> s.kvm_debugregs:
        st = s.kvm_debugregs()
        _ioctl(self.fd, c.KVM_GET_DEBUGREGS, st)
        return st

    def set_debugregs(self, st: s.kvm_debugregs) -> None:
        _ioctl(self.fd, c.KVM_SET_DEBUGREGS, st)

    def kvmclock_ctrl(self) -> bool:
        """KVM_KVMCLOCK_CTRL: tell the guest's soft-lockup watchdog that the host paused this vCPU.
        False when the guest has no kvmclock page (EINVAL) or the host lacks it."""
        try:
            _ioctl(self.fd, c.KVM_KVMCLOCK_CTRL)
            return True
        except KvmError:
            return False

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency KVM gives this vCPU."""
        return _ioctl(self.fd, c.KVM_GET_TSC_KHZ)

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        dbg = s.kvm_guest_debug(control=control)
        for i, v in enumerate(debugreg):
            dbg.arch.debugreg[i] = v
        _ioctl(self.fd, c.KVM_SET_GUEST_DEBUG, dbg)

    def translate(self, linear: int) -> s.kvm_translation:
        tr = s.kvm_translation(linear_address=linear)
        _ioctl(self.fd, c.KVM_TRANSLATE, tr)
        return tr

    def stats_fd(self) -> int:
        return _ioctl(self.fd, c.KVM_GET_STATS_FD)
