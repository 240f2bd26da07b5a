"""Parse ftrace text output into events.

Two producers write nearly the same text: the kernel's ``tracing/trace``
file and ``trace-cmd report``. Both print ``COMM-PID [CPU] FLAGS TS: EVENT:
INFO``, but any of the leading columns may be missing (the seed mail's trace
has no irq-flags column), comms may contain spaces and dashes, and a capture
may contain lost-event markers, truncated lines or events we have never
heard of. A trace is evidence someone collected at some cost, so nothing in
it may make the parser raise: lines that cannot be read are counted and
reported, not fatal.

Timestamps are kept as integers so that interval arithmetic is exact: for
clocks that print seconds (6 or 9 decimals) the unit is nanoseconds, for
counter clocks (``x86-tsc``, ``counter``) that print raw integers the unit is
"clock units" and the report says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

NS = "ns"
CLOCK_UNITS = "clock units"

# COMM-PID, optional (TGID), optional [CPU], optional irq flags, TIMESTAMP:
# EVENT: INFO. The comm is matched lazily up to the first "-digits" that is
# followed by whitespace, so "qemu-system-x86-77375" and "CPU 0/KVM-1234"
# both split correctly.
_LINE = re.compile(
    r"^\s*"
    r"(?:(?P<comm>\S.*?)-(?P<pid>\d+)\s+)?"
    r"(?:\(\s*(?P<tgid>[\d-]+)\)\s+)?"
    r"(?:\[(?P<cpu>\d+)\]\s+)?"
    r"(?:(?P<flags>[.a-zA-Z][.\w]{2,5})\s+)?"
    r"(?P<ts>\d+(?:\.\d+)?):\s+"
    r"(?P<event>[A-Za-z_][\w:]*):\s?"
    r"(?P<info>.*)$"
)
_LOST = re.compile(r"^\s*CPU:?\s*(?P<cpu>\d+)\s*\[(?:LOST\s+(?P<n>\d+)\s+)?EVENTS?(?:\s+LOST)?\]")
_CLOCK_HEADER = re.compile(r"^#\s*(?:kvmkit\s+)?trace_clock[:=]\s*(?P<clock>[\w-]+)")
_ENTRIES_HEADER = re.compile(r"^#\s*entries-in-buffer/entries-written:\s*(\d+)/(\d+)")
_COUNTER_CLOCKS = frozenset({"x86-tsc", "counter"})


@dataclass(frozen=True)
class Event:
    """One trace line. ``ts`` is in the trace's unit (see ``Trace.unit``)."""

    ts: int
    name: str
    info: str
    fields: dict[str, object] = field(default_factory=dict, compare=False)
    cpu: int | None = None
    pid: int | None = None
    comm: str | None = None
    flags: str | None = None
    line_no: int = 0


@dataclass(frozen=True)
class Lost:
    """A lost-events marker: the ring buffer of ``cpu`` overflowed here."""

    cpu: int
    count: int | None
    line_no: int = 0


@dataclass
class Trace:
    """Everything read from one trace file, in file order."""

    records: list[Event | Lost] = field(default_factory=list)
    unit: str = NS
    clock: str | None = None
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    mixed_timestamps: bool = False
    header_lines: int = 0
    overwritten: int = 0  # events the ring buffer dropped before the capture was read

    @property
    def events(self) -> list[Event]:
        return [r for r in self.records if isinstance(r, Event)]

    @property
    def lost(self) -> list[Lost]:
        return [r for r in self.records if isinstance(r, Lost)]


def parse_timestamp(text: str) -> tuple[int, bool]:
    """Return (value, is_seconds). Seconds become integer nanoseconds."""
    if "." in text:
        whole, frac = text.split(".", 1)
        frac = (frac + "000000000")[:9]
        return int(whole) * 1_000_000_000 + int(frac), True
    return int(text), False


