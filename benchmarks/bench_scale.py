"""Scale benchmark: sklinfluence's EK-FAC against Kronfluence's at the sizes users have.

Both libraries score the same trained weights, each method in its own fresh
process (its peak memory its own) with one torch thread, and every time and
memory figure is printed next to its **ratio against Kronfluence measured in
the same run** (absolute times drift on shared machines; the ratios are the
result). Both sides compute, in our convention,

    M[m, e] = (1/N) ∇L_e(θ)ᵀ (G + μI + λI)⁻¹ ∇L_m(θ)       (train m × query e)
    s[m]    = (1/N) ∇L_m(θ)ᵀ (G + μI + λI)⁻¹ ∇L_m(θ)       (self-influence)

with G the Gauss–Newton matrix of the mean training loss (Kronfluence: its
Fisher, labels sampled from the model), λ = 1e-3 the damping and μ = 1e-4 the
weight decay the net was trained with. sklinfluence gets ``damping=λ,
weight_decay=μ``; Kronfluence gets ``damping_factor = λ + μ`` and its scores
are converted with ``M = scores.T / N`` and ``s = self_scores / N``
(:func:`from_kronfluence_pairwise`, :func:`from_kronfluence_self`). The
``check`` task verifies this on a model where EK-FAC is exact in both.

Data: the 8×8 digits of scikit-learn, shifted and noised to reach the sizes
users have (:func:`shifted_digits`): 100 digits are held out as queries; copy
``k`` of the remaining 1,697 is rolled by ``(k % 3 − 1, k // 3 % 3 − 1)``
pixels, N(0, 0.5) noise is added (pixel scale 0–16, ``numpy`` seed 0), the
copies are concatenated (13 of them, more for 50,000 rows) and ``N`` rows kept
(a seeded permutation, so that 1,200 rows hold every shift), divided by 16.
The queries get the same transform (query ``i`` shifted as copy ``i % 9``).
Every net is a skorch ``NeuralNetClassifier`` (cross-entropy, Adam, lr 3e-3 —
1e-3 for ``wide1200`` —, batch 128, ``weight_decay`` μ, torch seed 0),
trained once per run in the parent process; the header of each task prints
its training and query accuracy.

Tasks (``--tasks``; ``--quick`` shrinks every ``N`` for a smoke run):

- ``check``: linear regression ``Linear(10, 1)`` in float64 on diabetes,
  342 training / 100 query rows, at the exact ridge minimiser. EK-FAC is exact
  there in both libraries (one layer, one output, constant output Hessian), so
  both must match the closed form: prints the maximum relative differences
  (ours and Kronfluence's against the closed form and against each other, for
  the matrix and the self-influence) and fails unless all are below 1e-8.
- ``cnn1200``: the reference digits CNN, Conv2d(1,16,3)–ReLU–Conv2d(16,32,3)–
  ReLU–Linear(512,128)–ReLU–Linear(128,10) (71,754 parameters), **float64**,
  1,200 rows: our EK-FAC and Kronfluence's against the exact answer
  (``solver="kernel"``, the exact inverse in kernel form), Pearson of the
  1,200 × 100 matrix and of the self-influence.
- ``cnn20k`` (the main one): the same CNN in **float32** on 20,000 rows;
  times and peak memory of (a) the fit (factors), (b) the 20,000 × 100
  matrix, (c) the self-influence of all 20,000 rows; agreement between the
  two (both approximate).
- ``cnn50k``: as ``cnn20k`` on 50,000 rows (cap it with ``--timeout``).
- ``wide1200``: Conv2d(1,64,3,pad 1)–ReLU–Conv2d(64,128,3,pad 1)–ReLU–
  Conv2d(128,256,3,pad 1)–ReLU–global average pool–Linear(256,10), 372,234
  parameters, float32, 1,200 rows, the 1,200 × 100 matrix; ours also as
  ``ekfac-1GiB``, with ``working_memory_bytes=2**30`` (about Kronfluence's
  peak there): at the default 64 MiB the 100 queries' solutions (1.5 MB
  each) come in five chunks, each one more pass over the training rows.
- ``mlp1m``: MLP 64-1024-1024-10 (ReLU, 1,126,410 parameters), float32,
  20,000 rows, matrix and self-influence.
- ``auto``: ``InfluenceEstimator(solver="auto")`` on the ``cnn20k`` net: the
  policy it records (``diagnostics_["solver_policy"]``, every key it has,
  predictions included where present), and its actual fit and matrix times.
  If it finishes and ``cnn20k`` ran, also the Pearson of both EK-FACs against
  its matrix (an exact solver to its ``tol``).
- ``auto1200``: the same on the ``cnn1200`` net (float64, 1,200 rows), where
  ``auto`` runs an exact option (the kernel form): its predicted seconds
  against the actual fit + matrix seconds (the prediction is for one solve
  of ``min(N, 512)`` right-hand sides, the matrix solves for 100), and, if
  ``cnn1200`` ran, the Pearson of its matrix with that task's.

The matrix and the self-influence of each method run in two separate
processes (each fits its own factors: the fit is reported from the first), so
a self-influence that times out leaves the matrix measured. A process that
runs past ``--timeout`` is reported as a timeout, with the phases it finished.
Peak memory is the process's high-water mark during a phase (reset before
each, ``/proc/self/clear_refs``) minus its resident memory before the fit.

Kronfluence lives in its own venv (it pins nothing we need, but keeps the main
one clean)::

    python3 -m venv /tmp/peers
    /tmp/peers/bin/pip install "torch==2.13.0" kronfluence scikit-learn

Run (Kronfluence skipped with a note when ``--peers-python`` is not found)::

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --quick          # smoke run
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --tasks check cnn1200 cnn20k \\
        --timeout 600 --json scale.json

Kronfluence runs with its default dtypes on the float32 nets (float32
covariances, scores and per-sample gradients, float64 eigendecomposition), and
with every dtype float64 on the float64 ones. Its factors go through its
output directory on disk (a temporary one), which its times include.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _process and influence_peers, also in the subprocesses

#: λ, the damping of both sides (Kronfluence: λ + μ).
DAMPING = 1e-3
#: μ, the weight decay of training (SGD's ``weight_decay``: the objective's (μ/2)‖θ‖²).
WEIGHT_DECAY = 1e-4
#: Held-out query rows.
N_QUERY = 100
#: Rows per batch of Kronfluence's factor and score passes.
KRONFLUENCE_BATCH = 512
#: Largest relative difference the ``check`` task accepts.
CHECK_TOL = 1e-8
DEFAULT_PEERS_PYTHON = "/tmp/peers/bin/python"

#: Task name -> architecture, dtype, training rows (full, ``--quick``), epochs (full,
#: quick), the runs ``(side, solver)``, the jobs each run does, and the reference run.
TASKS = {
    "check": {"arch": "linear", "dtype": "float64", "n_train": (342, 342), "epochs": (0, 0),
              "runs": [("ours", "ekfac"), ("kronfluence", "ekfac")],
              "jobs": ("matrix", "self")},
    "cnn1200": {"arch": "digits_cnn", "dtype": "float64", "n_train": (1200, 300),
                "epochs": (20, 5), "runs": [("ours", "kernel"), ("ours", "ekfac"),
                                            ("kronfluence", "ekfac")],
                "jobs": ("matrix", "self"), "reference": ("ours", "kernel")},
    "cnn20k": {"arch": "digits_cnn", "dtype": "float32", "n_train": (20_000, 2_000),
               "epochs": (4, 2), "runs": [("ours", "ekfac"), ("kronfluence", "ekfac")],
               "jobs": ("matrix", "self")},
    "cnn50k": {"arch": "digits_cnn", "dtype": "float32", "n_train": (50_000, 3_000),
               "epochs": (2, 1), "runs": [("ours", "ekfac"), ("kronfluence", "ekfac")],
               "jobs": ("matrix", "self")},
    "wide1200": {"arch": "wide_cnn", "dtype": "float32", "n_train": (1200, 300),
                 "epochs": (15, 2), "lr": 1e-3,
                 "runs": [("ours", "ekfac"), ("ours", "ekfac-1GiB"), ("kronfluence", "ekfac")],
                 "jobs": ("matrix",)},
    "mlp1m": {"arch": "mlp1m", "dtype": "float32", "n_train": (20_000, 500),
              "epochs": (3, 1), "runs": [("ours", "ekfac"), ("kronfluence", "ekfac")],
              "jobs": ("matrix", "self")},
    "auto": {"arch": "digits_cnn", "dtype": "float32", "n_train": (20_000, 2_000),
             "epochs": (4, 2), "runs": [("ours", "auto")], "jobs": ("matrix",)},
    "auto1200": {"arch": "digits_cnn", "dtype": "float64", "n_train": (1200, 300),
                 "epochs": (20, 5), "runs": [("ours", "auto")], "jobs": ("matrix",)},
}
#: Our solver variants: name -> (solver, working_memory_bytes).
VARIANTS = {"ekfac-1GiB": ("ekfac", 2**30)}
#: Parameter counts of the architectures (checked when a net is built).
N_PARAMS = {"linear": 11, "digits_cnn": 71_754, "wide_cnn": 372_234, "mlp1m": 1_126_410}


# ------------------------------------------------------------- architectures
def build_module(arch: str, dtype: str):
    """A fresh ``torch.nn.Module`` of architecture ``arch`` (a key of :data:`N_PARAMS`)
    in ``dtype`` (``"float32"`` or ``"float64"``), on flat rows of 64 (10 for
    ``"linear"``) features, initialised from torch's global RNG."""
    import torch

    nn = torch.nn
    if arch == "digits_cnn":
        from influence_peers import digits_cnn

        module = digits_cnn()
    elif arch == "wide_cnn":
        module = nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                               nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))
    elif arch == "mlp1m":
        module = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                               nn.ReLU(), nn.Linear(1024, 10))
    elif arch == "linear":
        module = nn.Sequential(nn.Linear(10, 1))
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(N_PARAMS)}")
    return module.to(getattr(torch, dtype))


