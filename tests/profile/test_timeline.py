"""Guest/host intervals and the report, checked against the seed mail's own reading."""

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from kvmkit.profile import ftrace, svgplot, trace_cli, trace_report
from kvmkit.profile.timeline import GUEST, HOST, build, percentile, summarize

FIXTURES = Path(__file__).parent.parent / "fixtures"
SEED = (FIXTURES / "seed_trace.txt").read_text()
US = 1000  # ns


def analyze(text: str) -> trace_report.Analysis:
    return trace_report.analyze(ftrace.parse(text))


def test_seed_mail_reading() -> None:
    """tglx: 2 µs guest, 11 µs APIC_EOI, 9 µs guest, 11 µs APIC_TMICT: 11 µs guest vs 22 µs host."""
    a = analyze(SEED)
    s = a.summary
    apic = s.by_reason["APIC_ACCESS"]
    assert apic.count == 2
    assert sum(apic.host) == 22 * US and sorted(apic.host) == [11 * US, 11 * US]
    assert sum(apic.guest) == 11 * US and apic.guest == [2 * US, 9 * US]
    eoi = s.by_access["apic"]["APIC_EOI write"]
    tmict = s.by_access["apic"]["APIC_TMICT write"]
    assert (eoi.count, eoi.guest, eoi.host) == (1, [2 * US], [11 * US])
    assert (tmict.count, tmict.guest, tmict.host) == (1, [9 * US], [11 * US])
    assert s.by_access["mmio"]["write 0xfee00380"].host == [11 * US]
    hlt = s.by_reason["HLT"]
    assert (hlt.count, hlt.guest, hlt.host) == (1, [11 * US], [])
    [tmict_seq] = [k for k in s.by_sequence if "APIC_TMICT" in k]
    assert tmict_seq.startswith("exit APIC_ACCESS -> ")
    assert tmict_seq.endswith("emulate -> page walk -> mmio write 0xfee00380 -> APIC_TMICT write -> hrtimer_start -> entry")
    kinds = [(i.kind, i.duration) for i in a.timeline.intervals]
    assert kinds == [(GUEST, 2 * US), (HOST, 11 * US), (GUEST, 9 * US), (HOST, 11 * US), (GUEST, 11 * US)]
    assert a.timeline.open_at_end == 1  # the HLT exit has no entry in the capture


def test_seed_text_and_json_report() -> None:
    a = analyze(SEED)
    text = trace_report.render_text(a)
    [row] = [line for line in text.splitlines() if line.startswith("APIC_ACCESS ")]
    assert row.split() == ["APIC_ACCESS", "2", "11.000", "2.000", "9.000", "22.000", "11.000", "11.000"]
    assert "Total: guest 22.000 µs, host 22.000 µs" in text
    data = json.loads(trace_report.render_json(a))
    [apic] = [r for r in data["by_reason"] if r["key"] == "APIC_ACCESS"]
    assert apic["host"]["total"] == 22000 and apic["guest"]["total"] == 11000 and apic["count"] == 2
    assert data["unit"] == "ns" and data["intervals_available"] is True


def _reformat(line: str, layout: str) -> str:
    """The seed's line in another producer's layout."""
    head, rest = line.split("] ", 1)
    comm_pid, cpu = head.rsplit(" [", 1)
    ts, event = rest.split(": ", 1)
    if layout == "sysfs":
        return f"{comm_pid:>20} [{cpu}] d..2. {ts}: {event}"
    if layout == "nanoseconds":
        return f"{comm_pid} [{cpu}] {ts}000: {event}"
    return f"{ts}: {event}"


@pytest.mark.parametrize("layout", ["sysfs", "nanoseconds", "bare"])
def test_seed_in_other_layouts_gives_same_numbers(layout: str) -> None:
    lines = [_reformat(line, layout) for line in SEED.splitlines()]
    if layout == "bare":  # without a thread column only the vCPU's own lines can be attributed
        lines = [line for line in lines if " kvm_" in line]
    s = analyze("\n".join(lines)).summary
    assert sum(s.by_reason["APIC_ACCESS"].host) == 22 * US
    assert sum(s.by_reason["APIC_ACCESS"].guest) == 11 * US
    assert s.by_access["apic"]["APIC_TMICT write"].host == [11 * US]


