"""How a machine stops: one outcome, decided once, whoever asks and from whatever thread.

A guest poweroff, a reset, a triple fault, a VMM error, Ctrl-A x, SIGINT and
SIGTERM all end the VM the same way: the first :meth:`Lifecycle.stop` wins
and records an :class:`Outcome`; every vCPU is made to leave KVM_RUN
(``immediate_exit`` plus a signal, because a vCPU halted inside KVM does not
look at the flag until something wakes it); waiters are released. The vCPU
loop never stops the machine itself: it returns an Outcome, and its thread
hands that to the lifecycle. That keeps the loop testable and the machine
out of its imports.

Kicks are the other use of the signal: a vCPU thread is the only place its
registers can be read while the guest runs, so code that wants to look at a
running vCPU (the nested-PVM quirks, the poweroff detection below) asks for
a kick and runs as a hook on the vCPU thread when KVM_RUN returns EINTR.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from ..errors import KvmkitError
from ..kvm.constants import KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED
from ..kvm.system import KvmError, Vcpu
from ..x86 import RFLAGS_IF

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
WATCH_INTERVAL = 1.0  # seconds between kicks while a kick hook wants to look at the vCPUs

# Outcome kinds: what ended the VM, for callers that act on it (a reset, a crash).
POWEROFF = "poweroff"
RESET = "reset"
EXIT_PORT = "exit-port"
TRIPLE_FAULT = "triple-fault"
HALT = "halt"
ERROR = "error"
SIGNAL = "signal"
QUIT = "quit"
HOST = "host"  # the program driving kvmkit (the API, a test) ended it


@dataclass(frozen=True)
class Outcome:
    """How the VM ended: the exit status kvmkit gives, one sentence, and what kind of end it was."""

    status: int
    message: str
    kind: str

    @property
    def reset(self) -> bool:
        return self.kind == RESET


class Member(Protocol):
    """A vCPU runner as the lifecycle sees it: a thread to signal and a way to make KVM_RUN return."""

    thread: threading.Thread | None

    def interrupt(self) -> None:
        """Make the next (or current, once signalled) KVM_RUN return at once."""
        ...


def install_kick_handler() -> bool:
    """A no-op handler, so a signal sent to a vCPU thread interrupts KVM_RUN (EINTR)."""
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    return True


class Lifecycle:
    """Stop, kick and signal handling for one machine."""

    def __init__(self) -> None:
        self.outcome: Outcome | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._members: list[Member] = []
        self.on_stop: list[Callable[[Outcome], None]] = []

    def add(self, member: Member) -> None:
        self._members.append(member)

    @property
    def stopping(self) -> bool:
        return self.outcome is not None

    def stop(self, status: int, message: str = "", kind: str = HOST) -> None:
        """End the VM with ``status``; the first request wins. Safe from any thread, signal handlers included."""
        self.finish(Outcome(status, message, kind))

    def finish(self, outcome: Outcome) -> None:
        with self._lock:
            if self.outcome is not None:
                return
            self.outcome = outcome
        for m in self._members:
            m.interrupt()
        self.kick_all()
        self._done.set()
        for cb in self.on_stop:
            try:
                cb(outcome)
            except Exception:
                log.exception("stop callback failed")

    def kick_all(self) -> None:
        """Bring every vCPU out of KVM_RUN once (it re-enters at once unless stopping): hooks run, tallies flush."""
        me = threading.current_thread()
        for m in self._members:
            t = m.thread
            if t is not None and t.is_alive() and t.ident is not None and t is not me:
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Block until the VM has stopped and its vCPU threads have left (or ``timeout``)."""
        if not self._done.wait(timeout):
            return None
        me = threading.current_thread()
        for m in self._members:
            t = m.thread
            if t is not None and t is not me:
                t.join(timeout=5)
                if t.is_alive():  # a vCPU that did not leave KVM_RUN: kick again
                    self.kick_all()
                    t.join(timeout=5)
        return self.outcome

    def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Kick every vCPU now and then until the VM stops, so that kick hooks get to look."""
        def run() -> None:
            while not self._done.wait(interval):
                self.kick_all()
        threading.Thread(target=run, name="kvmkit-watch", daemon=True).start()

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT, SIGTERM and SIGHUP stop the VM cleanly (status 130, 143, 129) while inside.

        A signal the parent set to be ignored stays ignored: ``nohup kvmkit run``
        must outlive its terminal.
        """
        old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)):
                if signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                old[sig] = signal.signal(sig, lambda s, f, st=status: self.stop(
                    st, f"stopped by signal {signal.Signals(s).name}", SIGNAL))
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]


def require_kick_handler() -> None:
    if not install_kick_handler():
        raise KvmkitError("kvmkit must be started from the main thread the first time (it installs a signal handler).")


class PoweroffWatch:
    """Linux's poweroff (and halt) without ACPI ends in ``cli; hlt`` on every CPU: stop with status 0.

    A kick hook on every vCPU records whether it sits halted with interrupts
    off; when all do, the guest is done. A vCPU the guest never started
    (waiting for INIT/SIPI) counts as stopped too.
    """

    def __init__(self, lifecycle: Lifecycle, vcpu_ids: list[int]) -> None:
        self.lifecycle = lifecycle
        self._halted = {vid: False for vid in vcpu_ids}

    def __call__(self, vcpu: Vcpu) -> None:
        try:
            state = vcpu.get_mp_state()
            halted = state == KVM_MP_STATE_HALTED and not vcpu.get_regs().rflags & RFLAGS_IF
        except KvmError:
            return
        self._halted[vcpu.id] = halted or (vcpu.id != 0 and state in (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED))
        if halted and all(self._halted.values()):
            self.lifecycle.stop(0, "the guest halted with interrupts off on every vCPU (Linux's poweroff without ACPI)", POWEROFF)
