"""The one place a guest's kernel command line is put together.

Who contributes, in the order the words appear:

1. the machine's defaults: ``console=ttyS0`` (its console is COM1; with
   ``--console virtio``, ``console=hvc0`` and an early console on COM1), and
   ``pci=off`` while the machine has no PCI devices (a Linux kernel would
   otherwise probe configuration ports nothing answers);
2. the host quirk profile's additions (machine/quirks.py), for Linux only;
3. the user's words (``-p``/``--append``), last, so that they win: a
   default or quirk parameter whose name the user wrote is left out
   altogether (``console=`` given twice would make two consoles), and words
   after `` -- `` (arguments for init, or the bundled guest's script) stay at
   the end.

The bundled guest gets the defaults that concern it (its console) and the
script after `` -- ``; quirk parameters are Linux's.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_CONSOLE = "console=ttyS0"
# With the console on virtio (hvc0, a module), boot messages go to COM1
# through the early console until hvc0 registers and takes over: the two
# never print the same line twice.
VIRTIO_CONSOLE = ("earlycon=uart8250,io,0x3f8,115200", "console=hvc0")


def param_key(word: str) -> str:
    """The name a kernel parameter is known by: the part before ``=``."""
    return word.split("=", 1)[0]


def split_init_args(cmdline: str) -> tuple[str, str | None]:
    """``kernel words -- init words`` -> (kernel words, init words or None)."""
    if cmdline.startswith("-- "):
        return "", cmdline[3:]
    if cmdline == "--":
        return "", ""
    head, sep, tail = cmdline.partition(" -- ")
    return (head, tail) if sep else (cmdline, None)


def build_cmdline(user: str | None, *, linux: bool, pci: bool = False, quirk_params: Sequence[str] = (),
                  script: str | None = None, virtio_console: bool = False) -> str:
    """The command line for a guest: the defaults, the quirk profile's words, then the user's.

    ``user`` None means the user gave no command line; ``script`` is the
    bundled guest's command script (put after `` -- ``).
    """
    head, init_args = split_init_args(user or "")
    user_words = head.split()
    given = {param_key(w) for w in user_words}
    ours = list(VIRTIO_CONSOLE) if linux and virtio_console else [DEFAULT_CONSOLE]
    if linux:
        if not pci:
            ours.append("pci=off")
        ours += list(quirk_params)
    words = [w for w in ours if param_key(w) not in given] + user_words
    if script:
        init_args = f"{init_args} {script}".strip() if init_args else script
    out = " ".join(words)
    if init_args is not None:
        out = f"{out} -- {init_args}" if out else f"-- {init_args}"
    return out
