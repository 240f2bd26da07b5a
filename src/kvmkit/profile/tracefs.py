"""A tracefs capture that leaves the machine's tracing as it found it.

Tracing state is global and shared with every other tool on the host
(trace-cmd, perf, a colleague's debugging session): a capture that leaves
events enabled or a pid filter behind silently breaks the next person's
trace. So a :class:`TraceSession` snapshots every setting it is about to
touch, changes them, and on every way out of the ``with`` block (return,
exception, KeyboardInterrupt) writes each one back, continuing past a
failed restore so that one stuck file does not leave the others changed.
It mounts tracefs if it is not mounted and unmounts it again afterwards.

With ``instance=NAME`` the capture runs in its own ftrace instance
(``instances/NAME``), which is created and removed again, so the global
buffer and settings are not touched at all.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
from pathlib import Path
from types import TracebackType

from kvmkit.errors import KvmkitError

TRACEFS_MOUNTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# Files whose value the session changes; set_event is handled separately
# because it is a list that must be rebuilt, not overwritten.
SETTINGS = ("tracing_on", "current_tracer", "trace_clock", "buffer_size_kb",
            "set_event_pid", "options/event-fork")


class TraceError(KvmkitError):
    """Tracing could not be set up or read."""


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, value: str, append: bool = False) -> None:
    """Write one value as echo does: newline-terminated, with plain open/write.

    Python's append mode seeks to the end, which tracefs files refuse
    (EINVAL), so this goes through os.open with O_APPEND instead.
    """
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags)
        try:
            if value:
                os.write(fd, (value + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise TraceError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def current_choice(text: str) -> str:
    """'[local] global mono' -> 'local': tracefs marks the active choice in brackets."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


def buffer_kb_value(text: str) -> str:
    """'7 (expanded: 1408)' -> '1408'.

    An unused buffer reports its minimal size and the size it will have
    once expanded; the kernel offers no way back to the unexpanded state,
    so the expanded size is the value to restore.
    """
    text = text.strip()
    if "(expanded:" in text:
        return text.split("(expanded:", 1)[1].strip(" )")
    return text


def find_tracefs() -> Path | None:
    """The mounted tracefs directory, if any."""
    for path in TRACEFS_MOUNTS:
        if (path / "trace").exists() and (path / "set_event").exists():
            return path
    return None


INSTANCE_PREFIX = "kvmkit-"


def own_instance_name(pid: int | None = None) -> str:
    """The private ftrace instance of one kvmkit process: ``kvmkit-PID``."""
    return f"{INSTANCE_PREFIX}{pid if pid is not None else os.getpid()}"


def remove_stale_instances(root: Path) -> list[str]:
    """Remove ``kvmkit-PID`` instances whose process is gone (a capture killed with SIGKILL); their names."""
    removed = []
    try:
        entries = list((root / "instances").iterdir())
    except OSError:
        return removed
    for path in entries:
        name = path.name
        if not name.startswith(INSTANCE_PREFIX) or not name[len(INSTANCE_PREFIX):].isdigit():
            continue
        pid = int(name[len(INSTANCE_PREFIX):])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            path.rmdir()
            removed.append(name)
        except OSError:
            pass
    return removed


def snapshot(root: Path) -> dict[str, str]:
    """The settings a session changes, normalised so they compare equal when restored."""
    snap: dict[str, str] = {}
    for name in SETTINGS:
        path = root / name
        if not path.exists():
            continue
        text = _read(path)
        if name == "trace_clock" or name == "current_tracer":
            text = current_choice(text)
        elif name == "buffer_size_kb":
            text = buffer_kb_value(text)
        elif name == "set_event_pid":
            text = " ".join(sorted(text.split(), key=int))
        snap[name] = text.strip()
    snap["set_event"] = "\n".join(sorted(_read(root / "set_event").split()))
    return snap


