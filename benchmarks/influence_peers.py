"""Influence matrices from peer libraries (pyDVL, Captum, Kronfluence) in our convention.

Given a *task file* (an ``.npz`` written by :func:`write_task`: data, a trained
tanh MLP in float64, the damping λ and the weight decay μ), computes the
train × test influence matrix with one peer method per invocation, converts it
to our convention and saves it with the wall time and peak memory of the fit
and the computation::

    M[m, e] = (1/N) ∇L_e(θ)ᵀ (C + λ I)⁻¹ ∇L_m(θ),   C = ∇²[(1/N) Σ_i L_i] + μ I

(positive: removing training sample m raises the loss on test sample e).

The peers pin ``numpy<2`` (pyDVL), so they live in their own venv::

    python3 -m venv /tmp/peers
    /tmp/peers/bin/pip install "torch==2.13.0" "pydvl[influence]" captum kronfluence scikit-learn

(pyDVL 0.10.0, Captum 0.9.0, Kronfluence 1.0.1, numpy 1.26.4; the
``[influence]`` extra brings dask/distributed, which ``pydvl.influence`` needs.)

Usage::

    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/influence_peers.py --list
    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/influence_peers.py --make-demo-task demo.npz
    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/influence_peers.py \\
        --task demo.npz --method pydvl_cg --out out.npz
    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/influence_peers.py --check-ridge

``--check-ridge`` compares every method with the closed form of a ridge
regression. ``exact_ggn`` (our dense Gauss–Newton reference), ``pydvl_direct``
and ``captum_naive`` are exact dense methods for small models. See README_peers.md.
"""

import argparse
import copy
import importlib.util
import resource
import tempfile
import time

import numpy as np
import torch

PEER_METHODS = {  # method -> module it needs
    "pydvl_cg": "pydvl", "pydvl_ekfac": "pydvl", "pydvl_nystroem": "pydvl",
    "pydvl_direct": "pydvl", "captum_arnoldi": "captum", "captum_naive": "captum",
    "kronfluence_ekfac": "kronfluence", "kronfluence_kfac": "kronfluence",
    "exact_ggn": "torch",
}

PEER_IMPORTS = {"pydvl": ("pydvl.influence.torch",), "kronfluence": ("kronfluence",),
                "captum": ("captum.influence._core.arnoldi_influence_function",
                           "captum.influence._core.influence_function")}


def digits_cnn():
    """Our reference CNN on 8×8 digits (flattened rows), 71,754 parameters, float64:
    Conv2d(1,16,3)–ReLU–Conv2d(16,32,3)–ReLU–Linear(512,128)–ReLU–Linear(128,10)."""
    nn = torch.nn
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3), nn.ReLU(),
                         nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(512, 128),
                         nn.ReLU(), nn.Linear(128, 10)).double()


#: Architectures a task file can name besides the tanh MLP (built without arguments).
ARCHITECTURES = {"digits_cnn": digits_cnn}


def write_task(path, model, X_train, y_train, X_test, y_test, *, task, hidden,
               damping, weight_decay, activation="tanh", architecture="mlp"):
    """Write a task file for this script (numpy and torch only).

    Parameters
    ----------
    path : str
        Destination ``.npz``.
    model : torch.nn.Module
        ``Sequential(Linear, Tanh, ..., Linear)``; its ``parameters()`` are saved
        in order as ``param_0``, ``param_1``, ... (float64).
    X_train, y_train, X_test, y_test : array-like
        Data; targets int64 (N,) for classification, float64 (N, K) for regression.
    task : {"classification", "regression"}
    hidden : sequence of int
        Hidden widths (empty for a linear model).
    damping, weight_decay : float
        λ and μ.
    activation : str, default "tanh"
    architecture : str, default "mlp"
        ``"mlp"`` (built from ``hidden`` and ``activation``) or a key of
        :data:`ARCHITECTURES` (``hidden`` and ``activation`` then ignored).
    """
    params = [p.detach().cpu().double().numpy() for p in model.parameters()]
    ytype = np.int64 if task == "classification" else np.float64
    np.savez(path, X_train=np.asarray(X_train, np.float64), y_train=np.asarray(y_train, ytype),
             X_test=np.asarray(X_test, np.float64), y_test=np.asarray(y_test, ytype),
             task=np.array(task), hidden=np.asarray(hidden, np.int64).reshape(-1),
             activation=np.array(activation), n_outputs=np.int64(params[-1].shape[0]),
             damping=np.float64(damping), weight_decay=np.float64(weight_decay),
             architecture=np.array(architecture),
             **{f"param_{i}": p for i, p in enumerate(params)})


