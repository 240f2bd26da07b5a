"""kvmkit: a small KVM virtual machine monitor in Python.

The package is layered (see DESIGN.md in the shared notes): ``kvm`` binds
/dev/kvm, ``devices`` holds pure device models, ``boot`` loads kernels,
``host`` does host I/O, ``machine`` wires a VM together, ``profile``
measures it and ``cli`` parses arguments.
"""

__version__ = "0.1.0"