class TraceSession:
    """Enable ``events`` for ``pids`` (and, with event_fork, their later threads).

    Use as a context manager; inside, call :meth:`save` or :meth:`read_text`
    once the traced work is done. Patterns such as ``"kvm:*"`` or
    ``"timer:hrtimer_*"`` are expanded against available_events; patterns
    that match nothing are listed in :attr:`missing`.
    """

    def __init__(
        self,
        events: list[str],
        pids: list[int],
        buffer_kb: int = 8192,
        clock: str = "mono",
        event_fork: bool = True,
        instance: str | None = None,
    ) -> None:
        self.patterns = list(events)
        self.pids = list(pids)
        self.buffer_kb = buffer_kb
        self.clock = clock
        self.event_fork = event_fork
        self.instance = instance
        self.root: Path | None = None
        self.dir: Path | None = None
        self.enabled: list[str] = []
        self.missing: list[str] = []
        self._saved: dict[str, str] | None = None
        self._mounted: Path | None = None
        self._made_instance = False

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> "TraceSession":
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close(raise_errors=et is None)

    def start(self) -> None:
        """Mount, snapshot, configure and turn tracing on; undo it all on failure."""
        if os.geteuid() != 0:
            raise TraceError("kvmkit trace needs root: tracefs settings can only be changed by root (run it with sudo).")
        try:
            self.root = self._mount()
            self.dir = self._instance_dir(self.root)
            self._saved = snapshot(self.dir)
            self._configure(self.dir)
        except BaseException:
            self.close(raise_errors=False)
            raise

    def _mount(self) -> Path:
        found = find_tracefs()
        if found is not None:
            return found
        target = TRACEFS_MOUNTS[0]
        try:
            proc = subprocess.run(["mount", "-t", "tracefs", "nodev", str(target)],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise TraceError(f"tracefs is not available: cannot run mount ({exc}).") from exc
        if proc.returncode != 0 or find_tracefs() is None:
            why = proc.stderr.strip() or "no trace files after mounting"
            raise TraceError(f"tracefs is not available: mounting it on {target} failed ({why}).")
        self._mounted = target
        return target

    def _instance_dir(self, root: Path) -> Path:
        if self.instance is None:
            return root
        remove_stale_instances(root)
        path = root / "instances" / self.instance
        try:
            path.mkdir()
        except OSError as exc:
            raise TraceError(f"cannot create ftrace instance {path}: {exc.strerror or exc}") from exc
        self._made_instance = True
        return path

    def _configure(self, d: Path) -> None:
        _write(d / "tracing_on", "0")
        if (d / "current_tracer").exists():
            _write(d / "current_tracer", "nop")
        _write(d / "trace_clock", self.clock)
        _write(d / "buffer_size_kb", str(self.buffer_kb))
        self.enabled, self.missing = expand_events(self.root or d, self.patterns)
        if not self.enabled:
            raise TraceError(f"none of the trace events {self.patterns} exist on this kernel.")
        _write(d / "set_event", "")  # truncate: only our events
        for name in self.enabled:
            _write(d / "set_event", name, append=True)
        _write(d / "options/event-fork", "1" if self.event_fork else "0")
        _write(d / "set_event_pid", " ".join(str(p) for p in self.pids))
        _write(d / "trace", "")  # clear the buffer
        _write(d / "tracing_on", "1")

    def stop(self) -> None:
        """Stop recording; the buffer stays readable."""
        if self.dir is not None and self._saved is not None:
            _write(self.dir / "tracing_on", "0")

    def read_text(self) -> str:
        """The buffer as ftrace text (non-consuming read of ``trace``); stops recording first."""
        if self.dir is None:
            raise TraceError("the trace session is not started.")
        self.stop()
        return _read(self.dir / "trace")

    def save(self, path: Path | str) -> int:
        """Write the buffer to ``path`` with a header naming the clock; returns bytes written."""
        text = self.read_text()
        header = (f"# kvmkit trace: events={len(self.enabled)} pids={' '.join(map(str, self.pids))}\n"
                  f"# trace_clock: {self.clock}\n")
        data = header + text
        Path(path).write_text(data)
        return len(data)

    def close(self, raise_errors: bool = True) -> None:
        """Restore every saved setting, remove the instance, unmount what we mounted."""
        errors: list[str] = []
        d, saved = self.dir, self._saved
        if d is not None and saved is not None and not self._made_instance:
            errors += restore(d, saved)
        if self._made_instance and d is not None:
            try:
                _write(d / "tracing_on", "0")
                d.rmdir()
            except (OSError, TraceError) as exc:
                errors.append(f"cannot remove instance {d}: {exc}")
            self._made_instance = False
        if self._mounted is not None:
            proc = subprocess.run(["umount", str(self._mounted)], capture_output=True, text=True)
            if proc.returncode != 0:
                errors.append(f"cannot unmount {self._mounted}: {proc.stderr.strip()}")
            self._mounted = None
        self._saved = None
        self.dir = None
        if errors and raise_errors:
            raise TraceError("tracing settings were not all restored: " + "; ".join(errors))


def expand_events(d: Path, patterns: list[str]) -> tuple[list[str], list[str]]:
    """Match 'system:event' globs against available_events (set_event takes no globs).

    ``d`` is the tracefs root: instances have no available_events of their own.
    """
    available = _read(d / "available_events").split()
    enabled: list[str] = []
    missing: list[str] = []
    for pat in patterns:
        full = pat if ":" in pat else f"*:{pat}"
        hits = [e for e in available if fnmatch.fnmatchcase(e, full)]
        if not hits:
            missing.append(pat)
        enabled += [h for h in hits if h not in enabled]
    return enabled, missing


def restore(d: Path, saved: dict[str, str]) -> list[str]:
    """Write saved settings back, tracing_on last; returns the failures."""
    errors: list[str] = []

    def attempt(name: str, value: str, append: bool = False) -> None:
        try:
            _write(d / name, value, append)
        except TraceError as exc:
            errors.append(str(exc))

    attempt("tracing_on", "0")
    attempt("set_event_pid", saved.get("set_event_pid", ""))
    attempt("set_event", "")
    for name in saved.get("set_event", "").split():
        attempt("set_event", name, append=True)
    for name in ("options/event-fork", "trace_clock", "current_tracer", "buffer_size_kb"):
        if name in saved:
            attempt(name, saved[name])
    if "tracing_on" in saved:
        attempt("tracing_on", saved["tracing_on"])
    return errors
