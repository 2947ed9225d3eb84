"""Benchmark: LDS ground truth, batched retraining vs one subset at a time.

Fits an MLP (64-32-10, tanh, float64; the recipe of ``bench_ground_truth.py``:
SGD lr 0.1, momentum 0.9, weight decay 1e-3, 64-row mini-batches, 20 epochs)
on 1,500 digits and fits
``LinearDatamodelingScore(net, n_subsets=50, alpha=0.5, reference="retrain")``
against 100 held-out digits: 50 cold-start retrainings of the recipe on random
halves. One configuration per fresh subprocess (so that timings and
peak memory are not shared):

- ``sequential``: one subset at a time with the net's own ``fit``
  (``removal_batch_size=1``, ``n_jobs=1``);
- ``batched-32``: the library's default ``removal_batch_size=32``, a
  vectorised ensemble replaying the recipe (same optimiser, batch order and
  seed); 50 subsets make two ensembles, of 32 and 18 copies, each running
  every optimiser step of the recipe;
- ``batched-50``: ``removal_batch_size=50``, all 50 copies in one ensemble
  (the whole LDS in one pass of the recipe's steps);
- ``joblib-2``: two loky worker processes (``n_jobs=2``), one torch thread
  each, one subset at a time within each worker.

Every process runs with one torch thread (``OMP_NUM_THREADS=1``). The
configurations run in turn, ``--repeats`` rounds of them interleaved, so that
the machine's drift hits all of them alike; the table gives the median wall
time of ``fit`` (which includes one fit of the net on all rows and the
measurements, the same work in every configuration), the speed-up against the
sequential median of the same run (these machines are noisy: compare ratios,
not absolute times), the peak resident memory of the main process (and of the
workers), the memory the computation added to the process (its peak during
``fit`` minus the resident size before, Linux), and for the ensembles the
documented bound on that (``8 B (3P + 8·64 (d + W))`` bytes for ``B`` copies,
``P`` parameters, ``d`` input features, ``W`` the summed layer widths, 64 rows
a mini-batch; ``sklinfluence/ground_truth.py``) plus the workspace the
sequential run added. It checks that every configuration gives the same
answer as the sequential one: the largest difference of ``measurements_``
(absolute, and relative to the largest measurement) and of
``param_changes_`` (relative to the largest entry), against a tolerance of
1e-14 relative, the library's tests' (the ensemble replays the recipe, so only
rounding differs: 0 to 1e-15 measured; ``joblib-2`` runs the same ``fit`` calls as
``sequential``, bit for bit).
Last, it scores one attribution matrix — exact influence,
``InfluenceEstimator(net, damping=1e-2, solver="exact")`` — against every
configuration's ground truth (first round only: its 200 bootstrap resamplings
take about 10 s): the LDS must not depend on how the ground truth was
computed. As in ``bench_ground_truth.py``, the worker pool is started
before the timing and every process makes one tiny ``torch.func`` call first
(the first transform of a process imports ``torch._dynamo``, about 1 s and
75 MiB, once). Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_lds.py

``--n-train``, ``--n-subsets``, ``--n-eval``, ``--repeats`` and
``--configs`` shrink it for a quick look (digits has 1,797 rows:
``n_train + n_eval`` at most).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from _process import first_transform, reset_peak_rss, status_mib, warm_up

CONFIGS = ("sequential", "batched-32", "batched-50", "joblib-2")
DIGITS_ROWS = 1797
TOLERANCE = 1e-14  # relative to the largest entry (as the tests); 0 to 1e-15 measured


def _children_peak_mib():
    """Largest peak resident memory of this process's live children (the loky workers)."""
    me, peak = str(os.getpid()), 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
            peak = max(peak, int(fields["VmHWM"].split()[0]) / 1024)
    return peak


def _data_and_net(args):
    """Training and held-out digits (pixels in [0, 1]) and the unfitted net."""
    import torch
    from skorch import NeuralNetClassifier
    from sklearn.datasets import load_digits

    class MLP(torch.nn.Sequential):
        def __init__(self):
            super().__init__(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
            self.double()

    X, y = load_digits(return_X_y=True)
    rows = np.random.default_rng(0).permutation(len(X))
    train, held_out = rows[:args.n_train], rows[args.n_train:args.n_train + args.n_eval]
    net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss, lr=0.1,
                              optimizer__momentum=0.9, optimizer__weight_decay=1e-3,
                              batch_size=64, max_epochs=args.epochs,
                              iterator_train__shuffle=True, verbose=0)
    return X[train] / 16.0, y[train], X[held_out] / 16.0, y[held_out], net


