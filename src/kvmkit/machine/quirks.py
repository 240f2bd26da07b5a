"""Host quirk profiles: what kvmkit does differently on a host whose KVM is unusual.

One profile exists besides ``none``: ``nested-pvm``, for KVM provided by the
``kvm_pvm`` module (PVM, nested virtualization without VMX/SVM). There the
guest's CPL0 code runs in KVM's instruction emulator and CPL3 code runs
natively, which breaks a stock Linux kernel in a few precise ways
(docs/quirks.md has the list, the reasons and how each was found):

* a few instructions are not emulated (KVM_EXIT_INTERNAL_ERROR, emulation
  suberror): some are hidden through CPUID or the command line, the rest are
  completed here (:mod:`kvmkit.machine.x86insn` decodes them,
  :meth:`NestedPvmQuirks.on_internal_error` finishes them);
* the emulated kernel is slow, so the profile adds kernel parameters that
  skip work costing minutes when emulated (:func:`pvm_cmdline_params`; the
  machine's command-line builder places them);
* a user-mode ``syscall`` does not enter the kernel: it jumps to MSR_LSTAR
  still at CPL3 and takes a page fault there. kvmkit watches the guest's
  page-fault handler (found in the guest IDT) with a hardware breakpoint and
  restarts such a fault as the SYSCALL it was (:func:`syscall_entry_state`).

Everything is found from the guest's own state (IDT, MSRs), never from
addresses of one kernel build. The profile is chosen by :func:`detect_profile`
and is never active on a host with ordinary hardware virtualization. A
profile sees a vCPU only through the hooks of its :class:`VcpuRunner` and
guest RAM only through :class:`GuestMemory`.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import KvmkitError
from ..kvm import constants as c
from ..kvm import structs as s
from ..kvm.system import KvmError, Vcpu
from ..memory import GuestMemory
from ..x86 import (
    BP_VECTOR,
    CPUID1_ECX_CX16,
    CR4_LA57,
    DR7_FIXED,
    DR7_G0,
    EFER_LMA,
    MSR_LSTAR,
    MSR_STAR,
    MSR_SYSCALL_MASK,
    PF_VECTOR,
    RFLAGS_AC,
    RFLAGS_FIXED,
    RFLAGS_RF,
    is_canonical,
)
from .config import QUIRK_PROFILES as PROFILES
from .cpu import flat_segment
from .vcpu import InternalError, VcpuRunner
from .x86insn import Insn, decode, effective_address, no_op_length

log = logging.getLogger(__name__)

# --- detection -------------------------------------------------------------------


def detect_profile(sys_module: Path = Path("/sys/module")) -> str:
    """``nested-pvm`` when the host's KVM is the PVM module, else ``none``.

    PVM registers as the ``kvm_pvm`` kernel module; with VMX or SVM the
    vendor module is ``kvm_intel`` or ``kvm_amd`` and nothing here applies.
    """
    try:
        if (sys_module / "kvm_pvm").is_dir():
            return "nested-pvm"
    except OSError:
        pass
    return "none"


def resolve_profile(name: str | None, sys_module: Path = Path("/sys/module")) -> str:
    """The profile to use for a ``--quirks`` value (``auto`` or None: detect)."""
    if name in (None, "", "auto"):
        return detect_profile(sys_module)
    if name not in PROFILES:
        raise KvmkitError(f"unknown quirk profile {name!r}; choose one of {', '.join(PROFILES)}.")
    return name


# --- CPUID and command line ---------------------------------------------------------

# Bits cleared in the KVM_SET_CPUID2 table. Only bits KVM lists as supported
# can be hidden this way here; the rest are hidden with clearcpuid= below.
#
# KVM's paravirtual features that Linux uses through VMCALL: the PV spinlock
# kick (PV_UNHALT), PV IPIs and PV yield, all of them only with more than one
# CPU. The emulator never executes a hypercall: it "fixes" the instruction to
# the host vendor's own and re-enters the guest to run it natively. Under PVM
# a guest's ring 0 is always emulated, so the fixed VMCALL is emulated again,
# fixed again, forever: a secondary CPU sat at one VMCALL for good and the
# boot hung after "x86: Booting SMP configuration". Without the features
# Linux uses the LAPIC's ICR for IPIs and plain spinning.
KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
KVM_HYPERCALL_FEATURES = KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD
CPUID_CLEAR: dict[tuple[int, str], int] = {
    (1, "ecx"): CPUID1_ECX_CX16,  # lock cmpxchg16b is not emulated
    (KVM_CPUID_FEATURES, "eax"): KVM_HYPERCALL_FEATURES,
}

# Features the guest sees from the host CPU although the CPUID table lacks
# them; each either leads to an instruction the emulator lacks (smap: clac/stac,
# ssse3: blake2s and ldmxcsr, fsgsbase, rdpid, rdtscp, invpcid) or makes
# emulated code slower (erms/fsrm: byte-wise rep movs/stos).
CLEARCPUID = ("smap", "smep", "erms", "fsrm", "fsgsbase", "rdpid", "pcid", "invpcid", "popcnt",
              "3dnowprefetch", "rdtscp", "aperfmperf", "ssse3", "sse4_1", "sse4_2")

# Initcalls that take tens of seconds to minutes when emulated and that a
# console boot does not need (tracing self-checks, certificate parsing, BPF
# self-registration, TCP congestion module registration). tracer_init_tracefs
# populates the guest's own /sys/kernel/tracing: 33 s of guest time under
# initcall_debug on Debian's 6.1, the slowest initcall left; a guest that
# wants ftrace passes its own initcall_blacklist=.
INITCALL_BLACKLIST = ("ftrace_check_for_weak_functions", "trace_eval_init", "load_system_certificate_list",
                      "cubictcp_register", "bpf_prog_test_run_init", "bpf_key_sig_kfuncs_init",
                      "bpf_tcp_ca_kfunc_init", "bpf_rstat_kfunc_init", "kfunc_init", "tracer_init_tracefs")

# The guest believes the TSC runs this many times faster than it does, so its
# periodic tick (HZ, calibrated against the TSC) fires this many times less
# often: an emulated kernel otherwise spends its time in the tick.
TSC_SCALE = 10
GUEST_HZ = 250  # Debian's CONFIG_HZ; only used to pre-set loops_per_jiffy


def host_tsc_khz(from_kvm: int = 0, cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The TSC frequency in kHz: KVM's figure (KVM_GET_TSC_KHZ) when it has one, else /proc/cpuinfo's "cpu MHz"."""
    if from_kvm > 0:
        return from_kvm
    try:
        m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo.read_text(), re.M)
    except OSError:
        return None
    return int(float(m.group(1)) * 1000) if m else None


