"""Saved device state: the error a damaged snapshot raises, and the checks every ``load_state`` makes.

Why a device checks its own state: a snapshot is a file, and a file can be
truncated, edited, or written by another kvmkit version. A model that
trusted it could be left with a FIFO longer than the part has, an index
past a table, or a half-loaded register file. So each ``load_state`` reads
every field through a :class:`StateReader`, which checks type, range and
length bound, makes its cross-field checks, and only then changes the
device: on :class:`StateError` the device is as it was.

A state is a plain ``dict`` that ``json.dumps`` accepts: ints, bools,
strings, lists and nested dicts; bytes are hex strings; no floats. Field
names follow the datasheet or specification names of what they hold.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from kvmkit.errors import KvmkitError

__all__ = ["StateError", "StateReader", "check_keys"]

_HEX = re.compile(r"(?:[0-9a-f]{2})*")


class StateError(KvmkitError):
    """A snapshot's device state that is damaged or from another version (or cannot be taken now)."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_keys(state: object, device: str, keys: Collection[str]) -> Mapping[str, object]:
    """``state`` as a mapping with exactly ``keys``: a missing or an unknown field is a damaged state.

    Unknown fields are refused rather than ignored, because they mean the
    snapshot came from a version that saved something this one would lose.
    """
    if not isinstance(state, Mapping):
        raise StateError(f"The saved state of {device} is {type(state).__name__}, not a JSON object.")
    for key in keys:
        if key not in state:
            raise StateError(f"The saved state of {device} has no '{key}' field.")
    for key in state:
        if key not in keys:
            raise StateError(f"The saved state of {device} has an unknown field {_show(key)}.")
    return state


class StateReader:
    """Typed, bounded access to the fields of one saved state (``device`` names it in errors)."""

    def __init__(self, state: object, device: str, keys: Collection[str]) -> None:
        self.state = check_keys(state, device, keys)
        self.device = device

    def fail(self, key: str, why: str) -> StateError:
        """The error for field ``key`` (``why`` finishes the sentence), for the caller to raise."""
        return StateError(f"The saved state of {self.device} has a bad '{key}' field: {why}.")

    def take_int(self, key: str, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``; a bool is not one, though Python says it is."""
        value = self.state[key]
        if type(value) is not int or not lo <= value <= hi:
            raise self.fail(key, f"{_show(value)} is not an integer from {lo} to {hi}")
        return value

    def take_optional_int(self, key: str, lo: int, hi: int) -> int | None:
        """An integer in ``[lo, hi]``, or None (JSON null) for "none"."""
        return None if self.state[key] is None else self.take_int(key, lo, hi)

    def take_bool(self, key: str) -> bool:
        value = self.state[key]
        if type(value) is not bool:
            raise self.fail(key, f"{_show(value)} is not true or false")
        return value

    def take_str(self, key: str, choices: Collection[str]) -> str:
        value = self.state[key]
        if not isinstance(value, str) or value not in choices:
            raise self.fail(key, f"{_show(value)} is not one of {', '.join(sorted(choices))}")
        return value

    def take_hex_bytes(self, key: str, max_len: int, *, min_len: int = 0) -> bytes:
        """Bytes saved as a lower-case hex string of ``min_len`` to ``max_len`` bytes."""
        value = self.state[key]
        if not isinstance(value, str) or not _HEX.fullmatch(value):
            raise self.fail(key, f"{_show(value)} is not a string of hex byte pairs")
        if not min_len <= len(value) // 2 <= max_len:
            raise self.fail(key, f"{len(value) // 2} bytes are not {min_len} to {max_len}")
        return bytes.fromhex(value)

    def take_list(self, key: str, max_len: int, *, min_len: int = 0) -> list[object]:
        """A list of ``min_len`` to ``max_len`` items, not yet checked (nested states, for their owners)."""
        value = self.state[key]
        if not isinstance(value, list):
            raise self.fail(key, f"{_show(value)} is not a list")
        if not min_len <= len(value) <= max_len:
            raise self.fail(key, f"{len(value)} items are not {min_len} to {max_len}")
        return value

    def take_int_list(self, key: str, lo: int, hi: int, max_len: int, *, min_len: int = 0) -> list[int]:
        items = self.take_list(key, max_len, min_len=min_len)
        for item in items:
            if type(item) is not int or not lo <= item <= hi:
                raise self.fail(key, f"item {_show(item)} is not an integer from {lo} to {hi}")
        return items  # type: ignore[return-value]

    def take_state(self, key: str, keys: Collection[str]) -> StateReader:
        """A nested state with exactly ``keys``."""
        return StateReader(self.state[key], f"{self.device} ('{key}')", keys)

    def require(self, ok: bool, key: str, why: str) -> None:
        """A cross-field check: raise for ``key`` unless ``ok``."""
        if not ok:
            raise self.fail(key, why)