def attributions_worker(args):
    """The exact-influence attribution matrix, saved for the other workers to score."""
    import torch
    from sklearn.base import clone

    from sklinfluence import InfluenceEstimator

    torch.set_num_threads(1)
    X, y, X_eval, y_eval, net = _data_and_net(args)
    torch.manual_seed(0)
    clone(net).fit(X, y)  # the first fit of a process pays one-time costs
    start = time.perf_counter()
    clone(net).fit(X, y)  # one fit of the recipe on all rows: part of every LDS fit
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    est = InfluenceEstimator(net, damping=1e-2, solver="exact", random_state=0).fit(X, y)
    matrix = est.loss_change(X, y, X_eval, y_eval)
    seconds = time.perf_counter() - start
    np.save(args.out, matrix)
    print(json.dumps({"seconds": seconds, "fit_seconds": fit_seconds,
                      "n_params": int(est.model_.n_params)}))


def worker(args):
    import torch

    from sklinfluence import LinearDatamodelingScore

    torch.set_num_threads(1)
    X, y, X_eval, y_eval, net = _data_and_net(args)
    n_jobs = 2 if args.config == "joblib-2" else 1  # joblib-2: one subset at a time per worker
    batch = int(args.config.split("-")[1]) if args.config.startswith("batched") else 1
    lds = LinearDatamodelingScore(net, n_subsets=args.n_subsets, alpha=0.5,
                                  reference="retrain", random_state=0,
                                  removal_batch_size=batch, n_jobs=n_jobs)
    if n_jobs > 1:  # start the workers (and their torch import) outside the timing
        from joblib import Parallel, delayed

        Parallel(n_jobs=n_jobs)(delayed(warm_up)() for _ in range(n_jobs))
    first_transform(torch)  # in every configuration, as after a session's first call
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    lds.fit(X, y, X_eval, y_eval)
    seconds = time.perf_counter() - start
    extra = status_mib("VmHWM") - rss_before if rss_before is not None else float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = _children_peak_mib()  # live workers: RUSAGE_CHILDREN has only the dead
    bound = None
    P = lds.model_.n_params
    if batch > 1:  # the documented bound (ground_truth.py, README), for the largest ensemble
        d, W = 64, 32 + 10  # W: summed layer widths
        copies = min(batch, args.n_subsets)
        bound = copies * 8 * (3 * P + 8 * 64 * (d + W)) / 2 ** 20  # 64 rows a mini-batch
    score = None
    if args.attributions:
        result = lds.score_attributions(np.load(args.attributions))
        score = [result.mean, result.bootstrap_std]
    np.savez(args.out, measurements=lds.measurements_, param_changes=lds.param_changes_,
             subsets=lds.subsets_, base_losses=lds.base_losses_)
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "extra_mib": extra,
                      "bound_mib": bound, "peak_children_mib": peak_children,
                      "n_params": int(P), "lds": score}))