def test_lost_events_drop_the_open_interval() -> None:
    lines = SEED.splitlines()
    at = next(i for i, line in enumerate(lines) if "APIC_TMICT" in line)
    lines.insert(at, "CPU:17 [LOST 3 EVENTS]")
    a = analyze("\n".join(lines))
    assert a.summary.by_reason["APIC_ACCESS"].host == [11 * US]  # only the EOI one survives
    assert a.timeline.dropped_lost == 1
    assert any("lost-events" in n for n in trace_report.notes(a))


def test_counter_clock_is_reported_in_clock_units() -> None:
    text = "\n".join([
        "vcpu-7 [000] 1000: kvm_entry: vcpu 0",
        "vcpu-7 [000] 1500: kvm_exit: vcpu 0 reason IO_INSTRUCTION rip 0x1",
        "vcpu-7 [000] 1510: kvm_pio: pio_write at 0x3f8 size 1 count 1 val 0x41",
        "vcpu-7 [000] 4500: kvm_entry: vcpu 0",
    ])
    a = analyze(text)
    assert a.unit == ftrace.CLOCK_UNITS
    assert a.summary.by_access["pio"]["write 0x3f8"].host == [3000]
    out = trace_report.render_text(a)
    assert "clock units" in out and "3000" in out


NESTED = """\
# tracer: nop
     python3-4242    [001] .....   100.000000: kvm_emulate_insn: 0:fff0:ee (real)
     python3-4242    [001] .....   100.000100: kvm_pio: pio_write at 0x3f8 size 1 count 1 val 0x41
     python3-4242    [001] .....   100.000200: kvm_userspace_exit: reason KVM_EXIT_IO (2)
     python3-4242    [001] .....   100.000300: kvm_emulate_insn: 0:fff1:ee (real)
     python3-4242    [001] .....   100.000400: kvm_mmio: mmio write len 4 gpa 0xfee00380 val 0x10
     python3-4242    [001] .....   100.000400: kvm_apic: apic_write APIC_TMICT = 0x10
     python3-4242    [001] .....   100.000500: kvm_emulate_insn: 0:fff2:0f 0b (real) failed
     python3-4242    [001] .....   100.001000: kvm_new_thing: something=1
"""


def test_nested_kvm_trace_reports_counts_and_says_intervals_are_missing() -> None:
    a = analyze(NESTED)
    assert not a.timeline.has_entry_exit and a.timeline.intervals == []
    act = a.activity
    assert act.emulated == 3 and act.emulation_failed == 1
    assert act.accesses["pio"] == {"write 0x3f8": 1}
    assert act.accesses["apic"] == {"APIC_TMICT write": 1}
    assert act.userspace_exits == {"KVM_EXIT_IO": 1}
    assert act.events["kvm_new_thing"] == 1  # unknown events are counted
    assert act.span == 1000 * US
    text = trace_report.render_text(a)
    assert trace_report.NO_INTERVALS in text
    assert "3000.0/s" in text  # 3 emulated instructions in 1 ms
    ET.fromstring(svgplot.render_svg(a.timeline))


def test_svg_is_well_formed_and_draws_every_interval() -> None:
    a = analyze(SEED)
    root = ET.fromstring(svgplot.render_svg(a.timeline, a.unit))
    rects = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("fill") in (svgplot.GUEST_COLOR, svgplot.HOST_COLOR)]
    assert len(rects) == 5
    assert [r.get("fill") for r in rects].count(svgplot.HOST_COLOR) == 2


def test_report_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg = tmp_path / "t.svg"
    assert trace_cli.report_main([str(FIXTURES / "seed_trace.txt"), "--json", "--plot", str(svg)]) == 0
    assert json.loads(capsys.readouterr().out)["host_total"] == 22000
    ET.parse(svg)
    assert trace_cli.report_main([str(FIXTURES / "seed_trace.txt")]) == 0
    assert "APIC_TMICT write" in capsys.readouterr().out
    assert trace_cli.report_main([str(tmp_path / "missing")]) == 1


