"""kvmkit: a small KVM virtual machine monitor in Python.

Run a VM from Python with :class:`VirtualMachine`; its :attr:`console`
(a :class:`ConsoleTap`) is the guest's serial console: ``text`` is all the
guest wrote, ``wait_for(pattern, timeout)`` waits for text, ``send(data)``
types. ``wait(timeout)`` returns the guest's exit status once the console
holds its last byte::

    import kvmkit

    with kvmkit.VirtualMachine(script="echo hello; poweroff 3") as vm:
        vm.console.wait_for("hello", timeout=30)
        status = vm.wait(60)              # 3, and vm.console.text is complete
    print(status, vm.console.text)

Timeouts raise :class:`ConsoleTimeout` (text did not appear) or
:class:`VmTimeout` (the VM did not stop); both are :class:`TimeoutError`
and :class:`KvmkitError`, the base of every error kvmkit reports (a sentence
saying what to do). In a pytest suite, the ``kvmkit_vm`` fixture (plugin
``kvmkit.pytest_plugin``, loaded automatically once kvmkit is installed)
starts VMs and stops and closes them after the test.

The package is layered (docs/architecture.md; tests/test_layers.py checks
it): ``kvm`` binds /dev/kvm, ``devices`` holds pure device models, ``boot`` loads kernels,
``host`` does host I/O, ``machine`` wires a VM together, ``profile``
measures it and ``cli`` parses arguments. :class:`VirtualMachine` is the
scripting entry point.
"""

__version__ = "0.1.0"

__all__ = ["ConsoleTap", "ConsoleTimeout", "KvmkitError", "VirtualMachine", "VmTimeout", "__version__"]

_LAZY = ("ConsoleTap", "ConsoleTimeout", "KvmkitError", "VirtualMachine", "VmTimeout")


def __getattr__(name: str) -> object:  # lazy, so `import kvmkit` stays cheap and KVM-free
    if name in _LAZY:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'kvmkit' has no attribute {name!r}")


def __dir__() -> list[str]:  # help(kvmkit) and dir() list the lazy names too
    return sorted(set(globals()) | set(__all__))