def pvm_cmdline_params(cpus: int, tsc_khz: int | None) -> list[str]:
    """The ``nested-pvm`` profile's kernel parameters, in the order they are placed."""
    params = ["noxsave", "clearcpuid=" + ",".join(CLEARCPUID)]
    if tsc_khz:
        params.append(f"tsc_early_khz={tsc_khz * TSC_SCALE}")
        params.append(f"lpj={tsc_khz * 1000 // GUEST_HZ}")  # delays keep their real length; no calibration loop
    params += ["tsc=reliable", "nowatchdog", "rcupdate.rcu_cpu_stall_suppress=1"]
    if cpus == 1:
        # One CPU: device interrupts through the 8259, as every 1-vCPU figure in docs/ was measured.
        # More: the IO-APIC, so that an interrupt can reach any CPU (pvce.ko's per-CPU lines).
        params += ["noapic", "nosmp"]
    params += ["mitigations=off", "nopti", "nokaslr", "cryptomgr.notests", "rodata=off",
               "initcall_blacklist=" + ",".join(INITCALL_BLACKLIST)]
    return params


# --- the guest IDT and the system call path -------------------------------------------------


def idt_gate_offset(entry: bytes) -> int | None:
    """Handler address of a 16-byte 64-bit IDT gate; None when the gate is not present."""
    if len(entry) < 16:
        return None
    lo, _sel, _ist, attr, mid, hi = struct.unpack_from("<HHBBHI", entry)
    if not attr & 0x80:
        return None
    return lo | (mid << 16) | (hi << 32)


