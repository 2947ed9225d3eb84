"""The study's figures, drawn without pyplot (no global state) and saved as PNG.

Per architecture: the five terms as grouped bars on a log axis and the
agreement of influence with each rung. Against a parameter:
:class:`~sklinfluence.display.TermsCurveDisplay` beside
:class:`~sklinfluence.display.AgreementCurveDisplay`. Detection:
:class:`~sklinfluence.display.DetectionCurveDisplay`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..display import AgreementCurveDisplay, DetectionCurveDisplay, TermsCurveDisplay
from .claims import IF_LOO_RANGE, IF_PBRF_RANGE, agreement_summary, term_summary

__all__ = ["StudyFigure", "study_figures", "sweep_key", "term_label", "param_label"]

#: Resolution of the PNGs (the report shows them at their size in pixels / 1.25).
DPI = 100
REFERENCES = ("pbrf", "proximal", "warm_start", "loo")
_REFERENCE_LABELS = {"pbrf": "IF–PBRF", "proximal": "IF–proximal retraining",
                     "warm_start": "IF–warm-start retraining", "loo": "IF–cold-start LOO"}
_PARAM_LABELS = {"net__module__width": "width", "net__max_epochs": "training epochs"}
_TERM_LABELS = {"warm_start_gap": "warm-start gap", "non_convergence_gap": "non-convergence gap"}


def term_label(name: str) -> str:
    """A term's name for people.

    Parameters
    ----------
    name : str
        The term's name, e.g. ``"warm_start_gap"``.

    Returns
    -------
    label : str
        E.g. ``"warm-start gap"``.
    """
    return _TERM_LABELS.get(name, name.replace("_", " "))


def param_label(param: str) -> str:
    """A swept parameter's name for people.

    Parameters
    ----------
    param : str
        The parameter, e.g. ``"net__max_epochs"``.

    Returns
    -------
    label : str
        E.g. ``"training epochs"``.
    """
    return _PARAM_LABELS.get(param, param)


@dataclass
class StudyFigure:
    """One figure of the report.

    Parameters
    ----------
    key : str
        Its file name without ``.png``, and its HTML id after ``fig-``.
    title : str
        Its title.
    caption : str
        What it shows, for the figure's caption.
    png : bytes
        The image.
    """

    key: str
    title: str
    caption: str
    png: bytes


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _spread(results: Any) -> str:
    scale = results.scale
    return f"{scale.seeds} seed{'s' if scale.seeds > 1 else ''} × {scale.rows} removed rows"


def terms_by_architecture(results: Any) -> StudyFigure:
    """Grouped bars: each term's mean per architecture, log axis, ±1 std whiskers.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.run_study`.

    Returns
    -------
    figure : StudyFigure
        The drawn figure, as PNG.
    """
    entries = list(results.architectures)
    curves = [results.architectures[e] for e in entries]
    names = curves[0].term_names
    summary = [term_summary(c) for c in curves]
    means = np.array([m for m, _ in summary])
    stds = np.array([s for _, s in summary])
    fig, ax = _new_figure(max(8.0, 1.1 * len(entries) + 4.0), 4.4)
    positive = means[means > 0]
    bottom = positive.min() / 5 if positive.size else 1e-6
    top = (means + stds).max() * 3 if positive.size else 1.0
    x = np.arange(len(entries))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        at = x + (k - (len(names) - 1) / 2) * width
        m, s = means[:, k], stds[:, k]
        drawn = m > 0
        ax.bar(at[drawn], m[drawn], width, color=f"C{k}", label=term_label(name))
        ax.errorbar(at[drawn], m[drawn], yerr=[m[drawn] - np.maximum(m[drawn] - s[drawn],
                                                                       bottom), s[drawn]],
                    fmt="none", ecolor="0.2", capsize=2, linewidth=0.8)
        for position in at[~drawn]:
            ax.annotate("0", xy=(position, bottom), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", color=f"C{k}", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_xticks(x, entries)
    ax.set_ylabel("mean ‖Δf‖₂ over the training inputs")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return StudyFigure(
        "terms_by_architecture", "The five terms per architecture",
        f"Mean over {_spread(results)} of each term (function-space distance between "
        "consecutive rungs, log axis); whiskers ±1 standard deviation over the same. A term "
        "that is exactly 0 is marked 0 at the bottom edge.", _png(fig))


def agreement_by_architecture(results: Any) -> StudyFigure:
    """Grouped bars: Spearman of influence with each reference per architecture.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.run_study`.

    Returns
    -------
    figure : StudyFigure
        The drawn figure, as PNG.
    """
    entries = list(results.architectures)
    fig, ax = _new_figure(max(8.0, 1.1 * len(entries) + 4.0), 4.4)
    x = np.arange(len(entries))
    width = 0.8 / len(REFERENCES)
    ax.axhspan(*IF_PBRF_RANGE, color="C0", alpha=0.10, label="paper: IF–PBRF range")
    ax.axhspan(*IF_LOO_RANGE, color="C3", alpha=0.15, label="paper: IF–LOO range")
    for k, ref in enumerate(REFERENCES):
        stats = np.array([agreement_summary(results.architectures[e], ref) for e in entries])
        at = x + (k - (len(REFERENCES) - 1) / 2) * width
        ax.bar(at, stats[:, 0], width, color=f"C{k}",
               label=_REFERENCE_LABELS[ref], yerr=stats[:, 1], capsize=2,
               error_kw={"linewidth": 0.8, "ecolor": "0.2"})
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xticks(x, entries)
    ax.set_ylabel("Spearman correlation of self-influence")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return StudyFigure(
        "agreement_by_architecture", "Agreement of influence with each rung",
        f"Spearman correlation over the {results.scale.rows} removed rows between the "
        "influence estimate's self-influence and each reference's, mean over "
        f"{results.scale.seeds} seed(s) (whiskers ±1 standard deviation over seeds). Shaded: "
        "the ranges the paper reports for IF–PBRF and IF–LOO.", _png(fig))


def sweep_key(entry: str, param: str) -> str:
    """The key (file name) of the figure of a zoo entry against a parameter.

    Parameters
    ----------
    entry : str
        The zoo entry.
    param : str
        The swept parameter.

    Returns
    -------
    key : str
        E.g. ``"mlp_width"``.
    """
    return f"{entry}_{param_label(param).replace(' ', '_')}"


def sweep_figure(results: Any, entry: str, param: str, curve: Any) -> StudyFigure:
    """The five terms and the agreement of one entry against one parameter.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.run_study`.
    entry : str
        The zoo entry.
    param : str
        The swept parameter.
    curve : Bunch
        Its :func:`~sklinfluence.study.decomposition_curve` result.

    Returns
    -------
    figure : StudyFigure
        The drawn figure, as PNG.
    """
    label = param_label(param)
    fig, (left, right) = _new_figure(12.0, 4.6, ncols=2)
    values = np.asarray(curve.param_range, dtype=float)
    xscale = "log" if values.min() > 0 and values.max() / values.min() >= 8 else None
    TermsCurveDisplay.from_results(curve, ax=left, xscale=xscale)
    AgreementCurveDisplay.from_results(curve, ax=right, references=REFERENCES, xscale=xscale)
    for ax in (left, right):
        ax.set_xlabel(label)
    fig.suptitle(f"{entry}: against {label}")
    return StudyFigure(
        sweep_key(entry, param), f"{entry} against {label}",
        f"Left: the five terms (symmetric-log axis, exact zeros drawn at 0), mean over "
        f"{_spread(results)}, bars ±1 standard deviation. Right: Spearman correlation of "
        "influence's self-influence with each reference, mean over seeds, bars ±1 standard "
        "deviation over seeds.", _png(fig))


def detection_figure(results: Any, entry: str, result: Any) -> StudyFigure:
    """The mislabel detection curves of every self-score on one entry.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.run_study`.
    entry : str
        The zoo entry.
    result : Bunch
        Its detection results (``results.detection[entry]``).

    Returns
    -------
    figure : StudyFigure
        The drawn figure, as PNG.
    """
    scale = results.scale
    fig, ax = _new_figure(6.4, 4.8)
    DetectionCurveDisplay.from_scores(result.is_flipped, result.scores, budget=scale.budget,
                                      ax=ax)
    ax.axvline(scale.budget, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_title(f"{entry}: {scale.flip_fraction:.0%} of {len(result.is_flipped)} labels "
                 "flipped")
    return StudyFigure(
        f"{entry}_detection", f"Mislabel detection on {entry}",
        "Fraction of the flipped labels found against the fraction of the training rows "
        f"inspected, highest score first; the legend gives each score's fraction found at "
        f"{scale.budget:.0%} (dotted line).", _png(fig))


def study_figures(results: Any) -> list[StudyFigure]:
    """Every figure of the report, in its order.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.run_study`.

    Returns
    -------
    figures : list of StudyFigure
        Terms and agreement per architecture, one per sweep, one per
        detection run (only those of the sections that were run).
    """
    figures = []
    if results.architectures:
        figures += [terms_by_architecture(results), agreement_by_architecture(results)]
    for entry, params in results.sweeps.items():
        figures += [sweep_figure(results, entry, param, curve) for param, curve in params.items()]
    figures += [detection_figure(results, entry, result)
                for entry, result in results.detection.items()]
    return figures
