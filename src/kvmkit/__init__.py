"""kvmkit: a small KVM virtual machine monitor in Python.

The package is layered (docs/architecture.md; tests/test_layers.py checks
it): ``kvm`` binds /dev/kvm, ``devices`` holds pure device models, ``boot`` loads kernels,
``host`` does host I/O, ``machine`` wires a VM together, ``profile``
measures it and ``cli`` parses arguments. :class:`VirtualMachine` is the
scripting entry point.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy, so `import kvmkit` stays cheap and KVM-free
    if name in ("VirtualMachine", "ConsoleTap", "ConsoleTimeout"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
