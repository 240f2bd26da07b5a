"""Typed bindings for /dev/kvm (x86-64): structures, ioctl numbers and handles."""

from .constants import Cap, ExitReason, exit_reason_name
from .system import Kvm, KvmError, KvmUnavailable, Vcpu, Vm

__all__ = ["Cap", "ExitReason", "exit_reason_name", "Kvm", "KvmError", "KvmUnavailable", "Vcpu", "Vm"]
