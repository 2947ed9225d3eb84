"""Benchmark: self-influence from the factorisation, and float32 nets at default settings.

Two parts, each configuration in a fresh subprocess (its own peak memory), one
torch thread, ratios against a baseline measured in the same run:

- ``kernel``: the reference digits CNN — Conv2d(1,16,3)–ReLU–Conv2d(16,32,3)–
  ReLU–Linear(512,128)–ReLU–Linear(128,10), 71,754 parameters, float64 —
  trained by skorch (10 epochs of SGD, weight decay 1e-4) on 1,200 digits,
  damping 1e-3, ``solver="kernel"`` (float64, 10,800 kernel rows). Times the
  1,200 × 300 influence matrix (``loss_change``), ``score_samples`` of all
  1,200 training rows from the kernel's diagonal blocks, and the same
  self-influence one solve per row (what ``score_samples`` did before: the
  solve of every row's gradient and back to parameters); prints the ratios
  and the largest relative difference of the two self-influence answers.
- ``float32``: a user's CNN as skorch trains it — float32, Conv2d(1,16,3)–ReLU–
  Conv2d(16,32,3)–ReLU–Linear(512,64)–ReLU–Linear(64,10), 38,282
  parameters — on all 1,797 digits (10 epochs, weight decay 1e-4), ``fit``
  (training included) plus ``score_samples`` of every row, at default
  settings (``"auto"`` → the float32 kernel refined in float64 to
  ``tol=1e-6``), against the previous defaults (float64 kernel, ``tol=1e-10``,
  one solve per row), the float64 kernel with the new self-influence, and
  EK-FAC; relative error against the float64 kernel's answer on the same net.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_self_influence.py

``--parts`` runs one part.
"""

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _process, also in the --run subprocesses


def _module(hidden, dtype):
    import torch

    nn = torch.nn
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3), nn.ReLU(),
                         nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(512, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(dtype)


def _net(hidden, dtype):
    import torch
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(_module, module__hidden=hidden, module__dtype=dtype,
                               criterion=torch.nn.CrossEntropyLoss, max_epochs=10, lr=0.05,
                               batch_size=64, optimizer__weight_decay=1e-4,
                               optimizer__momentum=0.9, iterator_train__shuffle=True,
                               train_split=None, verbose=0)


def _digits(n, dtype):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(X))[:n]
    return (X[idx] / 16.0).astype(dtype), y[idx]


def _old_self_influence(est, X):
    """Self-influence one solve per row: the generic path (solve, then products)."""
    from sklinfluence.solvers import Solver

    removals, _ = est._removals(X, None)
    scores = [Solver.self_products(est.solver_, part, est._forces)
              for part in est._linear_parts(removals)]
    import torch
    return est.epsilon_ * torch.cat(scores).numpy()


def run(config: dict) -> dict:
    """One configuration, in this process."""
    import torch

    from sklinfluence import InfluenceEstimator

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out = {}
    if config["part"] == "kernel":
        X, y = _digits(1500, np.float64)
        X, y, X_test, y_test = X[:1200], y[:1200], X[1200:], y[1200:]
        net = _net(128, torch.float64).fit(X, y)
        from sklearn.frozen import FrozenEstimator

        start = time.perf_counter()
        est = InfluenceEstimator(FrozenEstimator(net), damping=1e-3, solver="kernel").fit(X, y)
        out["fit"] = time.perf_counter() - start
        start = time.perf_counter()
        est.loss_change(X, y, X_test, y_test)
        out["matrix"] = time.perf_counter() - start
        start = time.perf_counter()
        new = est.score_samples(X)
        out["self"] = time.perf_counter() - start
        start = time.perf_counter()
        old = _old_self_influence(est, X)
        out["self_old"] = time.perf_counter() - start
        out["difference"] = float((np.abs(new - old) / np.abs(old)).max())
    else:
        X, y = _digits(1797, np.float32)
        kwargs = {"default": {}, "ekfac": {"solver": "ekfac"},
                  "float64 kernel": {"solver": "kernel", "tol": 1e-10},
                  "before": {"solver": "kernel", "tol": 1e-10}}[config["name"]]
        start = time.perf_counter()
        est = InfluenceEstimator(_net(64, torch.float32), random_state=0, **kwargs).fit(X, y)
        out["fit"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = _old_self_influence(est, X) if config["name"] == "before" \
            else est.score_samples(X)
        out["self"] = time.perf_counter() - start
        out["scores"] = scores.tolist()
        out["solver"] = {k: est.diagnostics_.get(k) for k in
                         ("solver", "precision", "fallback", "tol", "max_relative_residual")}
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _subprocess(config: dict) -> dict:
    from _process import in_subprocess

    return in_subprocess(__file__, config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["kernel", "float32"],
                        default=["kernel", "float32"])
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run(json.loads(args.run))))
        return
    if "kernel" in args.parts:
        r = _subprocess({"part": "kernel"})
        print("Digits CNN, 71,754 parameters, float64, 1,200 rows, solver='kernel' "
              f"(fit {r['fit']:.1f} s, peak {r['peak_mib']:.0f} MiB)")
        print("| | s | × the 1,200 × 300 matrix |\n|---|---|---|")
        for label, key in [("influence matrix 1,200 × 300", "matrix"),
                           ("self-influence, 1,200 rows (diagonal blocks)", "self"),
                           ("self-influence, one solve per row (before)", "self_old")]:
            print(f"| {label} | {r[key]:.2f} | {r[key] / r['matrix']:.2f} |")
        print(f"one solve per row / diagonal blocks: {r['self_old'] / r['self']:.1f}x; "
              f"largest relative difference of the answers {r['difference']:.1e}")
    if "float32" in args.parts:
        names = ["before", "default", "float64 kernel", "ekfac"]
        results = {name: _subprocess({"part": "float32", "name": name}) for name in names}
        reference = np.array(results["float64 kernel"]["scores"])
        base = results["before"]["fit"] + results["before"]["self"]
        print("\nfloat32 CNN as skorch trains it, 38,282 parameters, 1,797 digits: fit "
              "(training included) + self-influence of every row")
        print("| configuration | fit s | self s | total s | × before | rel. error | "
              "peak MiB | solver |\n|---|---|---|---|---|---|---|---|")
        for name in names:
            r = results[name]
            error = float((np.abs(np.array(r["scores"]) - reference) / np.abs(reference)).max())
            total = r["fit"] + r["self"]
            print(f"| {name} | {r['fit']:.1f} | {r['self']:.1f} | {total:.1f} | "
                  f"{total / base:.2f} | {error:.1e} | {r['peak_mib']:.0f} | {r['solver']} |")


if __name__ == "__main__":
    main()
