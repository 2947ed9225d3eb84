"""
Choosing a solver: speed against accuracy
=========================================

An influence matrix ``loss_change(X_train, y_train, X_test, y_test)`` needs
``(G + λI)⁻¹`` applied to one gradient per test row (the side with fewer
rows). :class:`~sklinfluence.InfluenceEstimator` offers several ways of
doing that (``solver=``). This script trains one MLP on digits, freezes it,
and computes the same influence matrix with each solver, timing ``fit`` +
``loss_change`` and comparing the result with the exact solve.

What to expect, before running it:

- ``"exact"`` builds the dense ``P × P`` damped Gauss–Newton matrix and
  factorises it once: the reference here, and the fastest way to an exact
  answer while ``P`` is a few thousand (``"auto"`` chooses it up to 5,000
  parameters); its memory, ``8 P²`` bytes, is what rules it out above that.
- ``"cg"`` (block conjugate gradients) reaches the same answer up to its
  ``tol`` without ever forming the matrix. All test gradients share one block
  Krylov space, so a handful of iterations suffice even at a small damping.
  ``mixed_precision`` makes the products float32 and refines the answer in
  float64: same accuracy, cheaper products, but more iterations.
- ``"ekfac"`` / ``"kfac"`` (Kronecker-factored) and ``"arnoldi"`` (top
  eigenpairs) are approximations with no iterations — the fastest here, but
  how wrong they are depends on the damping: both are poor where many
  directions of small curvature matter, i.e. at a small damping. A second
  table repeats them at larger dampings.
- ``"lissa"`` at a fixed depth is a truncated Neumann series: each step costs
  one full-batch curvature product, like a CG iteration, but it converges at
  the rate ``1 − λ_min/σ``; at a small damping it stays far from converged
  and warns with its residual (``ConvergenceWarning``).

The whole run takes well under a minute on 2 cores; ``--n-train``,
``--n-test`` and ``--epochs`` shrink it, ``--plot`` names the PNG.
"""

import argparse
import time
import warnings

import numpy as np
import torch
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator
from sklearn.preprocessing import StandardScaler

from sklinfluence import InfluenceEstimator


class MLP(torch.nn.Sequential):
    def __init__(self, hidden=32):
        super().__init__(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                         torch.nn.Linear(hidden, 10))
        self.double()


#: (label, solver, solver_params, other InfluenceEstimator parameters)
SOLVERS = [
    ("exact", "exact", None, {}),
    ("cg", "cg", None, {"tol": 1e-6}),
    ("cg, mixed precision", "cg", {"mixed_precision": True}, {"tol": 1e-6}),
    ("ekfac", "ekfac", None, {}),
    ("kfac", "kfac", None, {}),
    ("arnoldi, rank 50", "arnoldi", {"rank": 50}, {}),
    ("lissa, 100 steps", "lissa", None, {"max_iter": 100, "tol": 1e-6}),
]
#: Larger dampings at which the approximate solvers are compared again.
DAMPINGS = [1e-2, 1e-1]


