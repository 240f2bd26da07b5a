"""Render a trace analysis as a text table or as JSON.

The text report answers the mail's question first ("how much host time did
each kind of exit cost, against how much guest time?") and puts caveats
next to the numbers they qualify: lost events, dropped partial intervals,
unreadable lines, and clocks whose units are not nanoseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvmkit.profile.ftrace import NS, Trace
from kvmkit.profile.timeline import Activity, Row, Stats, Summary, Timeline, build, count_activity, summarize

NO_INTERVALS = (
    "This trace has no kvm_entry/kvm_exit events, so guest/host intervals are not "
    "available in it (nested KVM such as kvm_pvm emulates guest code and emits "
    "kvm_emulate_insn instead); showing counts and rates only."
)


@dataclass
class Analysis:
    """Everything the renderers need, computed once."""

    trace: Trace
    timeline: Timeline
    summary: Summary
    activity: Activity

    @property
    def unit(self) -> str:
        return self.trace.unit


def analyze(trace: Trace) -> Analysis:
    """Build the timeline, its summary and the activity counts of a parsed trace."""
    tl = build(trace)
    return Analysis(trace, tl, summarize(tl), count_activity(trace))


def _fmt(value: int, unit: str) -> str:
    return f"{value / 1000:.3f}" if unit == NS else str(value)


def _unit_word(unit: str) -> str:
    return "µs" if unit == NS else "clock units"


def notes(a: Analysis) -> list[str]:
    """Caveats about this trace, one sentence each."""
    out = []
    t, tl = a.trace, a.timeline
    if not tl.has_entry_exit:
        out.append(NO_INTERVALS)
    if t.unit != NS:
        out.append("Timestamps are raw counter values (x86-tsc/counter clock): times are in clock units, not µs.")
    if t.mixed_timestamps:
        out.append("The trace mixes second and counter timestamps; times across them are meaningless.")
    lost = t.lost
    if lost:
        known = sum(r.count or 0 for r in lost)
        out.append(f"{len(lost)} lost-events markers ({known} events lost); intervals open across them were dropped ({tl.dropped_lost}).")
    if t.overwritten:
        out.append(f"{t.overwritten} events were overwritten because the trace buffer was full: the start of the capture is missing.")
    if tl.dropped_backwards:
        out.append(f"{tl.dropped_backwards} intervals dropped where a thread's timestamps went backwards.")
    if tl.unmatched:
        out.append(f"{tl.unmatched} entries or exits had no partner (events missing).")
    if tl.open_at_end:
        out.append(f"{tl.open_at_end} interval(s) still open when the trace ended (not counted).")
    if t.malformed:
        out.append(f"{t.malformed} lines could not be read (skipped).")
    return out


def _stats_json(s: Stats) -> dict[str, int]:
    return {"count": s.count, "total": s.total, "p50": s.p50, "p99": s.p99, "max": s.max}


def _row_json(r: Row) -> dict[str, Any]:
    return {"key": r.key, "count": r.count, "guest": _stats_json(r.guest_stats), "host": _stats_json(r.host_stats)}


def _sorted_rows(rows: dict[str, Row]) -> list[Row]:
    return sorted(rows.values(), key=lambda r: (-sum(r.host), -r.count, r.key))


def to_json(a: Analysis) -> dict[str, Any]:
    """A JSON-ready dict; times are integers in ``unit`` ("ns" or "clock units")."""
    s, tl, act = a.summary, a.timeline, a.activity
    streams = []
    for key, st in tl.streams.items():
        ivs = [i for i in tl.intervals if i.stream == key]
        if not ivs:
            continue
        streams.append({
            "stream": str(key), "label": st.label or str(key), "vcpu": st.vcpu,
            "guest": sum(i.duration for i in ivs if i.kind == "guest"),
            "host": sum(i.duration for i in ivs if i.kind == "host"),
        })
    return {
        "unit": a.unit,
        "clock": a.trace.clock,
        "intervals_available": tl.has_entry_exit,
        "notes": notes(a),
        "events": len(a.trace.events),
        "malformed_lines": a.trace.malformed,
        "lost_markers": len(a.trace.lost),
        "overwritten": a.trace.overwritten,
        "guest_total": s.guest_total,
        "host_total": s.host_total,
        "streams": streams,
        "by_reason": [_row_json(r) for r in _sorted_rows(s.by_reason)],
        "by_access": {k: [_row_json(r) for r in _sorted_rows(v)] for k, v in sorted(s.by_access.items())},
        "by_sequence": [_row_json(r) for r in _sorted_rows(s.by_sequence)],
        "activity": {
            "span": act.span,
            "events": dict(sorted(act.events.items(), key=lambda kv: -kv[1])),
            "accesses": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in sorted(act.accesses.items())},
            "userspace_exits": act.userspace_exits,
            "emulated_instructions": act.emulated,
            "emulation_failed": act.emulation_failed,
        },
    }


def render_json(a: Analysis) -> str:
    return json.dumps(to_json(a), indent=2)


def _table(title: str, rows: list[Row], unit: str) -> list[str]:
    if not rows:
        return []
    u = _unit_word(unit)
    key_last = max(len(r.key) for r in rows) > 32  # long sequences go after the numbers
    width = 0 if key_last else max(20, *(len(r.key) for r in rows))
    nums = (f"{'count':>7} {'guest total':>12} {'p50':>9} {'p99':>9}"
            f" {'host total':>12} {'p50':>9} {'p99':>9}")
    head = f"{nums}  what" if key_last else f"{'':{width}} {nums}"
    lines = [f"{title} (guest = time in the guest before the exit, host = time handling it; {u})", head]
    for r in rows:
        g, h = r.guest_stats, r.host_stats

        def cells(st: Stats) -> str:
            if st.count == 0:
                return f"{'-':>12} {'-':>9} {'-':>9}"
            return f"{_fmt(st.total, unit):>12} {_fmt(st.p50, unit):>9} {_fmt(st.p99, unit):>9}"

        nums = f"{r.count:>7} {cells(g)} {cells(h)}"
        lines.append(f"{nums}  {r.key}" if key_last else f"{r.key:{width}} {nums}")
    return lines + [""]


def _rate(n: int, span: int, unit: str) -> str:
    if unit != NS or span <= 0:
        return "-"
    return f"{n * 1e9 / span:.1f}/s"


def _counts(title: str, counts: dict[str, int], a: Analysis) -> list[str]:
    if not counts:
        return []
    width = max(20, *(len(k) for k in counts))
    lines = [title]
    for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {k:{width}} {n:>9} {_rate(n, a.activity.span, a.unit):>12}")
    return lines + [""]


def render_text(a: Analysis, source: str = "") -> str:
    """The human report: notes, per-stream totals, then the tables."""
    s, tl, act, unit = a.summary, a.timeline, a.activity, a.unit
    u = _unit_word(unit)
    out = [f"kvmkit trace report{': ' + source if source else ''}",
           f"{len(a.trace.events)} events over {_fmt(act.span, unit)} {u}"]
    out += [f"note: {n}" for n in notes(a)]
    out.append("")
    if tl.has_entry_exit:
        out.append(f"Total: guest {_fmt(s.guest_total, unit)} {u}, host {_fmt(s.host_total, unit)} {u}")
        for entry in to_json(a)["streams"]:
            out.append(f"  {entry['label']}: guest {_fmt(entry['guest'], unit)} {u}, host {_fmt(entry['host'], unit)} {u}")
        out.append("")
        out += _table("Exits by reason", _sorted_rows(s.by_reason), unit)
        for kind, rows in sorted(s.by_access.items()):
            out += _table(f"Emulated {kind} accesses", _sorted_rows(rows), unit)
        out += _table("Host sequences", _sorted_rows(s.by_sequence), unit)
    if act.emulated:
        out.append(f"Emulated instructions: {act.emulated} ({_rate(act.emulated, act.span, unit)}),"
                   f" {act.emulation_failed} failed")
        out.append("")
    for kind, counts in sorted(act.accesses.items()):
        out += _counts(f"{kind} accesses (count, rate)", counts, a)
    out += _counts("Userspace exits (count, rate)", act.userspace_exits, a)
    out += _counts("Events (count, rate)", act.events, a)
    return "\n".join(out).rstrip() + "\n"
