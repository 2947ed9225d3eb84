"""Studies: the five terms and the agreement of influence against a parameter.

:func:`decomposition_curve` is :func:`sklearn.model_selection.validation_curve`
for the :class:`~sklinfluence.Decomposer`: for every value of one parameter
(the net's width, its training epochs, the damping, ...) and every training
seed it clones the Decomposer, sets the value and the seed, fits, and
records

- the five terms of the influence–LOO gap for the same removed training
  rows (:meth:`Decomposer.transform <sklinfluence.Decomposer.transform>`);
- how well the influence estimate (rung 5) agrees with the PBRF, the
  proximal and the warm-start retraining and cold-start leave-one-out —
  Spearman and Pearson correlations over the removed rows, of the rows'
  self-influence (:meth:`Decomposer.rung_scores
  <sklinfluence.Decomposer.rung_scores>`) and of the change of the mean
  evaluation loss (:meth:`Decomposer.rung_losses
  <sklinfluence.Decomposer.rung_losses>`).

Each (value, seed) cell is one task: cells run in parallel through joblib
(so ``joblib.parallel_config(backend="dask")`` runs them on a Dask cluster),
are cached one by one with ``memory=`` (a killed run resumes without
redoing finished cells) and show a tqdm bar with ``verbose``.

:func:`detection_curve` is the mislabel-detection curve of any self-score:
the fraction of flipped labels found against the fraction of the training
data inspected, top-ranked first.

The displays of :mod:`sklinfluence.display` plot both.
"""

from __future__ import annotations

import os
import time
import warnings
from inspect import Parameter, isclass, signature
from numbers import Integral
from typing import Any, Sequence

import numpy as np
from joblib import delayed
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from sklearn.utils import Bunch, check_random_state
from sklearn.utils.validation import check_memory
from tqdm.auto import tqdm

from .agreement import REFERENCES as AGREEMENT_REFERENCES
from .agreement import agreement as correlation
from .baselines import training_loss
from .decomposer import Decomposer
from .utils._warnings import user_stacklevel
from .utils.execution import streaming_parallel

__all__ = ["decomposition_curve", "detection_curve", "REFERENCES", "STATISTICS", "QUANTITIES"]

#: The responses influence is compared with: short name → rung of the ladder
#: (the names of :func:`~sklinfluence.agreement_scorer`'s ``reference``).
REFERENCES = {name: AGREEMENT_REFERENCES[name] for name in ("pbrf", "proximal", "warm_start", "loo")}
#: Correlations computed over the removed rows.
STATISTICS = ("spearman", "pearson")
#: What is correlated: each removed row's own loss change (``"self"``), and the
#: change of the mean evaluation loss when the row is removed (``"eval"``).
QUANTITIES = ("self", "eval")
#: The rung whose agreement with the references is measured.
ESTIMATE = "influence"
#: Parameters of the Decomposer that decide how, not what, it computes: left out
#: of the cache key, so a run resumed with another ``n_jobs`` still finds its cells.
EXECUTION_PARAMS = ("n_jobs", "verbose", "memory")

# ------------------------------------------------------------------ validation
def _check_estimator(estimator: Any) -> None:
    if isclass(estimator) or not isinstance(estimator, Decomposer):
        what = estimator.__name__ if isclass(estimator) else type(estimator).__name__
        raise TypeError(
            "decomposition_curve needs a Decomposer instance (it walks every rung of the "
            f"ladder), got {what}. Wrap the same net: Decomposer(net, damping=...); for the "
            "agreement of one estimator with a reference use agreement_scorer in GridSearchCV.")
    if isinstance(estimator.net, FrozenEstimator):
        raise ValueError(
            "decomposition_curve refits the net for every value and seed, and cold-start "
            "leave-one-out needs its initial parameters, which a FrozenEstimator does not "
            "have. Pass the unfitted net: Decomposer(net, ...).")


