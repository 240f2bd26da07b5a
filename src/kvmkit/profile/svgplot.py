"""The timeline as a hand-written SVG: one row per vCPU, guest green, host red.

A picture makes the mail's point at a glance: thin green slivers of guest
time between wide red blocks of host time. Every rectangle carries a
<title> (exit reason, accesses, duration) so a browser shows it on hover.
Huge traces are cut to the first ``max_intervals`` intervals, and the
picture says so, rather than producing a file no browser can open.
"""

from __future__ import annotations

import math
from html import escape

from kvmkit.profile.ftrace import NS
from kvmkit.profile.timeline import GUEST, Timeline

GUEST_COLOR = "#3a9d23"
HOST_COLOR = "#d0342c"
WIDTH = 1200
LEFT = 180
ROW = 28
TOP = 50


def _nice_step(span: float) -> float:
    """A 1/2/5 x 10^n tick step giving at most 10 ticks across ``span``."""
    if span <= 0:
        return 1.0
    exp = math.floor(math.log10(span / 10))
    for m in (1, 2, 5):
        if span / (m * 10.0**exp) <= 10:
            return m * 10.0**exp
    return 10.0 ** (exp + 1)


def render_svg(tl: Timeline, unit: str = NS, max_intervals: int = 50_000) -> str:
    """SVG text of the timeline; works (with a message) when there are no intervals."""
    keys = [k for k in tl.streams if any(i.stream == k for i in tl.intervals)]
    intervals = tl.intervals[:max_intervals]
    height = TOP + ROW * max(1, len(keys)) + 60
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="monospace" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        '<text x="10" y="20" font-size="14">kvmkit trace: guest (green) and host (red) time per vCPU</text>',
    ]
    if not intervals or tl.first_ts is None or tl.last_ts is None:
        out.append(f'<text x="10" y="{TOP + 14}">No kvm_entry/kvm_exit events in this trace: '
                   'guest/host intervals are not available.</text>')
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
    axis_y = TOP + len(keys) * ROW + 10
    out.append(f'<line x1="{LEFT}" y1="{axis_y}" x2="{WIDTH - 20}" y2="{axis_y}" stroke="black"/>')
    step = _nice_step(span / div)
    n_tick = 0
    while n_tick * step * div <= span:
        tick = round(n_tick * step, 9)
        x = LEFT + tick * div * scale
        out.append(f'<line x1="{x:.2f}" y1="{axis_y}" x2="{x:.2f}" y2="{axis_y + 5}" stroke="black"/>')
        out.append(f'<text x="{x:.2f}" y="{axis_y + 18}" text-anchor="middle">{tick:g}</text>')
        n_tick += 1
    out.append(f'<text x="{WIDTH - 20}" y="{axis_y + 36}" text-anchor="end">{word} since first interval</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
