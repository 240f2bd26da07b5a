from kvmkit.machine.irq import IrqLine


def test_shared_line_is_the_or_of_its_sources():
    calls = []
    line = IrqLine(4, lambda gsi, level: calls.append((gsi, level)))
    com1, com3 = line.source(), line.source()
    com1(True)
    com3(True)
    com1(False)          # COM3 still asserts: the line stays up
    assert calls == [(4, True)]
    com3(False)
    assert calls == [(4, True), (4, False)]
    assert line.raises == 1 and not line.level


def test_repeated_levels_do_not_retrigger():
    calls = []
    line = IrqLine(3, lambda gsi, level: calls.append(level))
    src = line.source()
    for _ in range(3):
        src(False)
    src(True)
    src(True)
    assert calls == [True]
