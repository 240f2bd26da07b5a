"""The ftrace text parser: every column layout, every clock, never a crash."""

from pathlib import Path

from hypothesis import given, settings, strategies as st

from kvmkit.profile import ftrace
from kvmkit.profile.ftrace import CLOCK_UNITS, NS, Lost, parse, parse_line

FIXTURES = Path(__file__).parent.parent / "fixtures"
SEED = (FIXTURES / "seed_trace.txt").read_text()


def one(line: str) -> ftrace.Event:
    parsed = parse_line(line)
    assert parsed is not None, line
    return parsed[0]


def test_seed_fixture_parses_completely() -> None:
    t = parse(SEED)
    assert t.malformed == 0
    assert len(t.events) == 45
    assert t.unit == NS
    entry = next(e for e in t.events if e.name == "kvm_entry")
    assert (entry.comm, entry.pid, entry.cpu, entry.ts) == ("<...>", 77375, 17, 316004_317577_000)
    assert entry.fields == {"vcpu": 1}
    idle = t.events[0]
    assert (idle.comm, idle.pid, idle.name) == ("<idle>", 0, "hrtimer_cancel")


def test_kernel_trace_file_layout_with_flags_and_tgid() -> None:
    e = one("   CPU 0/KVM-1234    (   1200) [001] d..2.  1234.567890123: kvm_exit: vcpu 0 reason HLT rip 0xffffffff81052214 info1 0x0")
    assert (e.comm, e.pid, e.cpu, e.flags) == ("CPU 0/KVM", 1234, 1, "d..2.")
    assert e.ts == 1234_567890123
    assert e.fields["reason"] == "HLT" and e.fields["vcpu"] == 0 and e.fields["rip"] == 0xFFFFFFFF81052214


def test_trace_cmd_layout_and_bare_layout() -> None:
    e = one("qemu-system-x86-77375 [017] 316004.317579: kvm:kvm_exit:  reason APIC_ACCESS rip 0xffffffff8104d1cc info 10b0 0")
    assert (e.comm, e.pid, e.name, e.fields["reason"]) == ("qemu-system-x86", 77375, "kvm_exit", "APIC_ACCESS")
    bare = one("316004.317579: kvm_exit: reason APIC_ACCESS rip 0x1 info 10b0 0")
    assert (bare.comm, bare.pid, bare.cpu, bare.ts) == (None, None, None, 316004_317579_000)
    cpu_only = one("[003] 5.000001: kvm_entry: vcpu 2")
    assert (cpu_only.cpu, cpu_only.fields["vcpu"]) == (3, 2)


def test_kvm_field_decoders() -> None:
    assert one("1.0: kvm_mmio: mmio write len 4 gpa 0xfee00380 val 0x1798").fields == {
        "op": "write", "len": 4, "gpa": 0xFEE00380, "val": 0x1798}
    assert one("1.0: kvm_apic: apic_write APIC_TMICT = 0x1798").fields == {"op": "write", "reg": "APIC_TMICT", "val": 0x1798}
    pio = one("1.0: kvm_pio: pio_write at 0x3f8 size 1 count 1 val 0x41 ").fields
    assert (pio["op"], pio["port"], pio["val"]) == ("write", 0x3F8, 0x41)
    msr = one("1.0: kvm_msr: msr_write 6e0 = 0x1234 (#GP)").fields
    assert (msr["msr"], msr["val"], msr["gp"]) == (0x6E0, 0x1234, True)
    assert one("1.0: kvm_userspace_exit: reason KVM_EXIT_IO (2)").fields == {"reason": "KVM_EXIT_IO", "code": 2}
    emu = one("1.0: kvm_emulate_insn: 0:ffffffff8104d1cc: 89 b7 00 b0 5f ff (prot64) failed").fields
    assert (emu["rip"], emu["insn"], emu["mode"], emu["failed"]) == (0xFFFFFFFF8104D1CC, "89 b7 00 b0 5f ff", "prot64", True)
    assert one("1.0: kvm_inj_virq: IRQ 0xef").fields == {"vector": 0xEF}
    assert one("1.0: kvm_inj_virq: irq 239").fields == {"vector": 239}
    wake = one("1.0: sched_wakeup: comm=CPU 0/KVM pid=77 prio=19 target_cpu=017").fields
    assert wake == {"comm": "CPU 0/KVM", "pid": 77, "prio": 19, "target_cpu": 17}
    sw = one("1.0: sched_switch: prev_comm=a prev_state=S ==> next_comm=b next_pid=0").fields
    assert (sw["prev_state"], sw["next_comm"]) == ("S", "b")


def test_clocks() -> None:
    assert parse("1.000001: x: y\n").events[0].ts == 1_000_001_000
    assert parse("1.000000001: x: y\n").events[0].ts == 1_000_000_001
    raw = parse("123456789012: kvm_entry: vcpu 0\n")
    assert raw.unit == CLOCK_UNITS and raw.events[0].ts == 123456789012
    hdr = parse("# trace_clock: x86-tsc\n5.5: x: y\n")
    assert hdr.clock == "x86-tsc" and hdr.unit == CLOCK_UNITS
    mixed = parse("5.5: x: y\n7: x: y\n")
    assert mixed.mixed_timestamps


def test_lost_events_truncated_lines_and_preamble() -> None:
    text = "\n".join([
        "cpus=2",
        "version = 7",
        "CPU:1 [LOST 42 EVENTS]",
        "CPU 0 [EVENTS LOST]",
        "<...>-77375 [017] 316004.3175",
        "<...>-77375 [017] 316004.317579: kvm_exit: reason APIC_ACC",
        "garbage without any structure",
        "##### CPU 2 buffer started ####",
    ])
    t = parse(text)
    assert [(r.cpu, r.count) for r in t.lost] == [(1, 42), (0, None)]
    assert t.malformed == 2
    assert len(t.events) == 1 and t.events[0].fields["reason"] == "APIC_ACC"
    assert isinstance(t.records[0], Lost)


def test_overwritten_events_are_counted_from_the_header() -> None:
    assert parse("# entries-in-buffer/entries-written: 100/250   #P:2\n").overwritten == 150
    assert parse("# entries-in-buffer/entries-written: 138/138   #P:2\n").overwritten == 0


@settings(max_examples=300)
@given(st.text())
def test_arbitrary_text_never_crashes(text: str) -> None:
    t = parse(text)
    assert t.malformed + len(t.records) + t.header_lines <= len(text.splitlines())


SEED_LINES = SEED.splitlines()


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(SEED_LINES), st.integers(0, 200), st.text(max_size=8)), max_size=30))
def test_mangled_real_lines_never_crash(pieces: list[tuple[str, int, str]]) -> None:
    """Real lines cut at any point, with junk appended, in any order."""
    lines = [line[:cut] + junk for line, cut, junk in pieces]
    t = parse(lines)
    assert t.malformed + len(t.records) + t.header_lines <= len(lines)
    for e in t.events:
        assert isinstance(e.ts, int) and isinstance(e.fields, dict)