def load_task(path):
    """Load a task file; return (model, data dict of float64/int64 tensors, spec dict)."""
    f = np.load(path, allow_pickle=False)
    architecture = str(f["architecture"]) if "architecture" in f.files else "mlp"
    spec = {"task": str(f["task"]), "damping": float(f["damping"]),
            "weight_decay": float(f["weight_decay"]), "architecture": architecture}
    if architecture != "mlp":
        model = ARCHITECTURES[architecture]()
    elif str(f["activation"]) != "tanh":
        raise ValueError(f"activation {f['activation']} not supported (tanh only)")
    else:
        widths = [f["X_train"].shape[1], *f["hidden"].tolist(), int(f["n_outputs"])]
        layers = []
        for i in range(len(widths) - 1):
            layers += [torch.nn.Linear(widths[i], widths[i + 1]), torch.nn.Tanh()]
        model = torch.nn.Sequential(*layers[:-1]).double()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.from_numpy(f[f"param_{i}"]))
    data = {k: torch.from_numpy(np.ascontiguousarray(f[k]))
            for k in ("X_train", "y_train", "X_test", "y_test")}
    return model, data, spec


def per_sample_loss(task):
    """Per-sample losses L_i, shape (n,): CE, or MSE averaged over the outputs."""
    if task == "classification":
        return lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")
    return lambda out, y: ((out - y) ** 2).mean(dim=1)


def _captum_loss(task):
    fn = per_sample_loss(task)

    def loss(out, y):
        return fn(out, y)

    loss.reduction = "none"  # Captum reads this: the losses are per sample
    return loss


def _loader(X, y, batch_size):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch_size)


def even_batch_size(n, batch_size):
    """Largest batch size <= ``batch_size`` that splits ``n`` into equal batches.

    pyDVL's Hessian operators average the per-batch *mean* losses without
    weighting by batch size, so a ragged last batch biases the Hessian (4e-2
    relative error on the ridge check with 342 samples in batches of 128).
    Falls back to ``batch_size`` (ragged) if that would more than double the
    number of batches.
    """
    n_batches = -(-n // batch_size)
    for k in range(n_batches, 2 * n_batches + 1):
        if n % k == 0:
            return n // k
    return batch_size


def _flat_grads(model, loss_i, X, y):
    """Per-sample loss gradients, (n, P), via torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, t):
        out = torch.func.functional_call(model, p, (x[None],))
        return loss_i(out, t[None]).sum()

    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g[k].reshape(len(X), -1) for k in params], dim=1)


def exact_ggn(model, data, spec, reg):
    """Our dense reference: (1/N) G_e (GGN + reg I)⁻¹ G_mᵀ, GGN = (1/N) Σ J_iᵀ H_i J_i."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    X, N = data["X_train"], len(data["X_train"])

    def f(p, x):
        return torch.func.functional_call(model, p, (x[None],))[0]

    J = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, X)
    J = torch.cat([J[k].reshape(N, J[k].shape[1], -1) for k in params], dim=2)  # (N, K, P)
    out = model(X).detach()
    if spec["task"] == "classification":  # Hessian of CE wrt logits: diag(p) - p pᵀ
        p = torch.softmax(out, dim=1)
        Hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:  # (1/K) Σ_k (f_k - y_k)²  ->  (2/K) I
        Hout = (2.0 / out.shape[1]) * torch.eye(out.shape[1]).expand(N, -1, -1)
    HJ = torch.bmm(Hout, J).reshape(-1, J.shape[2])
    G = J.reshape(-1, J.shape[2]).T @ HJ / N + reg * torch.eye(J.shape[2])
    del J, HJ
    loss_i = per_sample_loss(spec["task"])
    g_train = _flat_grads(model, loss_i, X, data["y_train"])
    g_test = _flat_grads(model, loss_i, data["X_test"], data["y_test"])
    return g_train @ torch.cholesky_solve(g_test.T, torch.linalg.cholesky(G)) / N