def test_parse_record_args() -> None:
    assert trace_cli.parse_record_args(["-o", "x.trace", "--", "--kernel", "bz", "-m", "64"]) == (
        Path("x.trace"), ["--kernel", "bz", "-m", "64"])
    assert trace_cli.parse_record_args(["--", "-o", "y"]) == (trace_cli.DEFAULT_OUTPUT, ["-o", "y"])


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 99), percentile([7], 99)) == (50, 99, 7)
    assert percentile([1, 2], 50) == 1 and percentile([], 50) == 0


# --- synthetic traces with known intervals ----------------------------------

REASONS = ["HLT", "IO_INSTRUCTION", "APIC_ACCESS", "MSR_WRITE", "EPT_VIOLATION"]
vcpu_runs = st.lists(
    st.tuples(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from(REASONS)), min_size=1, max_size=12
)


def _events(vcpu: int, runs: list[tuple[int, int, str]], start: int) -> list[tuple[int, int, str, str]]:
    """(ts_us, vcpu, event, info): entry, exit, an access, entry ... closing every host interval."""
    out, t = [], start
    out.append((t, vcpu, "kvm_entry", f"vcpu {vcpu}"))
    for guest, host, reason in runs:
        t += guest
        out.append((t, vcpu, "kvm_exit", f"vcpu {vcpu} reason {reason} rip 0x1000 info1 0x0"))
        if reason == "IO_INSTRUCTION":
            out.append((t, vcpu, "kvm_pio", f"pio_write at 0x{0x3f8 + vcpu:x} size 1 count 1 val 0x0"))
        t += host
        out.append((t, vcpu, "kvm_entry", f"vcpu {vcpu}"))
    return out


def _line(ts_us: int, vcpu: int, event: str, info: str, layout: str) -> str:
    secs, us = divmod(ts_us, 1_000_000)
    if layout == "sysfs":
        return f"   CPU {vcpu}/KVM-{900 + vcpu}    [{vcpu:03d}] d..1. {secs}.{us:06d}: {event}: {info}"
    if layout == "trace-cmd-ns":
        return f"qemu-{900 + vcpu} [{vcpu:03d}] {secs}.{us:06d}000: {event}: {info}"
    return f"[{vcpu:03d}] {secs}.{us:06d}: {event}: {info}"  # no thread column: the vcpu field decides


@settings(max_examples=150, deadline=None)
@given(st.lists(vcpu_runs, min_size=1, max_size=3), st.sampled_from(["sysfs", "trace-cmd-ns", "cpu-only"]),
       st.integers(0, 10**9))
def test_synthetic_traces_round_trip_exactly(per_vcpu: list, layout: str, start: int) -> None:
    events = []
    for vcpu, runs in enumerate(per_vcpu):
        events += _events(vcpu, runs, start + vcpu * 7)
    events.sort(key=lambda e: e[0])  # stable: each vCPU's own order is kept, CPUs interleave
    text = "\n".join(_line(*e, layout) for e in events)
    tl = build(ftrace.parse(text))
    assert tl.dropped_lost == tl.unmatched == 0
    assert tl.open_at_end == len(per_vcpu)  # each ends inside the guest
    for vcpu, runs in enumerate(per_vcpu):
        [key] = [k for k, s in tl.streams.items() if s.vcpu == vcpu]
        got = [(i.kind, i.duration, i.reason) for i in tl.intervals if i.stream == key]
        want = []
        for guest, host, reason in runs:
            want += [(GUEST, guest * US, reason), (HOST, host * US, reason)]
        assert got == want
    s = summarize(tl)
    assert s.guest_total == US * sum(g for runs in per_vcpu for g, _, _ in runs)
    assert s.host_total == US * sum(h for runs in per_vcpu for _, h, _ in runs)
    for reason in REASONS:
        want_host = sorted(h * US for runs in per_vcpu for _, h, r in runs if r == reason)
        got_host = sorted(s.by_reason[reason].host) if reason in s.by_reason else []
        assert got_host == want_host
    pio = s.by_access.get("pio", {})
    for vcpu, runs in enumerate(per_vcpu):
        want_io = sorted(h * US for _, h, r in runs if r == "IO_INSTRUCTION")
        got_io = sorted(pio[f"write {0x3f8 + vcpu:#x}"].host) if want_io else []
        assert got_io == want_io


