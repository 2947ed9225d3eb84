"""
Choosing the damping with GridSearchCV
======================================

The damping ``λ`` of an influence estimate is a free parameter: too small and
the inverse curvature amplifies noise, too large and the estimate shrinks
towards a plain gradient dot product. This script lets scikit-learn choose it:
``GridSearchCV`` fits :class:`~sklinfluence.InfluenceEstimator` on all
training rows for each candidate damping (the :class:`~sklinfluence.RemovalSplit`
splitter yields *(all rows, a subset to remove)*) and scores it by how well its
self-influence scores on the removed subset rank like a reference:

- cold-start leave-one-out retraining (``estimator.score``'s default), and
- the PBRF at the same damping (``agreement_scorer(reference="pbrf")``).

Bae et al. (2022) find that influence estimates approximate the PBRF well at
any reasonable damping, while their agreement with leave-one-out is weaker.
What this script shows on a small weight-decayed MLP: agreement with the PBRF
is ~1.0 from λ = 0.01 up (at 1e-3 a few PBRF objectives are not convex at θˢ
and their solves stop with a warning), and agreement with leave-one-out is
high (~0.96) and nearly flat in λ — this net is close to convex; larger nets
trained longer are where the two references part. The reference responses are computed once and shared
by all candidates (they are cached in-process), so the search costs about one
leave-one-out retraining per removed sample plus one PBRF solve per sample and
candidate. About a minute on 2 cores; writes ``grid_search_damping.png``
(``--plot``).
"""

import argparse
import time

import numpy as np
import torch
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV

from sklinfluence import InfluenceEstimator, RemovalSplit, agreement_scorer


class MLP(torch.nn.Sequential):
    def __init__(self, hidden=16):
        super().__init__(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                         torch.nn.Linear(hidden, 10))
        self.double()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-remove", type=int, default=30)
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", default="grid_search_damping.png")
    args = parser.parse_args(argv)

    X, y = load_digits(return_X_y=True)
    rows = np.random.default_rng(args.random_state).choice(len(X), args.n_train, replace=False)
    X, y = X[rows] / 16.0, y[rows]
    net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss, lr=0.1,
                              optimizer__momentum=0.9, optimizer__weight_decay=1e-3,
                              batch_size=50, max_epochs=30, iterator_train__shuffle=True,
                              verbose=0)
    grid = {"damping": [1e-3, 1e-2, 1e-1, 1.0, 10.0]}
    cv = RemovalSplit(n_remove=args.n_remove, random_state=args.random_state)
    results = {}
    for name, scoring in [("leave-one-out", None),
                          ("PBRF", agreement_scorer(reference="pbrf"))]:
        start = time.perf_counter()
        search = GridSearchCV(InfluenceEstimator(net, random_state=args.random_state), grid,
                              cv=cv, scoring=scoring, refit=False).fit(X, y)
        results[name] = search.cv_results_["mean_test_score"]
        print(f"reference {name}: best damping {search.best_params_['damping']:g} "
              f"(Spearman {search.best_score_:.3f}), {time.perf_counter() - start:.0f} s")

    print(f"\n{'damping':>10} " + " ".join(f"{name:>15}" for name in results))
    for i, damping in enumerate(grid["damping"]):
        print(f"{damping:>10g} " + " ".join(f"{v[i]:>15.3f}" for v in results.values()))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, values in results.items():
            ax.plot(grid["damping"], values, marker="o", label=f"vs {name}")
        ax.set_xscale("log")
        ax.set_xlabel("damping λ")
        ax.set_ylabel("Spearman of self-influence")
        ax.set_title("Influence-estimate agreement against damping")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
