"""kvmkit's pytest plugin: the ``kvmkit_vm`` fixture, so a test suite gets VMs without copying set-up code.

Installing kvmkit registers the plugin (entry point ``pytest11``: ``kvmkit``);
without an installed kvmkit, load it with ``pytest -p kvmkit.pytest_plugin``
or ``pytest_plugins = ["kvmkit.pytest_plugin"]`` in a conftest.py::

    def test_greeting(kvmkit_vm):
        vm = kvmkit_vm(script="echo hello; poweroff 3")
        assert vm.wait(60) == 3
        assert "hello" in vm.console.text

Each call of the factory makes a :class:`kvmkit.VirtualMachine` with the
keyword arguments given and starts it; after the test every VM it made is
stopped (if it still runs) and closed, whatever the test did, so no vCPU
thread, guest memory or socket outlives its test. On a host without a
usable /dev/kvm the call raises :class:`kvmkit.KvmkitError` saying why: the
test fails rather than skips, so a broken host is not mistaken for a pass.

The module imports kvmkit's VM code only when a test asks for a VM, so
having the plugin loaded costs a pytest session nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol

import pytest

if TYPE_CHECKING:
    from .api import VirtualMachine


class VmFactory(Protocol):
    """The ``kvmkit_vm`` fixture: call it with :class:`kvmkit.VirtualMachine`'s arguments for a started VM."""

    def __call__(self, **kwargs: Any) -> "VirtualMachine": ...


@pytest.fixture
def kvmkit_vm() -> Iterator[VmFactory]:
    """A factory of started VMs: ``vm = kvmkit_vm(script="echo hi; poweroff 0")`` (any
    :class:`kvmkit.VirtualMachine` keyword). Every VM it made is stopped and closed after the test."""
    from .api import VirtualMachine

    made: list[VirtualMachine] = []

    def make(**kwargs: Any) -> VirtualMachine:
        vm = VirtualMachine(**kwargs)
        made.append(vm)  # closed after the test even if start() fails
        vm.start()
        return vm

    yield make
    errors: list[BaseException] = []
    for vm in reversed(made):
        try:
            if vm.status is None:
                vm.stop(0, "stopped by the kvmkit_vm fixture after the test")
        except Exception as e:
            errors.append(e)
        finally:
            try:
                vm.close()
            except Exception as e:
                errors.append(e)
    if errors:
        raise errors[0]
