"""Running the study: every cell once, in parallel, cached on disk, then assembled.

A *cell* is one training run of one configuration: a (zoo entry, parameter
value, seed) of :func:`~sklinfluence.study.decomposition_curve`, or the
mislabel detection run of one entry. :func:`compute_study` first computes
the cells that are not yet in the cache (longest first, through joblib, with
one tqdm bar over all of them), then assembles the curves from the cache —
so a killed run, restarted on the same cache, redoes no finished cell, and
the numbers are those of ``decomposition_curve`` called directly.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from joblib import Memory, Parallel, delayed
from sklearn.utils import Bunch
from tqdm.auto import tqdm

from .. import Decomposer, __version__
from ..study import decomposition_curve, detection_curve
from ..zoo import load_zoo_data, make_zoo_net
from .detection import DATA_SEED, cached_detection, detection_args
from .scales import StudyScale, solver_for

__all__ = ["SECTIONS", "compute_study", "study_data", "removed_rows", "study_decomposer",
           "study_curve", "plan_cells", "Cell"]

#: The parts of the study: the per-architecture table, the curves against a
#: parameter and mislabel detection.
SECTIONS = ("architectures", "sweeps", "detection")
#: Rough relative cost of one cell per entry (for scheduling only: longest first).
_COST = {"resnet": 60.0, "vgg": 12.0, "transformer": 12.0, "lenet": 4.0, "autoencoder": 1.5}


# ------------------------------------------------------------------ one configuration
def study_data(entry: str, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The study's training data of a zoo entry.

    Parameters
    ----------
    entry : str
        A key of :data:`sklinfluence.zoo.ZOO`.
    n_samples : int
        Rows of the subset (drawn with the seed ``DATA_SEED``).

    Returns
    -------
    X, y : ndarray
        As :func:`~sklinfluence.zoo.load_zoo_data` returns them.
    """
    return load_zoo_data(entry, n_samples=n_samples, random_state=DATA_SEED)


def removed_rows(scale: StudyScale) -> np.ndarray:
    """The training rows removed in every decomposition cell.

    Parameters
    ----------
    scale : StudyScale
        Its ``n_train`` and ``rows``.

    Returns
    -------
    rows : ndarray of int of shape (scale.rows,)
        Sorted indices, the same for every entry (seed ``DATA_SEED``).
    """
    rng = np.random.default_rng(DATA_SEED)
    return np.sort(rng.choice(scale.n_train, scale.rows, replace=False))


def study_decomposer(scale: StudyScale, entry: str) -> Decomposer:
    """The unfitted Decomposer of an entry at the study's settings.

    Parameters
    ----------
    scale : StudyScale
        Its ``epochs``, ``damping`` and ``solver``.
    entry : str
        A key of :data:`sklinfluence.zoo.ZOO`.

    Returns
    -------
    decomposer : Decomposer
        Of :func:`~sklinfluence.zoo.make_zoo_net`'s net for the entry.
    """
    return Decomposer(make_zoo_net(entry, max_epochs=scale.epochs), damping=scale.damping,
                      solver=solver_for(entry, scale.solver))


def study_curve(scale: StudyScale, entry: str, param_name: str, values: Any, seeds: Any,
                memory: Memory) -> Bunch:
    """:func:`~sklinfluence.study.decomposition_curve` of one entry at the study's settings.

    Parameters
    ----------
    scale : StudyScale
        The settings.
    entry : str
        A key of :data:`sklinfluence.zoo.ZOO`.
    param_name : str
        The swept parameter (``"net__max_epochs"`` for the per-architecture
        cells).
    values : sequence
        Its values.
    seeds : sequence of int
        The training seeds.
    memory : joblib.Memory
        Caches each (value, seed) cell.

    Returns
    -------
    curve : Bunch
        The result of :func:`~sklinfluence.study.decomposition_curve`.
    """
    X, y = study_data(entry, scale.n_train)
    return decomposition_curve(study_decomposer(scale, entry), X, y, param_name=param_name,
                               param_range=list(values), seeds=list(seeds),
                               rows=removed_rows(scale), memory=memory)


