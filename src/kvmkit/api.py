"""The Python API: start a VM, talk to its console, stop it.

Meant for tests and scripts::

    with kvmkit.VirtualMachine(script="echo hello") as vm:
        vm.console.wait_for("hello")
    assert vm.status == 0

The console is COM1 connected to a socket pair; a reader thread collects
everything the guest prints so ``wait_for`` never misses output that came
before it was called.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

from .errors import KvmkitError
from .host.backends import Backend, NullBackend, SocketPairBackend
from .machine.config import DiskSpec, VmConfig
from .machine.machine import Machine


class ConsoleTimeout(KvmkitError, TimeoutError):
    """The text did not appear on the console in time."""


class ConsoleTap:
    """The test's end of COM1: everything the guest wrote, and a way to type."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
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
        with self._cond:
            return bytes(self._buf)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    def send(self, data: bytes | str) -> None:
        """Type into the guest; the VM takes it as fast as the guest reads it."""
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def wait_for(self, pattern: str | bytes | re.Pattern, timeout: float = 30.0, *, since_last: bool = True) -> str:
        """Wait until ``pattern`` (text or regex) appears; returns the output up to and including it.

        With ``since_last`` the search starts after the previous match, so a
        dialogue of prompts and answers reads naturally.
        """
        if isinstance(pattern, str):
            rx = re.compile(re.escape(pattern.encode()))
        elif isinstance(pattern, bytes):
            rx = re.compile(re.escape(pattern))
        else:
            rx = re.compile(pattern.pattern.encode() if isinstance(pattern.pattern, str) else pattern.pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                start = self._pos if since_last else 0
                m = rx.search(self._buf, start)
                if m:
                    self._pos = m.end()
                    return self._buf[start:m.end()].decode("utf-8", errors="replace")
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    tail = self._buf[-2000:].decode("utf-8", errors="replace")
                    raise ConsoleTimeout(f"{pattern!r} did not appear on the console within {timeout} s; last output:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=2)
        self.sock.close()


class VirtualMachine:
    """A VM running in this process, its console on a socket pair.

    ``kernel=None`` boots the bundled guest; ``script`` is then the list of
    guest commands it runs (after which it powers off, unless the script
    ends with ``shell``).
    """

    def __init__(self, kernel: str | Path | None = None, initrd: str | Path | None = None,
                 append: str | None = None, script: str | None = None, mem: str | int = "256M",
                 cpus: int = 1, serial_fifo: bool = True, serial_pace: bool = False,
                 extra_ports: list[Backend | None] | None = None,
                 cpuid_clear: dict[tuple[int, str], int] | None = None, quirks: str = "auto",
                 disks: list[str | DiskSpec] | None = None, rng: bool = False, console: str = "serial",
                 virtio_console: Backend | None = None) -> None:
        """``extra_ports``: backends for COM2-COM4 (None: no such port). ``disks``: ``PATH[,ro][,serial=ID]``
        strings or DiskSpecs, virtio-blk. ``console="virtio"`` puts :attr:`console` on hvc0 (COM1 keeps
        the early boot messages, into the same tap). ``virtio_console``: a virtio-console device with
        its own backend, beside a serial console."""
        ports = extra_ports if extra_ports is not None else [NullBackend(), NullBackend(), NullBackend()]
        config = VmConfig(kernel=Path(kernel) if kernel is not None else None,
                          initrd=Path(initrd) if initrd is not None else None,
                          cmdline=append, script=script or None, mem_size=mem, cpus=cpus,  # type: ignore[arg-type]
                          serial=["none"] + ["off" if b is None else "none" for b in ports[:3]],
                          serial_fifo=serial_fifo, serial_pace=serial_pace,
                          cpuid_clear=dict(cpuid_clear or {}), quirks=quirks,
                          disks=list(disks or []), rng=rng, console=console,  # type: ignore[arg-type]
                          virtio_console=virtio_console is not None)
        self.console_backend = SocketPairBackend()
        backends: dict[str, Backend | None] = {"COM1": self.console_backend}
        backends.update({f"COM{i + 2}": b for i, b in enumerate(ports[:3])})
        if virtio_console is not None:
            backends["hvc0"] = virtio_console
        self.machine = Machine(config, backends=backends)
        self.console = ConsoleTap(self.console_backend.peer)
        try:
            self.boot_info = self.machine.load()
        except BaseException:
            self.close()
            raise
        self._started = False

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
        self.console_backend = SocketPairBackend()
        backends: dict[str, Backend | None] = {"COM1": self.console_backend}
        for i, b in enumerate((extra_ports or [NullBackend(), NullBackend(), NullBackend()])[:3]):
            backends[f"COM{i + 2}"] = b if b is not None else NullBackend()
        if virtio_console is not None:
            backends["hvc0"] = virtio_console
        self.console = ConsoleTap(self.console_backend.peer)
        self._started = False
        self.boot_info = None
        try:
            self.machine = Machine.restore(directory, backends=backends, verify=verify)
        except BaseException:
            self.console.close()
            raise
        return self

    def pause(self, timeout: float = 5.0) -> None:
        """Stop the vCPUs at an instruction boundary (devices go on); :meth:`resume` lets them run."""
        self.machine.pause(timeout)

    def resume(self) -> None:
        self.machine.resume()

    def snapshot(self, directory: str | Path) -> dict[str, object]:
        """Save the VM into a new directory and go on running; returns sizes and timings.
        :meth:`restore` (or ``kvmkit run --restore DIR``) continues from it."""
        return self.machine.snapshot(directory)

    @property
    def status(self) -> int | None:
        return self.machine.status

    @property
    def stop_message(self) -> str:
        return self.machine.stop_message

    def start(self) -> "VirtualMachine":
        self.machine.start()
        self._started = True
        return self

    def wait(self, timeout: float | None = None) -> int | None:
        return self.machine.wait(timeout)

    def stop(self, status: int = 0, message: str = "stopped by the API") -> int | None:
        self.machine.request_stop(status, message)
        return self.machine.wait(10)

    def close(self) -> None:
        if getattr(self, "_started", False):
            self.machine.shutdown()
            self._started = False
        self.console.close()
        self.machine.close()

    def __enter__(self) -> "VirtualMachine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.machine.status is None:
            self.stop()
        self.close()
