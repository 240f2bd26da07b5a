"""The one place a guest's kernel command line is put together.

Who contributes, in the order the words appear:

1. the machine's defaults: ``console=ttyS0`` (its console is COM1; with
   ``--console virtio``, ``console=hvc0`` and an early console on COM1), and
   ``pci=off`` while the machine has no PCI devices (a Linux kernel would
   otherwise probe configuration ports nothing answers), and
   ``i8042.noaux``: the keyboard controller has no AUX (mouse) device, and
   without the word Linux probes for one with commands that time out;
   ``earlyprintk`` on COM1 (unless the user names an early console), so a
   boot is not silent until the 8250 driver registers; and ``panic=-1``,
   so a panicked kernel resets and kvmkit ends with the panic line
   (machine/console_watch.py) rather than hanging;
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
NO_AUX = "i8042.noaux"
# Boot messages from the first instruction, not from when the 8250 driver
# registers (a minute and more into an emulated boot): a silent boot is the
# first thing a new user takes for a hang.
EARLY_CONSOLE = "earlyprintk=serial,ttyS0,115200"
# A panicked kernel resets at once rather than hanging; kvmkit reads the
# panic line from the console and ends with a non-zero status.
PANIC_RESET = "panic=-1"


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
        if not virtio_console and not given & {"earlyprintk", "earlycon"}:
            ours.append(EARLY_CONSOLE)
        if not pci:
            ours.append("pci=off")
        ours += [NO_AUX, PANIC_RESET]
        ours += list(quirk_params)
    words = [w for w in ours if param_key(w) not in given] + user_words
    if script:
        init_args = f"{init_args} {script}".strip() if init_args else script
    out = " ".join(words)
    if init_args is not None:
        out = f"{out} -- {init_args}" if out else f"-- {init_args}"
    return out