def run_method(method, model, data, spec, batch_size=128, rank=50, cg_rtol=1e-2):
    """Fit ``method`` and return its train × test matrix converted to our convention.

    Every peer gets the regularisation ``reg = λ + μ`` added to the Hessian (or
    its approximation) of the *mean* training loss, rescaled where the peer
    works with sums; see README_peers.md for the conversions and checks.

    Parameters
    ----------
    method : str
        A key of ``PEER_METHODS``.
    model, data, spec
        As returned by :func:`load_task` (the model is left unchanged).
    batch_size : int, default 128
        Training-data batch size (pyDVL: see :func:`even_batch_size`).
    rank : int, default 50
        Rank of ``pydvl_nystroem`` and ``captum_arnoldi``.
    cg_rtol : float, default 1e-2
        ``rtol`` of ``pydvl_cg``.

    Returns
    -------
    torch.Tensor
        ``M``, shape (N_train, N_test).
    """
    reg = spec["damping"] + spec["weight_decay"]
    task = spec["task"]
    Xtr, ytr, Xte, yte = data["X_train"], data["y_train"], data["X_test"], data["y_test"]
    N = len(Xtr)
    if method == "exact_ggn":
        return exact_ggn(model, data, spec, reg)
    if method.startswith("pydvl_"):
        import pydvl.influence.torch as pi

        def loss_mean(out, y):
            return per_sample_loss(task)(out, y).mean()

        if method == "pydvl_cg":
            # Block CG stops at ‖r‖ <= max(rtol² ‖b‖, atol²) (squared, sic); rtol 1e-2
            # is 4e-6 from the exact Hessian influence on the demo task (1e-1: 3e-3).
            inf = pi.CgInfluence(model, loss_mean, regularization=reg, rtol=cg_rtol, atol=1e-12,
                                 solve_simultaneously=True)
        elif method == "pydvl_direct":
            inf = pi.DirectInfluence(model, loss_mean, regularization=reg)
        elif method == "pydvl_nystroem":
            inf = pi.NystroemSketchInfluence(model, loss_mean, regularization=reg, rank=rank)
        elif method == "pydvl_ekfac":
            if task != "classification":
                raise ValueError("pyDVL's EK-FAC supports cross-entropy classification only")
            inf = pi.EkfacInfluence(model, update_diagonal=True, hessian_regularization=reg)
        inf = inf.fit(_loader(Xtr, ytr, even_batch_size(N, batch_size)))
        # pyDVL: <(H_mean + reg)⁻¹ ∇L_test, ∇L_train>, shape (test, train), no sign flip.
        # Test factors once, then the training side in batches (bounds the memory:
        # EK-FAC's all-at-once influences() peaks at 3 GiB on the demo task).
        factors = inf.influence_factors(Xte, yte)
        return torch.cat([inf.influences_from_factors(factors, Xtr[i:i + batch_size],
                                                      ytr[i:i + batch_size])
                          for i in range(0, N, batch_size)], dim=1).T / N
    if method.startswith("captum_"):
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
        from captum.influence._core.influence_function import NaiveInfluenceFunction

        # Captum's Hessian is that of the *summed* loss: give it N·reg, and
        # ∇L_e (N (H_mean + reg))⁻¹ ∇L_m is then our M as it stands.
        common = {"checkpoint": "unused", "checkpoints_load_func": lambda m, path: 1.0,
                  "loss_fn": _captum_loss(task), "batch_size": batch_size,
                  "hessian_reg": N * reg}
        train = torch.utils.data.TensorDataset(Xtr, ytr)
        if method == "captum_arnoldi":
            inf = ArnoldiInfluenceFunction(model, train, projection_dim=rank, **common)
        else:  # full rank, keep every eigenvalue above 1e-12 (its default drops < 1e-5)
            n_params = sum(p.numel() for p in model.parameters())
            inf = NaiveInfluenceFunction(model, train, projection_dim=n_params,
                                         hessian_inverse_tol=1e-12, **common)
        return inf.influence((Xte, yte)).T
    if method in ("kronfluence_ekfac", "kronfluence_kfac"):
        return _kronfluence(model, data, task, reg, batch_size,
                            strategy=method.split("_")[1]).T / N
    raise ValueError(f"unknown method {method!r}")