def test_real_nested_kvm_capture() -> None:
    """Captured here with trace_cli.record: a real-mode guest doing 20 `out dx, al` to 0x3f8, then hlt."""
    a = analyze((FIXTURES / "trace_nested_pio.txt").read_text())
    assert a.trace.malformed == 0 and a.trace.clock == "mono"
    assert not a.timeline.has_entry_exit
    assert a.activity.accesses == {"pio": {"write 0x3f8": 20}}
    assert a.activity.userspace_exits == {"KVM_EXIT_IO": 20, "KVM_EXIT_HLT": 1}
    assert trace_report.to_json(a)["intervals_available"] is False


def _nested_busy_trace() -> str:
    """A kvm_pvm-style capture: 1 ms of emulated instructions, a port write every 10th, an exit every 50th."""
    lines = ["# tracer: nop"]
    for i in range(200):
        ts = f"100.{i * 5:06d}"
        lines.append(f"     python3-4242    [001] .....   {ts}: kvm_emulate_insn: 0:fff0:ee (real)")
        if i % 10 == 0:
            lines.append(f"     python3-4242    [001] .....   {ts}: kvm_pio: pio_write at 0x3f8 size 1 count 1 val 0x41")
        if i % 50 == 0:
            lines.append(f"     python3-4242    [001] .....   {ts}: kvm_userspace_exit: reason KVM_EXIT_IO (2)")
    return "\n".join(lines) + "\n"


SVG = "{http://www.w3.org/2000/svg}"


def _bars(root: ET.Element) -> dict[str, int]:
    """Events per row name, read back from the bars' <title>s."""
    out: dict[str, int] = {}
    for rect in root.iter(f"{SVG}rect"):
        title = rect.find(f"{SVG}title")
        if title is not None and title.text and re.search(r": \d+ events? in ", title.text):
            name, rest = title.text.split(": ", 1)
            out[name] = out.get(name, 0) + int(rest.split()[0])
    return out


def test_plot_without_entry_exit_draws_event_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "nested.trace"
    trace.write_text(_nested_busy_trace())
    svg = tmp_path / "rates.svg"
    assert trace_cli.report_main([str(trace), "--plot", str(svg)]) == 0
    err = capsys.readouterr().err
    assert "kvmkit: wrote event rates over time" in err and err.rstrip().endswith(f"to {svg}"), err
    root = ET.parse(svg).getroot()
    assert _bars(root) == {"kvm_emulate_insn": 200, "kvm_pio": 20, "kvm_userspace_exit": 4}
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "kvm_emulate_insn" in labels and "kvm_userspace_exit" in labels
    # 200 instructions over 995 µs: 100 slots of 9.95 µs hold 2 each, i.e. about 201,005/s
    assert any(t and t.startswith("200 (peak 201,005/s)") for t in labels), labels


def test_rate_plot_folds_rare_names_into_other_and_handles_one_instant() -> None:
    events = [ftrace.Event(ts=1000, name=f"ev{i:02d}", info="") for i in range(20) for _ in range(20 - i)]
    root = ET.fromstring(svgplot.render_rates_svg(events, max_rows=5))
    bars = _bars(root)
    assert bars["ev00"] == 20 and "ev05" not in bars
    assert bars["other (16 names)"] == sum(20 - i for i in range(4, 20))
    assert sum(bars.values()) == len(events)


def test_plot_of_a_trace_with_intervals_is_still_the_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg = tmp_path / "t.svg"
    assert trace_cli.report_main([str(FIXTURES / "seed_trace.txt"), "--plot", str(svg)]) == 0
    assert f"kvmkit: wrote the guest/host timeline to {svg}" in capsys.readouterr().err
    root = ET.parse(svg).getroot()
    assert [r.get("fill") for r in root.iter(f"{SVG}rect")].count(svgplot.HOST_COLOR) == 2
    empty = ET.fromstring(svgplot.render_svg(analyze("").timeline, trace=ftrace.parse("")))
    assert any("No events in this trace" in (t.text or "") for t in empty.iter(f"{SVG}text"))
