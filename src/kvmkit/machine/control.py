"""A running VM's control socket: the command table (docs/api.md) and how the CLI shows its replies.

The socket's mechanics (where it lives, the line protocol, the limits on
clients) are host/control.py's; this module only maps a request to a
:class:`Machine` call. Commands run on the socket's client threads, never on
a vCPU thread; the ones that change the VM's state run one at a time, so two
scripts pausing and resuming at once cannot interleave inside the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import KvmkitError
from ..host.control import ControlSocket, NameInUse, check_private_dir, control_dir

if TYPE_CHECKING:
    from .machine import Machine

COMMANDS = ("info", "pause", "resume", "stop", "stats", "snapshot")
STATS_SETTLE_S = 0.25  # the most a stats request waits for the vCPUs to flush their tallies
KICK_INTERVAL_S = 0.005
BUSY_WAIT_S = 10.0     # how long a state change waits for another one (a pause takes at most 5 s)
STOP_TIMEOUT_S = 30    # how long `stop` waits for the guest's own shutdown before it forces one
MAX_STOP_TIMEOUT_S = 600
STOP_POLL_S = 0.05


class ControlServer:
    """The control socket of one VM: ``start()`` before ``machine.run()``, ``close()`` on every way out."""

    def __init__(self, machine: "Machine", name: str | None = None, directory: Path | None = None,
                 **limits: Any) -> None:
        """``name`` None picks an unused ``vm-XXXX``; ``limits`` go to :class:`ControlSocket` (the tests shorten them)."""
        self.machine = machine
        self.name = name
        self.directory = directory
        self.limits = limits
        self.socket: ControlSocket | None = None
        self._busy = threading.Lock()
        self._table: dict[str, tuple[Callable[..., dict[str, Any]], dict[str, type]]] = {
            "info": (self._info, {}), "pause": (self._pause, {}), "resume": (self._resume, {}),
            "stop": (self._stop, {}), "stats": (self._stats, {}), "snapshot": (self._snapshot, {"dir": str}),
        }
        # Arguments a command may leave out (the handler has the default).
        self._optional: dict[str, dict[str, type]] = {"stop": {"timeout": int, "force": bool}}

    @property
    def path(self) -> Path | None:
        return self.socket.path if self.socket is not None else None

    def start(self) -> Path:
        """Bind the socket (one sentence if the name is taken or the directory unsafe) and serve it."""
        if self.directory is None:
            directory = control_dir(create=True)
        else:
            directory = self.directory
            check_private_dir(directory, create=True)
        if self.name is not None:
            sock = ControlSocket(directory, self.name, self.handle, **self.limits)
        else:
            sock = self._bind_generated(directory)
        self.socket = sock
        self.name = sock.name
        self.machine.name = sock.name
        sock.start()
        return sock.path

    def _bind_generated(self, directory: Path) -> ControlSocket:
        for _ in range(64):
            name = f"vm-{secrets.token_hex(2)}"
            if (directory / f"{name}.sock").exists():
                continue  # not even a stale one: someone may be about to come back for it
            try:
                return ControlSocket(directory, name, self.handle, **self.limits)
            except NameInUse:
                continue
        raise KvmkitError(f"no unused VM name was found in {directory}; give one with --name.")

    def close(self) -> None:
        """Stop serving and remove the socket; safe to call twice, or before :meth:`start`."""
        if self.socket is not None:
            self.socket.close()

    # --- the command table --------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The reply's fields for one request object; a KvmkitError is the error reply."""
        cmd = request.get("cmd")
        if not isinstance(cmd, str):
            raise KvmkitError('the request has no "cmd" string; send e.g. {"cmd": "info"}.')
        entry = self._table.get(cmd)
        if entry is None:
            shown = cmd if len(cmd) <= 40 else cmd[:40] + "..."
            raise KvmkitError(f"unknown command {shown!r}; the commands are {', '.join(COMMANDS)}.")
        fn, spec = entry
        optional = self._optional.get(cmd, {})
        args = {k: v for k, v in request.items() if k != "cmd"}
        for key in args:
            if key not in spec and key not in optional:
                names = [*spec, *optional]
                takes = f"it takes {', '.join(names)}" if names else "it takes none"
                raise KvmkitError(f"{cmd!r} has no argument {key[:40]!r}; {takes}.")
        for key, typ in spec.items():
            if key not in args:
                raise KvmkitError(f"{cmd!r} needs the argument {key!r}.")
        for key, typ in {**spec, **optional}.items():
            # bool is an int in Python; a JSON true is not a number of seconds
            if key in args and (not isinstance(args[key], typ) or (typ is int and isinstance(args[key], bool))):
                raise KvmkitError(f"the argument {key!r} of {cmd!r} must be {_JSON_TYPES[typ]}, "
                                  f"not {_JSON_NAMES.get(type(args[key]), 'that')}.")
        return fn(**args)

    def _require_started(self) -> None:
        if self.machine.state == "created":
            raise KvmkitError("the VM has not started yet; try again in a moment.")

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if not self._busy.acquire(timeout=BUSY_WAIT_S):
            raise KvmkitError(f"another control command is still changing the VM; {what} was not done, try again.")
        try:
            yield
        finally:
            self._busy.release()

    def _info(self) -> dict[str, Any]:
        m = self.machine
        started = m.started_at
        return {"name": self.name, "pid": os.getpid(), "state": m.state, "cpus": m.config.cpus,
                "memory": m.config.mem_size, "uptime_s": round(time.time() - started, 3) if started else None,
                "kernel": str(m.config.kernel) if m.config.kernel is not None else "bundled guest"}

    def _pause(self) -> dict[str, Any]:
        self._require_started()
        with self._exclusive("the pause"):
            self.machine.pause()
        return {"state": self.machine.state}

    def _resume(self) -> dict[str, Any]:
        self._require_started()
        if self.machine.state == "stopped":
            raise KvmkitError("the VM has stopped; there is nothing to resume.")
        with self._exclusive("the resume"):
            self.machine.resume()
        return {"state": self.machine.state}

    def _stop(self, timeout: int = STOP_TIMEOUT_S, force: bool = False) -> dict[str, Any]:
        """The guest's own shutdown first (Ctrl-Alt-Del, where it has a keyboard driver), then a hard stop.

        Waits up to ``timeout`` seconds for the guest to end the VM itself;
        ``force`` (or a paused VM, or a guest with no keyboard driver) goes
        straight to the hard stop. The reply says which it was.
        """
        if not 0 <= timeout <= MAX_STOP_TIMEOUT_S:
            raise KvmkitError(f'"timeout" must be 0 to {MAX_STOP_TIMEOUT_S} seconds, not {timeout}.')
        m = self.machine
        if m.state == "stopped":
            return {"state": "stopped", "by": "already stopped", "message": m.stop_message}
        ask = getattr(m, "request_shutdown", None)
        asked = bool(not force and ask is not None and ask())
        if asked:
            deadline = time.monotonic() + timeout
            while m.state != "stopped" and time.monotonic() < deadline:
                time.sleep(STOP_POLL_S)
        if asked and m.state == "stopped":
            return {"state": "stopped", "by": "guest", "message": m.stop_message}
        why = f" (the guest did not shut down within {timeout} s of Ctrl-Alt-Del)" if asked else ""
        m.request_stop(0, f"stopped by 'kvmkit stop'{why}")
        return {"state": "stopped", "by": "host", "message": m.stop_message}

    def _stats(self) -> dict[str, Any]:
        """Figures to the moment: each vCPU flushes its tallies when a kick brings it out of KVM_RUN.

        A kick that lands while a vCPU is in kvmkit's exit handler rather
        than in KVM_RUN does nothing, so the kick is repeated (within
        STATS_SETTLE_S) until every vCPU's kick count has moved. A paused
        vCPU flushed when it parked.
        """
        self._require_started()
        m = self.machine
        if m.state == "running":
            before = _kicks(m.stats_dict())
            deadline = time.monotonic() + STATS_SETTLE_S
            while True:
                m.kick_all()
                time.sleep(KICK_INTERVAL_S)
                now = _kicks(m.stats_dict())
                if all(now.get(v, 0) > n for v, n in before.items()) or time.monotonic() >= deadline:
                    break
        return {"stats": m.stats_dict()}

    def _snapshot(self, dir: str) -> dict[str, Any]:
        snapshot = getattr(self.machine, "snapshot", None)
        if snapshot is None:
            raise KvmkitError("this kvmkit cannot snapshot.")
        if not os.path.isabs(dir):
            raise KvmkitError(f'"dir" must be an absolute path, not {dir[:200]!r}.')
        self._require_started()
        with self._exclusive("the snapshot"):
            result = snapshot(Path(dir))
        return {"snapshot": result if isinstance(result, dict) else {"result": result}}


