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
import time
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
PANIC = "panic"  # the guest kernel panicked (and then reset or halted)
PANIC_STATUS = 1


def call_elsewhere(post: Callable[[Callable[[], None]], None], fn: Callable[[], object], timeout: float,
                   late: Callable[[], BaseException]) -> object:
    """Hand ``fn`` to another thread through ``post``, wait for it, and return its result or raise its error.

    ``late()`` is raised when it has not run within ``timeout`` seconds.
    """
    result: list[object] = []
    error: list[BaseException] = []
    done = threading.Event()

    def call() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)
        finally:
            done.set()

    post(call)
    if not done.wait(timeout):
        raise late()
    if error:
        raise error[0]
    return result[0]


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
        # Looks at an outcome before it is final and may restate it (a reset
        # after a kernel panic is the panic); it must not block.
        self.judge: Callable[[Outcome], Outcome] | None = None
        # Pausing: every vCPU thread parks in park() until resume() or a stop.
        self._pause = threading.Condition()
        self._pausing = False
        self._parked: set[int] = set()
        self._work: dict[int, list[Callable[[], None]]] = {}  # vCPU id -> calls to run on its thread while parked

    def add(self, member: Member) -> None:
        self._members.append(member)

    @property
    def stopping(self) -> bool:
        return self.outcome is not None

    def stop(self, status: int, message: str = "", kind: str = HOST) -> None:
        """End the VM with ``status``; the first request wins. Safe from any thread, signal handlers included."""
        self.finish(Outcome(status, message, kind))

    def finish(self, outcome: Outcome) -> None:
        if self.judge is not None:
            try:
                outcome = self.judge(outcome)
            except Exception:
                log.exception("outcome judge failed")
        with self._lock:
            if self.outcome is not None:
                return
            self.outcome = outcome
        for m in self._members:
            m.interrupt()
        self.kick_all()
        with self._pause:
            self._pause.notify_all()  # parked vCPUs leave too
        self._done.set()
        for cb in self.on_stop:
            try:
                cb(outcome)
            except Exception:
                log.exception("stop callback failed")

    # --- pause and resume ------------------------------------------------------------
    @property
    def pausing(self) -> bool:
        """A pause was asked for and not yet undone (the vCPU loop looks at it after each kick)."""
        return self._pausing

    @property
    def paused(self) -> bool:
        """Every started vCPU thread is parked."""
        with self._pause:
            return self._pausing and self._all_parked()

    def _all_parked(self) -> bool:
        live = [m for m in self._members if m.thread is not None and m.thread.is_alive()]
        return all(id(m) in self._parked for m in live)

    def pause(self, timeout: float = 5.0) -> bool:
        """Bring every vCPU out of KVM_RUN and park it; True once all are parked (False on timeout or stop).

        A vCPU leaves KVM_RUN only through KVM_RUN itself, with immediate_exit
        set: that completes an I/O or MMIO exit it was in the middle of, so
        that what is parked is a clean instruction boundary (KVM's rule for
        saving state, see kvm/state.py).
        """
        with self._pause:
            self._pausing = True
        for m in self._members:
            m.interrupt()
        self.kick_all()
        deadline = time.monotonic() + timeout
        with self._pause:
            while not self._all_parked():
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping:
                    return False
                self._pause.wait(min(left, 0.05))
                if not self._all_parked():
                    for m in self._members:
                        m.interrupt()
                    self.kick_all()  # a vCPU halted in KVM: the first kick may have come before it got there
            return True

    def resume(self) -> None:
        with self._pause:
            self._pausing = False
            self._pause.notify_all()

    def park(self, member: Member) -> None:
        """Called by a vCPU thread that found :attr:`pausing`: wait for resume or stop, running what
        :meth:`on_vcpu` hands it meanwhile."""
        key = id(member)
        with self._pause:
            self._parked.add(key)
            self._pause.notify_all()
            try:
                while self._pausing and not self.stopping:
                    work = self._work.pop(key, None)
                    if work:
                        self._pause.release()
                        try:
                            for fn in work:
                                fn()
                        finally:
                            self._pause.acquire()
                        self._pause.notify_all()
                        continue
                    self._pause.wait(0.5)
            finally:
                self._parked.discard(key)

    def on_vcpu(self, member: Member, fn: Callable[[], object], timeout: float = 10.0) -> object:
        """Run ``fn`` on a parked vCPU's own thread (KVM wants vCPU ioctls from the thread that runs
        the vCPU) and return its result; raises what it raised."""
        def post(call: Callable[[], None]) -> None:
            with self._pause:
                if id(member) not in self._parked:
                    raise KvmkitError("the vCPU is not paused; pause the VM first.")
                self._work.setdefault(id(member), []).append(call)
                self._pause.notify_all()
        return call_elsewhere(post, fn, timeout,
                              lambda: KvmkitError(f"a paused vCPU did not answer within {timeout:.0f} s."))

    def kick_all(self) -> None:
        """Bring every vCPU out of KVM_RUN once (it re-enters at once unless stopping): hooks run, tallies flush.

        The signal only interrupts a vCPU that is inside KVM_RUN; one that is
        handling an exit in Python at that moment would miss it, so
        ``immediate_exit`` is set too and its next KVM_RUN returns at once.
        """
        me = threading.current_thread()
        for m in self._members:
            t = m.thread
            if t is not None and t.is_alive():
                m.interrupt()
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