# ------------------------------------------------------------------ the cells
@dataclass(frozen=True)
class Cell:
    """One unit of work: a decomposition cell or a detection run.

    Parameters
    ----------
    kind : {"curve", "detection"}
        Which.
    entry : str
        The zoo entry.
    param_name : str, default=""
        The swept parameter of a decomposition cell.
    value : object, default=None
        Its value.
    seed : int, default=0
        The training seed.
    """

    kind: str
    entry: str
    param_name: str = ""
    value: Any = None
    seed: int = 0

    def cost(self, scale: StudyScale) -> float:
        """A rough relative duration, to start the longest first.

        Parameters
        ----------
        scale : StudyScale
            The study's settings.

        Returns
        -------
        cost : float
            Larger for longer cells.
        """
        base = _COST.get(self.entry, 1.0)
        if self.kind == "detection":
            return 8.0 * base * scale.n_detect / max(scale.rows, 1)
        if self.param_name == "net__max_epochs":
            return base * self.value / scale.epochs
        if self.param_name == "net__module__width":
            return base * 2.0  # the widest nets dominate their sweep
        return base


def plan_cells(scale: StudyScale, sections: tuple) -> list[Cell]:
    """Every cell the sections need, each once, longest first.

    A per-architecture cell and the epoch sweep's cell at the study's epochs
    are the same configuration, hence one cell (and one cache entry).

    Parameters
    ----------
    scale : StudyScale
        The settings.
    sections : tuple of str
        Any of :data:`SECTIONS`.

    Returns
    -------
    cells : list of Cell
        In the order to start them.
    """
    cells: dict = {}
    seeds = range(scale.seeds)
    if "architectures" in sections:
        for entry in scale.architectures:
            for seed in seeds:
                cells.setdefault(("net__max_epochs", entry, scale.epochs, seed), Cell(
                    "curve", entry, "net__max_epochs", scale.epochs, seed))
    if "sweeps" in sections:
        for entry, params in scale.sweeps.items():
            for param, values in params.items():
                for value in values:
                    for seed in seeds:
                        cells.setdefault((param, entry, value, seed),
                                         Cell("curve", entry, param, value, seed))
    if "detection" in sections:
        for entry in scale.detection:
            cells[("detection", entry)] = Cell("detection", entry)
    return sorted(cells.values(), key=lambda c: -c.cost(scale))