_JSON_TYPES = {str: "a string", int: "an integer", bool: "true or false"}
_JSON_NAMES = {str: "a string", int: "an integer", bool: "a boolean", float: "a number with a fraction",
               list: "a list", dict: "an object", type(None): "null"}


def _kicks(stats: dict[str, Any]) -> dict[Any, int]:
    return {v.get("vcpu"): v.get("kicks", 0) for v in stats.get("vcpus", [])}


# --- what the CLI prints ----------------------------------------------------------------------
def format_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_vm_table(infos: list[dict[str, Any]]) -> str:
    """``kvmkit list``: NAME PID STATE CPUS MEMORY UPTIME, one VM a line."""
    rows = [("NAME", "PID", "STATE", "CPUS", "MEMORY", "UPTIME")]
    for i in infos:
        rows.append((str(i.get("name")), str(i.get("pid")), str(i.get("state")), str(i.get("cpus")),
                     format_size(i["memory"]) if isinstance(i.get("memory"), int) else "?",
                     format_uptime(i.get("uptime_s") if isinstance(i.get("uptime_s"), (int, float)) else None)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _seconds(ns: Any) -> str:
    return f"{ns / 1e9:.3f} s" if isinstance(ns, (int, float)) else "?"


def format_stats(stats: dict[str, Any], top: int = 5) -> str:
    """``kvmkit stats``: per vCPU, exits by reason and the busiest ports; then the console streams."""
    lines: list[str] = []
    for v in stats.get("vcpus", []):
        exits: dict[str, int] = v.get("exits", {})
        lines.append(f"vCPU {v.get('vcpu')}: {sum(exits.values())} userspace exits, {v.get('kicks', 0)} kicks; "
                     f"in KVM_RUN {_seconds(v.get('run_ns'))}, in kvmkit {_seconds(v.get('handler_ns'))}")
        lines.append(f"  {'exit reason':<24}{'count':>12}")
        for reason, n in sorted(exits.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason:<24}{n:>12}")
        pio: dict[str, int] = v.get("pio", {})
        if pio:
            lines.append(f"  {'top ports':<24}{'count':>12}")
            for port, n in sorted(pio.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {port.replace('/', ' '):<24}{n:>12}")
        mmio: dict[str, int] = v.get("mmio", {})
        if mmio:
            lines.append(f"  {'top mmio pages':<24}{'count':>12}")
            for page, n in sorted(mmio.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {page.replace('/', ' '):<24}{n:>12}")
    for name, c in stats.get("ports", {}).items():
        lines.append(f"{name}: {c.get('host_bytes_out', 0)} bytes out in {c.get('host_writes', 0)} host writes, "
                     f"{c.get('host_bytes_in', 0)} bytes in")
    for name, c in stats.get("net", {}).items():
        dev = c.get("device", {})
        drops = sum(dev.get("drops", {}).values())
        lines.append(f"{name} ({c.get('mac')}, {c.get('backend')}): tx {dev.get('tx_frames', 0)} frames, "
                     f"rx {dev.get('rx_frames', 0)} frames, {drops} dropped" + (f"; down: {c['down']}" if c.get("down") else ""))
    return "\n".join(lines)
