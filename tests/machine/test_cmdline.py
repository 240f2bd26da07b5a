"""The one command-line builder: defaults, quirk words, the user's words last and winning."""

from __future__ import annotations

from kvmkit.machine import quirks as q
from kvmkit.machine.cmdline import build_cmdline, split_init_args

PVM = ["noapic", "nopti", "nokaslr"]


def test_linux_defaults_without_a_user_line() -> None:
    assert build_cmdline(None, linux=True) == "console=ttyS0 earlyprintk=serial,ttyS0,115200 pci=off i8042.noaux panic=-1"
    assert build_cmdline("", linux=True, quirk_params=PVM) == "console=ttyS0 earlyprintk=serial,ttyS0,115200 pci=off i8042.noaux panic=-1 noapic nopti nokaslr"


def test_pci_off_only_while_the_machine_has_no_pci_devices() -> None:
    assert "pci=off" not in build_cmdline(None, linux=True, pci=True).split()


def test_user_words_come_last_and_win() -> None:
    out = build_cmdline("console=hvc0 pci=conf1 nokaslr root=/dev/vda", linux=True, quirk_params=PVM)
    assert out == "earlyprintk=serial,ttyS0,115200 i8042.noaux panic=-1 noapic nopti console=hvc0 pci=conf1 nokaslr root=/dev/vda"
    assert out.split().count("nokaslr") == 1


def test_init_arguments_stay_last() -> None:
    out = build_cmdline("console=ttyS0 -- single nopti", linux=True, quirk_params=["nopti"])
    assert out == "earlyprintk=serial,ttyS0,115200 pci=off i8042.noaux panic=-1 nopti console=ttyS0 -- single nopti"
    assert build_cmdline("-- x", linux=True) == "console=ttyS0 earlyprintk=serial,ttyS0,115200 pci=off i8042.noaux panic=-1 -- x"


def test_bundled_guest_gets_its_console_and_script_but_no_linux_words() -> None:
    assert build_cmdline(None, linux=False, quirk_params=PVM, script="echo hi; poweroff 3") == \
        "console=ttyS0 -- echo hi; poweroff 3"
    assert build_cmdline("console=ttyS1", linux=False) == "console=ttyS1"


def test_split_init_args() -> None:
    assert split_init_args("a b -- c d") == ("a b", "c d")
    assert split_init_args("-- c") == ("", "c")
    assert split_init_args("a b") == ("a b", None)


def test_profile_cmdline_fits_the_kernel_limit() -> None:
    words = q.pvm_cmdline_params(cpus=1, tsc_khz=9_999_999)
    assert len(build_cmdline("console=ttyS0 earlyprintk=serial root=/dev/vda", linux=True, quirk_params=words)) < 2047


def test_an_early_console_or_panic_setting_of_the_user_wins() -> None:
    out = build_cmdline("earlycon=uart8250,io,0x3f8 panic=10", linux=True).split()
    assert "earlyprintk=serial,ttyS0,115200" not in out and "panic=-1" not in out
    assert out[-2:] == ["earlycon=uart8250,io,0x3f8", "panic=10"]
    assert "earlyprintk=serial,ttyS0,115200" not in build_cmdline(None, linux=True, virtio_console=True).split()
