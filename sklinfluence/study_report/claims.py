"""The paper's claims, each set beside what the study measured, with a verdict.

Bae et al. (2022) report, for MNIST-scale models, that

1. influence estimates agree with the proximal Bregman response function
   (PBRF): Spearman correlation between 0.52 and 0.99;
2. they barely agree with cold-start leave-one-out retraining: Spearman
   between −0.08 and 0.12 — so influence answers the PBRF's question better
   than leave-one-out's;
3. the warm-start, proximity and non-convergence gaps dominate the gap,
   while the linearization and solver errors are about an order of
   magnitude smaller;
4. PBRF self-influence finds over 80 % of the corrupted labels after
   inspecting 20 % of the data (10 % of the labels flipped).

:func:`assess_claims` judges each on the study's numbers by a rule stated
with it: per architecture it *holds*, holds *partly* or *fails*, and the
claim is "reproduced" where it holds on every architecture, "not
reproduced" where it holds on none, and "partly" in between. The rules read
the claims as the paper states them; the settings of the study are fixed
beforehand, never tuned to make a claim hold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..zoo import ZOO, Logistic

__all__ = ["Claim", "assess_claims", "term_summary", "agreement_summary", "nonlinear",
           "REPRODUCED", "PARTLY", "NOT_REPRODUCED", "NOT_MEASURED"]

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_MEASURED = (
    "reproduced", "partly", "not reproduced", "not measured")
HOLDS, FAILS = "holds", "fails"
#: The paper's ranges.
IF_PBRF_RANGE = (0.52, 0.99)
IF_LOO_RANGE = (-0.08, 0.12)
#: "About an order of magnitude".
DOMINANCE = 10.0
DETECTION_FOUND = 0.8
N_LEADING = 3  # warm-start, proximity, non-convergence


@dataclass
class Claim:
    """One claim of the paper and what the study found.

    Parameters
    ----------
    key : str
        Short name (``"if_pbrf"``, ``"if_loo"``, ``"pbrf_over_loo"``,
        ``"terms"``, ``"detection"``).
    paper : str
        What the paper reports.
    rule : str
        How the study's numbers decide the verdict.
    verdict : str
        ``"reproduced"``, ``"partly"``, ``"not reproduced"`` or
        ``"not measured"``.
    measured : str
        The measured numbers, in a sentence.
    per_entry : dict of str to tuple of (str, str)
        Per architecture: the number(s) and ``"holds"``, ``"partly"`` or
        ``"fails"``.
    """

    key: str
    paper: str
    rule: str
    verdict: str = NOT_MEASURED
    measured: str = ""
    per_entry: dict = field(default_factory=dict)


def nonlinear(entries: Any) -> list[str]:
    """The entries that are neural networks: the paper's claims are about them.

    Parameters
    ----------
    entries : iterable of str
        Keys of :data:`sklinfluence.zoo.ZOO`.

    Returns
    -------
    entries : list of str
        Those whose module is not the linear :class:`~sklinfluence.zoo.Logistic`.
    """
    return [e for e in entries if ZOO[e].module is not Logistic]


def term_summary(curve: Any, value: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each term's mean and standard deviation over seeds and removed rows.

    Parameters
    ----------
    curve : Bunch
        A :func:`~sklinfluence.study.decomposition_curve` result.
    value : int, default=0
        Position of the parameter value in ``curve.param_range``.

    Returns
    -------
    mean, std : ndarray of shape (5,)
        Over seeds and removed rows (``ddof=0``).
    """
    terms = np.asarray(curve.terms[value], dtype=np.float64)
    return terms.mean(axis=(0, 1)), terms.std(axis=(0, 1))


def agreement_summary(curve: Any, reference: str, value: int = 0) -> tuple[float, float]:
    """Mean and standard deviation over seeds of influence's agreement with a reference.

    Parameters
    ----------
    curve : Bunch
        A :func:`~sklinfluence.study.decomposition_curve` result.
    reference : {"pbrf", "proximal", "warm_start", "loo"}
        The rung compared with.
    value : int, default=0
        Position of the parameter value in ``curve.param_range``.

    Returns
    -------
    mean, std : float
        Of the self-influence Spearman correlations over the seeds (``nan``
        seeds — constant scores — left out).
    """
    values = np.asarray(curve.agreement["self"]["spearman"][reference][value], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)), float(np.nanstd(values))


def _verdict(statuses: list[str]) -> str:
    if not statuses:
        return NOT_MEASURED
    if all(s == HOLDS for s in statuses):
        return REPRODUCED
    if all(s == FAILS for s in statuses):
        return NOT_REPRODUCED
    return PARTLY


def _listing(per_entry: dict) -> str:
    return "; ".join(f"{entry} {text}" for entry, (text, _) in per_entry.items())


def _if_pbrf(curves: dict) -> Claim:
    low, high = IF_PBRF_RANGE
    claim = Claim("if_pbrf", f"Influence agrees with the PBRF: Spearman between {low} and "
                  f"{high} on MNIST-scale models.",
                  "Per neural network, the mean over seeds of the Spearman correlation over "
                  "the removed rows between influence's and the PBRF's self-influence. It "
                  f"holds at {low} or more (above {high} is closer agreement than the "
                  "paper's and counts as holding).")
    for entry, curve in curves.items():
        mean, _ = agreement_summary(curve, "pbrf")
        claim.per_entry[entry] = (f"{mean:+.2f}", HOLDS if mean >= low else FAILS)
    claim.verdict = _verdict([s for _, s in claim.per_entry.values()])
    claim.measured = "Spearman: " + _listing(claim.per_entry) + "."
    return claim


