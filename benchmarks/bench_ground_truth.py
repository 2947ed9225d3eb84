"""Benchmark: ground-truth responses one at a time vs in parallel.

Fits an MLP (64-32-10, tanh, float64) on 1,000 digits and computes the
responses of 32 removed samples for three rungs — PBRF, warm-start retraining,
cold-start leave-one-out — one configuration per fresh subprocess (so that
timings and peak memory are not shared):

- ``sequential``: one sample at a time in one process (``n_jobs=1``,
  ``removal_batch_size=1``);
- ``batched``: 32 samples at once (``removal_batch_size=32``). PBRF:
  vectorised gradients over parameter copies iterating with the shared damped
  Gauss–Newton factor (the factorisation, which the exact influence rung
  shares, is timed too). Retraining: a vectorised ensemble of 32 copies
  replaying the net's recipe (same optimiser, batch order and seed);
- ``joblib-2``: two loky worker processes (``n_jobs=2``), one torch thread each,
  one sample at a time within each worker.

It prints wall time, peak resident memory of the main process (and of the
workers), the memory the computation added to the process (its peak during
``param_change`` minus the resident size before, Linux), the documented bound
on that for the batched paths (``18 P² + 8 B (4P + 3 N W)`` for the PBRF with
its shared factor, ``8 B (3P + 8·64 (d + W))`` for the retraining ensembles of
``B`` copies, ``d`` input features, ``W`` the summed layer widths, 64 rows a
mini-batch) plus the one-time workspace the sequential run of the same rung
added, the speed-up against the sequential run
measured in the same invocation (these machines are noisy: compare ratios, not
absolute times), and checks that both
give the same answers (to 1e-6 relative: the PBRF solves stop at a 1e-9 relative gradient
norm, by different routes). The worker pool is started (and has imported torch)
before the timing, as it is after the first parallel call of a session; a
cold start adds about 3 s. Likewise every process (main and workers) makes one
tiny ``torch.func`` call first: the first transform of a process imports
``torch._dynamo`` (about 1 s and 75 MiB, once). Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_ground_truth.py

``--n-removed``, ``--n-train`` and ``--rungs`` shrink it for a quick look.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from _process import first_transform, reset_peak_rss, status_mib, warm_up

RUNGS = ("pbrf", "warm_start", "cold_start_loo")


def worker(args):
    import torch
    from skorch import NeuralNetClassifier
    from sklearn.datasets import load_digits

    from sklinfluence import LOOEstimator, PBRFEstimator

    torch.set_num_threads(1)

    class MLP(torch.nn.Sequential):
        def __init__(self):
            super().__init__(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
            self.double()

    X, y = load_digits(return_X_y=True)
    X, y = X[:args.n_train] / 16.0, y[:args.n_train]
    net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss, lr=0.1,
                              optimizer__momentum=0.9, optimizer__weight_decay=1e-3,
                              batch_size=64, max_epochs=args.epochs,
                              iterator_train__shuffle=True, verbose=0)
    n_jobs = 2 if args.config == "joblib-2" else 1  # joblib-2: one sample at a time per worker
    kw = dict(random_state=0, n_jobs=n_jobs)
    batch = 32 if args.config == "batched" else 1
    kw["removal_batch_size"] = batch
    est = {"pbrf": PBRFEstimator(net, damping=1e-2, **kw),
           "warm_start": LOOEstimator(net, warm_start=True, **kw),
           "cold_start_loo": LOOEstimator(net, **kw)}[args.rung].fit(X, y)
    removed = np.random.default_rng(0).choice(args.n_train, args.n_removed, replace=False)
    if n_jobs > 1:  # start the workers (and their torch import) outside the timing
        from joblib import Parallel, delayed

        Parallel(n_jobs=n_jobs)(delayed(warm_up)() for _ in range(n_jobs))
    first_transform(torch)  # in every configuration, as after a session's first call
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    delta = est.param_change(X[removed])
    seconds = time.perf_counter() - start
    extra = status_mib("VmHWM") - rss_before if rss_before is not None else float("nan")
    shared = 0.0
    if args.config == "batched" and args.rung == "pbrf":
        info = est.responder_.chord_solver().info
        shared = info.get("build_seconds", 0.0) + info.get("factor_seconds", 0.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    bound = None
    if args.config == "batched":  # the documented bounds (README, estimator docstrings)
        P, d, W = est.model_.n_params, 64, 32 + 10  # W: summed layer widths
        bound = (18 * P ** 2 + batch * 8 * (4 * P + 3 * args.n_train * W) if args.rung == "pbrf"
                 else batch * 8 * (3 * P + 8 * 64 * (d + W))) / 2 ** 20  # 64 rows a batch
    print(json.dumps({"seconds": seconds, "shared_factor_seconds": shared, "peak_mib": peak,
                      "extra_mib": extra, "bound_mib": bound,
                      "peak_children_mib": peak_children,
                      "checksum": float(np.abs(delta).sum()), "delta0": delta[0, :5].tolist()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-removed", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rungs", nargs="+", choices=RUNGS, default=list(RUNGS))
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--rung", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return worker(args)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"MLP 64-32-10 on {args.n_train} digits, {args.epochs} epochs; "
          f"{args.n_removed} removed samples\n")
    print(f"{'rung':>15} {'config':>11} {'seconds':>9} {'per sample':>11} {'speed-up':>9} "
          f"{'peak MiB':>9} {'added MiB':>10} {'bound MiB':>10} {'same answer':>12}")
    notes = []
    for rung in args.rungs:
        baseline = None
        for config in ("sequential", "batched", "joblib-2"):
            out = subprocess.run(
                [sys.executable, __file__, "--config", config, "--rung", rung,
                 "--n-train", str(args.n_train), "--n-removed", str(args.n_removed),
                 "--epochs", str(args.epochs)],
                capture_output=True, text=True, env=env, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            baseline = baseline or result
            same = np.allclose(result["delta0"], baseline["delta0"], rtol=1e-6,
                               atol=1e-9 * np.abs(baseline["delta0"]).max())
            peak = max(result["peak_mib"], result["peak_children_mib"])
            if result["bound_mib"] is not None:  # + the workspace any first computation adds
                result["bound_mib"] += baseline["extra_mib"]
            print(f"{rung:>15} {config:>11} {result['seconds']:9.2f} "
                  f"{result['seconds'] / args.n_removed:11.3f} "
                  f"{baseline['seconds'] / result['seconds']:9.2f} {peak:9.0f} "
                  f"{result['extra_mib']:10.0f} "
                  f"{'-' if result['bound_mib'] is None else round(result['bound_mib']):>10} "
                  f"{str(same):>12}")
            if result["shared_factor_seconds"]:
                rest = result["seconds"] - result["shared_factor_seconds"]
                notes.append(f"{rung} batched: {result['shared_factor_seconds']:.2f} s of it "
                             "build and factorise the damped Gauss-Newton matrix (shared with "
                             "the exact-influence rung; paid once per fit); the solves alone "
                             f"take {rest:.2f} s, {baseline['seconds'] / rest:.1f}x faster "
                             "than sequential")
    for note in notes:
        print("\n" + note)


if __name__ == "__main__":
    main()
