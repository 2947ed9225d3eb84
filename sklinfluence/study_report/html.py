"""The report: one self-contained HTML page.

Everything is inside the file — the style sheet inline, every figure a
base64 PNG in a ``data:`` URI, no script — so it opens offline in any
browser, can be mailed, and shows exactly what was measured.
"""

from __future__ import annotations

import base64
import html
import platform
from collections import Counter
from typing import Any, Iterable

import numpy as np

from ..zoo import ZOO
from .claims import (NOT_MEASURED, NOT_REPRODUCED, PARTLY, REPRODUCED, agreement_summary,
                     dominance, term_summary)
from .figures import param_label, sweep_key, term_label
from .scales import solver_for

__all__ = ["render_report"]

_VERDICT_CLASS = {REPRODUCED: "yes", PARTLY: "partly", NOT_REPRODUCED: "no",
                  NOT_MEASURED: "none"}
_STATUS_MARK = {"holds": "✓", "partly": "~", "fails": "✗"}
_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       margin: 0; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5em 2em 4em; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin-top: 1.6em; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d8d8d8; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { font-weight: 600; padding: 0.1em 0.5em; border-radius: 0.3em; white-space: nowrap; }
.yes { background: #d9f2dd; color: #14532d; }
.partly { background: #fdf0c8; color: #713f12; }
.no { background: #fbd9d9; color: #7f1d1d; }
.none { background: #e8e8e8; color: #444; }
.rule { color: #555; font-size: 0.88em; }
figure { margin: 1.2em 0; }
.side-by-side { display: flex; flex-wrap: wrap; gap: 0 2em; }
.side-by-side figure { flex: 1 1 22em; max-width: calc(50% - 1em); }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; max-width: 60em; }
code, pre { background: #f4f4f4; border-radius: 0.2em; padding: 0.1em 0.3em; }
pre { padding: 0.6em; overflow-x: auto; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _num(value: float, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "n/a" if value is None or np.isnan(value) else ("∞" if value > 0 else "−∞")
    return f"{value:.{digits}g}"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric_from: int = 1) -> str:
    """An HTML table; cells are HTML already (escape before)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(figure: Any) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure id="fig-{_e(figure.key)}"><img src="data:image/png;base64,{data}" '
            f'alt="{_e(figure.title)}"><figcaption><b>{_e(figure.title)}.</b> '
            f"{_e(figure.caption)}</figcaption></figure>")


def _verdict(verdict: str) -> str:
    return f'<span class="verdict {_VERDICT_CLASS[verdict]}">{_e(verdict)}</span>'


def _claims(claims: list) -> str:
    rows = []
    for k, claim in enumerate(claims, 1):
        entries = "<br>".join(f"{_STATUS_MARK[status]} {_e(entry)}: {_e(text)}"
                              for entry, (text, status) in claim.per_entry.items())
        rows.append([str(k), _e(claim.paper), f"{entries or 'not measured at this scale'}"
                     f'<div class="rule">{_e(claim.rule)}</div>', _verdict(claim.verdict)])
    return _table(["#", "The paper reports", "Measured here (✓ holds, ~ partly, ✗ fails)",
                   "Verdict"], rows, numeric_from=9)


def _settings(results: Any) -> str:
    s = results.scale
    solvers = ", ".join(f"{e}: {solver_for(e, s.solver)}"
                        for e in dict.fromkeys([*s.architectures, *s.sweeps, *s.detection]))
    rows = [
        ("scale", s.name), ("architectures", ", ".join(s.architectures)),
        ("training rows", f"{s.n_train} (a seeded random subset of each data set)"),
        ("removed rows per cell", f"{s.rows}, the same indices for every architecture: "
         + ", ".join(str(int(r)) for r in results.rows)),
        ("training seeds", f"{s.seeds} (0 … {s.seeds - 1})"),
        ("epochs", f"{s.epochs} (SGD, momentum 0.9, weight decay 1e-4, batches of 32)"),
        ("damping λ", f"{s.damping:g}"),
        ("influence solver (rung 5)", solvers),
        ("metric", "mean ‖Δf‖₂ over the training inputs (the paper's function-space "
         "distance)"),
        ("detection", f"{', '.join(s.detection) or 'none'}: {s.n_detect} rows, "
         f"{s.flip_fraction:.0%} of labels flipped, read at {s.budget:.0%} inspected"),
        ("run", f"{results.n_cells} cells, {results.n_computed} computed by this run and "
                f"{results.n_cells - results.n_computed} loaded from its cache; "
                f"n_jobs={results.n_jobs}; {results.seconds:.0f} s"),
    ]
    return _table(["setting", "value"], [(_e(k), _e(v)) for k, v in rows], numeric_from=9)


def _terms_table(results: Any) -> str:
    curves = results.architectures
    names = next(iter(curves.values())).term_names
    rows = []
    for entry, curve in curves.items():
        means, stds = term_summary(curve)
        ratio, ordered = dominance(means)
        rows.append([_e(entry), f"{ZOO[entry].n_params:,}",
                     _e(solver_for(entry, results.scale.solver)),
                     *(f"{_num(m)} ± {_num(s, 2)}" for m, s in zip(means, stds)),
                     _num(ratio, 3), "yes" if ordered else "<b>no</b>"])
    return _table(["architecture", "parameters", "solver",
                   *(_e(term_label(n)) for n in names),
                   "first three ÷ last two", "each of the first three above the last two"],
                  rows, numeric_from=3)


def _agreement_table(results: Any) -> str:
    rows = []
    for entry, curve in results.architectures.items():
        stats = {ref: agreement_summary(curve, ref) for ref in curve.references}
        better = stats["pbrf"][0] > stats["loo"][0]
        spread = results.scale.seeds > 1
        rows.append([_e(entry), *(f"{m:+.2f}" + (f" ± {s:.2f}" if spread else "")
                                  for m, s in stats.values()),
                     "yes" if better else "<b>no</b>"])
    refs = ["IF–PBRF", "IF–proximal", "IF–warm-start", "IF–cold-start LOO"]
    return _table(["architecture", *refs, "closer to PBRF than to LOO"], rows)


def _sweep_table(curve: Any) -> str:
    rows = []
    for i, value in enumerate(curve.param_range):
        means, _ = term_summary(curve, i)
        pbrf, _ = agreement_summary(curve, "pbrf", i)
        loo, _ = agreement_summary(curve, "loo", i)
        rows.append([_e(f"{value:g}"), *(_num(m) for m in means), f"{pbrf:+.2f}",
                     f"{loo:+.2f}"])
    header = [param_label(curve.param_name), *map(term_label, curve.term_names), "IF–PBRF",
              "IF–LOO"]
    return _table(map(_e, header), rows)


def _detection_table(results: Any) -> str:
    budget = results.scale.budget
    rows = []
    for entry, result in results.detection.items():
        best = min(1.0, budget / result.is_flipped.mean())
        rows.append([_e(entry), *(f"{found:.0%}" for found in result.found.values()),
                     f"{budget:.0%}", f"{best:.0%}"])
    names = next(iter(results.detection.values())).found
    return _table(["architecture", *(_e(n) for n in names), "random order (expected)",
                   "perfect ranking"], rows)


def _warnings(results: Any) -> str:
    if not results.warnings:
        return "<p>No cell raised a warning.</p>"
    # a cell's warning is repeated by each of its rungs' calls: counted once per message
    counts = Counter((where, category, message.split(";")[0][:220])
                     for where, category, message in dict.fromkeys(results.warnings))
    rows = [(_e(where), _e(category), _e(message), str(n))
            for (where, category, message), n in sorted(counts.items())]
    return ("<p>Warnings the cells raised (PBRF solves that stopped short of their "
            "tolerance, iterative solvers at their iteration cap); the numbers above include "
            "these cells as computed.</p>"
            + _table(["where", "category", "message (first clause)", "cells"], rows,
                     numeric_from=3))


def render_report(results: Any, claims: list, figures: list) -> str:
    """The report as one self-contained HTML page.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.compute_study`.
    claims : list of Claim
        :func:`~sklinfluence.study_report.assess_claims` of the results.
    figures : list of StudyFigure
        :func:`~sklinfluence.study_report.study_figures` of the results.

    Returns
    -------
    page : str
        HTML5, UTF-8, with no external resource.
    """
    by_key = {f.key: f for f in figures}

    def figure(key: str) -> str:  # "" for a figure not drawn
        return _figure(by_key[key]) if key in by_key else ""

    s = results.scale
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>The paper's study — sklinfluence</title>", f"<style>{_STYLE}</style>",
        "</head><body><main>",
        "<h1>If influence functions are the answer, what is the question? The study, "
        "measured</h1>",
        f'<p class="meta">Bae, Ng, Lo, Ghassemi &amp; Grosse (NeurIPS 2022), rerun with '
        f"sklinfluence {_e(results.version)} at the <b>{_e(s.name)}</b> scale on the "
        f"architectures of <code>sklinfluence.zoo</code> (scikit-learn's digits and "
        f"diabetes data); started {_e(results.started)}, {results.seconds:.0f} s on "
        f"{_e(platform.machine())} with n_jobs={_e(results.n_jobs)}. Every number is in "
        "<code>study.csv</code> beside this file.</p>",
        '<section id="claims"><h2>The paper\'s claims beside what was measured</h2>',
        "<p>The paper's models are MNIST-scale; these are smaller, on 8 × 8 digits. Each "
        "claim is judged on the neural networks (the logistic regression is the linear "
        "control) by the rule under it; the settings were fixed before looking at the "
        "results.</p>", _claims(claims), "</section>",
        '<section id="settings"><h2>Settings</h2>', _settings(results), "</section>"]
    if results.architectures:
        parts += ['<section id="terms"><h2>The five terms per architecture</h2>',
                  "<p>Mean ± standard deviation over seeds and removed rows of each term of "
                  "the influence–LOO gap: the distance between consecutive rungs of the "
                  "ladder (cold-start LOO → warm start → proximal → PBRF → exact influence → "
                  "practical influence).</p>", _terms_table(results),
                  figure("terms_by_architecture"), "</section>",
                  '<section id="agreement"><h2>Influence against the PBRF and against '
                  "leave-one-out</h2>",
                  "<p>Spearman correlation over the removed rows of the self-influence of "
                  "the influence estimate with each rung's, mean ± standard deviation over "
                  "seeds.</p>", _agreement_table(results),
                  figure("agreement_by_architecture"), "</section>"]
    if results.sweeps:
        parts.append('<section id="sweeps"><h2>Against width and training time</h2>')
        for entry, params in results.sweeps.items():
            for param, curve in params.items():
                title = f"{entry} against {param_label(param)}"
                parts += [f"<h3>{_e(title)}</h3>", _sweep_table(curve),
                          figure(sweep_key(entry, param))]
        parts.append("</section>")
    if results.detection:
        parts += ['<section id="detection"><h2>Finding mislabelled training rows</h2>',
                  f"<p>{s.flip_fraction:.0%} of the labels flipped to another class; the "
                  f"fraction of them found in the top {s.budget:.0%} of the training rows by "
                  "each self-score (grad-dot: the curvature replaced by 0; TracIn-CP: the "
                  "end-of-epoch checkpoints of the same fit).</p>", _detection_table(results),
                  '<div class="side-by-side">',
                  *(figure(f"{entry}_detection") for entry in results.detection),
                  "</div></section>"]
    parts += ['<section id="warnings"><h2>Warnings</h2>', _warnings(results), "</section>",
              '<section id="reproduce"><h2>Reproduce</h2>',
              f"<pre>sklinfluence study --scale {_e(s.name)} --output DIR</pre>",
              "<p>A run restarted on the same output directory loads the finished cells "
              "from <code>DIR/cache</code>.</p></section>", "</main></body></html>"]
    return "\n".join(parts)