def influence_matrix(net, X, y, X_test, y_test, damping, solver, params, kwargs):
    """``loss_change`` with one solver: scores, seconds, diagnostics, warnings."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        est = InfluenceEstimator(FrozenEstimator(net), damping=damping, solver=solver,
                                 solver_params=params, **kwargs).fit(X, y)
        scores = est.loss_change(X, y, X_test, y_test)
    seconds = time.perf_counter() - start
    messages = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    return scores, seconds, est.diagnostics_, messages


def compare(scores, reference):
    """Pearson correlation and relative Frobenius error against the reference."""
    pearson = np.corrcoef(scores.ravel(), reference.ravel())[0, 1]
    return pearson, np.linalg.norm(scores - reference) / np.linalg.norm(reference)


def setup_seconds(diagnostics):
    """Set-up time recorded by ``fit`` (dense build, factors, eigenpairs …)."""
    return sum(v for k, v in diagnostics.items() if k.endswith("_seconds")
               and k not in ("gradient_seconds", "solve_seconds"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", default="solver_comparison.png")
    args = parser.parse_args(argv)

    X, y = load_digits(return_X_y=True)
    rows = np.random.default_rng(args.random_state).permutation(len(X))
    train, test = rows[:args.n_train], rows[args.n_train:args.n_train + args.n_test]
    scaler = StandardScaler().fit(X[train])
    X_train, y_train = scaler.transform(X[train]), y[train]
    X_test, y_test = scaler.transform(X[test]), y[test]

    torch.manual_seed(args.random_state)
    net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss, lr=0.05,
                              optimizer__momentum=0.9, optimizer__weight_decay=1e-4,
                              batch_size=64, max_epochs=args.epochs,
                              iterator_train__shuffle=True, verbose=0)
    start = time.perf_counter()
    net.fit(X_train, y_train)
    n_params = sum(p.numel() for p in net.module_.parameters())
    print(f"MLP 64-32-10 ({n_params} parameters) trained on {args.n_train} digits in "
          f"{time.perf_counter() - start:.1f} s; test accuracy "
          f"{net.score(X_test, y_test):.3f}; influence matrix "
          f"{args.n_train} × {len(test)}, damping {args.damping:g}\n")

    results = {}
    for label, solver, params, kwargs in SOLVERS:
        results[label] = influence_matrix(net, X_train, y_train, X_test, y_test,
                                          args.damping, solver, params, kwargs)
    reference = results["exact"][0]

    print(f"{'solver':>20} {'seconds':>8} {'set-up':>7} {'solve':>7} {'Pearson':>8} "
          f"{'rel. error':>10} {'iterations':>10} {'residual':>9}")
    summary = {}
    for label, (scores, seconds, diagnostics, _messages) in results.items():
        pearson, error = compare(scores, reference)
        summary[label] = seconds, error
        residual = diagnostics["max_relative_residual"]
        print(f"{label:>20} {seconds:8.2f} {setup_seconds(diagnostics):7.2f} "
              f"{diagnostics['solve_seconds']:7.2f} {pearson:8.4f} {error:10.2e} "
              f"{diagnostics['n_iter']:>10} "
              f"{'—' if residual is None else format(residual, '.1e'):>9}")
    for label, (_, _, _, messages) in results.items():
        for message in messages:
            print(f"\n{label} warned: {message}")
    print(f"\nlargest eigenvalue of G + λI (Lanczos, from LiSSA's set-up): "
          f"{results['lissa, 100 steps'][2]['top_eigenvalue']:.3g}; "
          f"rank-50 Arnoldi keeps eigenvalues down to "
          f"{results['arnoldi, rank 50'][2]['smallest_kept_eigenvalue']:.3g}")

    # The approximations again at larger dampings, each against its own exact solve.
    approximate = [entry for entry in SOLVERS if entry[1] in ("ekfac", "kfac", "arnoldi")]
    print("\napproximate solvers against damping (Pearson / relative error vs exact):")
    print(f"{'damping':>8} " + " ".join(f"{label:>20}" for label, *_ in approximate))
    for damping in sorted({args.damping, *DAMPINGS}):
        exact = (reference if damping == args.damping else
                 influence_matrix(net, X_train, y_train, X_test, y_test, damping,
                                  "exact", None, {})[0])
        cells = []
        for _label, solver, params, kwargs in approximate:
            scores = influence_matrix(net, X_train, y_train, X_test, y_test, damping,
                                      solver, params, kwargs)[0]
            cells.append("{:.3f} / {:.2f}".format(*compare(scores, exact)))
        print(f"{damping:>8g} " + " ".join(f"{cell:>20}" for cell in cells))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for label, (seconds, error) in summary.items():
            if label == "exact":
                continue  # zero error: not drawable on a log axis
            left.scatter(seconds, error)
            below = label == "ekfac"  # K-FAC sits at about the same place: label apart
            left.annotate(label, (seconds, error), textcoords="offset points",
                          xytext=(5, -11 if below else 4), fontsize=8)
        left.axvline(summary["exact"][0], color="grey", linestyle="--", linewidth=1)
        left.text(summary["exact"][0], 0.5, " exact (error 0)", rotation=90, va="center",
                  transform=left.get_xaxis_transform(), fontsize=8, color="grey")
        left.set_xscale("log")
        left.set_yscale("log")
        left.margins(x=0.15, y=0.15)
        left.set_xlabel("fit + loss_change (s)")
        left.set_ylabel("relative Frobenius error vs exact")
        left.set_title("Speed against accuracy")

        ekfac = results["ekfac"][0]
        right.scatter(reference.ravel(), ekfac.ravel(), s=2, alpha=0.3)
        bound = np.abs(np.concatenate([reference.ravel(), ekfac.ravel()])).max()
        right.plot([-bound, bound], [-bound, bound], color="grey", linewidth=1)
        # Linear within the typical size of an entry, logarithmic beyond.
        linear = 10.0 ** np.floor(np.log10(np.quantile(np.abs(reference), 0.9)))
        top = int(np.ceil(np.log10(bound)))
        ticks = [0.0] + [sign * 10.0 ** k for k in range(int(np.log10(linear)), top + 1, 2)
                         for sign in (-1, 1)]
        for axis in ("x", "y"):
            getattr(right, f"set_{axis}scale")("symlog", linthresh=linear)
            getattr(right, f"set_{axis}ticks")(ticks)
        right.set_xlabel("exact influence (symlog)")
        right.set_ylabel("EK-FAC influence (symlog)")
        right.set_title(f"All {reference.size} entries, damping {args.damping:g}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()

# %%
# What the run showed
# -------------------
#
# On our machine (2 shared cores, ``OMP_NUM_THREADS=1``; times are noisy, the
# ratios less so), at the default sizes — 2,410 parameters, an 800 × 200
# influence matrix, damping 1e-3 — one run printed::
#
#                 solver  seconds  set-up   solve  Pearson rel. error iterations  residual
#                  exact     1.57    1.45    0.07   1.0000   0.00e+00          0         —
#                     cg     1.72    0.00    1.69   1.0000   2.94e-07          8   4.9e-07
#    cg, mixed precision     1.78    0.00    1.75   1.0000   4.24e-09         17   9.3e-09
#                  ekfac     0.08    0.03    0.01   0.4427   7.09e+00          0         —
#                   kfac     0.05    0.01    0.01   0.3972   8.74e+00          0         —
#       arnoldi, rank 50     0.71    0.66    0.01   0.7188   9.19e+00          0         —
#       lissa, 100 steps    13.57    0.15   13.39   0.9352   4.41e-01        100   7.3e-01
#
# - Exact took 1.6 s, nearly all of it building the dense matrix; block CG
#   matched it to 3e-7 in 8 iterations (1.7 s). Mixed precision reached
#   4e-9 (its refinement rounds, each to 1e-4, overshoot ``tol``) in about
#   the same time: its float32 products cost about half, but it needed 17
#   iterations against 8.
# - At this small damping the fast approximations were poor: EK-FAC Pearson
#   0.44 and relative error 7.1, K-FAC 0.40 / 8.7, Arnoldi 0.72 / 9.2. The
#   right panel shows why the error is so large: a few training rows get a
#   hugely inflated influence (checked separately: the largest single entry,
#   36 against 1.1 exact, carries 88 % of EK-FAC's squared error), and many
#   small entries change sign. Arnoldi treats every direction beyond its top 50 (whose
#   smallest eigenvalue is 0.045) as if it had curvature ``μ + λ`` = 1.1e-3
#   only, over-inverting them.
# - With more damping they recovered (Pearson / relative error): EK-FAC
#   0.68 / 4.3 at 1e-2 and 0.93 / 1.4 at 0.1; Arnoldi 0.88 / 1.4 and
#   0.996 / 0.10. What fails EK-FAC at a small damping is the Kronecker
#   eigenbasis, not its eigenvalues (they equal the exact Gauss–Newton
#   diagonal in that basis) nor the neglect of cross-layer terms: the exact
#   inverse of the same layer-wise block-diagonal matrix gives Pearson 0.97 /
#   relative error 0.48 at 1e-3 (checked separately).
# - LiSSA, 100 steps with its scale at 1.05 × the top eigenvalue (0.64),
#   was the slowest by far (14 s, eight times CG) and still 44 % off, with a
#   relative residual of 0.73 — it warned. Its Pearson (0.94) is higher than
#   its error suggests: the truncated series keeps the large-curvature
#   directions right and shrinks the rest.
#
# So: keep ``solver="auto"`` (exact here, CG once the matrix no longer fits)
# when the numbers matter; EK-FAC/Arnoldi are for rankings at a damping
# large enough for them, checked against CG on a subset as above.
