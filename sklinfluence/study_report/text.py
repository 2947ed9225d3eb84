"""The study's main numbers as plain text, for a terminal (``sklinfluence study``)."""

from __future__ import annotations

from typing import Any

from .claims import agreement_summary, term_summary

__all__ = ["format_summary"]

_SHORT = {"warm_start_gap": "warm-start", "proximity_gap": "proximity",
          "non_convergence_gap": "non-conv.", "linearization_error": "lineariz.",
          "solver_error": "solver"}


def format_summary(results: Any) -> str:
    """The run, the five terms and agreements per architecture, detection and the verdicts.

    Parameters
    ----------
    results : Bunch
        Returned by :func:`~sklinfluence.study_report.run_study`.

    Returns
    -------
    text : str
        Several lines, no trailing newline.
    """
    s = results.scale
    lines = [f"The paper's study, scale {s.name}: {len(s.architectures)} architectures, "
             f"{s.n_train} training rows, {s.rows} removed rows × {s.seeds} seed(s), "
             f"{s.epochs} epochs, damping {s.damping:g}; {results.n_cells} cells "
             f"({results.n_computed} computed, {results.n_cells - results.n_computed} from "
             f"the cache) in {results.seconds:.0f} s"]
    if results.architectures:
        names = next(iter(results.architectures.values())).term_names
        lines += ["", "Five terms (mean ‖Δf‖₂ over seeds and removed rows) and the "
                  "self-influence Spearman of influence with the PBRF and with cold-start LOO:",
                  f"{'architecture':>13} " + " ".join(f"{_SHORT.get(n, n):>10}" for n in names)
                  + f" {'IF–PBRF':>8} {'IF–LOO':>8}"]
        for entry, curve in results.architectures.items():
            means, _ = term_summary(curve)
            pbrf, _ = agreement_summary(curve, "pbrf")
            loo, _ = agreement_summary(curve, "loo")
            lines.append(f"{entry:>13} " + " ".join(f"{m:10.3g}" for m in means)
                         + f" {pbrf:+8.2f} {loo:+8.2f}")
    if results.detection:
        scores = list(next(iter(results.detection.values())).found)
        lines += ["", f"Flipped labels found in the top {s.budget:.0%} "
                  f"({s.flip_fraction:.0%} flipped):",
                  f"{'architecture':>13} " + " ".join(f"{n:>13}" for n in scores)]
        for entry, result in results.detection.items():
            lines.append(f"{entry:>13} " + " ".join(f"{result.found[n]:13.0%}" for n in scores))
    if results.get("claims"):
        lines += ["", "The paper's claims:"]
        for claim in results.claims:
            lines.append(f"  {claim.verdict:>15}  {claim.paper}")
    return "\n".join(lines)