def _check_param_name(estimator: Decomposer, param_name: Any, value: Any) -> None:
    if not isinstance(param_name, str) or not param_name:
        raise TypeError(f"param_name must be a parameter name (str), got {param_name!r}.")
    if param_name == "random_state" or param_name.endswith("__random_state"):
        raise ValueError(f"param_name={param_name!r}: the training seed is swept by seeds=, "
                         "not by param_range.")
    if param_name in EXECUTION_PARAMS:
        raise ValueError(f"param_name={param_name!r} changes how the Decomposer runs, not "
                         "what it computes; there is nothing to sweep.")
    try:
        clone(estimator).set_params(**{param_name: value})
    except ValueError:
        owner, path = estimator, param_name
        while "__" in path:  # the innermost estimator that exists
            head, _, rest = path.partition("__")
            inner = owner.get_params(deep=False).get(head)
            if not hasattr(inner, "get_params"):
                break
            owner, path = inner, rest
        known = sorted(owner.get_params(deep=False))
        hint = (" The wrapped net's parameters are addressed as 'net__<name>' (e.g. "
                "'net__max_epochs', 'net__lr', 'net__module__<argument of the module>')."
                if owner is estimator else "")
        raise ValueError(f"unknown param_name {param_name!r}: {type(owner).__name__} has no "
                         f"parameter {path!r}; its parameters are {known}.{hint}") from None
    # skorch accepts any module__/criterion__/optimizer__ name and fails only in fit:
    # check it against the class it will be passed to.
    parts = param_name.split("__")
    if len(parts) == 3 and parts[0] == "net" and parts[1] in ("module", "criterion",
                                                                "optimizer"):
        target = getattr(estimator.net, parts[1], None)
        if isclass(target):
            params = signature(target).parameters
            if parts[2] not in params and not any(
                    p.kind is Parameter.VAR_KEYWORD for p in params.values()):
                raise ValueError(
                    f"unknown param_name {param_name!r}: {target.__name__} takes no argument "
                    f"{parts[2]!r}; it takes {[p for p in params if p != 'self']}.")


def _check_range(param_range: Any) -> list:
    if isinstance(param_range, (str, bytes)) or not hasattr(param_range, "__iter__"):
        raise TypeError("param_range must be a sequence of values, e.g. [1e-3, 1e-2, 1e-1]; "
                        f"got {param_range!r}.")
    values = list(param_range)
    if not values:
        raise ValueError("param_range is empty: give at least one value to evaluate.")
    return values


def _check_seeds(seeds: Any) -> np.ndarray:
    if isinstance(seeds, Integral) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds={seeds}: give at least one seed.")
        seeds = range(int(seeds))
    values = list(seeds) if hasattr(seeds, "__iter__") else [seeds]
    if not values or not all(isinstance(s, Integral) and not isinstance(s, bool)
                             for s in values):
        raise ValueError("seeds must be a non-empty sequence of integers (each the "
                         f"Decomposer's random_state for one training run), got {seeds!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"seeds has repeated values {values}: each seed is one training run.")
    return np.asarray(values, dtype=np.int64)


def _check_rows(rows: Any, n: int, random_state: Any) -> np.ndarray:
    if isinstance(rows, Integral) and not isinstance(rows, bool):
        if not 2 <= rows <= n:
            raise ValueError(f"rows={rows}: draw between 2 and n_samples={n} rows to remove "
                             "(the agreement is a correlation over removed rows).")
        return np.sort(check_random_state(random_state).choice(n, int(rows), replace=False))
    index = np.asarray(rows)
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise ValueError("rows must be a number of rows to draw or a 1-D array of training "
                         f"row indices, got {rows!r}.")
    if len(index) < 2:
        raise ValueError("rows must select at least 2 training rows (the agreement is a "
                         f"correlation over removed rows), got {len(index)}.")
    if index.min() < 0 or index.max() >= n:
        raise ValueError(f"rows must be indices into X's {n} rows, got values from "
                         f"{index.min()} to {index.max()}.")
    if len(np.unique(index)) != len(index):
        raise ValueError("rows has repeated indices: each row is removed once.")
    return index.astype(np.int64)


# ------------------------------------------------------------------ one cell
def _take(values: Any, rows: np.ndarray) -> Any:
    """The ``rows`` of an array-like (positions in a DataFrame or Series)."""
    return values.iloc[rows] if hasattr(values, "iloc") else np.asarray(values)[rows]


def _curve_cell(estimator: Decomposer, X: Any, y: Any, X_eval: Any, y_eval: Any,
                rows: np.ndarray, execution: dict) -> dict:
    """Fit one configured Decomposer and measure it on ``rows``.

    ``execution`` (``n_jobs``, ``verbose``, ``memory``) is not part of the
    cache key (see ``EXECUTION_PARAMS``).
    """
    est = clone(estimator).set_params(**execution)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X, y, X_eval, y_eval)
        X_rows, y_rows = _take(X, rows), _take(y, rows)
        terms = est.transform(X_rows, y_rows)
        self_scores = est.rung_scores(X_rows, y_rows)
        losses = est.rung_losses(X_rows, y_rows)
        base = training_loss(est, X if X_eval is None else X_eval,
                             y if X_eval is None else y_eval).mean()
    return {"terms": np.asarray(terms, dtype=np.float64),
            "self_scores": np.asarray(self_scores, dtype=np.float64),
            "eval_changes": np.asarray(losses, dtype=np.float64) - base,
            "rung_names": list(est.rungs_),
            "term_names": [str(t) for t in est.get_feature_names_out()],
            "seconds": time.perf_counter() - start,
            "warnings": [(w.category, str(w.message)) for w in caught]}


