"""Benchmark: the ground-truth rungs on the digits CNN (71,754 parameters).

Our reference CNN — Conv2d(1,16,3)–act–Conv2d(16,32,3)–act–Linear(512,128)–act–
Linear(128,10), float64 — trained by skorch (10 epochs of SGD, weight decay
1e-4) on 1,200 digits, damping 1e-3, one torch thread, each configuration in
a fresh subprocess (its own peak memory):

- ``pbrf``: ``PBRFEstimator.param_change`` of the first ``--n-batched`` (32)
  rows with ``removal_batch_size=32`` (Anderson-accelerated chord iteration
  on the shared kernel-form factor, whose build is included) against the
  first ``--n-one`` (6) rows one at a time (``removal_batch_size=1``: Newton
  with MINRES on Hessian-vector products). Prints seconds per row, the
  ratio, how many solves met ``tol`` and the largest relative difference of
  the answers on rows both met it. Tanh activations (``--activation``): a
  ReLU net's objective has kinks and its solves stall on both paths.
- ``decomposer``: ``Decomposer.transform`` of the first ``--n-rows`` (20)
  rows: seconds, seconds per rung and peak resident memory.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_cnn_ladder.py

``--parts``, ``--activation`` and the row counts shrink it for a quick look.
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


def _net(activation):
    import torch
    from skorch import NeuralNetClassifier

    sys.path.insert(0, str(HERE))
    from influence_peers import digits_cnn

    def module():
        m = digits_cnn()
        if activation == "tanh":
            for i, layer in enumerate(m):
                if isinstance(layer, torch.nn.ReLU):
                    m[i] = torch.nn.Tanh()
        return m

    return NeuralNetClassifier(module, criterion=torch.nn.CrossEntropyLoss, max_epochs=10,
                               lr=0.05, batch_size=64, optimizer__weight_decay=1e-4,
                               train_split=None, verbose=0, iterator_train__shuffle=True)


def _data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(X))[:1200]
    return X[idx] / 16.0, y[idx]


def run(config: dict) -> dict:
    """One configuration, in this process: timings, memory and answers."""
    import torch

    from sklinfluence import Decomposer, PBRFEstimator

    torch.set_num_threads(1)
    X, y = _data()
    net = _net(config["activation"])
    n = config["n"]
    if config["part"] == "decomposer":
        dec = Decomposer(net, damping=1e-3, random_state=0).fit(X, y)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dec.transform(X[:n], y[:n])
        return {"seconds": time.perf_counter() - start,
                "rungs": {k: sum(v) for k, v in dec.responder_.timings.items()},
                "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    est = PBRFEstimator(net, damping=1e-3, removal_batch_size=config["batch"],
                        random_state=0).fit(X, y)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = est.param_change(X[:n], y[:n])
    info = est.responder_.last_info
    return {"seconds": time.perf_counter() - start, "delta": delta.tolist(),
            "converged": info["converged"].astype(bool).tolist(),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _subprocess(config: dict) -> dict:
    from _process import in_subprocess

    return in_subprocess(__file__, config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["pbrf", "decomposer"],
                        default=["pbrf", "decomposer"])
    parser.add_argument("--activation", nargs="+", choices=["relu", "tanh"],
                        default=["relu", "tanh"], help="the Decomposer's nets")
    parser.add_argument("--n-batched", type=int, default=32)
    parser.add_argument("--n-one", type=int, default=6)
    parser.add_argument("--n-rows", type=int, default=20)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run(json.loads(args.run))))
        return
    if "pbrf" in args.parts:
        many = _subprocess({"part": "pbrf", "activation": "tanh", "batch": 32,
                            "n": args.n_batched})
        one = _subprocess({"part": "pbrf", "activation": "tanh", "batch": 1, "n": args.n_one})
        per_many, per_one = many["seconds"] / args.n_batched, one["seconds"] / args.n_one
        both = np.array(many["converged"][:args.n_one]) & np.array(one["converged"])
        d_many, d_one = np.array(many["delta"])[:args.n_one], np.array(one["delta"])
        diff = (np.linalg.norm(d_many - d_one, axis=1) / np.linalg.norm(d_one, axis=1))[both]
        print("PBRF, tanh CNN, damping 1e-3 (seconds per row; batched includes the factor)")
        print("| path | rows | s/row | met tol | peak MiB |\n|---|---|---|---|---|")
        print(f"| one at a time | {args.n_one} | {per_one:.2f} | {sum(one['converged'])} | "
              f"{one['peak_mib']:.0f} |")
        print(f"| batched 32 | {args.n_batched} | {per_many:.2f} | {sum(many['converged'])} | "
              f"{many['peak_mib']:.0f} |")
        print(f"speed-up per row: {per_one / per_many:.2f}x; largest relative difference on "
              f"the {int(both.sum())} rows both met tol: "
              f"{diff.max() if diff.size else float('nan'):.1e}")
    if "decomposer" in args.parts:
        print(f"\nDecomposer.transform of {args.n_rows} rows, damping 1e-3")
        print("| net | s | peak MiB | s per rung |\n|---|---|---|---|")
        for activation in args.activation:
            r = _subprocess({"part": "decomposer", "activation": activation,
                             "n": args.n_rows})
            rungs = ", ".join(f"{k} {v:.0f}" for k, v in r["rungs"].items())
            print(f"| {activation} CNN | {r['seconds']:.0f} | {r['peak_mib']:.0f} | {rungs} |")


if __name__ == "__main__":
    main()