def n_params(module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- data
def shifted_digits(n_train: int, n_query: int = N_QUERY, seed: int = 0,
                   dtype=np.float32) -> tuple:
    """Digits shifted by a pixel and noised, ``n_train`` training and ``n_query`` query rows.

    ``n_query`` digits (a seeded permutation) are held out. Copy ``k`` (``k = 0,
    1, ...``: at least 13 copies, more when ``n_train`` needs them) of the other
    images is rolled by ``(k % 3 − 1, k // 3 % 3 − 1)`` pixels (rows, columns)
    and gets N(0, 0.5) noise on the 0–16 pixel scale; the copies are concatenated
    and ``n_train`` rows kept, drawn without replacement (so that a few hundred rows
    hold every shift). Query ``i`` is rolled as copy ``i % 9``
    and noised alike. Everything is divided by 16.

    Parameters
    ----------
    n_train : int
        Training rows.
    n_query : int, default=100
        Query rows (held-out digits, fewer than 1,797).
    seed : int, default=0
        Seed of the permutations and the noise (one ``numpy`` generator).
    dtype : numpy dtype, default=numpy.float32

    Returns
    -------
    X_train : ndarray of shape (n_train, 64)
    y_train : ndarray of shape (n_train,), int64
    X_query : ndarray of shape (n_query, 64)
    y_query : ndarray of shape (n_query,), int64
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    if not 0 < n_query < len(images) or n_train < 1:
        raise ValueError(f"need n_train >= 1 and 0 < n_query < {len(images)}, got "
                         f"n_train={n_train}, n_query={n_query}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    held, source = order[:n_query], order[n_query:]
    images = images.reshape(-1, 8, 8)

    def shift(k):
        return (k % 3 - 1, k // 3 % 3 - 1)

    copies = max(13, math.ceil(n_train / len(source)))
    X = np.concatenate([np.roll(images[source], shift(k), axis=(1, 2))
                        + rng.normal(0.0, 0.5, (len(source), 8, 8)) for k in range(copies)])
    y = np.tile(labels[source], copies)
    keep = rng.permutation(len(X))[:n_train]  # every shift among the first rows
    Xq = np.stack([np.roll(images[j], shift(i % 9), axis=(0, 1)) for i, j in enumerate(held)])
    Xq = Xq + rng.normal(0.0, 0.5, Xq.shape)
    return ((X[keep].reshape(n_train, 64) / 16).astype(dtype), y[keep].astype(np.int64),
            (Xq.reshape(n_query, 64) / 16).astype(dtype), labels[held].astype(np.int64))


def ridge_check_data() -> dict:
    """The ``check`` task: standardised diabetes (342 / 100 rows), the exact ridge
    minimiser θ of ``(1/N) Σ (x̃ᵀθ − y)² + (μ/2)‖θ‖²`` (x̃ = [x, 1]), and the
    closed forms of the matrix and the self-influence with ``(A + (μ + λ) I)⁻¹``,
    ``A`` the Hessian of the mean loss."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    n = 342
    Xb = np.hstack([X, np.ones((len(X), 1))])
    A = Xb[:n].T @ Xb[:n] * (2 / n)  # Hessian (= Gauss–Newton) of the mean squared loss
    theta = np.linalg.solve(A + WEIGHT_DECAY * np.eye(11), Xb[:n].T @ y[:n] * (2 / n))
    g = 2 * (Xb @ theta - y)[:, None] * Xb  # per-sample gradients
    solved = np.linalg.solve(A + (WEIGHT_DECAY + DAMPING) * np.eye(11), g.T)  # (11, 442)
    return {"X_train": X[:n], "y_train": y[:n, None], "X_query": X[n:], "y_query": y[n:, None],
            "params": [theta[None, :10], theta[10:]],
            "matrix": g[:n] @ solved[:, n:] / n,
            "self": np.einsum("ip,pi->i", g[:n], solved[:, :n]) / n}


# ------------------------------------------------------------ conversions
def from_kronfluence_pairwise(scores, n_train: int) -> np.ndarray:
    """Kronfluence's pairwise scores ``∇L_e (F + λ + μ)⁻¹ ∇L_m``, shape (query, train),
    as our matrix ``M`` (train, query): transposed and divided by ``N``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != n_train:
        raise ValueError(f"expected scores of shape (n_query, {n_train}), got {scores.shape}")
    return scores.T / n_train


def from_kronfluence_self(scores, n_train: int) -> np.ndarray:
    """Kronfluence's self scores ``∇L_m (F + λ + μ)⁻¹ ∇L_m``, shape (train,), divided by
    ``N``: our self-influence."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n_train,):
        raise ValueError(f"expected scores of shape ({n_train},), got {scores.shape}")
    return scores / n_train


def pearson(a, b) -> float:
    """Pearson correlation of two arrays of the same shape, flattened."""
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def max_relative_difference(a, b) -> float:
    """``max |a − b| / max |b|``."""
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


# -------------------------------------------------------------- task files
def write_task(path: str, arch: str, dtype: str, kind: str, params: list, X_train, y_train,
               X_query, y_query) -> None:
    """Save data and trained weights for the subprocesses (numpy only)."""
    np.savez(path, arch=np.array(arch), dtype=np.array(dtype), kind=np.array(kind),
             X_train=X_train, y_train=y_train, X_query=X_query, y_query=y_query,
             **{f"param_{i}": p for i, p in enumerate(params)})


def load_task(path: str) -> tuple:
    """(module with the saved weights, data dict of ndarrays, spec dict)."""
    import torch

    f = np.load(path, allow_pickle=False)
    spec = {k: str(f[k]) for k in ("arch", "dtype", "kind")}
    module = build_module(spec["arch"], spec["dtype"])
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(torch.from_numpy(f[f"param_{i}"]))
    data = {k: f[k] for k in ("X_train", "y_train", "X_query", "y_query")}
    return module, data, spec


def train_task(name: str, quick: bool, path: str) -> dict:
    """Build the task's data, train its net with skorch (seeded) and write the task
    file; return what was trained (parameters, accuracies, seconds)."""
    import torch
    from skorch import NeuralNetClassifier

    cfg = TASKS[name]
    arch, dtype = cfg["arch"], cfg["dtype"]
    if arch == "linear":
        d = ridge_check_data()
        write_task(path, arch, dtype, "regression", d["params"], d["X_train"], d["y_train"],
                   d["X_query"], d["y_query"])
        return {"n_params": N_PARAMS[arch], "n_train": len(d["X_train"]), "train_seconds": 0.0}
    n_train, epochs = cfg["n_train"][quick], cfg["epochs"][quick]
    X, y, Xq, yq = shifted_digits(n_train, dtype=np.dtype(dtype))
    torch.manual_seed(0)
    module = build_module(arch, dtype)
    if n_params(module) != N_PARAMS[arch]:
        raise AssertionError(f"{arch}: {n_params(module)} parameters, expected {N_PARAMS[arch]}")
    net = NeuralNetClassifier(module, criterion=torch.nn.CrossEntropyLoss,
                              optimizer=torch.optim.Adam, lr=cfg.get("lr", 3e-3),
                              optimizer__weight_decay=WEIGHT_DECAY,
                              batch_size=128, max_epochs=epochs, iterator_train__shuffle=True,
                              train_split=None, verbose=0)
    start = time.perf_counter()
    net.fit(X, y)
    seconds = time.perf_counter() - start
    params = [p.detach().numpy() for p in net.module_.parameters()]
    write_task(path, arch, dtype, "classification", params, X, y, Xq, yq)
    return {"n_params": N_PARAMS[arch], "n_train": n_train, "epochs": epochs,
            "train_seconds": seconds, "train_accuracy": float((net.predict(X) == y).mean()),
            "query_accuracy": float((net.predict(Xq) == yq).mean())}


# ------------------------------------------------- one method, in a subprocess
def _ours_phases(module, data, spec, solver, batch_size):
    """Phase name -> callable of sklinfluence's ``InfluenceEstimator`` on the frozen net."""
    import torch
    from skorch import NeuralNetClassifier, NeuralNetRegressor
    from sklearn.frozen import FrozenEstimator

    from sklinfluence import InfluenceEstimator, set_config

    if solver in VARIANTS:
        solver, memory = VARIANTS[solver]
        set_config(working_memory_bytes=memory)
    classification = spec["kind"] == "classification"
    cls = NeuralNetClassifier if classification else NeuralNetRegressor
    criterion = torch.nn.CrossEntropyLoss if classification else torch.nn.MSELoss
    net = cls(module, criterion=criterion, train_split=None, verbose=0).initialize()
    X, y, Xq, yq = (data[k] for k in ("X_train", "y_train", "X_query", "y_query"))
    est = InfluenceEstimator(FrozenEstimator(net), damping=DAMPING, solver=solver,
                             weight_decay=WEIGHT_DECAY, batch_size=batch_size)

    def fit():
        est.fit(X, y)
        d = est.diagnostics_
        return None, {"solver": d.get("solver"), "solver_policy": d.get("solver_policy"),
                      "predictions": {k: v for k, v in d.items() if "predict" in k}}

    return {"fit": fit,
            "matrix": lambda: (est.loss_change(X, y, Xq, yq), {}),
            "self": lambda: (est.score_samples(X, y), {})}


def _kronfluence_phases(module, data, spec, workdir, batch_size):
    """Phase name -> callable of Kronfluence's EK-FAC, scores in our convention."""
    import torch
    from kronfluence import Analyzer, FactorArguments, ScoreArguments, prepare_model

    from influence_peers import kronfluence_task

    task = kronfluence_task(spec["kind"])
    precise = {}
    if spec["dtype"] == "float64":
        f64 = torch.float64
        precise = {"activation_covariance_dtype": f64, "gradient_covariance_dtype": f64,
                   "per_sample_gradient_dtype": f64, "lambda_dtype": f64}
    fargs = FactorArguments(strategy="ekfac", **precise)
    sargs = ScoreArguments(damping_factor=DAMPING + WEIGHT_DECAY, **(
        {"per_sample_gradient_dtype": f64, "precondition_dtype": f64, "score_dtype": f64}
        if precise else {}))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}
    train = torch.utils.data.TensorDataset(tensors["X_train"], tensors["y_train"])
    query = torch.utils.data.TensorDataset(tensors["X_query"], tensors["y_query"])
    n = len(train)
    an = Analyzer("scale", prepare_model(module, task), task, cpu=True, disable_tqdm=True,
                  output_dir=workdir)

    def fit():
        an.fit_all_factors("f", train, per_device_batch_size=batch_size, factor_args=fargs,
                           overwrite_output_dir=True)
        return None, {}

    def matrix():
        an.compute_pairwise_scores("m", "f", query, train, per_device_query_batch_size=len(query),
                                   per_device_train_batch_size=batch_size, score_args=sargs,
                                   overwrite_output_dir=True)
        return from_kronfluence_pairwise(an.load_pairwise_scores("m")["all_modules"], n), {}

    def self_scores():
        an.compute_self_scores("s", "f", train, per_device_train_batch_size=batch_size,
                               score_args=sargs, overwrite_output_dir=True)
        return from_kronfluence_self(an.load_self_scores("s")["all_modules"], n), {}

    return {"fit": fit, "matrix": matrix, "self": self_scores}


