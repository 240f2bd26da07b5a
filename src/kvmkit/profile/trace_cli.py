"""``kvmkit trace report`` and the library half of ``kvmkit trace record``.

The CLI package only parses arguments; it calls :func:`report_main` for
``trace report`` and, for ``trace record -- <run arguments>``, splits the
arguments with :func:`parse_record_args` and hands a ``run`` callable to
:func:`record`, which traces this process and every thread it starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Callable

from kvmkit.errors import KvmkitError
from kvmkit.profile import ftrace, svgplot, trace_report
from kvmkit.profile.tracefs import TraceSession, own_instance_name

DEFAULT_EVENTS: list[str] = [
    "kvm:*",
    "timer:hrtimer_*",
    "sched:sched_switch",
    "sched:sched_wakeup",
]
DEFAULT_OUTPUT = Path("kvmkit.trace")


def report_main(argv: list[str]) -> int:
    """``kvmkit trace report FILE [--json] [--plot FILE.svg]``; returns the exit status."""
    p = argparse.ArgumentParser(prog="kvmkit trace report",
                                description="Guest and host time per exit, access and sequence from an ftrace text file.")
    p.add_argument("file", type=Path, help="ftrace text (tracing/trace or trace-cmd report output); '-' for stdin")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", type=Path, metavar="FILE.svg",
                   help="also draw the timeline as SVG (event rates over time if the trace has no kvm_entry/kvm_exit)")
    args = p.parse_args(argv)
    try:
        if str(args.file) == "-":
            text = sys.stdin.read()
        else:
            text = args.file.read_text(errors="replace")
    except OSError as exc:
        print(f"kvmkit: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    analysis = trace_report.analyze(ftrace.parse(text))
    if args.json:
        print(trace_report.render_json(analysis))
    else:
        print(trace_report.render_text(analysis, str(args.file)), end="")
    if args.plot:
        try:
            args.plot.write_text(svgplot.render_svg(analysis.timeline, analysis.unit, trace=analysis.trace))
        except OSError as exc:
            print(f"kvmkit: cannot write {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        # stderr, so that --json output stays one JSON document
        print(f"kvmkit: wrote {svgplot.plot_kind(analysis.timeline, analysis.trace)} to {args.plot}", file=sys.stderr)
    return 0


def parse_record_args(argv: list[str]) -> tuple[Path, list[str]]:
    """Split ``[-o FILE] -- <run arguments>`` into the output path and the run arguments."""
    if "--" in argv:
        at = argv.index("--")
        own, rest = argv[:at], argv[at + 1:]
    else:
        own, rest = argv, []
    p = argparse.ArgumentParser(prog="kvmkit trace record",
                                usage="kvmkit trace record [-o FILE] -- <kvmkit run arguments>")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    args, extra = p.parse_known_args(own)
    return args.output, extra + rest


def record(
    run: Callable[[], int],
    output: Path,
    events: list[str] = DEFAULT_EVENTS,
    buffer_kb: int = 16384,
    clock: str = "mono",
) -> int:
    """Trace this process (and threads it starts) while ``run()`` runs; returns its status.

    The trace is saved even when ``run`` raises, because a crashing VM is
    exactly the run one wants a trace of; settings are restored in any
    case, and SIGTERM is turned into an exception while tracing so that a
    plain ``kill`` cannot leave tracing configured.
    """
    installed, old_term = _catch_sigterm()
    try:
        # A private instance (instances/kvmkit-PID): nothing global changes, so even a
        # capture killed with SIGKILL leaves the host's tracing as it was; a later run
        # removes the instance a dead capture left.
        with TraceSession(list(events), [os.getpid()], buffer_kb=buffer_kb, clock=clock, event_fork=True,
                          instance=own_instance_name()) as session:
            if session.missing:
                print(f"kvmkit: trace events not on this kernel: {', '.join(session.missing)}", file=sys.stderr)
            try:
                status = run()
            finally:
                try:
                    session.save(output)
                except OSError as exc:
                    raise KvmkitError(f"cannot write the trace to {output}: {exc.strerror or exc}") from exc
        return status
    finally:
        if installed:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)


def _catch_sigterm() -> tuple[bool, object]:
    """Make SIGTERM raise SystemExit (runs finally blocks); only possible on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False, None

    def _term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    return True, signal.signal(signal.SIGTERM, _term)