@dataclass(frozen=True)
class ExceptionFrame:
    """What the CPU pushes for an exception with an error code, lowest address first."""

    error_code: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    SIZE = 48

    @classmethod
    def unpack(cls, data: bytes) -> "ExceptionFrame":
        return cls(*struct.unpack_from("<6Q", data))


def is_syscall_fault(frame: ExceptionFrame, cr2: int, lstar: int) -> bool:
    """A page fault that is really a user-mode SYSCALL: at RIP = LSTAR, from CPL3."""
    return lstar != 0 and frame.rip == lstar and cr2 == lstar and frame.cs & 3 == 3


@dataclass(frozen=True)
class SyscallEntry:
    """Register state of a CPU that has just executed SYSCALL (Intel SDM, SYSCALL)."""

    rip: int
    rsp: int
    rflags: int
    cs: int
    ss: int


def syscall_entry_state(frame: ExceptionFrame, r11: int, star: int, fmask: int, lstar: int) -> SyscallEntry:
    """Where SYSCALL would have put the CPU: LSTAR, kernel CS/SS from STAR, RFLAGS masked.

    RCX (return RIP) and R11 (user RFLAGS) were already written by the
    instruction; RSP stays the user's (the kernel's entry code switches
    stacks itself), and the exception frame on the kernel stack is dropped.
    """
    kcs = (star >> 32) & 0xFFFC
    rflags = (r11 & ~fmask & ~RFLAGS_RF) | RFLAGS_FIXED
    return SyscallEntry(rip=lstar, rsp=frame.rsp, rflags=rflags & 0xFFFF_FFFF_FFFF_FFFF, cs=kcs, ss=kcs + 8)


class GuestView:
    """Guest virtual memory through KVM_TRANSLATE and the machine's RAM, page by page."""

    def __init__(self, vcpu: Vcpu, read_phys: Callable[[int, int], bytes], write_phys: Callable[[int, bytes], None] | None = None) -> None:
        self.vcpu = vcpu
        self.read_phys = read_phys
        self.write_phys = write_phys

    def _chunks(self, addr: int, size: int):  # type: ignore[no-untyped-def]
        while size > 0:
            n = min(size, 0x1000 - (addr & 0xFFF))
            tr = self.vcpu.translate(addr)
            if not tr.valid:
                raise KvmkitError(f"guest address {addr:#x} is not mapped")
            yield tr.physical_address, n
            addr += n
            size -= n

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        for gpa, n in self._chunks(addr, size):
            chunk = self.read_phys(gpa, n)
            if len(chunk) != n:
                raise KvmkitError(f"guest physical address {gpa:#x} is not RAM")
            out += chunk
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        assert self.write_phys is not None
        done = 0
        for gpa, n in self._chunks(addr, len(data)):
            self.write_phys(gpa, data[done:done + n])
            done += n


def read_idt_handler(view: GuestView, idt_base: int, idt_limit: int, vector: int) -> int | None:
    """Handler address of ``vector`` in the guest's IDT, or None if absent/unreadable."""
    if (vector + 1) * 16 - 1 > idt_limit:
        return None
    try:
        return idt_gate_offset(view.read(idt_base + vector * 16, 16))
    except (KvmkitError, KvmError):
        return None


MXCSR_DEFAULT = 0x1F80


@dataclass
class QuirkCounters:
    completed: dict[str, int]
    syscalls: int = 0
    page_faults_seen: int = 0
    rearms: int = 0
    sregs_restarts: int = 0
    lstar_writes: int = 0


