import os
import pty
import termios

from kvmkit.host.terminal import CTRL_A, EscapeFilter, RawTerminal


def test_escape_quit_and_literal_ctrl_a():
    cmds = []
    f = EscapeFilter(cmds.append)
    assert f.feed(b"ab\x01x") == b"ab"
    assert cmds == ["quit"]
    assert f.feed(bytes([CTRL_A, CTRL_A]) + b"z") == b"\x01z"
    assert cmds == ["quit"]


def test_escape_split_across_reads():
    cmds = []
    f = EscapeFilter(cmds.append)
    assert f.feed(b"\x01") == b""
    assert f.feed(b"x") == b""
    assert cmds == ["quit"]


def test_ctrl_c_goes_to_the_guest():
    f = EscapeFilter(lambda c: None)
    assert f.feed(b"\x03") == b"\x03"


def test_raw_mode_is_restored_even_after_an_exception():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        flags_before = os.get_blocking(slave)
        try:
            with RawTerminal(slave, slave):
                assert termios.tcgetattr(slave) != before
                assert not os.get_blocking(slave)
                raise RuntimeError("crash inside the VM run")
        except RuntimeError:
            pass
        assert termios.tcgetattr(slave) == before
        assert os.get_blocking(slave) == flags_before
    finally:
        os.close(master)
        os.close(slave)


def test_blocking_mode_comes_back_when_stdin_and_stdout_share_one_file_description():
    """A shell gives kvmkit one open terminal as fd 0 and fd 1: O_NONBLOCK is a property of that
    description, so saving fd 1's flags after setting fd 0's would "restore" O_NONBLOCK (issue 12, item 11)."""
    master, slave = pty.openpty()
    out = os.dup(slave)  # the same open file description, as a shell's stdout is its stdin
    try:
        assert os.get_blocking(slave)
        term = RawTerminal(slave, out)
        term.enter()
        assert not os.get_blocking(slave) and not os.get_blocking(out)
        term.restore()
        assert os.get_blocking(slave) and os.get_blocking(out)
    finally:
        os.close(out)
        os.close(master)
        os.close(slave)
