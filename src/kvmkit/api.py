"""The Python API: start a VM, talk to its console, stop it.

Meant for tests and scripts::

    with kvmkit.VirtualMachine(script="echo hello; poweroff 3") as vm:
        vm.console.wait_for("hello")
        assert vm.wait(30) == 3          # returns once the console holds all the guest wrote
    assert "hello" in vm.console.text

The console is COM1 connected to a socket pair; a reader thread collects
everything the guest prints so ``wait_for`` never misses output that came
before it was called. :meth:`VirtualMachine.wait` returns only when the
guest's last bytes have reached :attr:`VirtualMachine.console`: the serial
port batches output for a few milliseconds (machine/stream.py), so a VM
that stops right after printing still has its last line on the way when
its vCPUs stop, and ``wait`` flushes it through before it returns.

The API's two timeouts are both a :class:`TimeoutError` and a
:class:`~kvmkit.errors.KvmkitError` (a sentence for the user):
:class:`ConsoleTimeout` when text does not appear on the console,
:class:`VmTimeout` when the VM does not stop in time.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import KvmkitError
from .host.backends import Backend, NullBackend, SocketPairBackend
from .machine.config import DiskSpec, NetSpec, ShareSpec, VmConfig
from .machine.machine import Machine

__all__ = ["ConsoleTap", "ConsoleTimeout", "VirtualMachine", "VmTimeout"]

log = logging.getLogger(__name__)

# Seconds wait() allows the console to drain once the vCPUs have stopped: the
# host ends flush (bounded at 2 s a port by machine/stream.py) and the tap
# reads to the end. Far more than it takes; it only bounds a broken host end.
DRAIN_TIMEOUT = 10.0
# Seconds stop() gives the vCPUs to leave KVM_RUN (they are signalled out at once).
STOP_TIMEOUT = 10.0


class ConsoleTimeout(KvmkitError, TimeoutError):
    """The text did not appear on the console in time (or before the console closed)."""


class VmTimeout(KvmkitError, TimeoutError):
    """The VM did not stop within the time given to :meth:`VirtualMachine.wait`; it is still running."""


class ConsoleTap:
    """The program's end of the VM's console: everything the guest wrote, and a way to type.

    A reader thread takes the guest's output as it comes, so nothing is lost
    between calls: :attr:`text` is all of it so far, :meth:`wait_for` finds
    text in it (waiting for it if need be), :meth:`send` types.
    """

    def __init__(self, sock: socket.socket, on_idle: Callable[[], None] | None = None) -> None:
        """``sock``: the program's end of the console's socket pair. ``on_idle`` is called (without the
        tap's lock) while :meth:`wait_for` waits: the VM uses it to flush and close its end once it has
        stopped, so that a wait for text that will never come ends at once."""
        self.sock = sock
        self._on_idle = on_idle
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._pos = 0
        self._thread = threading.Thread(target=self._reader, name="kvmkit-console-tap", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    @property
    def output(self) -> bytes:
        """Everything the guest wrote to the console so far, as bytes."""
        with self._cond:
            return bytes(self._buf)

    @property
    def text(self) -> str:
        """Everything the guest wrote so far, decoded as UTF-8 (undecodable bytes replaced).

        After :meth:`VirtualMachine.wait` returns it holds the guest's output
        to its last byte.
        """
        return self.output.decode("utf-8", errors="replace")

    @property
    def eof(self) -> bool:
        """True once the VM's end of the console has closed: :attr:`output` is complete and stays as it is."""
        with self._cond:
            return self._eof

    def send(self, data: bytes | str) -> None:
        """Type into the guest (``str`` is sent as UTF-8); the VM takes it as fast as the guest reads it.

        Raises :class:`~kvmkit.errors.KvmkitError` once the VM's end has
        closed (the VM stopped and :meth:`VirtualMachine.wait` flushed it).
        """
        if isinstance(data, str):
            data = data.encode()
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise KvmkitError(f"cannot type into the console: {e.strerror or e}; the VM has stopped "
                              "(its console closed when it did).") from None

    def wait_for(self, pattern: str | bytes | re.Pattern, timeout: float = 30.0, *, since_last: bool = True) -> str:
        """Wait until ``pattern`` (text or regex) appears; returns the output up to and including it.

        With ``since_last`` the search starts after the previous match, so a
        dialogue of prompts and answers reads naturally. Raises
        :class:`ConsoleTimeout`, with the last output in its message, if the
        pattern does not appear within ``timeout`` seconds or before the
        console closes (the VM stopped): a test fails at once with the reason
        rather than at the end of its time.
        """
        if isinstance(pattern, str):
            rx = re.compile(re.escape(pattern.encode()))
        elif isinstance(pattern, bytes):
            rx = re.compile(re.escape(pattern))
        else:
            rx = re.compile(pattern.pattern.encode() if isinstance(pattern.pattern, str) else pattern.pattern)
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                start = self._pos if since_last else 0
                m = rx.search(self._buf, start)
                if m:
                    self._pos = m.end()
                    return self._buf[start:m.end()].decode("utf-8", errors="replace")
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    tail = self._buf[-2000:].decode("utf-8", errors="replace")
                    when = "before the console closed (the VM stopped)" if self._eof else f"within {timeout} s"
                    raise ConsoleTimeout(f"{pattern!r} did not appear on the console {when}; last output:\n{tail}")
                self._cond.wait(min(left, 0.5 if self._on_idle is None else 0.1))
            if self._on_idle is not None:
                self._on_idle()

    def wait_eof(self, timeout: float) -> bool:
        """Wait until the VM's end of the console has closed and all it sent has been read; True if it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Close the program's end (the reader thread ends); :attr:`text` keeps what was read."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=2)
        self.sock.close()


class VirtualMachine:
    """A VM running in this process, its console (:attr:`console`, a :class:`ConsoleTap`) on a socket pair.

    ``kernel=None`` boots the bundled guest; ``script`` is then the list of
    guest commands it runs (after which it powers off, unless the script
    ends with ``shell``). Use it as a context manager (``with`` starts it,
    and stops and closes it on the way out), or call :meth:`start`,
    :meth:`wait` or :meth:`stop`, and :meth:`close`.
    """

    def __init__(self, kernel: str | Path | None = None, initrd: str | Path | None = None,
                 append: str | None = None, script: str | None = None, mem: str | int = "256M",
                 cpus: int = 1, serial_fifo: bool = True, serial_pace: bool = False,
                 extra_ports: list[Backend | None] | None = None,
                 cpuid_clear: dict[tuple[int, str], int] | None = None, quirks: str = "auto",
                 disks: list[str | DiskSpec] | None = None, rng: bool = False, console: str = "serial",
                 virtio_console: Backend | None = None, shares: list[str | ShareSpec] | None = None,
                 net: str | NetSpec | list[str | NetSpec] | None = None) -> None:
        """``extra_ports``: backends for COM2-COM4 (None: no such port). ``disks``: ``PATH[,ro][,serial=ID]``
        strings or DiskSpecs, virtio-blk. ``shares``: ``HOSTDIR[:TAG][,ro]`` strings or ShareSpecs,
        virtio-9p. ``net``: one ``user[,socket=PATH]`` / ``tap[,ifname=NAME]`` spec (``,mac=MAC``
        optional) or NetSpec, or a list of them, virtio-net cards (a passt kvmkit starts is stopped by
        :meth:`close`). ``console="virtio"`` puts :attr:`console` on hvc0 (COM1 keeps
        the early boot messages, into the same tap). ``virtio_console``: a virtio-console device with
        its own backend, beside a serial console."""
        self._started = False
        self._closed = False
        self._finish_lock = threading.Lock()
        ports = extra_ports if extra_ports is not None else [NullBackend(), NullBackend(), NullBackend()]
        config = VmConfig(kernel=Path(kernel) if kernel is not None else None,
                          initrd=Path(initrd) if initrd is not None else None,
                          cmdline=append, script=script or None, mem_size=mem, cpus=cpus,  # type: ignore[arg-type]
                          serial=["none"] + ["off" if b is None else "none" for b in ports[:3]],
                          serial_fifo=serial_fifo, serial_pace=serial_pace,
                          cpuid_clear=dict(cpuid_clear or {}), quirks=quirks,
                          disks=list(disks or []), rng=rng, console=console,  # type: ignore[arg-type]
                          virtio_console=virtio_console is not None, shares=list(shares or []),  # type: ignore[arg-type]
                          nets=[net] if isinstance(net, (str, NetSpec)) else list(net or []))  # type: ignore[list-item]
        self.console_backend = SocketPairBackend()
        backends: dict[str, Backend | None] = {"COM1": self.console_backend}
        backends.update({f"COM{i + 2}": b for i, b in enumerate(ports[:3])})
        if virtio_console is not None:
            backends["hvc0"] = virtio_console
        try:
            self.machine = Machine(config, backends=backends)
        except BaseException:
            self.console_backend.close()
            self.console_backend.peer.close()
            raise
        self.console = ConsoleTap(self.console_backend.peer, on_idle=self._drain_if_stopped)
        try:
            self.boot_info = self.machine.load()
        except BaseException:
            self.close()
            raise

    @classmethod
    def restore(cls, directory: str | Path, extra_ports: list[Backend | None] | None = None,
                virtio_console: Backend | None = None, verify: bool = False) -> "VirtualMachine":
        """A VM that continues from a snapshot (:meth:`snapshot`, ``kvmkit snapshot``), with a new console tap.

        Any number of VMs may restore from one snapshot at once: each maps its
        memory copy-on-write and the snapshot never changes. ``extra_ports``
        and ``virtio_console`` are this run's backends for the ports the
        snapshot's machine had (default: discard their output).
        """
        self = cls.__new__(cls)
        self._started = False
        self._closed = False
        self._finish_lock = threading.Lock()
        self.console_backend = SocketPairBackend()
        backends: dict[str, Backend | None] = {"COM1": self.console_backend}
        for i, b in enumerate((extra_ports or [NullBackend(), NullBackend(), NullBackend()])[:3]):
            backends[f"COM{i + 2}"] = b if b is not None else NullBackend()
        if virtio_console is not None:
            backends["hvc0"] = virtio_console
        self.console = ConsoleTap(self.console_backend.peer, on_idle=self._drain_if_stopped)
        self.boot_info = None
        try:
            self.machine = Machine.restore(directory, backends=backends, verify=verify)
        except BaseException:
            self.console.close()
            self.console_backend.close()
            raise
        return self

    def pause(self, timeout: float = 5.0) -> None:
        """Stop the vCPUs at an instruction boundary (devices go on); :meth:`resume` lets them run.

        Raises :class:`~kvmkit.errors.KvmkitError` if the VM has stopped, or
        if its vCPUs did not stop within ``timeout`` seconds (it then keeps running).
        """
        self.machine.pause(timeout)

    def resume(self) -> None:
        """Let a paused VM run again (the guest sees the pause as time that passed); a no-op if it runs."""
        self.machine.resume()

    def snapshot(self, directory: str | Path) -> dict[str, object]:
        """Save the VM into a new directory and go on running; returns sizes and timings.
        :meth:`restore` (or ``kvmkit run --restore DIR``) continues from it."""
        return self.machine.snapshot(directory)

    @property
    def status(self) -> int | None:
        """The exit status once the VM has stopped (the guest's exit-port byte, 0 for a poweroff or
        reset, 2 for a triple fault, 1 for an error); None while it runs."""
        return self.machine.status

    @property
    def stop_message(self) -> str:
        """Why the VM stopped, in one sentence (empty while it runs)."""
        return self.machine.stop_message

    def start(self) -> "VirtualMachine":
        """Start the vCPUs and the host ends; returns the VM, so ``vm = VirtualMachine(...).start()`` reads well."""
        self.machine.start()
        self._started = True
        return self

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the VM stops; return its exit status (:attr:`status`) once the console is complete.

        When ``wait`` returns, :attr:`console` holds everything the guest
        wrote, its last line included: the VM's host ends are flushed and
        closed, and the console read to its end. (The serial port batches
        output for a few milliseconds, so the guest's last bytes are still on
        their way when its vCPUs stop.) The console takes no more input then.

        ``timeout`` (seconds, None for no limit) bounds the wait for the
        stop; a VM still running then raises :class:`VmTimeout` and goes on
        running (call :meth:`stop` to end it). A VM that was never started
        raises :class:`~kvmkit.errors.KvmkitError` rather than wait forever.
        """
        if self.machine.status is None and not self._started:
            raise KvmkitError("the VM has not been started, so it cannot stop; call start() first "
                              "(or use it in a with block).")
        status = self.machine.wait(timeout)
        if status is None:
            raise VmTimeout(f"the VM did not stop within {timeout} s; it is still running "
                            "(stop() ends it, close() ends and frees it).")
        self._finish()
        return status

    def _finish(self) -> None:
        """Stop what runs (a no-op after the stop), flush and close the host ends, then read the console
        to its end (bounded: a broken host end costs a warning, not a hang)."""
        with self._finish_lock:
            if self._started:
                self._started = False
                self.machine.shutdown()
                if not self.console.wait_eof(DRAIN_TIMEOUT):
                    log.warning("the VM's console did not close within %.0f s of the stop; its last output may "
                                "be missing from vm.console.", DRAIN_TIMEOUT)

    def _drain_if_stopped(self) -> None:
        """The console's idle hook: once the VM has stopped, complete its console (as :meth:`wait` does)."""
        if self._started and self.machine.stopping:
            try:
                self.wait(STOP_TIMEOUT)
            except KvmkitError:
                pass  # wait_for goes on to its own timeout

    def stop(self, status: int = 0, message: str = "stopped by the API") -> int:
        """Stop the VM from the host (the first stop wins: a VM that already stopped keeps its status).

        Returns the exit status once the vCPUs have left and the console is
        complete, as :meth:`wait` does.
        """
        self.machine.request_stop(status, message)
        return self.wait(STOP_TIMEOUT)

    def close(self) -> None:
        """Stop the VM if it runs, flush its console, and free everything (guest memory, KVM, sockets).

        :attr:`console`'s text, :attr:`status` and the machine's statistics
        stay readable afterwards. Safe to call more than once.
        """
        self._finish()  # a VM still running is stopped here, and its console completed
        with self._finish_lock:
            if self._closed:
                return
            self._closed = True
        self.console.close()
        self.machine.close()
        self.console_backend.close()  # a VM that never started never opened (or closed) its console's end

    def __enter__(self) -> "VirtualMachine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            if self.machine.status is None:
                self.stop()
        finally:
            self.close()
