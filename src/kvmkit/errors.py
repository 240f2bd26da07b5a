"""Errors a user can act on.

Every error that reaches the command line is a :class:`KvmkitError`: its
message is one plain sentence saying what is wrong and what to do, and the
CLI prints it without a traceback and exits non-zero.
"""


class KvmkitError(Exception):
    """An error with a message meant for the user."""


class GuestMemoryError(KvmkitError):
    """A guest physical address range that is not backed by RAM."""


class BootError(KvmkitError):
    """A kernel image, initrd or command line that cannot be booted."""
