"""What every device's snapshot test checks: a state survives JSON, and a damaged one is refused without a change.

Imported by tests/devices/test_device_state.py and
tests/devices/virtio/test_virtio_state.py.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import pytest

from kvmkit.devices.state import StateError

# Replacements that no field of any device state accepts (no field holds a
# float, nothing is 200 bits wide, nothing nests a list in a list or takes
# a key named "bogus").
_ALWAYS_BAD: tuple[object, ...] = ("bogus", 1.5, 1 << 200, -(1 << 200), [[]], {"bogus": 1})


def as_json(state: object) -> dict:
    """The state as a snapshot file gives it back: through json, with no float and no NaN on the way."""
    text = json.dumps(state, allow_nan=False)
    _assert_no_float(state)
    out = json.loads(text)
    assert isinstance(out, dict)
    return out


def _assert_no_float(value: object) -> None:
    assert not isinstance(value, float), "a device state holds a float"
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"key {k!r} is not a string"
            _assert_no_float(v)
    elif isinstance(value, list):
        for v in value:
            _assert_no_float(v)
    else:
        assert value is None or isinstance(value, (int, str)), f"{value!r} is not a JSON scalar"


def lockstep(original: Any, ops: list, apply: Callable[[Any, tuple], object], log: list,
             save: Callable[[Any], object], restore: Callable[[dict], tuple[Any, list]], every: int = 1) -> int:
    """Give ``ops`` to ``original`` and, from every ``every``-th op on, to a device restored from its state then.

    Each restored device is loaded from ``save(original)`` passed through
    JSON (``restore(state)`` builds a fresh one with a copy of the
    original's surroundings, RAM or clock, and loads it); it must not call
    its host while loading, must save the same state back, then answer
    every later op as the original does and make the same host calls
    (``log`` is the original's, the second item of ``restore`` the copy's).
    Saving at every step, not once, checks every state the sequence passes
    through. ``save`` may return None where the device cannot be saved at
    that point (a console with output in flight). Returns how many devices
    were restored.
    """
    clones: list[tuple[Any, list, int]] = []
    for i, op in enumerate(ops):
        raw = save(original) if i % every == 0 else None
        if raw is not None:
            state = as_json(raw)
            copy, copy_log = restore(state)
            assert copy_log == [], f"load_state called the host: {copy_log}"
            assert as_json(save(copy)) == state, "a loaded device saves another state"
            clones.append((copy, copy_log, len(log)))
        want = apply(original, op)
        for copy, _, _ in clones:
            assert apply(copy, op) == want, f"a restored device answers {op} differently"
    for copy, copy_log, mark in clones:
        assert copy_log == log[mark:], "a restored device made other host calls"
    return len(clones)


def damaged(state: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """(where, copy of ``state`` damaged there) for every field, nested ones included."""
    yield f"{path}+bogus_field", {**state, "bogus_field": 0}
    for key, value in state.items():
        yield f"{path}{key}: deleted", {k: v for k, v in state.items() if k != key}
        for where, bad in _variants(value, f"{path}{key}"):
            yield where, {**state, key: bad}


def _variants(value: object, path: str) -> Iterator[tuple[str, object]]:
    for bad in _ALWAYS_BAD:
        if bad != value:
            yield f"{path} = {bad!r:.20}", bad
    if isinstance(value, bool):
        yield f"{path} = {int(value)}", int(value)
    elif isinstance(value, int):
        yield f"{path} = True", True
    elif isinstance(value, str):
        yield f"{path}: oversized", value + "00" * 70_000
    elif isinstance(value, list):
        yield f"{path}: oversized", value + [0] * 5000
        for i, item in enumerate(value):
            for where, bad in _variants(item, f"{path}[{i}]"):
                yield where, value[:i] + [bad] + value[i + 1:]
    if isinstance(value, dict):
        yield from damaged(value, f"{path}.")


def assert_refused(load: Callable[[object], None], state: object, observe: Callable[[], object]) -> StateError:
    """``load(state)`` raises StateError, one sentence, and ``observe()`` (the device and its host) is unchanged."""
    before = observe()
    with pytest.raises(StateError) as info:
        load(state)
    message = str(info.value)
    assert "\n" not in message and message.endswith("."), message
    assert observe() == before, f"a refused state changed the device: {message}"
    return info.value


def assert_all_damage_refused(load: Callable[[object], None], state: dict, observe: Callable[[], object]) -> int:
    """Every :func:`damaged` variant of a good ``state`` is refused; returns how many were tried."""
    n = 0
    for where, bad in damaged(state):
        try:
            assert_refused(load, bad, observe)
        except (Exception, pytest.fail.Exception) as e:
            raise AssertionError(f"damaged state accepted or mishandled ({where}): {e}") from None
        n += 1
    for not_a_state in (None, "state", [], 7):
        assert_refused(load, not_a_state, observe)
    return n