def run_job(config: dict) -> None:
    """Child process: fit, then ``config["job"]``, each phase timed with its peak memory,
    one JSON line per phase appended to ``out/log.jsonl`` (so a timeout keeps the
    phases done) and each result saved as ``out/<phase>.npy``."""
    import resource

    import torch
    from _process import reset_peak_rss, status_mib, warm_up

    torch.set_num_threads(1)
    torch.manual_seed(0)  # Kronfluence samples its Fisher labels
    out = Path(config["out"])
    module, data, spec = load_task(config["task"])
    if config["side"] == "ours":
        warm_up()  # sklinfluence and torch.func's first transform, outside the clock
        phases = _ours_phases(module, data, spec, config["solver"], config.get("batch_size"))
    else:
        import kronfluence  # noqa: F401  (the import stays out of the timing)

        workdir = tempfile.mkdtemp(dir=out)
        phases = _kronfluence_phases(module, data, spec, workdir, config["kron_batch"])
    base = status_mib("VmRSS")
    for phase in ("fit", config["job"]):
        reliable = reset_peak_rss() is not None
        before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        result, extra = phases[phase]()
        seconds = time.perf_counter() - start
        peak = status_mib("VmHWM") if reliable else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if result is not None:
            np.save(out / f"{phase}.npy", np.asarray(result, dtype=np.float64))
        record = {"phase": phase, "seconds": seconds, "peak_mib": peak - base,
                  "peak_reliable": reliable or peak > before_max, **extra}
        with open(out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")


def run_in_subprocess(python: str, config: dict, timeout: float) -> dict:
    """Run :func:`run_job` in a fresh process (one torch thread); return its phases
    (``{phase: record}``, results loaded as ``"result"``), ``timed_out`` and ``error``."""
    with tempfile.TemporaryDirectory() as tmp:
        config = {**config, "out": tmp}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [python, str(Path(__file__).resolve()), "--run", json.dumps(config)]
        outcome = {"timed_out": False, "error": None}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            if done.returncode != 0:
                outcome["error"] = done.stderr[-3000:]
        except subprocess.TimeoutExpired:
            outcome["timed_out"] = True
        log = Path(tmp) / "log.jsonl"
        phases = {}
        for line in (log.read_text().splitlines() if log.exists() else []):
            record = json.loads(line)
            result = Path(tmp) / f"{record['phase']}.npy"
            if result.exists():
                record["result"] = np.load(result)
            phases[record["phase"]] = record
        return {**outcome, "phases": phases}


# ------------------------------------------------------------------ reports
def _label(side: str, solver: str) -> str:
    return f"{'sklinfluence' if side == 'ours' else 'Kronfluence'} {solver}"


def run_task(name: str, args, peers_python: str | None, session: dict) -> dict:
    """Train the task's net (once per run: tasks on the same net share it), run every
    method of the task (jobs in fresh processes), print its tables.

    ``session`` holds the run's working directory (``"dir"``), the trained nets
    (``"nets"``) and the matrices computed so far on each net (``"matrices"``),
    with which ``auto`` compares the EK-FACs of ``cnn20k``.
    """
    cfg = TASKS[name]
    key = (cfg["arch"], cfg["dtype"], cfg["n_train"][args.quick], cfg["epochs"][args.quick],
           cfg.get("lr"))
    if key not in session["nets"]:
        path = os.path.join(session["dir"], f"{name}.npz")
        session["nets"][key] = (path, train_task(name, args.quick, path))
    path, net = session["nets"][key]
    print(f"\n## {name}: {cfg['arch']} ({net['n_params']:,} parameters), {cfg['dtype']}, "
          f"{net['n_train']:,} train x {N_QUERY} query rows, lambda={DAMPING:g}, "
          f"mu={WEIGHT_DECAY:g}" + (f"; trained {net['epochs']} epochs in "
                                   f"{net['train_seconds']:.0f} s, accuracy train "
                                   f"{net['train_accuracy']:.3f} query "
                                   f"{net['query_accuracy']:.3f}" if "epochs" in net else ""),
          flush=True)
    runs = {}
    for side, solver in cfg["runs"]:
        if side == "kronfluence" and peers_python is None:
            continue
        python = sys.executable if side == "ours" else peers_python
        jobs = {}
        for job in cfg["jobs"]:
            config = {"side": side, "solver": solver, "task": path, "job": job,
                      "batch_size": args.our_batch_size, "kron_batch": KRONFLUENCE_BATCH}
            jobs[job] = run_in_subprocess(python, config, args.timeout)
            status = "timeout" if jobs[job]["timed_out"] else \
                "failed" if jobs[job]["error"] else "done"
            print(f"  {_label(side, solver)} {job}: {status}", flush=True)
            if jobs[job]["error"]:
                print(jobs[job]["error"], file=sys.stderr)
        runs[(side, solver)] = jobs
    report = {"task": name, "net": net, "runs": {}, "agreement": {}}
    print_times(name, cfg, runs, report, args.timeout)
    earlier = session["matrices"].setdefault(key, {})
    print_agreement(name, cfg, runs, report, earlier)
    earlier.update({run: (name, m) for run in runs
                    if (m := _result(runs, run, "matrix")) is not None})
    return report


def _phase(jobs: dict, phase: str) -> tuple:
    """(record or None, status) of ``phase``: the fit from the first job that has it."""
    order = list(jobs) if phase == "fit" else [phase]
    for job in order:
        record = jobs.get(job, {}).get("phases", {}).get(phase)
        if record:
            return record, "done"
    if phase != "fit" and phase in jobs:
        j = jobs[phase]
        return None, "timeout" if j["timed_out"] else "failed" if j["error"] else "not run"
    return None, "timeout" if any(j["timed_out"] for j in jobs.values()) else "failed"


def print_times(name: str, cfg: dict, runs: dict, report: dict, timeout: float) -> None:
    """One row per method (seconds and peak MiB of each phase), then the ratios of each
    of our methods to Kronfluence's EK-FAC measured in the same run."""
    phases = ["fit", *cfg["jobs"]]
    kron = runs.get(("kronfluence", "ekfac"))
    print("\n| method | " + " | ".join(f"{p} s | {p} peak MiB" for p in phases) + " |")
    print("|---|" + "---|---|" * len(phases))
    ratio_rows = []
    for (side, solver), jobs in runs.items():
        cells, entry = [], {}
        for p in phases:
            record, status = _phase(jobs, p)
            if record is None:
                cells += [f"> {timeout:.0f} (timeout)" if status == "timeout" else status, ""]
                entry[p] = {"status": status}
                continue
            mark = "" if record["peak_reliable"] else " (upper bound)"
            cells += [f"{record['seconds']:.2f}", f"{record['peak_mib']:.0f}{mark}"]
            entry[p] = {"seconds": record["seconds"], "peak_mib": record["peak_mib"]}
        print(f"| {_label(side, solver)} | " + " | ".join(cells) + " |")
        report["runs"][_label(side, solver)] = entry
        if side != "ours" or kron is None:
            continue
        ratios = []
        for p in phases:
            a, b = _phase(jobs, p)[0], _phase(kron, p)[0]
            if a is None or b is None:
                ratios += ["n/a", "n/a"]
                continue
            time_ratio = a["seconds"] / b["seconds"]
            memory_ratio = a["peak_mib"] / max(b["peak_mib"], 1e-9)
            ratios += [f"{time_ratio:.2f}x", f"{memory_ratio:.2f}x"]
            entry[p].update(time_ratio_vs_kronfluence=time_ratio,
                            memory_ratio_vs_kronfluence=memory_ratio)
        ratio_rows.append(f"| {_label(side, solver)} / Kronfluence ekfac | "
                          + " | ".join(ratios) + " |")
    print("\n".join(ratio_rows) if ratio_rows else "(no Kronfluence run: no ratios)")


def _result(runs: dict, run: tuple, phase: str):
    record = _phase(runs.get(run, {}), phase)[0]
    return None if record is None else record.get("result")


def print_agreement(name: str, cfg: dict, runs: dict, report: dict, earlier: dict) -> None:
    """Pearson (and Spearman for the self-influence) of sklinfluence's and Kronfluence's
    EK-FAC, each against the task's reference where it has one, and ``auto``'s
    policy, its matrix the reference of the EK-FACs of ``earlier`` tasks on the
    same net (``{(side, solver): (task, matrix)}``)."""
    from scipy.stats import spearmanr

    ours, kron = ("ours", "ekfac"), ("kronfluence", "ekfac")
    for run in runs:
        if run[1] == "auto":
            record = _phase(runs[run], "fit")[0]
            policy = record.get("solver_policy") if record else None
            print(f"\nsolver='auto' chose {record.get('solver') if record else 'n/a'}; "
                  "diagnostics_['solver_policy']:")
            for role, info in (policy or {}).items():
                print(f"  {role}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
            for key, value in (record or {}).get("predictions", {}).items():
                print(f"  diagnostics_[{key!r}] = {value}")
            report["agreement"]["solver_policy"] = policy
            chosen = record.get("solver") if record else None
            predicted = ((policy or {}).get("influence", {}).get("predicted", {})
                         .get(chosen, {}).get("seconds"))
            matrix = _phase(runs[run], "matrix")[0]
            if predicted is not None and matrix is not None:
                actual = record["seconds"] + matrix["seconds"]
                print(f"auto's {chosen}: predicted {predicted:.1f} s, actual fit + matrix "
                      f"{actual:.1f} s (actual / predicted {actual / predicted:.2f})")
                report["agreement"]["auto_predicted_seconds"] = predicted
                report["agreement"]["auto_actual_seconds"] = actual
            elif chosen is not None:
                print(f"auto chose {chosen}, an approximation: no prediction of its own")
            exact = _result(runs, run, "matrix")
            for other, (task, matrix) in earlier.items() if exact is not None else ():
                r = pearson(matrix, exact)
                print(f"Pearson({_label(*other)} of {task}, auto) matrix: {r:.4f}")
                report["agreement"][f"pearson_{other[0]}_{other[1]}_{task}_auto_matrix"] = r
    lines = []
    for job in cfg["jobs"]:
        a, b = _result(runs, ours, job), _result(runs, kron, job)
        if a is not None and b is not None:
            r = pearson(a, b)
            lines.append(f"Pearson(sklinfluence, Kronfluence) {job}: {r:.4f}")
            report["agreement"][f"pearson_ours_kronfluence_{job}"] = r
            if job == "self":
                rho = float(spearmanr(a, b).statistic)
                lines.append(f"Spearman(sklinfluence, Kronfluence) self: {rho:.4f}")
                report["agreement"]["spearman_ours_kronfluence_self"] = rho
        reference = cfg.get("reference")
        exact = _result(runs, reference, job) if reference else None
        for run in (ours, kron):
            approx = _result(runs, run, job)
            if exact is not None and approx is not None:
                r = pearson(approx, exact)
                lines.append(f"Pearson({_label(*run)}, exact kernel) {job}: {r:.4f}")
                report["agreement"][f"pearson_{run[0]}_exact_{job}"] = r
    if lines:
        print("\n" + "\n".join(lines))
    if name == "check":
        check_conventions(runs, report)


def check_conventions(runs: dict, report: dict) -> None:
    """The ``check`` task: print both EK-FACs' largest relative differences from the
    closed form and from each other; raise ``AssertionError`` if sklinfluence did not
    finish or any difference exceeds :data:`CHECK_TOL`."""
    d = ridge_check_data()
    worst = 0.0
    for job in ("matrix", "self"):
        ours = _result(runs, ("ours", "ekfac"), job)
        kron = _result(runs, ("kronfluence", "ekfac"), job)
        if ours is None:
            raise AssertionError(f"check: sklinfluence's EK-FAC {job} did not finish")
        pairs = {"sklinfluence vs closed form": (ours, d[job]),
                 "Kronfluence vs closed form": (kron, d[job]),
                 "sklinfluence vs Kronfluence": (ours, kron)}
        for what, (a, b) in pairs.items():
            if a is None or b is None:
                continue
            diff = max_relative_difference(a, b)
            worst = max(worst, diff)
            print(f"check {job}: {what}: max relative difference {diff:.1e}")
            report["agreement"][f"{job}: {what}"] = diff
    if worst > CHECK_TOL:
        raise AssertionError(f"check: conventions disagree ({worst:.1e} > {CHECK_TOL:.0e})")
    print(f"check passed: every difference <= {CHECK_TOL:.0e}")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds each process (one method's fit plus one job) may take")
    parser.add_argument("--peers-python", default=DEFAULT_PEERS_PYTHON,
                        help="interpreter of the venv with Kronfluence")
    parser.add_argument("--json", help="write the times, ratios and agreement here")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--our-batch-size", type=int, default=None,
                        help="InfluenceEstimator's batch_size (default: the library's choice)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        run_job(json.loads(args.run))
        return
    import torch

    torch.set_num_threads(1)
    peers_python = args.peers_python if Path(args.peers_python).exists() else None
    if peers_python is None:
        print(f"Kronfluence's interpreter {args.peers_python} not found: Kronfluence skipped "
              "(no ratios)")
    with tempfile.TemporaryDirectory() as tmp:
        session = {"dir": tmp, "nets": {}, "matrices": {}}
        reports = [run_task(name, args, peers_python, session) for name in args.tasks]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable({"quick": args.quick, "timeout": args.timeout,
                                 "tasks": reports}), fh, indent=1)


if __name__ == "__main__":
    main()
