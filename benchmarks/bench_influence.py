"""Influence-matrix benchmark: sklinfluence's solvers against pyDVL, Captum and Kronfluence.

Every method computes the full train × test influence matrix of the same
trained float64 MLP, in its own fresh process (so that each one's peak memory
is its own), and is compared with sklinfluence's exact dense Gauss–Newton
answer computed in the same run::

    M[m, e] = (1/N) ∇L_e(θ)ᵀ (G + μI + λI)⁻¹ ∇L_m(θ)

Tasks (``--tasks``):

- ``digits``: MLP 64-128-10 (tanh, 9,610 parameters) on scikit-learn's
  digits, 1,200 training and 300 test samples, cross-entropy, μ = 1e-4,
  λ = 1e-3 (our reference task);
- ``diabetes``: MLP 10-64-1 (tanh) regression on diabetes, 342 / 100
  samples, squared loss, μ = 1e-4, λ = 1e-3;
- ``digits_cnn``: the CNN Conv2d(1,16,3)–ReLU–Conv2d(16,32,3)–ReLU–
  Linear(512,128)–ReLU–Linear(128,10) (71,754 parameters) on digits, 1,200
  training and ``--cnn-test`` (300) test samples, μ = 1e-4, λ = 1e-3. Its dense
  matrix would need 82 GB, so the reference is the same exact inverse in
  kernel form (``solver="kernel"``: a 10,800 × 10,800 Cholesky
  factorisation), checked against an independent route, block CG at tol
  1e-10 (float64, no preconditioner, matrix-free Gauss–Newton products). pyDVL's ``CgInfluence``
  cannot check it: it solves with the Hessian, which is indefinite on this
  ReLU net (Pearson 0.008 measured). The ``per-sample gradients`` row is
  the floor of any gradient method: one pass of per-sample gradients over
  train and test (the fastest of three in one process; every other method
  is timed once, cold, so its ``× floor`` ratio errs on the slow side).

Each method runs with a time limit (``--timeout``, 900 s); one that exceeds
it is reported as such.

The peers pin ``numpy<2`` and live in their own venv (see
``benchmarks/README_peers.md``)::

    python3 -m venv /tmp/peers
    /tmp/peers/bin/pip install "torch==2.13.0" "pydvl[influence]" captum kronfluence scikit-learn

Run (peers skipped when ``--peers-python`` is not given or not found)::

    OMP_NUM_THREADS=1 python benchmarks/bench_influence.py --peers-python /tmp/peers/bin/python

It prints, per task, one row per method: seconds, the speed-up against
pyDVL's ``CgInfluence`` measured in the same run, the peak memory increase
(``ru_maxrss`` over the run), and the Pearson correlation and relative
Frobenius error ``‖M − M_exact‖ / ‖M_exact‖`` against the exact matrix.
Absolute times drift on shared machines; the ratios are the result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: Our configurations: name -> (solver, solver_params, tol, max_iter).
OURS = {
    "exact": ("exact", None, 1e-10, None),
    "kernel": ("kernel", None, 1e-10, None),
    "kernel mixed (tol 1e-10)": ("kernel", {"mixed_precision": True}, 1e-10, None),
    "auto (tol 1e-3)": ("auto", None, 1e-3, None),
    "cg float64 (tol 1e-3)": ("cg", None, 1e-3, None),
    "auto (tol 1e-6)": ("auto", None, 1e-6, None),
    "ekfac": ("ekfac", None, 1e-10, None),
    "kfac": ("kfac", None, 1e-10, None),
    "arnoldi (rank 50)": ("arnoldi", {"rank": 50}, 1e-10, None),
    "lissa (depth 20)": ("lissa", None, 1e-10, 20),
    "cg mixed (tol 1e-10)": ("cg", {"mixed_precision": True}, 1e-10, None),
    "cg float64 (tol 1e-10)": ("cg", None, 1e-10, None),
    "cg float64 (tol 1e-6)": ("cg", None, 1e-6, None),
    "per-sample gradients": (None, None, None, None),
}
#: Calls of the per-sample-gradient floor in its process; the fastest is reported.
FLOOR_REPEATS = 3
#: The reference matrix of each task (the others: "exact").
REFERENCE = {"digits_cnn": "kernel"}
#: Our configurations for the CNN (exact's dense matrix does not fit; LiSSA skipped).
CNN_OURS = ["kernel", "per-sample gradients", "cg float64 (tol 1e-10)", "auto (tol 1e-3)",
            "kernel mixed (tol 1e-10)", "cg float64 (tol 1e-3)", "cg float64 (tol 1e-6)",
            "ekfac", "kfac", "arnoldi (rank 50)"]
#: Run by default (LiSSA: 20 full-batch products for a poor answer; CG at the default
#: tol, which "auto" uses above 5,000 parameters, against "exact": ask for them by name).
DEFAULT_OURS = [name for name in OURS if not name.startswith(("lissa", "cg mixed", "kernel"))]
PEERS = ["pydvl_cg", "pydvl_ekfac", "pydvl_nystroem", "captum_arnoldi", "kronfluence_ekfac",
         "kronfluence_kfac"]
#: Peers that support classification only (pyDVL's EK-FAC: cross-entropy).
CLASSIFICATION_ONLY = {"pydvl_ekfac"}
BASELINE = "pydvl_cg"


# ----------------------------------------------------------------- tasks
def make_task(name: str, path: str, seed: int = 0) -> None:
    """Train the task's MLP (full-batch Adam, float64) and write its task file."""
    import torch
    from influence_peers import make_demo_task, train_full_batch, write_task
    from sklearn.datasets import load_diabetes

    if name == "digits":
        make_demo_task(path, seed=seed)
        return
    if name.startswith("digits_cnn"):
        from influence_peers import digits_cnn
        from sklearn.datasets import load_digits

        n_test = int(name.split(":")[1]) if ":" in name else 300
        X, y = load_digits(return_X_y=True)
        idx = np.random.default_rng(seed).permutation(len(X))[:1200 + n_test]
        X, y = X[idx] / 16.0, y[idx]
        torch.manual_seed(seed)
        model = digits_cnn()
        Xt, yt, wd = torch.from_numpy(X[:1200]), torch.from_numpy(y[:1200]), 1e-4
        train_full_batch(model, Xt, yt, torch.nn.functional.cross_entropy, wd, lr=3e-3,
                         steps=300)
        write_task(path, model, X[:1200], y[:1200], X[1200:], y[1200:],
                   task="classification", hidden=[], damping=1e-3, weight_decay=wd,
                   architecture="digits_cnn")
        return
    X, y = load_diabetes(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(X))
    X, y = X[idx], y[idx].reshape(-1, 1)
    n = 342
    X = (X - X[:n].mean(0)) / X[:n].std(0)
    y = (y - y[:n].mean()) / y[:n].std()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 1)).double()
    Xt, yt, wd = torch.from_numpy(X[:n]), torch.from_numpy(y[:n]), 1e-4
    train_full_batch(model, Xt, yt, torch.nn.functional.mse_loss, wd, lr=3e-3, steps=500)
    write_task(path, model, X[:n], y[:n], X[n:], y[n:], task="regression", hidden=[64],
               damping=1e-3, weight_decay=wd)


