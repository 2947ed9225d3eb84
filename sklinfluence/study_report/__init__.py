"""The paper's study in one call, with a report a person can look at.

:func:`run_study` reruns the study of Bae et al. (2022) on the architectures
of :mod:`sklinfluence.zoo` and writes, into one output directory,

- ``study.csv``: every number, one per row (:mod:`~sklinfluence.study_report.table`);
- ``report.html``: one self-contained page — the paper's claims beside what
  was measured with a verdict each ("reproduced", "partly", "not
  reproduced"), the five terms and the agreement of influence with the PBRF
  and with leave-one-out per architecture, the terms and the agreement
  against width and training epochs, mislabel detection by five
  self-scores — every figure embedded, no external resource;
- ``figures/*.png``: the same figures as files;
- ``cache/``: each finished cell, so that a killed run restarted on the same
  directory redoes no finished cell.

It is built from the library's public pieces:
:func:`~sklinfluence.study.decomposition_curve` for every cell,
:func:`~sklinfluence.study.detection_curve` and the displays of
:mod:`sklinfluence.display` for the figures. The command line runs it as
``sklinfluence study``.

Examples
--------
>>> from sklinfluence.study_report import SCALES
>>> sorted(SCALES)
['default', 'large', 'small']
>>> SCALES["default"].rows, SCALES["default"].seeds
(12, 2)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sklearn.utils import Bunch

from .claims import Claim, assess_claims
from .figures import StudyFigure, study_figures
from .files import write_bytes, write_csv, write_text
from .html import render_report
from .detection import SCORES
from .run import SECTIONS, compute_study
from .scales import SCALES, StudyScale, make_scale, solver_for
from .table import HEADER, study_table
from .text import format_summary

__all__ = ["run_study", "write_report", "compute_study", "assess_claims", "make_scale",
           "solver_for", "study_table", "study_figures", "render_report", "format_summary", "Claim",
           "StudyFigure", "StudyScale", "SCALES", "SECTIONS", "SCORES", "HEADER"]

#: File names inside the output directory.
CSV_NAME, HTML_NAME, FIGURES_DIR, CACHE_DIR = "study.csv", "report.html", "figures", "cache"


def write_report(results: Any, output: str | os.PathLike) -> Bunch:
    """Write ``study.csv``, ``report.html`` and ``figures/*.png`` of computed results.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`compute_study` (with ``claims`` set, or judged
        here by :func:`assess_claims`).
    output : str or path
        The output directory (created if missing). Each file is written
        under a temporary name and renamed into place.

    Returns
    -------
    paths : Bunch
        ``csv``, ``html`` and ``figures`` (a list), as :class:`pathlib.Path`.
    """
    output = Path(output)
    claims = results.get("claims") or assess_claims(results)
    figures = study_figures(results)
    paths = Bunch(csv=output / CSV_NAME, html=output / HTML_NAME,
                  figures=[output / FIGURES_DIR / f"{f.key}.png" for f in figures])
    write_csv(paths.csv, HEADER, study_table(results))
    for figure, path in zip(figures, paths.figures):
        write_bytes(path, figure.png)
    write_text(paths.html, render_report(results, claims, figures))
    return paths


def run_study(output: str | os.PathLike, scale: str | StudyScale = "default", *,
              sections: tuple = SECTIONS, n_jobs: int | None = None, verbose: int = 1,
              **changes: Any) -> Bunch:
    """Run the paper's study and write its CSV and its HTML report.

    Parameters
    ----------
    output : str or path
        Output directory: ``study.csv``, ``report.html``, ``figures/`` and
        the resumable ``cache/``. Rerunning on the same directory loads every
        finished cell from the cache.
    scale : {"small", "default", "large"} or StudyScale, default="default"
        How much to compute (:data:`SCALES`): ``"small"`` about a minute on
        2 cores, ``"default"`` a few minutes, ``"large"`` every zoo entry
        with more rows and seeds.
    sections : tuple of str, default=("architectures", "sweeps", "detection")
        The parts to run: the per-architecture table, the curves against
        width and epochs, mislabel detection.
    n_jobs : int, default=None
        Cells computed in parallel by joblib (``None``: 1; ``-1``: every
        core). ``joblib.parallel_config(backend="dask")`` runs them on a
        Dask cluster.
    verbose : int, default=1
        ``> 0``: a progress bar over the cells (on stderr).
    **changes
        Fields of :class:`StudyScale` replacing the scale's
        (``architectures=("mlp", "lenet")``, ``rows=20``, ``seeds=3``,
        ``epochs=30``, ``n_train=300``, ...; ``None`` changes nothing).

    Returns
    -------
    results : Bunch
        What :func:`compute_study` returns, with ``claims`` (a list of
        :class:`Claim`) and ``paths`` (``csv``, ``html``, ``figures``).

    Raises
    ------
    ValueError
        An unknown scale, zoo entry or section, or a size out of range.
    TypeError
        A setting :class:`StudyScale` does not have.

    See Also
    --------
    sklinfluence.study.decomposition_curve : One curve of the study.
    """
    scale = make_scale(scale, **changes)
    output = Path(output)
    results = compute_study(scale, output / CACHE_DIR, sections=tuple(sections),
                            n_jobs=n_jobs, verbose=verbose)
    results.claims = assess_claims(results)
    results.paths = write_report(results, output)
    return results