def _tagged(function: Any, key: tuple, *args: Any) -> tuple:
    return key, function(*args)


# ------------------------------------------------------------------ the curve
def decomposition_curve(estimator: Decomposer, X: Any, y: Any, *, param_name: str,
                        param_range: Sequence, seeds: Any = (0, 1, 2), rows: Any = 10,
                        X_eval: Any = None, y_eval: Any = None, random_state: Any = 0,
                        memory: Any = None, n_jobs: int | None = None,
                        verbose: int = 0) -> Bunch:
    """The five terms and the agreement of influence with ground truth, against a parameter.

    For each value of ``param_name`` and each seed, clones ``estimator``,
    sets the value and ``random_state=seed``, fits it on ``(X, y)`` and
    removes the same training ``rows``: records the five terms of each
    removal, every rung's self-influence and every rung's change of the mean
    evaluation loss, and the correlations over the removed rows of the
    influence estimate (rung 5) with the PBRF, proximal and warm-start
    retraining and cold-start leave-one-out. What
    :func:`~sklearn.model_selection.validation_curve` is to a score, this is
    to the decomposition: it is named after the
    :class:`~sklinfluence.Decomposer` it sweeps, since "response" already
    names a parameter change ``Δθ`` in this library.

    Parameters
    ----------
    estimator : Decomposer
        The configuration to sweep (fitted or not: it is cloned, never
        changed). Its ``metric`` decides the terms and its ``measure`` the
        self-influence and loss changes; its ``n_jobs``, ``verbose`` and
        ``memory`` apply inside each cell.
    X : array-like of shape (n_samples, ...)
        Training inputs.
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Training targets.
    param_name : str
        A parameter of the Decomposer (``"damping"``, ``"warm_start_fraction"``)
        or of its net through ``net__`` (``"net__max_epochs"``,
        ``"net__lr"``, ``"net__module__hidden"``), as for ``set_params``.
        Not ``random_state``: that is ``seeds``.
    param_range : sequence
        The values to evaluate, in plotting order.
    seeds : sequence of int or int, default=(0, 1, 2)
        One training run per seed (the Decomposer's ``random_state``: the
        net's initialisation and mini-batch order; the retrainings reuse
        it). An int ``k`` means ``range(k)``.
    rows : int or array-like of int, default=10
        The training rows removed in every cell: indices into ``X``, or a
        number of rows drawn without replacement by ``random_state``. At
        least 2 (the agreement is a correlation over them).
    X_eval, y_eval : array-like, default=None
        The evaluation set, passed to :meth:`Decomposer.fit
        <sklinfluence.Decomposer.fit>`: the inputs of the ``"output_l2"``
        metric and the loss whose change gives the ``"eval"`` agreement
        (e.g. held-out data; ``None``: the training rows). Both or neither.
    random_state : int, RandomState instance or None, default=0
        Draws ``rows`` when it is an int; a fixed default, so that a
        resumed run removes the same rows and finds its cached cells.
    memory : str, path, joblib.Memory or None, default=None
        A directory (``joblib.Memory(str(path))``) or a ``joblib.Memory``
        that caches each finished (value, seed) cell on disk, keyed by the
        configured Decomposer (all but ``n_jobs``, ``verbose`` and
        ``memory``), the data and the rows: a killed or repeated run loads
        the finished cells instead of recomputing them.
    n_jobs : int, default=None
        Cells computed in parallel by joblib (``None``: 1 unless in a
        :func:`joblib.parallel_config` context; ``-1``: all workers). Under
        ``joblib.parallel_config(backend="dask")`` the cells run on the
        Dask cluster.
    verbose : int, default=0
        ``> 0``: a progress bar over the cells (on stderr).

    Returns
    -------
    result : sklearn.utils.Bunch
        With ``V = len(param_range)``, ``S = len(seeds)``, ``R`` removed rows:

        param_name, param_range, seeds, rows
            What was evaluated (``param_range`` as a numpy array, of floats
            where the values are numbers).
        term_names : list of str
            The five terms, in column order.
        rung_names : list of str
            The six rungs, in ladder order.
        references : list of str
            ``["pbrf", "proximal", "warm_start", "loo"]``.
        metric, measure : str or None
            The Decomposer's (``None`` when swept).
        terms : ndarray of shape (V, S, R, 5)
            Each removal's five terms (:meth:`Decomposer.transform
            <sklinfluence.Decomposer.transform>`).
        terms_mean, terms_std : ndarray of shape (V, S, 5)
            Their mean and standard deviation (``ddof=0``) over the rows.
        self_scores : ndarray of shape (V, S, R, 6)
            Each rung's self-influence (:meth:`Decomposer.rung_scores
            <sklinfluence.Decomposer.rung_scores>`).
        eval_changes : ndarray of shape (V, S, R, 6)
            Each rung's change of the mean evaluation loss,
            :meth:`Decomposer.rung_losses <sklinfluence.Decomposer.rung_losses>`
            minus the mean evaluation loss at ``θˢ``.
        agreement : Bunch
            ``agreement[quantity][statistic][reference]`` of shape (V, S):
            the correlation over the ``R`` rows of the influence column with
            the reference's column of ``self_scores`` (quantity ``"self"``)
            or ``eval_changes`` (``"eval"``); statistic ``"spearman"`` or
            ``"pearson"``; ``nan`` where either column is constant.
        seconds : ndarray of shape (V, S)
            Wall time of each cell when it was computed.
        n_warnings : ndarray of shape (V, S)
            Warnings each cell raised (re-emitted with the cell named).
        from_cache : ndarray of bool of shape (V, S)
            Whether the cell was loaded from ``memory``.
        records : list of dict
            One tidy record per (value, seed), value-major: ``param_name``,
            ``param_value``, ``seed``, ``n_rows``, ``<term>_mean`` and
            ``<term>_std`` for each term,
            ``<quantity>_<statistic>_<reference>`` for each agreement,
            ``seconds``, ``n_warnings``, ``from_cache``.
            ``pandas.DataFrame(result.records)`` is the table, or write it
            with :class:`csv.DictWriter`.

    Raises
    ------
    TypeError
        ``estimator`` is not a Decomposer; ``param_range`` not a sequence.
    ValueError
        Unknown ``param_name`` (or ``random_state``), empty
        ``param_range``, bad ``seeds`` or ``rows``, a ``FrozenEstimator``
        net, ``X_eval`` without ``y_eval``.

    See Also
    --------
    sklinfluence.display.TermsCurveDisplay : Plots ``terms``.
    sklinfluence.display.AgreementCurveDisplay : Plots ``agreement``.
    sklearn.model_selection.validation_curve : The model of this function.

    Notes
    -----
    The cells differ only in the swept value and the seed; the removed rows
    are the same everywhere, so the spread over seeds is that of the
    training run and the spread over rows that of the removals. A cell's
    numbers are those of ``Decomposer(...).set_params(**{param_name: v},
    random_state=s).fit(X, y, X_eval, y_eval)`` called directly, to the
    last bit (the computation is deterministic). Warnings raised inside a
    cell (e.g. a PBRF solve that stopped short) are re-emitted once the
    curve is assembled, prefixed by the cell's value and seed, also for
    cells loaded from ``memory``. An error in a cell stops the curve; the
    cells finished before it stay cached.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from sklearn.datasets import load_diabetes
    >>> from sklinfluence import Decomposer
    >>> from sklinfluence.study import decomposition_curve
    >>> X, y = load_diabetes(return_X_y=True)
    >>> X, y = X[:30], (y[:30, None] - 150) / 80
    >>> net = NeuralNetRegressor(torch.nn.Linear(10, 1).double(), max_epochs=3, lr=0.1,
    ...                          train_split=None, verbose=0)
    >>> result = decomposition_curve(Decomposer(net), X, y, param_name="damping",
    ...                              param_range=[0.01, 0.1], seeds=2, rows=4)
    >>> result.terms.shape, result.agreement["self"]["spearman"]["pbrf"].shape
    ((2, 2, 4, 5), (2, 2))
    >>> sorted(result.records[0])[:3]
    ['eval_pearson_loo', 'eval_pearson_pbrf', 'eval_pearson_proximal']
    """
    _check_estimator(estimator)
    values = _check_range(param_range)
    _check_param_name(estimator, param_name, values[0])
    seed_array = _check_seeds(seeds)
    if (X_eval is None) != (y_eval is None):
        raise ValueError("X_eval and y_eval go together: the 'eval' agreement is the change "
                         "of the loss on (X_eval, y_eval). Pass both, or neither for the "
                         "training rows.")
    n = len(X)
    if len(y) != n:
        raise ValueError(f"X and y have different numbers of rows: {n} and {len(y)}.")
    row_index = _check_rows(rows, n, random_state)

    base = clone(estimator)
    execution = {k: estimator.get_params(deep=False)[k] for k in EXECUTION_PARAMS}
    base.set_params(n_jobs=None, verbose=0, memory=None)
    memory = check_memory(os.fspath(memory) if isinstance(memory, os.PathLike) else memory)
    cell = memory.cache(_curve_cell, ignore=["execution"])

    cells = {(i, j): (clone(base).set_params(**{param_name: value, "random_state": int(s)}),
                      X, y, X_eval, y_eval, row_index, execution)
             for i, value in enumerate(values) for j, s in enumerate(seed_array)}
    outputs: dict = {}
    from_cache = np.zeros((len(values), len(seed_array)), dtype=bool)
    for key, args in cells.items():
        if cell.check_call_in_cache(*args):
            outputs[key] = cell(*args)
            from_cache[key] = True
    todo = [key for key in cells if key not in outputs]
    bar = tqdm(total=len(cells), initial=len(outputs), disable=not verbose or not todo,
               desc=f"decomposition_curve[{param_name}]", unit="cell")
    try:
        if todo:
            tasks = (delayed(_tagged)(cell, key, *cells[key]) for key in todo)
            for key, output in streaming_parallel(n_jobs)(tasks):
                outputs[key] = output
                bar.update(1)
    finally:
        bar.close()
    return _assemble(outputs, values, seed_array, row_index, param_name, estimator,
                     from_cache)


