"""Per-vCPU exit accounting: what made the guest come back to user space, and what it cost.

The vCPU loop records every KVM_RUN return here. Time is split into time
inside KVM_RUN (the guest plus in-kernel handling) and time in kvmkit's own
handlers, the split the seed mail reads off its trace by hand.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..kvm.constants import exit_reason_name


MAX_DISTINCT = 256  # distinct addresses a tally keeps; the rest are counted together as OTHER
OTHER = -1          # the key of "every other address": a guest sweeping the address space cannot grow a tally


def tally(counts: dict, key: object, limit: int = MAX_DISTINCT) -> None:
    """Count ``key`` in ``counts``, a bounded table: past ``limit`` keys, new ones count as OTHER."""
    if key in counts or len(counts) < limit:
        counts[key] = counts.get(key, 0) + 1
    else:
        other = (OTHER, key[1]) if isinstance(key, tuple) else OTHER
        counts[other] = counts.get(other, 0) + 1


def format_addr(a: int) -> str:
    return "other" if a == OTHER else f"{a:#x}"


@dataclass
class VcpuExitStats:
    vcpu: int
    exits: Counter = field(default_factory=Counter)        # reason -> count
    pio: Counter = field(default_factory=Counter)          # (port, "in"/"out") -> count
    mmio: Counter = field(default_factory=Counter)         # (page, "r"/"w") -> count
    run_ns: int = 0        # time spent inside KVM_RUN
    handler_ns: int = 0    # time spent in kvmkit between two KVM_RUNs
    kicks: int = 0         # KVM_RUN returns with EINTR (a stop or kick signal)

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())

    def as_dict(self) -> dict:
        return {
            "vcpu": self.vcpu,
            "exits": {exit_reason_name(r): n for r, n in sorted(self.exits.items())},
            "pio": {f"{port:#x}/{d}": n for (port, d), n in sorted(self.pio.items())},
            "mmio": {f"{format_addr(page)}/{d}": n for (page, d), n in sorted(self.mmio.items())},
            "run_ns": self.run_ns,
            "handler_ns": self.handler_ns,
            "kicks": self.kicks,
        }


def _fmt_ns(ns: int) -> str:
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.3f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.3f} ms"
    return f"{ns / 1e3:.1f} us"


def format_exit_table(stats: list[VcpuExitStats], kvm_stats: dict[int, dict[str, int]] | None = None,
                      top: int = 10) -> str:
    """The ``--stats`` table: exits by reason and by port/page, time split, in-kernel exits."""
    lines: list[str] = []
    for st in stats:
        total = st.total_exits
        lines.append(f"vCPU {st.vcpu}: {total} userspace exits, {st.kicks} kicks; "
                     f"in KVM_RUN {_fmt_ns(st.run_ns)}, in kvmkit {_fmt_ns(st.handler_ns)}"
                     + (f", {st.handler_ns / total / 1e3:.1f} us/exit in kvmkit" if total else ""))
        lines.append(f"  {'exit reason':<24}{'count':>12}")
        for reason, n in st.exits.most_common():
            lines.append(f"  {exit_reason_name(reason):<24}{n:>12}")
        if st.pio:
            lines.append(f"  {'port':<24}{'count':>12}")
            for (port, d), n in st.pio.most_common(top):
                lines.append(f"  {f'{port:#06x} {d}':<24}{n:>12}")
        if st.mmio:
            lines.append(f"  {'mmio page':<24}{'count':>12}")
            for (page, d), n in st.mmio.most_common(top):
                lines.append(f"  {f'{format_addr(page)} {d}':<24}{n:>12}")
        if kvm_stats and st.vcpu in kvm_stats:
            ks = kvm_stats[st.vcpu]
            interesting = [k for k in ("exits", "halt_exits", "io_exits", "mmio_exits", "irq_exits",
                                       "irq_injections", "halt_successful_poll", "halt_wakeup",
                                       "insn_emulation", "insn_emulation_fail", "signal_exits",
                                       "request_irq_exits", "nmi_injections") if k in ks]
            if interesting:
                lines.append("  in-kernel (KVM binary stats)")
                for k in interesting:
                    lines.append(f"  {k:<24}{ks[k]:>12}")
    return "\n".join(lines)
