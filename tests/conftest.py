"""Shared test set-up: the KVM gate, and CI's rule that KVM tests never skip there.

Tests that need /dev/kvm take the ``kvm`` marker (or the ``kvm_ok`` fixture).
On a machine without usable KVM they skip with the reason printed; under
CI=true any skipped KVM test fails the run, because CI machines have KVM
and a silent skip would hide a broken VMM.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import pytest

_kvm_reason: str | None = None
_kvm_checked = False
_skipped_kvm: list[str] = []


def kvm_unavailable_reason() -> str | None:
    global _kvm_checked, _kvm_reason
    if not _kvm_checked:
        _kvm_checked = True
        try:
            from kvmkit.kvm import Kvm
            Kvm().close()
        except Exception as e:  # KvmUnavailable or anything odd: report it
            _kvm_reason = str(e)
    return _kvm_reason


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kvm") is not None:
        reason = kvm_unavailable_reason()
        if reason:
            pytest.skip(f"KVM is not usable here: {reason}")


# A hung test must fail with its stacks, not eat CI's whole budget: a slow test (a full Linux boot)
# gets this many seconds per phase, any other test a few minutes.
SLOW_TEST_LIMIT_S = 1200.0
TEST_LIMIT_S = 300.0


class TestRanTooLong(Exception):
    pass


def _watchdog(item: pytest.Item):  # type: ignore[no-untyped-def]
    limit = SLOW_TEST_LIMIT_S if item.get_closest_marker("slow") is not None else TEST_LIMIT_S

    def expired(signum: int, frame: object) -> None:
        sys.stderr.write(f"\n{item.nodeid} ran past {limit:.0f} s; every thread's stack:\n")
        faulthandler.dump_traceback(all_threads=True)
        raise TestRanTooLong(f"{item.nodeid} ran past {limit:.0f} s (tests/conftest.py's watchdog)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Watchdog:
    """The per-phase hooks, as a plugin object: conftest's own pytest_runtest_setup does the KVM gate."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):  # type: ignore[no-untyped-def]
        yield from _watchdog(item)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):  # type: ignore[no-untyped-def]
        yield from _watchdog(item)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item):  # type: ignore[no-untyped-def]
        yield from _watchdog(item)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_Watchdog(), "kvmkit-test-watchdog")


@pytest.fixture
def kvm_ok() -> None:
    reason = kvm_unavailable_reason()
    if reason:
        pytest.skip(f"KVM is not usable here: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    uses_kvm = item.get_closest_marker("kvm") is not None or "kvm_ok" in getattr(item, "fixturenames", ())
    if report.skipped and uses_kvm and report.nodeid not in _skipped_kvm:
        _skipped_kvm.append(report.nodeid)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if _skipped_kvm:
        terminalreporter.write_line(f"{len(_skipped_kvm)} KVM test(s) skipped:" + "".join(f"\n  {n}" for n in _skipped_kvm),
                                    red=_in_ci(), yellow=not _in_ci())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_kvm and _in_ci():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def stock_bzimage():
    """Debian 12's stock kernel, fetched with apt once per cache (~/.cache/kvmkit/kernels)."""
    from kvmkit.boot import fetch
    from kvmkit.errors import BootError
    try:
        return fetch.stock_kernel()
    except BootError as exc:
        pytest.skip(f"the stock Debian kernel could not be fetched: {exc}")


@pytest.fixture(scope="session")
def busybox_initrd(tmp_path_factory: pytest.TempPathFactory):
    """A busybox initramfs (kvmkit initramfs) whose /init gives a shell on the console."""
    from kvmkit.boot.initramfs import busybox_initramfs
    from kvmkit.errors import BootError
    try:
        data = busybox_initramfs()
    except BootError as exc:
        pytest.skip(f"no static busybox to build the initramfs: {exc}")
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(data)
    return path