def _param_array(values: list) -> np.ndarray:
    if all(isinstance(v, (Integral, float, np.floating)) and not isinstance(v, bool)
           for v in values):
        return np.asarray(values, dtype=np.float64)
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _bunch(mapping: dict) -> Bunch:
    """A Bunch of ``mapping`` (whose keys may include ``"self"``)."""
    bunch = Bunch()
    bunch.update(mapping)
    return bunch


def _assemble(outputs: dict, values: list, seeds: np.ndarray, rows: np.ndarray,
              param_name: str, estimator: Decomposer, from_cache: np.ndarray) -> Bunch:
    V, S = len(values), len(seeds)
    first = outputs[0, 0]
    rung_names, term_names = first["rung_names"], first["term_names"]
    grid = [[outputs[i, j] for j in range(S)] for i in range(V)]
    terms = np.array([[c["terms"] for c in row] for row in grid])
    self_scores = np.array([[c["self_scores"] for c in row] for row in grid])
    eval_changes = np.array([[c["eval_changes"] for c in row] for row in grid])
    by_quantity = {"self": self_scores, "eval": eval_changes}
    estimate = rung_names.index(ESTIMATE)
    agreement = _bunch({
        quantity: _bunch({
            statistic: _bunch({
                ref: np.array([[correlation(by_quantity[quantity][i, j, :, estimate],
                                             by_quantity[quantity][i, j, :,
                                                                   rung_names.index(rung)],
                                             statistic)
                                for j in range(S)] for i in range(V)])
                for ref, rung in REFERENCES.items()})
            for statistic in STATISTICS})
        for quantity in QUANTITIES})
    seconds = np.array([[c["seconds"] for c in row] for row in grid])
    n_warnings = np.array([[len(c["warnings"]) for c in row] for row in grid], dtype=np.int64)
    terms_mean, terms_std = terms.mean(axis=2), terms.std(axis=2)

    stacklevel = user_stacklevel()
    for i, value in enumerate(values):
        for j, seed in enumerate(seeds):
            for category, message in grid[i][j]["warnings"]:
                warnings.warn(f"decomposition_curve cell {param_name}={value!r}, seed "
                              f"{int(seed)}: {message}", category, stacklevel=stacklevel)

    records = []
    for i, value in enumerate(values):
        for j, seed in enumerate(seeds):
            record = {"param_name": param_name, "param_value": value, "seed": int(seed),
                      "n_rows": len(rows)}
            for k, name in enumerate(term_names):
                record[f"{name}_mean"] = float(terms_mean[i, j, k])
                record[f"{name}_std"] = float(terms_std[i, j, k])
            for quantity in QUANTITIES:
                for statistic in STATISTICS:
                    for ref in REFERENCES:
                        record[f"{quantity}_{statistic}_{ref}"] = float(
                            agreement[quantity][statistic][ref][i, j])
            record.update(seconds=float(seconds[i, j]), n_warnings=int(n_warnings[i, j]),
                          from_cache=bool(from_cache[i, j]))
            records.append(record)

    return Bunch(param_name=param_name, param_range=_param_array(values), seeds=seeds,
                 rows=rows, term_names=term_names, rung_names=rung_names,
                 references=list(REFERENCES),
                 metric=None if param_name == "metric" else estimator.metric,
                 measure=None if param_name == "measure" else estimator.measure,
                 terms=terms, terms_mean=terms_mean, terms_std=terms_std,
                 self_scores=self_scores, eval_changes=eval_changes, agreement=agreement,
                 seconds=seconds, n_warnings=n_warnings, from_cache=from_cache,
                 records=records)


