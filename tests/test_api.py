"""The Python API's promises (issue 13, "the first hour with kvmkit").

* ``vm.wait()`` returns only when the console holds the guest's last line:
  the serial port batches output for a few milliseconds, and before the fix
  ``console.text`` lacked the last line in most runs.
* ``vm.wait(timeout)`` on a VM that is still running raises the API's
  timeout error rather than return None.
* ``help(kvmkit)`` shows the console, the timeout errors and an example;
  every public method and property has a docstring.
* The pytest plugin's ``kvmkit_vm`` fixture gives another suite VMs (run
  through ``pytester``, with the plugin loaded by ``-p`` so that it works
  before kvmkit is reinstalled with its entry point).
"""

from __future__ import annotations

import inspect
import os
import pydoc
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import kvmkit
from kvmkit.api import ConsoleTap, ConsoleTimeout, VirtualMachine, VmTimeout
from kvmkit.errors import KvmkitError

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kvm
def test_wait_returns_with_the_guests_last_line_on_the_console() -> None:
    """10 runs: the script's output and the guest's very last line ("+ poweroff 3") are there when wait returns."""
    missing = []
    for i in range(10):
        with VirtualMachine(script=f"echo last-line-{i}; poweroff 3") as vm:
            status = vm.wait(60)
            text = vm.console.text.replace("\r\n", "\n")  # read at once: no grace period
        assert status == 3, vm.stop_message
        # "+ echo last-line-N" (the script's trace) holds the words too: look for the output line itself.
        if not re.search(rf"^last-line-{i}$", text, re.M) or not text.rstrip("\n").endswith("+ poweroff 3"):
            missing.append(f"run {i}: ...{text[-120:]!r}")
    assert not missing, "the console lacked the guest's last output after wait():\n" + "\n".join(missing)


@pytest.mark.kvm
def test_wait_with_a_timeout_on_a_running_vm_raises_and_the_vm_goes_on() -> None:
    with VirtualMachine() as vm:  # the bundled guest's shell: runs until told
        vm.console.wait_for("kvmkit> ", timeout=60)
        t0 = time.monotonic()
        with pytest.raises(VmTimeout, match="did not stop within 0.2 s") as info:
            vm.wait(0.2)
        assert time.monotonic() - t0 < 5
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, KvmkitError)
        assert vm.status is None  # still running, and still listening
        vm.console.send("echo still-here\r")
        vm.console.wait_for("still-here", timeout=30)
        vm.console.wait_for("kvmkit> ", timeout=30)
        vm.console.send("poweroff 5\r")
        assert vm.wait(30) == 5
        # The console was read to its end: it is complete, and typing into a stopped VM says so.
        assert vm.console.eof
        with pytest.raises(KvmkitError, match="stopped"):
            vm.console.send("x")
        with pytest.raises(ConsoleTimeout, match="before the console closed"):
            vm.console.wait_for("never printed", timeout=30)  # at once, not after 30 s
        assert vm.wait(1) == 5  # again: the same status at once
    assert vm.status == 5


@pytest.mark.kvm
def test_stop_returns_the_status_with_the_console_complete() -> None:
    with VirtualMachine(script="echo before-stop; shell") as vm:
        vm.console.wait_for("kvmkit> ", timeout=60)
        assert vm.stop(9, "from the test") == 9
        assert "before-stop" in vm.console.text and vm.console.eof
    assert vm.stop_message == "from the test"


@pytest.mark.kvm
def test_waiting_for_text_a_stopped_guest_never_printed_ends_at_once() -> None:
    """No wait() first: wait_for sees the VM stop, completes the console, and fails with the reason."""
    with VirtualMachine(script="echo going; poweroff 2") as vm:
        t0 = time.monotonic()
        with pytest.raises(ConsoleTimeout, match="before the console closed") as info:
            vm.console.wait_for("never printed", timeout=60)
        assert time.monotonic() - t0 < 30
        assert "+ poweroff 2" in str(info.value)  # the last output, to its last line
        assert vm.status == 2


@pytest.mark.kvm
def test_wait_on_a_vm_never_started_says_so_rather_than_hang() -> None:
    vm = VirtualMachine(script="poweroff 0")
    try:
        with pytest.raises(KvmkitError, match="not been started"):
            vm.wait()
    finally:
        vm.close()
    vm.close()  # twice is harmless


def test_help_shows_the_console_the_timeouts_and_an_example() -> None:
    text = pydoc.plain(pydoc.render_doc(kvmkit))
    for word in ("VirtualMachine", "ConsoleTap", "VmTimeout", "ConsoleTimeout", "KvmkitError",
                 "vm.console.wait_for(", "vm.wait(", "kvmkit_vm", "wait_for(self, pattern"):
        assert word in text, word
    assert set(kvmkit.__all__) <= set(dir(kvmkit))
    assert kvmkit.VmTimeout is VmTimeout and kvmkit.ConsoleTap is ConsoleTap and kvmkit.KvmkitError is KvmkitError
    with pytest.raises(AttributeError):
        kvmkit.no_such_name  # noqa: B018


@pytest.mark.parametrize("cls", [VirtualMachine, ConsoleTap])
def test_every_public_method_and_property_has_a_docstring(cls: type) -> None:
    undocumented = [name for name, member in vars(cls).items()
                    if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, (property, classmethod)))
                    and not (member.__func__ if isinstance(member, classmethod) else member).__doc__]
    assert not undocumented, f"{cls.__name__}: {undocumented}"


def test_the_plugin_is_registered_and_cheap_to_load() -> None:
    """The pytest11 entry point names the module, and loading it (every pytest run, once installed) imports no VM code."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert entry == {"kvmkit": "kvmkit.pytest_plugin"}
    probe = "import sys, kvmkit.pytest_plugin; print(sorted(m for m in sys.modules if m.startswith('kvmkit')))"
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                         capture_output=True, text=True, check=True).stdout
    assert "kvmkit.api" not in out and "kvmkit.machine" not in out, out


@pytest.mark.kvm
def test_the_pytest_plugin_gives_a_suite_vms_and_cleans_them_up(pytester: pytest.Pytester,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Exactly one copy of the plugin: by -p, not also by an installed entry point.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_user_suite='''
        made = []

        def test_a_script(kvmkit_vm):
            vm = kvmkit_vm(script="echo from-a-user-suite; poweroff 4")
            made.append(vm)
            assert vm.status is None or vm.status == 4  # started by the fixture
            assert vm.wait(60) == 4
            assert "from-a-user-suite" in vm.console.text

        def test_vms_left_running_are_stopped_after_the_test(kvmkit_vm):
            a = kvmkit_vm()
            b = kvmkit_vm(script="echo second; shell", mem="64M")
            made.extend([a, b])
            a.console.wait_for("kvmkit> ", timeout=60)
            b.console.wait_for("second", timeout=60)

        def test_every_vm_was_stopped_and_closed():
            assert len(made) == 3
            for vm in made:
                assert vm.status is not None
                assert vm.machine.vm is None and vm.machine.mem is None  # KVM's VM and guest memory are gone
    ''')
    result = pytester.runpytest("-p", "kvmkit.pytest_plugin", "-q")
    result.assert_outcomes(passed=3)