def _compute_cell(cell: Cell, scale: StudyScale, location: str) -> tuple[Cell, bool]:
    """Compute one cell into the cache, unless it is there; whether it was computed.

    Its warnings are recorded in the cached cell and reported when the study
    is assembled.
    """
    memory = Memory(location, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cell.kind == "curve":
            result = study_curve(scale, cell.entry, cell.param_name, [cell.value], [cell.seed],
                                 memory)
            return cell, not bool(result.from_cache.all())
        detect = cached_detection(memory)
        args = detection_args(scale, cell.entry)
        computed = not detect.check_call_in_cache(*args, responses=None)
        detect(*args, responses=os.path.join(location, "pbrf-responses"))
        return cell, computed


# ------------------------------------------------------------------ the study
def compute_study(scale: StudyScale, cache: str | os.PathLike, *, sections: tuple = SECTIONS,
                  n_jobs: int | None = None, verbose: int = 1) -> Bunch:
    """Compute every cell of the study (or load it from ``cache``) and assemble the results.

    Parameters
    ----------
    scale : StudyScale
        What to compute (:func:`~sklinfluence.study_report.make_scale`).
    cache : str or path
        Directory of the on-disk cache (a ``joblib.Memory``): each finished
        cell is stored as it completes, and found there by a later call.
    sections : tuple of str, default=SECTIONS
        Any of ``"architectures"``, ``"sweeps"``, ``"detection"``.
    n_jobs : int, default=None
        Cells computed in parallel by joblib (``None``: 1; ``-1``: all cores).
    verbose : int, default=1
        ``> 0``: a progress bar over the cells (on stderr).

    Returns
    -------
    results : Bunch
        ``architectures`` (entry → :func:`~sklinfluence.study.decomposition_curve`
        result at the study's epochs), ``sweeps`` (entry → parameter →
        result), ``detection`` (entry → Bunch of ``scores``, ``is_flipped``,
        ``curves``, ``found``, ``seconds``), ``warnings`` (list of
        ``(where, category, message)``), ``n_cells``, ``n_computed`` (cells
        computed by this call, the rest came from the cache),
        ``n_recomputed_on_assembly`` (cells that were not in the cache when
        the results were put together: 0 unless the cache is shared with
        another run that changed it), ``seconds``, ``started``, ``n_jobs``,
        ``version`` and ``scale``, ``sections``, ``rows`` (the removed
        rows).
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"sections must be a non-empty subset of {list(SECTIONS)}, got "
                         f"{list(sections)}.")
    start = time.perf_counter()
    started = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    location = os.fspath(cache)
    memory = Memory(location, verbose=0)
    cells = plan_cells(scale, tuple(sections))
    bar = tqdm(total=len(cells), desc=f"paper study ({scale.name})", unit="cell",
               disable=not verbose)
    n_computed = 0
    try:
        tasks = (delayed(_compute_cell)(cell, scale, location) for cell in cells)
        for cell, computed in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(tasks):
            n_computed += computed
            bar.set_postfix_str(f"{cell.entry} {cell.param_name or cell.kind}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    results = _assemble(scale, tuple(sections), memory, location)
    results.update(n_cells=len(cells), n_computed=n_computed,
                   seconds=time.perf_counter() - start, started=started, n_jobs=n_jobs,
                   version=__version__, scale=scale, sections=tuple(sections),
                   rows=removed_rows(scale))
    return results


def _recorded(where: str, record: list) -> list:
    """``(where, category, message)`` of the warnings worth reporting (torch's
    TorchScript deprecation notices are not)."""
    return [(where, w.category.__name__, str(w.message)) for w in record
            if not (issubclass(w.category, DeprecationWarning)
                    and ("torch.jit" in str(w.message) or "TorchScript" in str(w.message)))]


def _assemble(scale: StudyScale, sections: tuple, memory: Memory, location: str) -> Bunch:
    """Load every cell from the cache and put the curves together."""
    seeds = range(scale.seeds)
    found, caught = [], []

    def curve(entry: str, param: str, values: Any, where: str) -> Bunch:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            result = study_curve(scale, entry, param, values, seeds, memory)
        caught.extend(_recorded(where, record))
        found.append(~result.from_cache)
        return result

    architectures = ({entry: curve(entry, "net__max_epochs", [scale.epochs], entry)
                      for entry in scale.architectures} if "architectures" in sections else {})
    sweeps = ({entry: {param: curve(entry, param, values, f"{entry}, {param}")
                       for param, values in params.items()}
               for entry, params in scale.sweeps.items()} if "sweeps" in sections else {})
    detection = {}
    for entry in (scale.detection if "detection" in sections else ()):
        out = cached_detection(memory)(*detection_args(scale, entry),
                                        responses=os.path.join(location, "pbrf-responses"))
        caught.extend((f"{entry}, detection", category, message)
                      for category, message in out["warnings"]
                      if "torch.jit" not in message and "TorchScript" not in message)
        curves = {name: detection_curve(out["is_flipped"], s)[:2]
                  for name, s in out["scores"].items()}
        detection[entry] = Bunch(
            scores=out["scores"], is_flipped=out["is_flipped"], labels=out["labels"],
            seconds=out["seconds"], curves=curves,
            found={name: float(np.interp(scale.budget, *curves[name])) for name in curves})
    return Bunch(architectures=architectures, sweeps=sweeps, detection=detection,
                 warnings=caught,
                 n_recomputed_on_assembly=int(sum(np.sum(f) for f in found)))