def kronfluence_task(task):
    """A Kronfluence ``Task`` with per-sample losses summed, for ``task``
    ``"classification"`` (Fisher labels sampled from the softmax) or
    ``"regression"`` (sampled targets ``f ± √(K/2)``, so E[δδᵀ] = (2/K) I, the
    squared error's output Hessian, exact for K = 1)."""
    from kronfluence import Task

    loss_i = per_sample_loss(task)

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            out = model(x)
            if sample and task == "classification":  # true Fisher: labels from the model
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(out, dim=1), 1).flatten()
            elif sample:
                with torch.no_grad():
                    sign = torch.randint(0, 2, out.shape, dtype=out.dtype) * 2 - 1
                    y = out + sign * (out.shape[1] / 2) ** 0.5
            return loss_i(out, y).sum()

        def compute_measurement(self, batch, model):
            return loss_i(model(batch[0]), batch[1]).sum()

    return _Task()


def _kronfluence(model, data, task, reg, batch_size, strategy="ekfac"):
    """Kronfluence EK-FAC (or K-FAC) scores (test, train) = ∇L_e (F_mean + reg)⁻¹ ∇L_m,
    all float64."""
    from kronfluence import Analyzer, FactorArguments, ScoreArguments, prepare_model

    f64 = torch.float64
    fargs = FactorArguments(strategy=strategy, activation_covariance_dtype=f64,
                            gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64,
                            lambda_dtype=f64)
    sargs = ScoreArguments(damping_factor=reg, per_sample_gradient_dtype=f64,
                           precondition_dtype=f64, score_dtype=f64)
    ktask = kronfluence_task(task)
    model = prepare_model(copy.deepcopy(model), ktask)  # it rewraps modules in place
    train = torch.utils.data.TensorDataset(data["X_train"], data["y_train"])
    test = torch.utils.data.TensorDataset(data["X_test"], data["y_test"])
    with tempfile.TemporaryDirectory() as tmp:
        an = Analyzer("peers", model, ktask, cpu=True, disable_tqdm=True, output_dir=tmp)
        an.fit_all_factors("f", train, per_device_batch_size=batch_size, factor_args=fargs,
                           overwrite_output_dir=True)
        an.compute_pairwise_scores("s", "f", test, train, per_device_query_batch_size=len(test),
                                   per_device_train_batch_size=batch_size, score_args=sargs,
                                   overwrite_output_dir=True)
        return an.load_pairwise_scores("s")["all_modules"].to(f64)


def available_methods():
    """Methods whose library imports in this interpreter."""
    return [m for m, mod in PEER_METHODS.items() if importlib.util.find_spec(mod) is not None]


def _rss_kib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 1024


def timed_call(fn):
    """``fn()`` → (matrix ndarray, seconds, peak RSS increase in MiB, reliable?).

    The peak is ``ru_maxrss`` after the call minus the current RSS just before
    it. ``ru_maxrss`` is a high-water mark since the process started: if the
    call never exceeds an earlier peak (``reliable`` False), the figure is that
    earlier peak minus the baseline, an overestimate. Shared with
    ``bench_influence.py``, which times sklinfluence the same way.
    """
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base = _rss_kib()
    t0 = time.perf_counter()
    M = fn()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return M.detach().double().numpy(), seconds, (peak - base) / 1024, peak > base_max


def timed(method, model, data, spec, **kwargs):
    """Run ``method`` under :func:`timed_call`, its library imported before the clock."""
    for mod in PEER_IMPORTS.get(method.split("_")[0], ()):  # imports stay out of the timing
        importlib.import_module(mod)
    return timed_call(lambda: run_method(method, model, data, spec, **kwargs))


