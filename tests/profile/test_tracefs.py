"""TraceSession on the live machine: it captures, and it puts everything back.

Needs root and tracefs (mountable here), not /dev/kvm; skips with the reason
otherwise. Settings are compared before and after as the kernel reports them.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmkit.profile import ftrace, tracefs, trace_cli
from kvmkit.profile.tracefs import TraceError, TraceSession

EVENTS = ["timer:hrtimer_*", "sched:sched_switch", "sched:sched_wakeup"]
CHILD = """\
import sys, threading, time
sys.stdin.readline()  # wait until tracing is on
print(threading.get_native_id(), flush=True)
for _ in range(10):
    time.sleep(0.005)
t = threading.Thread(target=lambda: (print(threading.get_native_id(), flush=True), time.sleep(0.01)))
t.start(); t.join()
"""


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to change tracefs settings"
    if tracefs.find_tracefs() is not None:
        return None
    probe = subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"tracefs cannot be mounted: {probe.stderr.strip()}"
    subprocess.run(["umount", "/sys/kernel/tracing"], check=True)
    return None


REASON = _usable()
live = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def _settings() -> tuple[dict[str, str], str]:
    """Settings as the kernel reports them; tracefs state outlives unmounting, so mount to look."""
    root = tracefs.find_tracefs()
    if root is not None:
        return tracefs.snapshot(root), (root / "buffer_size_kb").read_text().strip()
    subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=True)
    try:
        return _settings()
    finally:
        subprocess.run(["umount", "/sys/kernel/tracing"], check=True)


def _state() -> tuple[bool, dict[str, str], str]:
    """(mounted?, settings, raw buffer_size_kb)."""
    mounted = tracefs.find_tracefs() is not None
    return (mounted, *_settings())


def _assert_restored(before: tuple[bool, dict[str, str], str]) -> None:
    mounted, settings, raw_kb = before
    assert (tracefs.find_tracefs() is not None) == mounted
    after, _ = _settings()
    settings = dict(settings)
    if "expanded" in raw_kb:
        # An unexpanded buffer cannot be put back; the kernel rounds the expanded size to pages.
        assert abs(int(after.pop("buffer_size_kb")) - int(settings.pop("buffer_size_kb"))) <= 16
    assert after == settings


@live
def test_session_captures_only_the_child_and_its_threads_then_restores() -> None:
    before = _state()
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with TraceSession(EVENTS + ["nosuch:event"], [child.pid], buffer_kb=1024) as session:
        assert session.missing == ["nosuch:event"]
        assert "timer:hrtimer_start" in session.enabled
        d = session.dir
        assert d is not None
        assert (d / "tracing_on").read_text().strip() == "1"
        assert (d / "options/event-fork").read_text().strip() == "1"
        assert (d / "set_event_pid").read_text().split() == [str(child.pid)]
        assert tracefs.current_choice((d / "trace_clock").read_text()) == "mono"
        out, _ = child.communicate("go\n", timeout=30)
        text = session.read_text()
    _assert_restored(before)
    tids = {int(x) for x in out.split()}
    assert child.pid in tids and len(tids) == 2
    trace = ftrace.parse(text)
    starts = [e for e in trace.events if e.name == "hrtimer_start"]
    assert len(starts) >= 10  # one per nanosleep at least
    assert {e.pid for e in starts} <= tids  # the pid filter held
    assert any(e.pid in tids - {child.pid} for e in trace.events)  # event-fork took in the later thread
    assert trace.malformed == 0


@live
def test_settings_are_restored_when_the_body_raises() -> None:
    before = _state()
    with pytest.raises(RuntimeError, match="boom"):
        with TraceSession(EVENTS, [os.getpid()], buffer_kb=2048, clock="global"):
            raise RuntimeError("boom")
    _assert_restored(before)


@live
def test_instance_session_leaves_global_settings_alone() -> None:
    before = _state()
    name = f"kvmkit-test-{os.getpid()}"
    with TraceSession(EVENTS, [os.getpid()], buffer_kb=256, instance=name) as session:
        assert session.dir is not None and session.dir.name == name
        assert tracefs.snapshot(session.root) == before[1]  # type: ignore[arg-type]
        time.sleep(0.02)
        text = session.read_text()
    assert any(e.name == "hrtimer_start" and e.pid == threading.get_native_id() for e in ftrace.parse(text).events)
    root = tracefs.find_tracefs()
    assert root is None or not (root / "instances" / name).exists()
    _assert_restored(before)


@live
def test_record_traces_the_run_and_restores(tmp_path: Path) -> None:
    before = _state()
    out = tmp_path / "run.trace"
    seen: list[int] = []

    def run() -> int:
        t = threading.Thread(target=lambda: (seen.append(threading.get_native_id()), time.sleep(0.01)))
        t.start()
        t.join()
        return 3

    assert trace_cli.record(run, out, events=EVENTS, buffer_kb=1024) == 3
    _assert_restored(before)
    trace = ftrace.parse(out.read_text())
    assert trace.clock == "mono"
    assert any(e.pid == seen[0] for e in trace.events)  # a thread started inside run() is traced

    def crash() -> int:
        raise ValueError("vm died")

    with pytest.raises(ValueError):
        trace_cli.record(crash, out, events=EVENTS, buffer_kb=1024)
    assert out.read_text().startswith("# kvmkit trace")
    _assert_restored(before)


def test_not_root_is_one_clear_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(TraceError, match="needs root"):
        with TraceSession(EVENTS, [1]):
            pass


def test_tracefs_unavailable_is_one_clear_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(tracefs, "find_tracefs", lambda: None)
    failed = subprocess.CompletedProcess(["mount"], 32, "", "mount: permission denied")
    monkeypatch.setattr(tracefs.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(TraceError, match="tracefs is not available.*permission denied"):
        with TraceSession(EVENTS, [1]):
            pass


def test_setting_parsers() -> None:
    assert tracefs.current_choice("[local] global counter x86-tsc") == "local"
    assert tracefs.current_choice("local global [x86-tsc]") == "x86-tsc"
    assert tracefs.buffer_kb_value("7 (expanded: 1408)") == "1408"
    assert tracefs.buffer_kb_value("4096\n") == "4096"


def test_a_capture_killed_with_sigkill_changes_nothing_global_and_its_instance_is_removed_later() -> None:
    """Issue 12, item 15: `kvmkit trace record` records in instances/kvmkit-PID, never in the global buffer."""
    from kvmkit.profile.tracefs import find_tracefs
    root = find_tracefs()
    mounted = None
    if root is None:
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"]).returncode:
            pytest.skip("tracefs is not available")
        root = mounted = find_tracefs()
        assert root is not None
    try:
        _killed_capture_leaves_nothing(root)
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)])


def _killed_capture_leaves_nothing(root: Path) -> None:
    import signal
    import subprocess
    import sys
    from kvmkit.profile.tracefs import own_instance_name, snapshot
    before = snapshot(root)
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, time\n"
        "from kvmkit.profile.tracefs import TraceSession, own_instance_name\n"
        "s = TraceSession(['kvm:kvm_exit'], [os.getpid()], buffer_kb=256, instance=own_instance_name())\n"
        "s.start(); print('tracing', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "tracing"
        assert (root / "instances" / own_instance_name(child.pid)).is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert snapshot(root) == before  # the global settings were never touched
    with TraceSession(["kvm:kvm_exit"], [os.getpid()], buffer_kb=256, instance=own_instance_name()):
        pass
    assert not (root / "instances" / own_instance_name(child.pid)).exists()
