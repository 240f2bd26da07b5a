"""Interrupt lines from device models to KVM's in-kernel PIC and IOAPIC.

On ISA, COM1 and COM3 share IRQ 4 (and COM2/COM4 IRQ 3): the line is the OR
of its sources, so one port lowering its output must not silence the other.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..devices.base import IrqCallback


class IrqLine:
    """One GSI, driven by any number of level sources, ORed."""

    def __init__(self, gsi: int, set_level: Callable[[int, bool], None]) -> None:
        self.gsi = gsi
        self._set_level = set_level
        self._levels: list[bool] = []
        self._level = False
        self._lock = threading.Lock()
        self.raises = 0

    def source(self) -> IrqCallback:
        """A callback for one device output on this line."""
        idx = len(self._levels)
        self._levels.append(False)

        def set_source(level: bool) -> None:
            with self._lock:
                self._levels[idx] = bool(level)
                new = any(self._levels)
                if new == self._level:
                    return
                self._level = new
                if new:
                    self.raises += 1
                self._set_level(self.gsi, new)

        return set_source

    @property
    def level(self) -> bool:
        return self._level