# ------------------------------------------------------------ one method
def run_ours(config: str, task_path: str) -> tuple[np.ndarray, float, float]:
    """sklinfluence's ``InfluenceEstimator`` on the task's net: (matrix, s, MiB)."""
    import torch
    from influence_peers import load_task, timed_call
    from skorch import NeuralNetClassifier, NeuralNetRegressor
    from sklearn.frozen import FrozenEstimator

    from sklinfluence import InfluenceEstimator

    torch.set_num_threads(1)
    module, data, spec = load_task(task_path)
    classification = spec["task"] == "classification"
    cls = NeuralNetClassifier if classification else NeuralNetRegressor
    net = cls(module, criterion=torch.nn.CrossEntropyLoss if classification else
              torch.nn.MSELoss, verbose=0, train_split=None).initialize()
    X, y = data["X_train"].numpy(), data["y_train"].numpy()
    Xe, ye = data["X_test"].numpy(), data["y_test"].numpy()
    solver, params, tol, max_iter = OURS[config]
    if solver is None:  # the floor: per-sample gradients over train and test, no solve
        est = InfluenceEstimator(FrozenEstimator(net), damping=spec["damping"],
                                 solver="identity", weight_decay=spec["weight_decay"]).fit(X, y)
        inputs = torch.cat([est.X_train_, torch.as_tensor(Xe)])
        targets = torch.cat([est.T_train_, torch.as_tensor(ye).to(est.T_train_.dtype)])
        model = est.model_
        # the best of FLOOR_REPEATS calls: a floor, not a sample of the machine's noise
        # (single cold calls measured 1.1-3.3 s on the CNN), so ratios to it are conservative
        runs = [timed_call(lambda: model.per_sample_grads(model.params, inputs, targets,
                                                          batch_size=256))
                for _ in range(FLOOR_REPEATS)]
        return None, min(r[1] for r in runs), runs[0][2]

    def compute():
        est = InfluenceEstimator(FrozenEstimator(net), damping=spec["damping"], solver=solver,
                                 solver_params=params, tol=tol, max_iter=max_iter,
                                 weight_decay=spec["weight_decay"]).fit(X, y)
        return torch.as_tensor(est.loss_change(X, y, Xe, ye))

    with warnings.catch_warnings():  # LiSSA at a fixed depth stops short on purpose
        warnings.simplefilter("ignore")
        matrix, seconds, peak_mib, _ = timed_call(compute)
    return matrix, seconds, peak_mib


