"""
Finding mislabeled digits: influence, PBRF, leave-one-out and four baselines
=============================================================================

A classic use of self-influence: a mislabeled training sample is one the
model has to bend to fit, so removing it would raise its own loss a lot.
This script flips 10% of the labels of 500 training digits, trains an MLP
(64-32-10, SGD with weight decay) on the noisy labels, ranks the training
rows by

- the influence estimate (:class:`~sklinfluence.InfluenceEstimator`),
- the PBRF (:class:`~sklinfluence.PBRFEstimator`),
- cold-start leave-one-out retraining (:class:`~sklinfluence.LOOEstimator`),
- three baselines users compare against (:ref:`formulas <theory-baselines>`): grad-dot
  (``InfluenceEstimator(solver="identity")``, the curvature replaced by 0),
  TracIn-CP (:class:`~sklinfluence.TracInCP`, gradient dot products summed
  over the end-of-epoch checkpoints of the same fit) and plain training loss
  (:func:`~sklinfluence.training_loss`),
- a random order,

and plots the detection curves: the fraction of flipped labels found against
the fraction of the data inspected, top-ranked first.

The paper uses this task to argue that influence estimates, though poor
approximations of leave-one-out on neural networks, still answer useful
questions through the PBRF. What this script shows, honestly: all three
self-influence rankings find most flipped labels early (in the top 10% of
the ranking: influence 74%, PBRF 78%, leave-one-out 84%, random 10%), and so
do the baselines: training loss 70%, grad-dot 76%, and TracIn-CP 88%, the
best of all — at this scale the cheap baselines are within a few points of
the influence estimate, and summing over the training trajectory helps more
than the curvature does. About a minute on 2 cores; ``--plot`` names the
PNG.
"""

import argparse
import time

import numpy as np
import torch
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler

from sklinfluence import (InfluenceEstimator, LOOEstimator, PBRFEstimator, TracInCP,
                          training_loss)


class MLP(torch.nn.Sequential):
    def __init__(self, hidden=32):
        super().__init__(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                         torch.nn.Linear(hidden, 10))
        self.double()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--flip", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", default="mislabel_detection.png")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.random_state)
    X, y = load_digits(return_X_y=True)
    rows = rng.choice(len(X), args.n_train, replace=False)
    X, y = StandardScaler().fit_transform(X[rows]), y[rows].copy()
    flipped = rng.choice(args.n_train, int(round(args.flip * args.n_train)), replace=False)
    for i in flipped:
        y[i] = rng.choice([c for c in range(10) if c != y[i]])

    net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss, lr=0.05,
                              optimizer__momentum=0.9, optimizer__weight_decay=1e-3,
                              batch_size=64, max_epochs=args.epochs,
                              iterator_train__shuffle=True, verbose=0)
    kw = dict(random_state=args.random_state)
    rankings = {}
    for name, est in [("influence", InfluenceEstimator(net, damping=args.damping, **kw)),
                      ("PBRF", PBRFEstimator(net, damping=args.damping, **kw)),
                      ("leave-one-out", LOOEstimator(net, **kw)),
                      ("grad-dot", InfluenceEstimator(net, damping=args.damping,
                                                      solver="identity", **kw)),
                      ("TracIn-CP", TracInCP(net, **kw))]:
        start = time.perf_counter()
        rankings[name] = est.fit(X, y).score_samples(X)
        print(f"{name:>14}: {time.perf_counter() - start:5.1f} s")
        if name == "influence":
            rankings["training loss"] = training_loss(est, X, y)
    rankings["random"] = rng.permutation(args.n_train).astype(float)

    inspected = np.arange(1, args.n_train + 1) / args.n_train
    curves = {}
    print(f"\nfraction of the {len(flipped)} flipped labels found after inspecting:")
    print(f"{'ranking':>14} " + " ".join(f"{p:>6.0%}" for p in (0.05, 0.1, 0.2, 0.3)))
    for name, scores in rankings.items():
        order = np.argsort(-scores, kind="stable")
        curves[name] = np.cumsum(np.isin(order, flipped)) / len(flipped)
        found = [curves[name][int(round(p * args.n_train)) - 1] for p in (0.05, 0.1, 0.2, 0.3)]
        print(f"{name:>14} " + " ".join(f"{f:>6.0%}" for f in found))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, curve in curves.items():
            ax.plot(inspected, curve, label=name, linestyle="--" if name == "random" else "-")
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_title(f"Mislabeled digits ({args.flip:.0%} flipped)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