def _if_loo(curves: dict, n_rows: int) -> Claim:
    low, high = IF_LOO_RANGE
    claim = Claim("if_loo", f"Influence barely agrees with cold-start leave-one-out: Spearman "
                  f"between {low} and {high}.",
                  "Per neural network, the mean over seeds of the Spearman correlation "
                  "between influence's and cold-start leave-one-out's self-influence. It "
                  f"holds inside [{low}, {high}].")
    for entry, curve in curves.items():
        mean, _ = agreement_summary(curve, "loo")
        claim.per_entry[entry] = (f"{mean:+.2f}", HOLDS if low <= mean <= high else FAILS)
    claim.verdict = _verdict([s for _, s in claim.per_entry.values()])
    noise = 1.0 / np.sqrt(max(n_rows - 1, 1))
    claim.measured = (f"Spearman: {_listing(claim.per_entry)}. Over {n_rows} removed rows a "
                      f"Spearman correlation of unrelated rankings has a standard deviation "
                      f"of about {noise:.2f}.")
    return claim


def _pbrf_over_loo(curves: dict) -> Claim:
    claim = Claim("pbrf_over_loo", "Influence answers the PBRF's question, not leave-one-out's: "
                  "it agrees better with the PBRF than with cold-start retraining.",
                  "Per neural network, holds where the mean IF–PBRF Spearman exceeds the mean "
                  "IF–LOO Spearman.")
    for entry, curve in curves.items():
        pbrf, _ = agreement_summary(curve, "pbrf")
        loo, _ = agreement_summary(curve, "loo")
        claim.per_entry[entry] = (f"{pbrf:+.2f} vs {loo:+.2f}", HOLDS if pbrf > loo else FAILS)
    claim.verdict = _verdict([s for _, s in claim.per_entry.values()])
    claim.measured = "IF–PBRF vs IF–LOO: " + _listing(claim.per_entry) + "."
    return claim


def dominance(means: np.ndarray) -> tuple[float, bool]:
    """How much the first three terms outweigh the last two.

    Parameters
    ----------
    means : ndarray of shape (5,)
        The five terms (their means), in ladder order.

    Returns
    -------
    ratio : float
        The sum of the first three over the sum of the last two (``inf``
        when those are 0).
    ordered : bool
        Whether each of the first three exceeds each of the last two.
    """
    leading, trailing = np.abs(means[:N_LEADING]), np.abs(means[N_LEADING:])
    ratio = leading.sum() / trailing.sum() if trailing.sum() > 0 else np.inf
    return float(ratio), bool(leading.min() > trailing.max())


def _terms(curves: dict) -> Claim:
    claim = Claim("terms", "The warm-start, proximity and non-convergence gaps dominate; the "
                  "linearization and solver errors are about an order of magnitude smaller.",
                  "Per neural network, each term's mean over seeds and removed rows (function-"
                  "space distance). It holds where the first three together are at least "
                  f"{DOMINANCE:g}× the last two together and each of the first three exceeds "
                  "each of the last two; partly where only one of these is true.")
    for entry, curve in curves.items():
        means, _ = term_summary(curve)
        ratio, ordered = dominance(means)
        big = ratio >= DOMINANCE
        status = HOLDS if big and ordered else (PARTLY if big or ordered else FAILS)
        text = f"{ratio:.0f}×" if np.isfinite(ratio) else "∞×"
        if not ordered:
            names = [n.replace("_", " ") for n in curve.term_names]
            small = names[int(np.argmin(np.abs(means[:N_LEADING])))]
            large = names[N_LEADING + int(np.argmax(np.abs(means[N_LEADING:])))]
            text += f" ({small} below {large})"
        claim.per_entry[entry] = (text, status)
    claim.verdict = _verdict([s for _, s in claim.per_entry.values()])
    claim.measured = "First three over last two: " + _listing(claim.per_entry) + "."
    return claim


def _detection(detection: dict, budget: float, flip_fraction: float) -> Claim:
    claim = Claim("detection", "PBRF self-influence finds over 80% of the corrupted labels "
                  "after inspecting 20% of the data (10% of the labels flipped).",
                  f"Per classifier with {flip_fraction:.0%} of its labels flipped, the fraction "
                  f"of flipped labels among the top {budget:.0%} of the training rows by PBRF "
                  f"self-influence. It holds above {DETECTION_FOUND:.0%}.")
    for entry, result in detection.items():
        found = result.found["PBRF"]
        claim.per_entry[entry] = (f"{found:.0%}", HOLDS if found > DETECTION_FOUND else FAILS)
    claim.verdict = _verdict([s for _, s in claim.per_entry.values()])
    claim.measured = "Found: " + _listing(claim.per_entry) + "."
    return claim


def assess_claims(results: Any) -> list[Claim]:
    """Judge each of the paper's claims on a study's results.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.run_study` (or
        ``compute_study``): its ``architectures``, ``detection`` and
        ``scale``.

    Returns
    -------
    claims : list of Claim
        ``if_pbrf``, ``if_loo``, ``pbrf_over_loo``, ``terms`` and
        ``detection``, each with its verdict (``"not measured"`` where the
        study did not run the section it needs).
    """
    curves = {e: results.architectures[e] for e in nonlinear(results.architectures)}
    scale = results.scale
    return [_if_pbrf(curves), _if_loo(curves, scale.rows), _pbrf_over_loo(curves),
            _terms(curves), _detection(results.detection, scale.budget, scale.flip_fraction)]
