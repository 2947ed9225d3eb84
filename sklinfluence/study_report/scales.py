"""How big a study is: :class:`StudyScale` and the three named scales of :data:`SCALES`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Mapping

from ..zoo import ZOO

__all__ = ["StudyScale", "SCALES", "make_scale", "solver_for"]

#: Zoo entries whose layers the Kronecker-factored solvers do not factor (the
#: transformer's positional embedding, a bare parameter, see :mod:`sklinfluence.zoo`):
#: there the study's influence uses conjugate gradients instead.
KRONECKER_UNFACTORED = ("transformer",)
#: Solvers that need every layer in Kronecker form.
KRONECKER_SOLVERS = ("ekfac", "kfac", "kernel")


@dataclass(frozen=True)
class StudyScale:
    """The sizes and settings of one run of the paper's study.

    Every number the report shows is computed at these settings; the
    report states them. :data:`SCALES` holds the three named scales and
    :func:`make_scale` builds one with some fields replaced.

    Parameters
    ----------
    name : str
        The scale's name, for the report.
    architectures : tuple of str
        Zoo entries (:data:`sklinfluence.zoo.ZOO`) of the per-architecture
        table: the five terms and the agreement of influence with each rung.
    n_train : int
        Training rows of each architecture (a seeded random subset of its
        scikit-learn data).
    rows : int
        Training rows removed in every cell (the same indices for every
        architecture); the agreements are correlations over them.
    seeds : int
        Training runs per cell (seeds ``0 … seeds − 1``).
    epochs : int
        Training epochs of the per-architecture cells and of the width
        sweeps.
    sweeps : dict of str to dict of str to tuple
        ``{entry: {parameter: values}}``: the curves against a parameter of
        :func:`~sklinfluence.study.decomposition_curve` (``"net__module__width"``,
        ``"net__max_epochs"``).
    detection : tuple of str
        Classification entries on which mislabelled rows are detected.
    n_detect : int
        Training rows of each detection run.
    flip_fraction : float, default=0.1
        Fraction of those rows whose label is flipped to another class.
    budget : float, default=0.2
        Fraction of the data inspected at which detection is read off.
    damping : float, default=1e-2
        ``λ`` of every estimator (the command line's default).
    solver : str, default="ekfac"
        Solver of the practical influence (rung 5). An approximate solver,
        so that the solver error is measured rather than 0 by construction;
        entries it cannot factor use ``"cg"`` (:func:`solver_for`).
    """

    name: str
    architectures: tuple
    n_train: int
    rows: int
    seeds: int
    epochs: int
    sweeps: Mapping[str, Mapping[str, tuple]] = field(default_factory=dict)
    detection: tuple = ()
    n_detect: int = 300
    flip_fraction: float = 0.1
    budget: float = 0.2
    damping: float = 1e-2
    solver: str = "ekfac"


def _sweeps(widths: Mapping[str, tuple], epochs: tuple) -> dict:
    return {entry: {"net__module__width": tuple(w), "net__max_epochs": tuple(epochs)}
            for entry, w in widths.items()}


#: The named scales: ``"small"`` (about a minute on 2 cores), ``"default"`` (the
#: command line's, a few minutes) and ``"large"`` (every entry of the zoo, more
#: rows and seeds; several hours, not timed).
SCALES: dict[str, StudyScale] = {
    "small": StudyScale(
        "small", ("logistic", "mlp", "mlp_diabetes", "lenet", "autoencoder"), n_train=100,
        rows=8, seeds=2, epochs=10,
        sweeps=_sweeps({"mlp": (8, 32), "lenet": (4, 8)}, (5, 10)),
        detection=("mlp", "lenet"), n_detect=100),
    "default": StudyScale(
        "default", tuple(name for name in ZOO if name != "resnet"), n_train=200, rows=12,
        seeds=2, epochs=20,
        sweeps=_sweeps({"mlp": (8, 32, 128), "lenet": (4, 8, 16)}, (5, 20, 60)),
        detection=("mlp", "lenet"), n_detect=300),
    "large": StudyScale(
        "large", tuple(ZOO), n_train=500, rows=24, seeds=3, epochs=30,
        sweeps=_sweeps({"mlp": (8, 16, 32, 64, 128), "lenet": (2, 4, 8, 16)},
                       (5, 10, 20, 40, 80)),
        detection=("mlp", "lenet", "vgg"), n_detect=600),
}


def solver_for(entry: str, solver: str) -> str:
    """The solver the study uses on a zoo entry.

    Parameters
    ----------
    entry : str
        A key of :data:`sklinfluence.zoo.ZOO`.
    solver : str
        The study's solver (:attr:`StudyScale.solver`).

    Returns
    -------
    solver : str
        ``solver``, or ``"cg"`` where the entry has layers that a
        Kronecker-factored ``solver`` cannot factor (the transformer).
    """
    if solver in KRONECKER_SOLVERS and entry in KRONECKER_UNFACTORED:
        return "cg"
    return solver


def _check_entries(name: str, entries: Any, *, classifiers: bool = False) -> tuple:
    if isinstance(entries, str):
        entries = tuple(e.strip() for e in entries.split(",") if e.strip())
    entries = tuple(entries)
    unknown = [e for e in entries if e not in ZOO]
    if unknown:
        raise ValueError(f"{name}: unknown zoo entries {unknown}; the entries are "
                         f"{', '.join(ZOO)}.")
    if len(set(entries)) != len(entries):
        raise ValueError(f"{name} has repeated entries: {list(entries)}.")
    if classifiers:
        other = [e for e in entries if ZOO[e].task != "classification"]
        if other:
            raise ValueError(f"{name}: mislabel detection flips class labels, but {other} "
                             "are not classifiers.")
    return entries


def _check_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}.")
    return int(value)


def make_scale(scale: str | StudyScale = "default", **changes: Any) -> StudyScale:
    """A checked :class:`StudyScale`: a named one, with ``changes`` replacing fields.

    Parameters
    ----------
    scale : {"small", "default", "large"} or StudyScale, default="default"
        The starting point.
    **changes
        Fields of :class:`StudyScale` to replace (``rows=20``,
        ``architectures=("mlp", "lenet")``, ...); ``None`` values are
        ignored, so that unset command-line options change nothing.

    Returns
    -------
    scale : StudyScale
        The checked settings (entries as tuples, sizes as ints).

    Raises
    ------
    ValueError
        An unknown scale or zoo entry, a size out of range (fewer than 2
        removed rows, more removed rows than training rows, ...).
    TypeError
        A field :class:`StudyScale` does not have.

    Examples
    --------
    >>> from sklinfluence.study_report import make_scale
    >>> scale = make_scale("small", rows=4, architectures="mlp,lenet")
    >>> scale.architectures, scale.rows, scale.n_train
    (('mlp', 'lenet'), 4, 100)
    """
    if isinstance(scale, StudyScale):
        base = scale
    elif scale in SCALES:
        base = SCALES[scale]
    else:
        raise ValueError(f"scale must be one of {list(SCALES)} or a StudyScale, got {scale!r}.")
    fields = {f.name for f in dataclasses.fields(StudyScale)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise TypeError(f"unknown study settings {unknown}; the settings are {sorted(fields)}.")
    new = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
    architectures = _check_entries("architectures", new.architectures)
    if not architectures:
        raise ValueError("architectures is empty: name at least one zoo entry.")
    detection = _check_entries("detection", new.detection, classifiers=True)
    n_train = _check_int("n_train", new.n_train, 3)
    rows = _check_int("rows", new.rows, 2)
    if rows > n_train:
        raise ValueError(f"rows={rows} removed rows do not fit in n_train={n_train} training "
                         "rows.")
    seeds = _check_int("seeds", new.seeds, 1)
    epochs = _check_int("epochs", new.epochs, 1)
    n_detect = _check_int("n_detect", new.n_detect, 10)
    sweeps = {}
    for entry, params in dict(new.sweeps).items():
        _check_entries("sweeps", [entry])
        sweeps[entry] = {}
        for param, values in dict(params).items():
            values = tuple(values)
            if not values:
                raise ValueError(f"sweeps[{entry!r}][{param!r}] has no values.")
            sweeps[entry][param] = values
    for name in ("flip_fraction", "budget"):
        value = getattr(new, name)
        if not isinstance(value, Real) or not 0 < value < 1:
            raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}.")
    if not isinstance(new.damping, Real) or not new.damping > 0:
        raise ValueError(f"damping must be a positive number, got {new.damping!r}.")
    return dataclasses.replace(new, architectures=architectures, detection=detection,
                               n_train=n_train, rows=rows, seeds=seeds, epochs=epochs,
                               n_detect=n_detect, sweeps=sweeps)
