"""Warnings that point at the user's line, and names for what a warning is about.

Every warning sklinfluence raises goes through :func:`warn`, which attributes
it to the first frame of the caller's own code: frames in this package are
skipped (the public methods are wrapped, e.g. by
:func:`~sklinfluence.utils.threads.compute_section`, so no fixed ``stacklevel``
is right), and so are the frames of libraries that merely call into it —
scikit-learn (``GridSearchCV.fit``, ``cross_val_score``), joblib, skorch,
torch, and the standard library's ``contextlib``, ``functools``, ``threading``
and ``concurrent`` — so that a ``GridSearchCV(...).fit`` in a script is blamed
on that line. Where no such frame exists (a worker thread) the warning points
at the library's caller of :func:`warn` (``stacklevel=2``).

A solver warns about right-hand sides it knows only by position; the code
that builds them says what each one is with :func:`naming_right_hand_sides`
(e.g. "training row 7" for the removal of that row), and the solver asks
:func:`right_hand_side_name`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from typing import Any, Callable, Iterator, Sequence

__all__ = ["warn", "user_stacklevel", "describe_removal", "removal_names",
           "naming_right_hand_sides", "right_hand_side_name", "list_in_words"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
#: Top-level modules whose frames only pass a call on to sklinfluence.
PASS_THROUGH = frozenset({"sklearn", "joblib", "skorch", "torch", "contextlib", "functools",
                          "threading", "concurrent"})


def _passes_through(frame: Any) -> bool:
    if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        return True
    module = frame.f_globals.get("__name__") or ""
    return module.partition(".")[0] in PASS_THROUGH


def user_stacklevel() -> int:
    """The ``stacklevel`` its caller passes to :func:`warnings.warn`.

    The level of the first frame, walking out from the caller (level 1),
    that is neither in sklinfluence nor in a library of :data:`PASS_THROUGH`;
    2 when every frame is one of theirs.
    """
    frame = sys._getframe(1)  # the frame that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None:
        if not _passes_through(frame):
            return level
        frame, level = frame.f_back, level + 1
    return 2


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warnings.warn` attributed to the user's line (see the module docstring)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


# ------------------------------------------------------------ what it is about
def _label_text(label: Any) -> str:
    value = label.item() if hasattr(label, "item") else label
    return repr(value)


def describe_removal(removal: Any) -> str:
    """Words for a :class:`~sklinfluence.model.removal.Removal`: its rows (and group label).

    ``"training row 7"``, ``"group 'a' (training rows 3, 5 and 9)"``, and for
    rows that are not training rows, their number.
    """
    index = [int(i) for i in removal.index]
    known = [i for i in index if i >= 0]
    others = len(index) - len(known)
    parts = []
    if len(known) == 1:
        parts.append(f"training row {known[0]}")
    elif 1 < len(known) <= 8:
        parts.append(f"training rows {', '.join(map(str, known[:-1]))} and {known[-1]}")
    elif known:
        parts.append(f"training rows {', '.join(map(str, known[:6]))}, … ({len(known)} rows)")
    if others:
        parts.append(f"{others} rows that are not training rows" if others > 1
                     else "a row that is not a training row")
    rows = " and ".join(parts)
    label = getattr(removal, "label", None)
    return f"group {_label_text(label)} ({rows})" if label is not None else rows


def removal_names(removals: Sequence[Any]) -> Callable[[int], str]:
    """``j ↦ "the removal of …"`` for ``removals[j]`` (:func:`describe_removal`), built
    only when a warning asks."""
    return lambda j: f"the removal of {describe_removal(removals[j])}"


_NAMES: contextvars.ContextVar[Callable[[int], str] | None] = contextvars.ContextVar(
    "sklinfluence_rhs_names", default=None)


@contextlib.contextmanager
def naming_right_hand_sides(names: Sequence[str] | Callable[[int], str]) -> Iterator[None]:
    """Within the block, right-hand side ``j`` of a solve is ``names[j]`` in warnings."""
    name = names if callable(names) else (lambda j, names=names: names[j])
    token = _NAMES.set(name)
    try:
        yield
    finally:
        _NAMES.reset(token)


def right_hand_side_name(j: int) -> str:
    """What right-hand side ``j`` of the current solve is (its position if unnamed)."""
    name = _NAMES.get()
    if name is not None:
        try:
            return name(j)
        except (IndexError, KeyError):
            pass
    return f"right-hand side {j}"


def list_in_words(items: Sequence[str], limit: int = 20) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``: every item, in order, up to ``limit``;
    beyond, the first ``limit`` and how many more ("… and 3 more")."""
    items = list(items)
    if len(items) > limit:
        return f"{', '.join(items[:limit])} and {len(items) - limit} more"
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"