# ------------------------------------------------------------------ mislabels
def detection_curve(is_flipped: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction of flipped labels found against fraction of the data inspected.

    The rows are inspected in decreasing order of ``scores`` (the most
    suspicious first, e.g. the largest self-influence); the curve has one
    point per distinct score, as :func:`sklearn.metrics.roc_curve` does, so
    rows with tied scores enter together and the straight line between two
    points is the expected curve under a random order within the tie.

    Parameters
    ----------
    is_flipped : array-like of bool of shape (n_samples,)
        ``True`` for the rows whose label was flipped (at least one).
    scores : array-like of shape (n_samples,)
        One finite score per row; larger means inspected earlier.

    Returns
    -------
    fraction_inspected : ndarray of shape (n_thresholds + 1,)
        ``|{score ≥ t}| / n_samples`` for each threshold, from 0 to 1.
    fraction_found : ndarray of shape (n_thresholds + 1,)
        ``|{score ≥ t and flipped}| / n_flipped``, from 0 to 1.
    thresholds : ndarray of shape (n_thresholds + 1,)
        The distinct scores in decreasing order, preceded by ``inf`` (the
        point where nothing has been inspected).

    See Also
    --------
    sklinfluence.display.DetectionCurveDisplay : Plots the curves of several scores.

    Examples
    --------
    >>> from sklinfluence.study import detection_curve
    >>> inspected, found, thresholds = detection_curve(
    ...     [True, False, False, True], [0.9, 0.8, 0.1, 0.3])
    >>> inspected.tolist(), found.tolist()
    ([0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    flipped = np.asarray(is_flipped)
    score = np.asarray(scores, dtype=np.float64)
    if flipped.ndim != 1 or score.ndim != 1:
        raise ValueError(f"is_flipped and scores must be 1-D, got shapes {flipped.shape} and "
                         f"{score.shape}.")
    if len(flipped) != len(score):
        raise ValueError(f"is_flipped and scores have different lengths: {len(flipped)} and "
                         f"{len(score)}.")
    if flipped.dtype != bool:
        if not np.isin(flipped, [0, 1]).all():
            raise ValueError("is_flipped must be a boolean mask (True: the label was flipped), "
                             f"got values {np.unique(flipped)[:5]}.")
        flipped = flipped.astype(bool)
    if not flipped.any():
        raise ValueError("is_flipped has no True entry: there is no flipped label to find.")
    if not np.isfinite(score).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(score)).sum())} are "
                         "NaN or infinite.")
    order = np.argsort(-score, kind="stable")
    sorted_scores, hits = score[order], flipped[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(score) - 1]
    found = np.cumsum(hits)[last_of_tie]
    fraction_inspected = np.r_[0.0, (last_of_tie + 1) / len(score)]
    fraction_found = np.r_[0.0, found / flipped.sum()]
    thresholds = np.r_[np.inf, sorted_scores[last_of_tie]]
    return fraction_inspected, fraction_found, thresholds