class NestedPvmQuirks:
    """The ``nested-pvm`` profile on a machine: exit hooks on every vCPU."""

    name = "nested-pvm"

    def __init__(self, *, cpus: int, mem: GuestMemory, tsc_khz: int | None) -> None:
        self.cpus = cpus
        self.mem = mem
        self.tsc_khz = tsc_khz
        self.counters = QuirkCounters(completed={})
        self._handler: dict[int, int | None] = {}  # vCPU id -> armed #PF handler address
        self._mxcsr: dict[int, int] = {}
        self._handler_gpa: dict[int, int] = {}  # vCPU id -> physical address of the watched handler
        self._stepping: set[int] = set()

    # -- set-up -------------------------------------------------------------------
    def cpuid_clear(self) -> dict[tuple[int, str], int]:
        return dict(CPUID_CLEAR)

    def install(self, runner: VcpuRunner) -> None:
        runner.add_exit_hook(c.ExitReason.INTERNAL_ERROR, self.on_internal_error)
        runner.add_exit_hook(c.ExitReason.DEBUG, self.on_debug)
        runner.kick_hooks.append(self.on_kick)
        runner.msr_write_hooks[MSR_LSTAR] = self.on_lstar_write

    def msr_write_traps(self) -> list[int]:
        """The guest's LSTAR write comes to the VMM: the moment that vCPU can make system calls,
        so the moment to watch its page-fault handler (a secondary CPU brought online, too)."""
        return [MSR_LSTAR]

    def cmdline_params(self) -> list[str]:
        return pvm_cmdline_params(self.cpus, self.tsc_khz)

    def _view(self, vcpu: Vcpu) -> GuestView:
        return GuestView(vcpu, self.mem.read_available, self.mem.write)

    def _count(self, kind: str) -> None:
        self.counters.completed[kind] = self.counters.completed.get(kind, 0) + 1

    # -- instruction completion -----------------------------------------------------
    def on_internal_error(self, vcpu: Vcpu, info: InternalError | None) -> bool:
        if info is None or info.suberror != c.InternalErrorSuberror.EMULATION:
            return False
        regs = vcpu.get_regs()
        code = info.insn
        if not code:
            view = self._view(vcpu)
            for size in (15, 0x1000 - (regs.rip & 0xFFF)):
                try:
                    code = view.read(regs.rip, min(size, 15))
                    break
                except (KvmkitError, KvmError):
                    continue
            if not code:
                return False
        insn = decode(code)
        if insn is None:
            return False
        try:
            return self._complete(vcpu, regs, insn)
        except (KvmkitError, KvmError) as e:
            log.info("could not complete %s at %#x: %s", insn.kind, regs.rip, e)
            return False

    def _complete(self, vcpu: Vcpu, regs: s.kvm_regs, insn: Insn) -> bool:
        next_rip = regs.rip + insn.length
        kind = insn.kind
        if kind in ("ldmxcsr", "stmxcsr"):
            assert insn.mem is not None
            sregs = vcpu.get_sregs() if insn.mem.segment else None
            addr = effective_address(insn.mem, regs, next_rip,
                                     lambda seg: getattr(sregs, seg).base if sregs is not None else 0)
            view = self._view(vcpu)
            fpu = vcpu.get_fpu()
            if kind == "ldmxcsr":
                value = struct.unpack("<I", view.read(addr, 4))[0]
                self._mxcsr[vcpu.id] = value
                fpu.mxcsr = value
                vcpu.set_fpu(fpu)
            else:
                # KVM_GET_FPU reports mxcsr 0 on PVM; the last value loaded is the truth then.
                value = fpu.mxcsr or self._mxcsr.get(vcpu.id, MXCSR_DEFAULT)
                view.write(addr, struct.pack("<I", value))
        elif kind == "clac":
            regs.rflags &= ~RFLAGS_AC
        elif kind == "stac":
            regs.rflags |= RFLAGS_AC
        regs.rip = next_rip
        vcpu.set_regs(regs)
        if kind == "int3":
            # A trap: the #BP frame's RIP is the byte after int3, as on hardware.
            ev = vcpu.get_vcpu_events()
            ev.exception.injected = 1
            ev.exception.nr = BP_VECTOR
            ev.exception.has_error_code = 0
            ev.exception.error_code = 0
            ev.exception.pending = 0
            ev.flags = 0
            vcpu.set_vcpu_events(ev)
        self._count(kind)
        return True

    # -- the system call path ----------------------------------------------------------
    def on_kick(self, vcpu: Vcpu) -> None:
        """Periodic check (the machine kicks vCPUs about once a second): re-arm if the IDT moved."""
        try:
            self.check_idt(vcpu)
        except (KvmkitError, KvmError) as e:
            log.debug("IDT check failed on vCPU %d: %s", vcpu.id, e)

    def on_lstar_write(self, vcpu: Vcpu, value: int) -> bool:
        """The guest's WRMSR to LSTAR (filtered): write it for the guest, then arm at once.

        Without this the breakpoint was armed at the next once-a-second kick, and a
        CPU onlined while the guest ran had up to a second in which a system call
        would fault unwatched. False (KVM then injects #GP) when KVM refuses the value,
        a non-canonical address, as the CPU would."""
        try:
            # Checked here: this KVM takes any value through KVM_SET_MSRS, the CPU does not.
            if not is_canonical(value, bool(vcpu.get_sregs().cr4 & CR4_LA57)):
                return False
            if vcpu.set_msrs({MSR_LSTAR: value}) != 1:
                return False
        except KvmError:
            return False
        self.counters.lstar_writes += 1
        try:
            self.check_idt(vcpu)
        except (KvmkitError, KvmError) as e:
            log.debug("IDT check after LSTAR write failed on vCPU %d: %s", vcpu.id, e)
        return True

    def check_idt(self, vcpu: Vcpu) -> None:
        """Watch the guest's #PF handler once system calls are possible (MSR_LSTAR set).

        Linux sets LSTAR in syscall_init(), after trap_init() installed the
        final exception handlers; before that there are no system calls, and
        the early #PF handler (which builds page tables) runs untouched.
        """
        if vcpu.id in self._stepping:
            return
        if not vcpu.get_msrs([MSR_LSTAR]).get(MSR_LSTAR, 0):
            return
        sregs = vcpu.get_sregs()
        if not sregs.efer & EFER_LMA or sregs.idt.limit < (PF_VECTOR + 1) * 16 - 1:
            return  # 16-byte gates only in long mode; a real-mode IVT is no IDT
        view = self._view(vcpu)
        handler = read_idt_handler(view, sregs.idt.base, sregs.idt.limit, PF_VECTOR)
        if handler is None or handler == self._handler.get(vcpu.id):
            return
        try:
            tr = vcpu.translate(handler)
        except KvmError:
            return
        if not tr.valid:
            return
        # Kernel text does not move, but it is patched (alternatives turn
        # NOPs into other NOPs), so the first instruction is re-read at each hit.
        self._handler_gpa[vcpu.id] = tr.physical_address
        self._handler[vcpu.id] = handler
        self._arm(vcpu)
        self.counters.rearms += 1
        log.info("vCPU %d: page-fault handler at %#x watched (IDT at %#x)", vcpu.id, handler, sregs.idt.base)

    def _arm(self, vcpu: Vcpu) -> None:
        handler = self._handler[vcpu.id]
        assert handler is not None
        vcpu.set_guest_debug(c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_USE_HW_BP,
                             [handler, 0, 0, 0, 0, 0, 0, DR7_FIXED | DR7_G0])

    def on_debug(self, vcpu: Vcpu, info: InternalError | None) -> bool:
        handler = self._handler.get(vcpu.id)
        if vcpu.id in self._stepping:  # the single step over the handler's first instruction
            self._stepping.discard(vcpu.id)
            self._arm(vcpu)
            return True
        regs = vcpu.get_regs()
        if handler is None or regs.rip != handler:
            return True
        self.counters.page_faults_seen += 1
        sregs = vcpu.get_sregs()
        msrs = vcpu.get_msrs([MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK])
        lstar = msrs.get(MSR_LSTAR, 0)
        if sregs.cr2 == lstar and lstar:
            frame = ExceptionFrame.unpack(self._view(vcpu).read(regs.rsp, ExceptionFrame.SIZE))
            if is_syscall_fault(frame, sregs.cr2, lstar):
                st = syscall_entry_state(frame, regs.r11, msrs.get(MSR_STAR, 0), msrs.get(MSR_SYSCALL_MASK, 0), lstar)
                regs.rip = st.rip
                regs.rsp = st.rsp
                regs.rflags = st.rflags
                if sregs.cs.selector != st.cs:
                    # The #PF gate's selector is not STAR's kernel CS (no Linux does this): load
                    # both segments as SYSCALL would, at the price of a whole KVM_SET_SREGS.
                    sregs.cs = flat_segment(st.cs, True)
                    sregs.ss = flat_segment(st.ss, False)
                    vcpu.set_sregs(sregs)
                    self.counters.sregs_restarts += 1
                # Otherwise only RIP, RSP and RFLAGS change: the fault's delivery already loaded the
                # kernel CS, and left SS null as every exception from user mode does (the kernel's
                # SYSCALL entry never reads SS; SYSRET loads the user's from STAR). KVM_SET_SREGS
                # would write back every segment base (FS's among them), the control registers,
                # EFER, the APIC base and the pending-interrupt bitmap from a copy read a moment
                # before: docs/quirks.md, "the TLS crash".
                vcpu.set_regs(regs)
                self.counters.syscalls += 1
                return True
        # An ordinary page fault: let the handler run. This KVM re-reports the
        # breakpoint even with RFLAGS.RF set, so step over the first
        # instruction: skip it when it does nothing (endbr64, a NOP), else
        # single-step it with the breakpoint off.
        gpa = self._handler_gpa.get(vcpu.id)
        skip = no_op_length(self.mem.read_available(gpa, 15)) if gpa is not None else 0
        if skip:
            regs.rip += skip
            vcpu.set_regs(regs)
        else:
            self._stepping.add(vcpu.id)
            vcpu.set_guest_debug(c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_SINGLESTEP)
        return True

    def save_state(self) -> dict[str, object]:
        """What a snapshot needs to carry: which vCPUs are mid-way through stepping over the handler.
        (The watched handler itself is found again from the guest's IDT.)"""
        return {"stepping": sorted(self._stepping)}

    def load_state(self, state: object, vcpus: list[Vcpu]) -> None:
        """Re-arm every vCPU of a restored machine as :meth:`on_kick` would, before it first runs:
        a system call made before the first kick would otherwise fault unwatched."""
        stepping = state.get("stepping", []) if isinstance(state, dict) else []
        ids = {v.id for v in vcpus}
        self._stepping = {i for i in stepping if isinstance(i, int) and i in ids} if isinstance(stepping, list) else set()
        for vcpu in vcpus:
            if vcpu.id in self._stepping:
                self._stepping.discard(vcpu.id)
                self.check_idt(vcpu)  # learn the handler; then go on with the step it was in
                self._stepping.add(vcpu.id)
                vcpu.set_guest_debug(c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_SINGLESTEP)
            else:
                self.check_idt(vcpu)

    def summary(self) -> str:
        done = ", ".join(f"{k} {n}" for k, n in sorted(self.counters.completed.items())) or "none"
        return (f"quirks nested-pvm: instructions completed: {done}; system calls restarted: {self.counters.syscalls}; "
                f"page faults seen: {self.counters.page_faults_seen}; LSTAR writes trapped: {self.counters.lstar_writes}")


class NoQuirks:
    """The ``none`` profile: a host with ordinary hardware virtualization."""

    name = "none"

    def cpuid_clear(self) -> dict[tuple[int, str], int]:
        return {}

    def install(self, runner: VcpuRunner) -> None:
        pass

    def msr_write_traps(self) -> list[int]:
        return []

    def cmdline_params(self) -> list[str]:
        return []

    def save_state(self) -> dict[str, object]:
        return {}

    def load_state(self, state: object, vcpus: list[Vcpu]) -> None:
        pass

    def summary(self) -> str:
        return ""


Quirks = NestedPvmQuirks | NoQuirks


def make_quirks(name: str | None, *, cpus: int, mem: GuestMemory, tsc_khz: int = 0) -> Quirks:
    """The profile for ``--quirks`` (``auto`` detects it) on a machine with ``cpus`` vCPUs and this RAM."""
    if resolve_profile(name) == "nested-pvm":
        return NestedPvmQuirks(cpus=cpus, mem=mem, tsc_khz=host_tsc_khz(tsc_khz))
    return NoQuirks()
