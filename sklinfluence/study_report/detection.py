"""Mislabel detection: flip labels, train once, rank the rows by five self-scores.

One detection run of an entry is one cell of the study (:func:`detection_cell`),
cached like the decomposition cells; its PBRF responses are kept one by one
as well, so that even an interrupted detection run resumes where it stopped.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
from joblib import Memory

from .. import InfluenceEstimator, PBRFEstimator, TracInCP, training_loss
from ..zoo import load_zoo_data, make_zoo_net
from .scales import StudyScale, solver_for

__all__ = ["SCORES", "DATA_SEED", "flip_labels", "detection_cell", "cached_detection",
           "detection_args"]

#: The self-scores ranked for mislabel detection, in plotting order.
SCORES = ("influence", "PBRF", "training loss", "grad-dot", "TracIn-CP")
#: Seeds of what is not a training run: the data subsets, the removed rows, the
#: flipped labels.
DATA_SEED = 0


def flip_labels(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip a fraction of the labels, each to another class drawn uniformly.

    Parameters
    ----------
    y : ndarray of shape (n,)
        Class labels.
    fraction : float
        Fraction of the rows to flip (``round(fraction · n)``, at least 1).
    seed : int
        Seeds the choice of rows and of their new classes.

    Returns
    -------
    noisy : ndarray of shape (n,)
        The labels after flipping.
    flipped : ndarray of bool of shape (n,)
        The rows whose label changed.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rng.choice(len(y), max(1, round(fraction * len(y))), replace=False)] = True
    noisy = y.copy()
    shift = rng.integers(1, len(classes), size=int(flipped.sum()))
    position = np.searchsorted(classes, y[flipped])
    noisy[flipped] = classes[(position + shift) % len(classes)]
    return noisy, flipped


def detection_cell(entry: str, n_detect: int, epochs: int, damping: float, solver: str,
                   flip_fraction: float, seed: int, responses: Any = None) -> dict:
    """Flip labels, train once, score every training row by each of :data:`SCORES`.

    All estimators share the seed, hence the trained net.

    Parameters
    ----------
    entry : str
        A classification entry of :data:`sklinfluence.zoo.ZOO`.
    n_detect : int
        Training rows.
    epochs : int
        Training epochs.
    damping : float
        ``λ`` of the influence and PBRF estimators.
    solver : str
        The study's solver (see :func:`~sklinfluence.study_report.solver_for`).
    flip_fraction : float
        Fraction of the labels flipped.
    seed : int
        The estimators' ``random_state``.
    responses : str, path or joblib.Memory, default=None
        Keeps each finished PBRF response, so that even an interrupted
        detection cell resumes where it stopped.

    Returns
    -------
    cell : dict
        ``scores`` (name → one score per row), ``is_flipped``, ``labels``
        (the noisy ones), ``seconds`` (per estimator) and ``warnings``
        (``(category, message)`` pairs).
    """
    X, y = load_zoo_data(entry, n_samples=n_detect, random_state=DATA_SEED)
    noisy, flipped = flip_labels(y, flip_fraction, DATA_SEED)
    net = make_zoo_net(entry, max_epochs=epochs)
    kw = dict(damping=damping, random_state=seed)
    estimators = {
        "influence": lambda: InfluenceEstimator(net, solver=solver_for(entry, solver), **kw),
        "PBRF": lambda: PBRFEstimator(net, memory=responses, **kw),
        "grad-dot": lambda: InfluenceEstimator(net, solver="identity", **kw),
        "TracIn-CP": lambda: TracInCP(net, random_state=seed)}
    scores, seconds, caught = {}, {}, []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for name, make in estimators.items():
            start = time.perf_counter()
            est = make().fit(X, noisy)
            scores[name] = np.asarray(est.score_samples(X, noisy), dtype=np.float64)
            if name == "influence":
                scores["training loss"] = np.asarray(training_loss(est, X, noisy),
                                                     dtype=np.float64)
            seconds[name] = time.perf_counter() - start
        caught = [(w.category.__name__, str(w.message)) for w in record]
    return {"scores": {name: scores[name] for name in SCORES}, "is_flipped": flipped,
            "labels": noisy, "seconds": seconds, "warnings": caught}


def cached_detection(memory: Memory) -> Any:
    """:func:`detection_cell` cached in ``memory`` (its ``responses`` left out of the key)."""
    return memory.cache(detection_cell, ignore=["responses"])


def detection_args(scale: StudyScale, entry: str) -> tuple:
    """The positional arguments of :func:`detection_cell` for an entry at the study's
    settings (training seed 0)."""
    return (entry, scale.n_detect, scale.epochs, scale.damping, scale.solver,
            scale.flip_fraction, 0)