def parse(lines: Iterable[str] | str) -> Trace:
    """Read ftrace text. Never raises on content; unreadable lines are counted."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    trace = Trace()
    saw_seconds = saw_counter = False
    for no, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            trace.header_lines += 1
            m = _CLOCK_HEADER.match(stripped)
            if m:
                trace.clock = m.group("clock")
            m = _ENTRIES_HEADER.match(stripped)
            if m:
                trace.overwritten += max(0, int(m.group(2)) - int(m.group(1)))
            continue
        lost = _LOST.match(line)
        if lost:
            n = lost.group("n")
            trace.records.append(Lost(int(lost.group("cpu")), int(n) if n else None, no))
            continue
        event = parse_line(line, no)
        if event is None:
            if _is_preamble(stripped):
                trace.header_lines += 1
            else:
                trace.malformed += 1
                if len(trace.malformed_examples) < 5:
                    trace.malformed_examples.append(line[:200])
            continue
        event, is_seconds = event
        saw_seconds |= is_seconds
        saw_counter |= not is_seconds
        trace.records.append(event)
    if trace.clock in _COUNTER_CLOCKS or (saw_counter and not saw_seconds):
        trace.unit = CLOCK_UNITS
    trace.mixed_timestamps = saw_seconds and saw_counter
    return trace


def _is_preamble(line: str) -> bool:
    """trace-cmd report starts with lines such as 'cpus=2' or 'version = 7'."""
    return bool(re.match(r"^(cpus|version|CPU \d+ is empty|#####|trace-cmd)\b", line)) or (
        "=" in line and ":" not in line and len(line) < 80
    )


def parse_line(line: str, line_no: int = 0) -> tuple[Event, bool] | None:
    """Parse one event line; None if it is not one. The bool says 'seconds clock'."""
    m = _LINE.match(line)
    if m is None:
        return None
    try:
        ts, is_seconds = parse_timestamp(m.group("ts"))
    except ValueError:
        return None
    name = m.group("event")
    if ":" in name:  # trace-cmd may print "kvm:kvm_exit"
        name = name.rsplit(":", 1)[1]
    info = m.group("info").strip()
    pid = m.group("pid")
    cpu = m.group("cpu")
    comm = m.group("comm")
    event = Event(
        ts=ts,
        name=name,
        info=info,
        fields=decode_fields(name, info),
        cpu=int(cpu) if cpu is not None else None,
        pid=int(pid) if pid is not None else None,
        comm=comm.strip() if comm is not None else None,
        flags=m.group("flags"),
        line_no=line_no,
    )
    return event, is_seconds


_KV = re.compile(r"(?:^|\s)([A-Za-z_]\w*)=")


def parse_key_values(info: str) -> dict[str, object]:
    """Split 'a=1 comm=CPU 0/KVM pid=5' into fields; values may contain spaces."""
    out: dict[str, object] = {}
    marks = list(_KV.finditer(info))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(info)
        value = info[m.end():end].strip()
        if value.endswith("==>"):
            value = value[:-3].strip()
        out[m.group(1)] = _number(value)
    return out


def _number(text: str) -> object:
    """Integers where the text is one (decimal, even zero-padded like '017', or 0x hex), else the text."""
    if re.fullmatch(r"-?\d+", text):
        return int(text, 10)
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    return text


def _search(pattern: str, info: str) -> re.Match[str] | None:
    return re.search(pattern, info)


def decode_fields(name: str, info: str) -> dict[str, object]:
    """Fields of the events the report reads; key=value for the rest.

    KVM's events print free text (``mmio write len 4 gpa 0x... val 0x...``)
    and the text has changed between kernel versions, so each decoder looks
    for the words it needs rather than for a whole fixed format.
    """
    try:
        decoder = _DECODERS.get(name)
        if decoder is not None:
            return decoder(info)
        return parse_key_values(info)
    except (ValueError, IndexError, AttributeError):
        return {}


def _vcpu(info: str, out: dict[str, object]) -> None:
    m = _search(r"\bvcpu (\d+)", info)
    if m:
        out["vcpu"] = int(m.group(1))


def _entry(info: str) -> dict[str, object]:
    out: dict[str, object] = {}
    _vcpu(info, out)
    m = _search(r"\brip (0x[0-9a-fA-F]+)", info)
    if m:
        out["rip"] = int(m.group(1), 16)
    return out


def _exit(info: str) -> dict[str, object]:
    out = _entry(info)
    m = _search(r"\breason (\S+)", info)
    if m:
        out["reason"] = m.group(1)
    return out


def _mmio(info: str) -> dict[str, object]:
    m = _search(r"mmio (\S+) len (\d+) gpa (0x[0-9a-fA-F]+)(?: val (0x[0-9a-fA-F]+))?", info)
    if not m:
        return {}
    out: dict[str, object] = {"op": m.group(1), "len": int(m.group(2)), "gpa": int(m.group(3), 16)}
    if m.group(4):
        out["val"] = int(m.group(4), 16)
    return out


def _apic(info: str) -> dict[str, object]:
    m = _search(r"apic_(read|write) (\S+)(?: = (0x[0-9a-fA-F]+))?", info)
    if not m:
        return {}
    out: dict[str, object] = {"op": m.group(1), "reg": m.group(2)}
    if m.group(3):
        out["val"] = int(m.group(3), 16)
    return out


def _pio(info: str) -> dict[str, object]:
    m = _search(r"pio_(read|write) at (0x[0-9a-fA-F]+) size (\d+) count (\d+)(?: val (0x[0-9a-fA-F]+))?", info)
    if not m:
        return {}
    out: dict[str, object] = {
        "op": m.group(1), "port": int(m.group(2), 16), "size": int(m.group(3)), "count": int(m.group(4)),
    }
    if m.group(5):
        out["val"] = int(m.group(5), 16)
    return out


def _msr(info: str) -> dict[str, object]:
    m = _search(r"msr_(read|write) ([0-9a-fA-F]+)(?: = (0x[0-9a-fA-F]+))?", info)
    if not m:
        return {}
    out: dict[str, object] = {"op": m.group(1), "msr": int(m.group(2), 16)}
    if m.group(3):
        out["val"] = int(m.group(3), 16)
    out["gp"] = "(#GP)" in info
    return out


def _userspace_exit(info: str) -> dict[str, object]:
    m = _search(r"reason (\S+)(?: \((-?\d+)\))?", info)
    if not m:
        return {}
    out: dict[str, object] = {"reason": m.group(1)}
    if m.group(2):
        out["code"] = int(m.group(2))
    return out


def _emulate(info: str) -> dict[str, object]:
    m = _search(r"^([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F ]*)(?:\((\w+)\))?", info)
    if not m:
        return {}
    return {
        "csbase": int(m.group(1), 16), "rip": int(m.group(2), 16),
        "insn": m.group(3).strip(), "mode": m.group(4) or "", "failed": info.endswith("failed"),
    }


def _inj_virq(info: str) -> dict[str, object]:
    m = _search(r"(?:irq|IRQ|Soft/INTn) (0x[0-9a-fA-F]+|\d+)", info)
    return {"vector": int(m.group(1), 0)} if m else {}


_DECODERS = {
    "kvm_entry": _entry,
    "kvm_exit": _exit,
    "kvm_mmio": _mmio,
    "kvm_apic": _apic,
    "kvm_pio": _pio,
    "kvm_msr": _msr,
    "kvm_userspace_exit": _userspace_exit,
    "kvm_emulate_insn": _emulate,
    "kvm_inj_virq": _inj_virq,
}
