"""Every number of the study as one long table: ``study.csv``.

One row per number, with the columns of :data:`HEADER`:

``section``
    ``architectures`` (the per-architecture cells), ``sweep`` (the curves
    against a parameter), ``detection``, ``table`` (the numbers of the
    report's tables, derived from the others) or ``run``.
``architecture``, ``param_name``, ``param_value``, ``seed``
    The cell: the zoo entry, the swept parameter and its value (the
    per-architecture cells are the value ``net__max_epochs`` = the study's
    epochs), the training seed.
``row``
    The removed (or, for detection, scored) training row, or empty for a
    number about the whole cell.
``quantity``, ``value``
    What the number is and the number, written exactly (Python's shortest
    round-trip form).

Per removed row: each of the five terms (``warm_start_gap`` …), each rung's
self-influence (``self_score_<rung>``) and change of the mean evaluation
loss (``eval_change_<rung>``). Per cell: every field of
:func:`~sklinfluence.study.decomposition_curve`'s ``records`` (the terms'
mean and standard deviation over the rows, the correlations
``<quantity>_<statistic>_<reference>``, ``seconds``, ``n_warnings``).
Detection: each training row's ``score <name>``, ``is_flipped`` and
``label``; per entry ``found <name>`` at ``param_name`` ``budget`` and the
``seconds <name>`` of each score.
"""

from __future__ import annotations

from numbers import Number
from typing import Any, Iterator

import numpy as np

from .claims import agreement_summary, dominance, term_summary

__all__ = ["HEADER", "study_table"]

HEADER = ("section", "architecture", "param_name", "param_value", "seed", "row", "quantity",
          "value")
#: Record fields that say where a cell is, not what it measured.
_CELL_KEYS = ("param_name", "param_value", "seed", "n_rows")


def _number(value: Any) -> Any:
    """A plain Python number (exact in ``str``), or the value unchanged."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _curve_rows(section: str, entry: str, curve: Any) -> Iterator[tuple]:
    S = len(curve.seeds)
    for i in range(len(curve.param_range)):
        for j, seed in enumerate(curve.seeds):
            record = curve.records[i * S + j]
            cell = (section, entry, curve.param_name, _number(record["param_value"]), int(seed))
            for r, row in enumerate(curve.rows):
                for k, name in enumerate(curve.term_names):
                    yield (*cell, int(row), name, _number(curve.terms[i, j, r, k]))
                for k, rung in enumerate(curve.rung_names):
                    yield (*cell, int(row), f"self_score_{rung}",
                           _number(curve.self_scores[i, j, r, k]))
                    yield (*cell, int(row), f"eval_change_{rung}",
                           _number(curve.eval_changes[i, j, r, k]))
            for key, value in record.items():
                if key not in _CELL_KEYS and isinstance(value, Number):
                    yield (*cell, "", key, _number(value))


def _detection_rows(entry: str, result: Any, budget: float) -> Iterator[tuple]:
    cell = ("detection", entry, "", "", 0)
    for row in range(len(result.is_flipped)):
        yield (*cell, row, "is_flipped", int(result.is_flipped[row]))
        yield (*cell, row, "label", _number(result.labels[row]))
        for name, scores in result.scores.items():
            yield (*cell, row, f"score {name}", _number(scores[row]))
    for name, found in result.found.items():
        yield ("detection", entry, "budget", budget, 0, "", f"found {name}", found)
    for name, seconds in result.seconds.items():
        yield (*cell, "", f"seconds {name}", seconds)


def _summary_rows(results: Any) -> Iterator[tuple]:
    epochs = results.scale.epochs
    for entry, curve in results.architectures.items():
        cell = ("table", entry, "net__max_epochs", epochs, "")
        means, stds = term_summary(curve)
        for name, mean, std in zip(curve.term_names, means, stds):
            yield (*cell, "", f"{name} mean", _number(mean))
            yield (*cell, "", f"{name} std", _number(std))
        ratio, ordered = dominance(means)
        yield (*cell, "", "first three over last two", ratio)
        yield (*cell, "", "each of first three above each of last two", int(ordered))
        for ref in curve.references:
            mean, std = agreement_summary(curve, ref)
            yield (*cell, "", f"self_spearman_{ref} mean", mean)
            yield (*cell, "", f"self_spearman_{ref} std", std)


def study_table(results: Any) -> list[tuple]:
    """Every number of a study's results as rows of :data:`HEADER` (see the module).

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.run_study`.

    Returns
    -------
    rows : list of tuple
        One tuple per number, in :data:`HEADER` order.
    """
    rows: list[tuple] = []
    for entry, curve in results.architectures.items():
        rows.extend(_curve_rows("architectures", entry, curve))
    for entry, params in results.sweeps.items():
        for curve in params.values():
            rows.extend(_curve_rows("sweep", entry, curve))
    for entry, result in results.detection.items():
        rows.extend(_detection_rows(entry, result, results.scale.budget))
    rows.extend(_summary_rows(results))
    for key in ("seconds", "n_cells", "n_computed"):
        rows.append(("run", "", "", "", "", "", key, _number(results[key])))
    return rows