def _run(args, config, out, attributions=None):
    command = [sys.executable, __file__, "--config", config, "--out", out,
               "--n-train", str(args.n_train), "--n-subsets", str(args.n_subsets),
               "--n-eval", str(args.n_eval), "--epochs", str(args.epochs)]
    if attributions:
        command += ["--attributions", attributions]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{config} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gap(a, b):
    """Largest absolute difference, and that relative to the largest entry of ``b``."""
    gap = float(np.abs(a - b).max())
    return gap, gap / float(np.abs(b).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-subsets", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of all configurations; the median time is shown")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="sequential always runs: it is the baseline")
    parser.add_argument("--no-attributions", action="store_true",
                        help="skip scoring the exact-influence matrix")
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--attributions", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config == "attributions":
        return attributions_worker(args)
    if args.config:
        return worker(args)
    if args.n_train + args.n_eval > DIGITS_ROWS:
        parser.error(f"digits has {DIGITS_ROWS} rows: n_train + n_eval must not exceed it")
    configs = ["sequential"] + [c for c in args.configs if c != "sequential"]

    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        matrix_path = None
        info = None
        if not args.no_attributions:
            matrix_path = os.path.join(tmp, "attributions.npy")
            info = _run(args, "attributions", matrix_path)
        runs = {c: [] for c in configs}
        answers = {c: [] for c in configs}
        for r in range(args.repeats):  # interleaved: drift hits every configuration alike
            for config in configs:
                out = os.path.join(tmp, f"{config}-{r}.npz")
                scored = matrix_path if r == 0 else None  # the bootstrap takes ~10 s
                runs[config].append(_run(args, config, out, scored))
                with np.load(out) as saved:
                    answers[config].append({k: saved[k] for k in saved.files})

    first = runs["sequential"][0]
    print(f"MLP 64-32-10 ({first['n_params']:,} parameters) on {args.n_train} digits, "
          f"{args.epochs} epochs; LDS ground truth: {args.n_subsets} halves retrained, "
          f"{args.n_eval} held-out points; median of {args.repeats} run(s) each\n")
    print(f"{'config':>11} {'seconds':>8} {'(min-max)':>13} {'per subset':>11} "
          f"{'speed-up':>9} {'peak MiB':>9} {'added MiB':>10} {'bound MiB':>10} "
          f"{'max|dQ|':>9} {'rel dQ':>9} {'rel dtheta':>11} {'same':>5}")
    baseline = float(np.median([run["seconds"] for run in runs["sequential"]]))
    reference = answers["sequential"][0]
    base_extra = float(np.median([run["extra_mib"] for run in runs["sequential"]]))
    failures = []
    worst = 0.0
    for config in configs:
        times = [run["seconds"] for run in runs[config]]
        seconds = float(np.median(times))
        peak = max(max(run["peak_mib"], run["peak_children_mib"]) for run in runs[config])
        extra = float(np.median([run["extra_mib"] for run in runs[config]]))
        bound = runs[config][0]["bound_mib"]
        bound = "-" if bound is None else round(bound + base_extra)  # + first-call workspace
        gap_q = rel_q = rel_theta = 0.0
        for answer in answers[config]:  # every repeat against the first sequential one
            if not np.array_equal(answer["subsets"], reference["subsets"]):
                failures.append(f"{config}: different subsets")
            q, rq = _gap(answer["measurements"], reference["measurements"])
            _, rt = _gap(answer["param_changes"], reference["param_changes"])
            gap_q, rel_q, rel_theta = max(gap_q, q), max(rel_q, rq), max(rel_theta, rt)
        same = rel_q <= TOLERANCE and rel_theta <= TOLERANCE
        worst = max(worst, rel_q, rel_theta)
        if not same:
            failures.append(f"{config}: relative gap {max(rel_q, rel_theta):.1e} > "
                            f"{TOLERANCE:.0e}")
        print(f"{config:>11} {seconds:8.2f} {f'({min(times):.1f}-{max(times):.1f})':>13} "
              f"{seconds / args.n_subsets:11.3f} {baseline / seconds:9.2f} {peak:9.0f} "
              f"{extra:10.0f} {bound:>10} {gap_q:9.1e} {rel_q:9.1e} {rel_theta:11.1e} "
              f"{str(same):>5}")

    here = "" if info is None else f" ({info['fit_seconds']:.2f} s)"
    print(f"\nseconds: wall time of LinearDatamodelingScore.fit, which includes one fit of "
          f"the net on all rows{here}\n  and the measurements, the same in every configuration")
    print("dQ: measurements_ minus the sequential run's (rel: over the largest |measurement|); "
          "dtheta: param_changes_, relative to the largest |entry|; every repeat compared")
    print(f"equal answers (tolerance {TOLERANCE:.0e} relative, largest gap {worst:.1e}): "
          + ("PASS" if not failures else "FAIL — " + "; ".join(failures)))
    if info is not None:
        print(f"\nLDS of exact influence (damping 1e-2; matrix computed once, "
              f"{info['seconds']:.1f} s) against each configuration's ground truth:")
        scores = {config: runs[config][0]["lds"] for config in configs}
        for config, (mean, spread) in scores.items():
            print(f"{config:>11}  {mean:.12f} ± {spread:.3f} (bootstrap std over subsets)")
        spread = max(m for m, _ in scores.values()) - min(m for m, _ in scores.values())
        print(f"  largest difference between configurations: {spread:.1e}")
    print(f"\ntotal: {time.perf_counter() - total:.0f} s")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