def run_one_in_subprocess(python: str, method: str, task: str, ours: bool,
                          timeout: float | None = None) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.npz")
        if ours:
            cmd = [python, __file__, "--run-ours", method, "--task", task, "--out", out]
        else:
            cmd = [python, str(HERE / "influence_peers.py"), "--task", task, "--method",
                   method, "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  {method}: over the {timeout:.0f} s limit", file=sys.stderr)
            return {"timed_out": True, "seconds": timeout}
        if done.returncode != 0:
            print(f"  {method}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
        f = np.load(out, allow_pickle=False)
        return {"matrix": f["matrix"] if f["matrix"].ndim else None,
                "seconds": float(f["seconds"]), "peak_mib": float(f["peak_rss_mib"])}


def compare(matrix: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    pearson = float(np.corrcoef(matrix.ravel(), exact.ravel())[0, 1])
    return pearson, float(np.linalg.norm(matrix - exact) / np.linalg.norm(exact))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "diabetes"])
    parser.add_argument("--peers-python", default=None,
                        help="interpreter of the peers' venv (e.g. /tmp/peers/bin/python)")
    parser.add_argument("--ours", nargs="+", default=DEFAULT_OURS, choices=list(OURS),
                        help="our configurations")
    parser.add_argument("--peers", nargs="+", default=PEERS)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds each method may take")
    parser.add_argument("--cnn-test", type=int, default=300,
                        help="test samples of the digits_cnn task")
    parser.add_argument("--run-ours", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_ours:  # child process: one of our configurations
        matrix, seconds, peak = run_ours(args.run_ours, args.task)
        np.savez(args.out, matrix=np.array(np.nan) if matrix is None else matrix,
                 seconds=seconds, peak_rss_mib=peak)
        return

    peers_python = args.peers_python if args.peers_python and Path(
        args.peers_python).exists() else None
    if peers_python is None:
        print("peers' interpreter not given or not found: peers skipped")
    for task in args.tasks:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{task}.npz")
            make_task(task if task != "digits_cnn" else f"digits_cnn:{args.cnn_test}", path)
            results = {}
            start = time.perf_counter()
            ours = CNN_OURS if task == "digits_cnn" and args.ours == DEFAULT_OURS else args.ours
            for config in ours:
                results[config] = run_one_in_subprocess(sys.executable, config, path, True,
                                                        args.timeout)
                print(f"  {config}: done", flush=True)
            if peers_python:
                for method in args.peers:
                    if task == "diabetes" and method in CLASSIFICATION_ONLY:
                        continue
                    results[method] = run_one_in_subprocess(peers_python, method, path, False,
                                                            args.timeout)
                    print(f"  {method}: done", flush=True)
            print_table(task, results, time.perf_counter() - start)


def print_table(task: str, results: dict, wall: float) -> None:
    reference = REFERENCE.get(task, "exact")
    exact = results.get(reference)
    if exact is None or exact.get("matrix") is None:
        print(f"{task}: the reference ({reference}) failed; no table")
        return
    baseline = results.get(BASELINE)
    floor = results.get("per-sample gradients")
    floor_s = floor["seconds"] if floor and not floor.get("timed_out") else None

    def times_floor(seconds: float) -> str:
        return f"{seconds / floor_s:.1f}" if floor_s else "n/a"

    print(f"\n## {task} (all methods {wall:.0f} s; reference: {reference})\n")
    print(f"| method | s | × floor | speed-up vs {BASELINE} | peak MiB | Pearson | rel. error |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if r is None:
            print(f"| {name} | failed | | | | | |")
            continue
        if r.get("timed_out"):
            print(f"| {name} | > {r['seconds']:.0f} | | | | | |")
            continue
        if r["matrix"] is None:  # the per-sample-gradient floor: a time, no matrix
            ratio = f"{baseline['seconds'] / r['seconds']:.2f}" if baseline and \
                not baseline.get("timed_out") else "n/a"
            print(f"| {name} | {r['seconds']:.2f} | 1.0 | {ratio} | {r['peak_mib']:.0f} | | |")
            continue
        pearson, rel = compare(r["matrix"], exact["matrix"])
        ratio = f"{baseline['seconds'] / r['seconds']:.2f}" if baseline and \
            not baseline.get("timed_out") else "n/a"
        print(f"| {name} | {r['seconds']:.2f} | {times_floor(r['seconds'])} | {ratio} "
              f"| {r['peak_mib']:.0f} | {pearson:.4f} | {rel:.1e} |")


if __name__ == "__main__":
    main()
