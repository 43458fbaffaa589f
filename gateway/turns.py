"""Serving in turn: lines of waiting items per caller, kept in an OrderedDict, each caller's
next item waiting for its next turn (round robin). Sync calls wait for a model slot this way
(`admission.py`) and the embedded store's queued tasks for a worker (`tasks/fair.py`)."""

from __future__ import annotations

import collections
from typing import TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")


def next_in_turn(lines: collections.OrderedDict[_K, collections.deque[_V]]) -> tuple[_K, _V]:
    """The first line's first item; that line goes to the back, or away once empty."""
    key, line = next(iter(lines.items()))
    item = line.popleft()
    if line:
        lines.move_to_end(key)
    else:
        del lines[key]
    return key, item
