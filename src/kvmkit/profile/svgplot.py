"""The timeline as a hand-written SVG: one row per vCPU, guest green, host red.

A picture makes the mail's point at a glance: thin green slivers of guest
time between wide red blocks of host time. Every rectangle carries a
<title> (exit reason, accesses, duration) so a browser shows it on hover.
Huge traces are cut to the first ``max_intervals`` intervals, and the
picture says so, rather than producing a file no browser can open.

A trace without kvm_entry/kvm_exit (nested KVM such as kvm_pvm emulates
the guest and emits kvm_emulate_insn instead) has no intervals to draw, but
it still says when the VM was busy and with what: such a trace gets event
rates over time, one row per event name, instead of an empty picture.
"""

from __future__ import annotations

import math
from html import escape

from kvmkit.profile.ftrace import NS, Event, Trace
from kvmkit.profile.timeline import GUEST, Timeline

GUEST_COLOR = "#3a9d23"
HOST_COLOR = "#d0342c"
WIDTH = 1200
LEFT = 180
ROW = 28
TOP = 50
RATE_BINS = 100            # time slots across the trace in the event-rate plot
RATE_ROWS = 12             # event names with a row of their own; the rest share "other"
RATE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
               "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _nice_step(span: float) -> float:
    """A 1/2/5 x 10^n tick step giving at most 10 ticks across ``span``."""
    if span <= 0:
        return 1.0
    exp = math.floor(math.log10(span / 10))
    for m in (1, 2, 5):
        if span / (m * 10.0**exp) <= 10:
            return m * 10.0**exp
    return 10.0 ** (exp + 1)


def plot_kind(tl: Timeline, trace: Trace | None = None) -> str:
    """What :func:`render_svg` draws for this trace, in words (for the "wrote ..." line)."""
    if tl.intervals and tl.first_ts is not None and tl.last_ts is not None:
        return "the guest/host timeline"
    if trace is not None and trace.events:
        return "event rates over time (the trace has no kvm_entry/kvm_exit events for a guest/host timeline)"
    return "an empty plot (the trace has no events)"


def render_svg(tl: Timeline, unit: str = NS, max_intervals: int = 50_000, trace: Trace | None = None) -> str:
    """SVG text of the timeline; without intervals, the event rates of ``trace`` (or a message)."""
    keys = [k for k in tl.streams if any(i.stream == k for i in tl.intervals)]
    intervals = tl.intervals[:max_intervals]
    has_timeline = bool(intervals) and tl.first_ts is not None and tl.last_ts is not None
    if not has_timeline and trace is not None and trace.events:
        return render_rates_svg(trace.events, unit)
    height = TOP + ROW * max(1, len(keys)) + 60
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="monospace" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        '<text x="10" y="20" font-size="14">kvmkit trace: guest (green) and host (red) time per vCPU</text>',
    ]
    if not has_timeline:
        why = ("No kvm_entry/kvm_exit events in this trace: guest/host intervals are not available."
               if trace is None else "No events in this trace: nothing to plot.")
        out.append(f'<text x="10" y="{TOP + 14}">{why}</text>')
        out.append("</svg>")
        return "\n".join(out) + "\n"
    t0 = min(i.start for i in intervals)
    t1 = max(i.end for i in intervals)
    span = max(1, t1 - t0)
    scale = (WIDTH - LEFT - 20) / span
    div, word = (1000.0, "µs") if unit == NS else (1.0, "clock units")
    if len(intervals) < len(tl.intervals):
        out.append(f'<text x="10" y="36">showing the first {len(intervals)} of {len(tl.intervals)} intervals</text>')
    rows = {k: n for n, k in enumerate(keys)}
    for k, n in rows.items():
        y = TOP + n * ROW
        label = tl.streams[k].label or str(k)
        out.append(f'<text x="10" y="{y + 17}">{escape(label[:24])}</text>')
    for iv in intervals:
        n = rows.get(iv.stream)
        if n is None:
            continue
        x = LEFT + (iv.start - t0) * scale
        w = max(0.5, iv.duration * scale)
        color = GUEST_COLOR if iv.kind == GUEST else HOST_COLOR
        what = iv.sequence if iv.kind != GUEST else f"guest until exit {iv.reason}"
        tip = f"{what}: {iv.duration / div:g} {word}"
        out.append(f'<rect x="{x:.2f}" y="{TOP + n * ROW + 4}" width="{w:.2f}" height="{ROW - 8}" '
                   f'fill="{color}"><title>{escape(tip)}</title></rect>')
    _axis(out, TOP + len(keys) * ROW + 10, span, scale, div, word, "first interval")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _axis(out: list[str], axis_y: int, span: int, scale: float, div: float, word: str, since: str) -> None:
    """A time axis under the rows: 1/2/5 ticks in ``word`` units."""
    out.append(f'<line x1="{LEFT}" y1="{axis_y}" x2="{WIDTH - 20}" y2="{axis_y}" stroke="black"/>')
    step = _nice_step(span / div)
    n_tick = 0
    while n_tick * step * div <= span:
        tick = round(n_tick * step, 9)
        x = LEFT + tick * div * scale
        out.append(f'<line x1="{x:.2f}" y1="{axis_y}" x2="{x:.2f}" y2="{axis_y + 5}" stroke="black"/>')
        out.append(f'<text x="{x:.2f}" y="{axis_y + 18}" text-anchor="middle">{tick:g}</text>')
        n_tick += 1
    out.append(f'<text x="{WIDTH - 20}" y="{axis_y + 36}" text-anchor="end">{word} since {since}</text>')