def train_full_batch(model, X, y, loss_fn, weight_decay, *, lr, steps):
    """Full-batch Adam on ``loss_fn(model(X), y) + (μ/2)‖θ‖²`` (plain L2 in the loss)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss = loss + 0.5 * weight_decay * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        opt.step()


def make_demo_task(path, seed=0):
    """Train the reference task: MLP 64-128-10 (tanh) on digits, 1,200 / 300, μ=1e-4, λ=1e-3."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(X))[:1500]
    X, y = X[idx], y[idx]
    mu, sd = X[:1200].mean(0), X[:1200].std(0) + 1e-8
    X = (X - mu) / sd
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, 10)).double()
    Xt, yt, wd = torch.from_numpy(X[:1200]), torch.from_numpy(y[:1200]), 1e-4
    train_full_batch(model, Xt, yt, torch.nn.functional.cross_entropy, wd, lr=1e-2, steps=300)
    write_task(path, model, X[:1200], y[:1200], X[1200:], y[1200:], task="classification",
               hidden=[128], damping=1e-3, weight_decay=wd)


def check_ridge(methods, batch_size):
    """Ridge regression on load_diabetes: every method against the closed form."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    Xb = np.hstack([X, np.ones((len(X), 1))])
    tr, te = slice(0, 342), slice(342, None)
    N, mu, lam = 342, 1e-2, 1e-3
    A = Xb[tr].T @ Xb[tr] * (2 / N)  # Hessian of (1/N) Σ (x̃ᵀθ - y)²
    theta = np.linalg.solve(A + mu * np.eye(11), Xb[tr].T @ y[tr] * (2 / N))
    g = 2 * (Xb @ theta - y)[:, None] * Xb  # per-sample gradients
    M = g[tr] @ np.linalg.solve(A + (mu + lam) * np.eye(11), g[te].T) / N
    model = torch.nn.Sequential(torch.nn.Linear(10, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(theta[None, :10]))
        model[0].bias.copy_(torch.from_numpy(theta[10:]))
    with tempfile.NamedTemporaryFile(suffix=".npz") as fh:  # round trip through the format
        write_task(fh.name, model, X[tr], y[tr, None], X[te], y[te, None], task="regression",
                   hidden=[], damping=lam, weight_decay=mu)
        model, data, spec = load_task(fh.name)
    print(f"closed form: max |M| = {np.abs(M).max():.3e}")
    for m in methods:
        if m == "pydvl_ekfac":
            print(f"{m:18s} skipped: cross-entropy only")
            continue
        P = run_method(m, model, data, spec, batch_size=batch_size, rank=11).detach().numpy()
        err = np.abs(P - M).max() / np.abs(M).max()
        print(f"{m:18s} max|peer - exact| / max|exact| = {err:.2e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", help="task .npz (see write_task)")
    ap.add_argument("--method", choices=sorted(PEER_METHODS))
    ap.add_argument("--out", help="output .npz: matrix, seconds, peak_rss_mib, method")
    ap.add_argument("--list", action="store_true", help="print the methods available here")
    ap.add_argument("--check-ridge", action="store_true", help="conversion check vs closed form")
    ap.add_argument("--make-demo-task", metavar="PATH", help="train and write the reference task")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rank", type=int, default=50, help="rank of Nyström / Arnoldi")
    ap.add_argument("--cg-rtol", type=float, default=1e-2, help="pyDVL CG rtol")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # float64 by default: some peers allocate buffers with the default dtype
    # (pyDVL's EK-FAC factors, Captum's identity), which would otherwise be float32.
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)  # Kronfluence samples labels, Nyström / Arnoldi draw sketches
    if args.list:
        print("\n".join(available_methods()))
    elif args.make_demo_task:
        make_demo_task(args.make_demo_task)
    elif args.check_ridge:
        check_ridge(available_methods(), args.batch_size)
    elif args.task and args.method and args.out:
        model, data, spec = load_task(args.task)
        M, seconds, peak, reliable = timed(args.method, model, data, spec, cg_rtol=args.cg_rtol,
                                           batch_size=args.batch_size, rank=args.rank)
        np.savez(args.out, matrix=M, seconds=np.float64(seconds), peak_rss_mib=np.float64(peak),
                 peak_rss_reliable=np.bool_(reliable), method=np.array(args.method))
        print(f"{args.method}: {seconds:.2f} s, peak +{peak:.0f} MiB, matrix {M.shape}")
    else:
        ap.error("give --list, --check-ridge, --make-demo-task PATH, or --task/--method/--out")


if __name__ == "__main__":
    main()