def _rate_text(count: int, width: float, unit: str) -> str:
    """``count`` events in a slot ``width`` wide, as a rate a person reads."""
    if width < 1:
        return f"{count} at one instant"  # every event has the same timestamp: no rate to speak of
    if unit == NS:
        return f"{count * 1e9 / width:,.0f}/s"
    return f"{count} per {width:g} clock units"


def render_rates_svg(events: list[Event], unit: str = NS, bins: int = RATE_BINS, max_rows: int = RATE_ROWS) -> str:
    """Event rates over time, one row per event name (busiest first), for traces without intervals.

    Each row is scaled to its own peak, which its label gives, so a rare
    event (a userspace exit) stays visible next to a flood of emulated
    instructions; every bar's <title> has the count and the rate. Names
    beyond ``max_rows`` share an "other" row rather than making the picture
    unreadable.
    """
    counts: dict[str, int] = {}
    for ev in events:
        counts[ev.name] = counts.get(ev.name, 0) + 1
    names = sorted(counts, key=lambda n: (-counts[n], n))
    own = names if len(names) <= max_rows else names[:max_rows - 1]
    row_of = {name: i for i, name in enumerate(own)}
    labels = list(own)
    if len(own) < len(names):
        labels.append(f"other ({len(names) - len(own)} names)")
    t0 = min(ev.ts for ev in events) if events else 0
    t1 = max(ev.ts for ev in events) if events else 0
    span = max(1, t1 - t0)
    nbins = max(1, bins) if t1 > t0 else 1
    width_ts = span / nbins if t1 > t0 else 0.0
    grid = [[0] * nbins for _ in labels]
    for ev in events:
        slot = min(nbins - 1, int((ev.ts - t0) / width_ts)) if width_ts else 0
        grid[row_of.get(ev.name, len(labels) - 1)][slot] += 1

    height = TOP + ROW * max(1, len(labels)) + 60
    div, word = (1000.0, "µs") if unit == NS else (1.0, "clock units")
    scale = (WIDTH - LEFT - 20) / span
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="monospace" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        '<text x="10" y="20" font-size="14">kvmkit trace: event rates over time (each row scaled to its own peak)</text>',
        '<text x="10" y="36">No kvm_entry/kvm_exit events in this trace, so no guest/host timeline; '
        + (f'{len(events)} events in {nbins} slots of {width_ts / div:g} {word}.</text>' if width_ts
           else f'{len(events)} events, all at one instant.</text>'),
    ]
    bar_w = (WIDTH - LEFT - 20) / nbins
    inner = ROW - 8
    for r, label in enumerate(labels):
        y = TOP + r * ROW
        row = grid[r]
        peak = max(row)
        color = RATE_COLORS[r % len(RATE_COLORS)]
        total = sum(row)
        out.append(f'<text x="10" y="{y + 12}">{escape(label[:24])}</text>')
        out.append(f'<text x="10" y="{y + 24}" font-size="10" fill="#555">{total} (peak '
                   f'{escape(_rate_text(peak, width_ts, unit))})</text>')
        out.append(f'<line x1="{LEFT}" y1="{y + 4 + inner}" x2="{WIDTH - 20}" y2="{y + 4 + inner}" stroke="#ddd"/>')
        for slot, n in enumerate(row):
            if not n:
                continue
            h = max(1.0, inner * n / peak)
            x = LEFT + slot * bar_w
            start = slot * width_ts / div
            tip = (f"{label}: {n} event{'s' if n != 1 else ''} in {start:g}-{start + width_ts / div:g} {word} "
                   f"({_rate_text(n, width_ts, unit)})")
            out.append(f'<rect x="{x:.2f}" y="{y + 4 + inner - h:.2f}" width="{max(0.5, bar_w - 0.5):.2f}" '
                       f'height="{h:.2f}" fill="{color}"><title>{escape(tip)}</title></rect>')
    _axis(out, TOP + len(labels) * ROW + 10, span, scale, div, word, "the first event")
    out.append("</svg>")
    return "\n".join(out) + "\n"
