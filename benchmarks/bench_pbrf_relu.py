"""Benchmark: the library's PBRF on ReLU nets against an independent long minimisation.

What
----
The PBRF of removing training row ``m`` (weight 1, ``ε = 1/N``) minimises, from
the trained ``θˢ``,

    ``F(θ) = (1/N) Σ_i KL(softmax f(θˢ, x_i) ‖ softmax f(θ, x_i))
    + ((μ + λ)/2)‖θ − θˢ‖² − ε L_m(θ)``

(the Bregman divergence of the cross-entropy on logits is that KL). On ReLU
nets the objective has kinks and the library's solve may stop early with a
``ConvergenceWarning``. This script measures how far its answer is from the
minimiser:

1. trains the ReLU digits CNN (``--net cnn``: Conv2d(1,16,3)–ReLU–
   Conv2d(16,32,3)–ReLU–Linear(512,128)–ReLU–Linear(128,10), 71,754
   parameters) or a 64-128-128-10 ReLU MLP (``--net mlp``), float32, with
   skorch (10 epochs of SGD, lr 0.05, momentum 0.9, weight decay 1e-4, batches
   of 64) on 600 digits, through ``PBRFEstimator(net, damping=1e-2,
   random_state=0)`` (the module's initial weights drawn under
   ``torch.manual_seed(0)``: ``random_state`` seeds only the training);
2. times ``param_change`` and ``score_samples`` (each on fresh solves: the
   response cache is cleared before each; the shared Gauss–Newton factor is
   built in the first call and reused by the second), and records the
   library's ``Δθ``, self-influence and per-row info (converged, gradient
   norms), counting the warnings;
3. writes ``F(θ) − F(θˢ)`` itself — ``torch.func.functional_call`` on a float64
   copy of ``net_.module_``, μ read from the optimiser (checked against the
   library's per-parameter μ) — and minimises it with float64 L-BFGS (scipy's
   L-BFGS-B, memory 50, no tolerances, restarted where its line search stops
   at a kink) from the library's answer ``θˢ + Δθ_lib``, for ``--lbfgs-iters``
   iterations in all or until a run lowers ``F`` by no more than its rounding;
4. checks the objective against the library's: the gradient norms at ``θˢ``
   and at ``θˢ + Δθ_lib`` against those the library reports (in float32 a
   gradient near a solution is mostly rounding, so expect agreement at ``θˢ``
   only), and — a sanity check only — against
   ``sklinfluence.response.pbrf.ResponseObjective`` in float64 (whole gradient vectors
   compared);
5. the IF–PBRF agreement: Spearman of ``InfluenceEstimator`` self-influence
   (linear measure, same damping, on the frozen net) against the PBRF
   self-influence over the first ``--n-agreement`` training rows (library only);
6. with ``--decompose N``, the ``Decomposer``'s five terms (output L2 metric,
   same net, data and damping) of the first ``N`` rows, every rung computed
   afresh: their median, mean and largest value, and the time per rung.

A before/after comparison runs this same script against an older checkout of
the library (put it first on ``sys.path``; the script only uses public names
and ``responder_.last_info``).

Run
---
::

    OMP_NUM_THREADS=1 python benchmarks/bench_pbrf_relu.py                # CNN, rows 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/bench_pbrf_relu.py --net mlp
    OMP_NUM_THREADS=1 python benchmarks/bench_pbrf_relu.py --rows 0 5 9 --lbfgs-iters 500 \\
        --n-timing 8 --n-agreement 0 --json out.json
    OMP_NUM_THREADS=1 python benchmarks/bench_pbrf_relu.py --rows 0 1 2 3 4 5 6 7 8 9 10 11 \\
        --decompose 10 --json cnn.json          # the README's table, about 12 minutes

Prints
------
The setup checks (weight decay, ε, objective agreement), the library's time per
row and warnings, the L-BFGS progress, then a markdown table with one line per
removed row — library converged?, gradient norms (at ``θˢ``; at the library's
answer as the library reports it and in this script's float64; at the
reference's end), ``F − F(θˢ)`` at the library's answer and the reference's
change of it, L-BFGS iterations / restarts, the relative move of the response
``‖Δθ_ref − Δθ_lib‖/‖Δθ_ref‖`` and of the self-influence ``|s_ref − s_lib|/|s_ref|``
(``s = L_m(θˢ + Δθ) − L_m(θˢ)``, float64) — the time per row, the
Spearman agreement, and a last line with the worst response and
self-influence moves. ``--json PATH`` writes the same numbers.
"""

import argparse
import copy
import json
import time
import warnings

import numpy as np

MU = 1e-4  # the optimiser's weight decay
DAMPING = 1e-2
N_TRAIN = 600


def build_net(kind):
    import torch
    from skorch import NeuralNetClassifier

    nn = torch.nn
    torch.manual_seed(0)  # the module's initial weights (random_state seeds only the training)
    if kind == "cnn":
        module = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3), nn.ReLU(),
                               nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                               nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10))
    else:
        module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                               nn.Linear(128, 10))
    return NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss, max_epochs=10, lr=0.05,
                               optimizer__momentum=0.9, optimizer__weight_decay=MU,
                               batch_size=64, train_split=None, iterator_train__shuffle=True,
                               verbose=0)


def load_data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(X))[:N_TRAIN]
    return X[idx] / 16.0, y[idx]


class Objective:
    """``F(θ) − F(θˢ)`` of removing one training row, float64, written from scratch."""

    def __init__(self, module, X, y, mu, damping, epsilon):
        import torch

        self.module = copy.deepcopy(module).to(torch.float64).eval()
        named = list(self.module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta_s = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.X = torch.as_tensor(X, dtype=torch.float64)
        self.y = torch.as_tensor(y, dtype=torch.int64)
        self.mu, self.damping, self.epsilon = mu, damping, epsilon
        with torch.no_grad():
            self.logp_ref = torch.log_softmax(self.logits(self.theta_s, self.X), dim=1)
        self.p_ref = self.logp_ref.exp()

    def logits(self, theta, X):
        from torch.func import functional_call

        chunks = theta.split([int(np.prod(s)) for s in self.shapes])
        params = {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes)}
        return functional_call(self.module, params, (X,))

    def row_loss(self, theta, m):
        import torch.nn.functional as F

        return F.cross_entropy(self.logits(theta, self.X[m:m + 1]), self.y[m:m + 1])

    def __call__(self, theta, m, loss_s):
        """Shifted objective; ``loss_s`` is ``L_m(θˢ)`` (so ``F(θˢ)`` maps to 0)."""
        logq = self.logits(theta, self.X).log_softmax(dim=1)
        kl = (self.p_ref * (self.logp_ref - logq)).sum(dim=1).mean()
        d = theta - self.theta_s
        return (kl + 0.5 * (self.mu + self.damping) * (d * d).sum()
                - self.epsilon * (self.row_loss(theta, m) - loss_s))

    def value_and_grad(self, theta, m, loss_s):
        import torch

        th = theta.detach().clone().requires_grad_(True)
        value = self(th, m, loss_s)
        (g,) = torch.autograd.grad(value, th)
        return float(value.detach()), g


def reference_solve(obj, m, start, max_iters):
    """Float64 L-BFGS-B on the shifted objective from ``start``; returns θ and a log.

    scipy's L-BFGS-B (memory 50, no tolerances) ends "abnormally" when its line
    search meets a kink; it is restarted from there, fresh memory, while a run
    lowers the objective beyond rounding, up to ``max_iters`` iterations in all.
    (``torch.optim.LBFGS`` with its strong-Wolfe zoom returns a zero step at a
    kink and stops after a few iterations, short of what L-BFGS-B reaches.)
    """
    import torch
    from scipy.optimize import minimize

    with torch.no_grad():
        loss_s = obj.row_loss(obj.theta_s, m)

    def fun(x):
        value, g = obj.value_and_grad(torch.from_numpy(x), m, loss_s)
        return value, g.numpy()

    began = time.perf_counter()
    x = start.detach().numpy().copy()
    best, done, runs, message = fun(x)[0], 0, 0, "max iterations"
    while done < max_iters:
        left = max_iters - done
        res = minimize(fun, x, jac=True, method="L-BFGS-B",
                       options={"maxiter": left, "maxfun": 2 * left + 50, "maxcor": 50,
                                "maxls": 50, "ftol": 0.0, "gtol": 0.0})
        done, runs, message = done + res.nit, runs + 1, str(res.message)
        print(f"    row {m}: run {runs}, it {done:5d}  F−F(θˢ) {res.fun:+.12e}  "
              f"‖∇F‖ {np.linalg.norm(res.jac):.3e}  ({message})", flush=True)
        if not res.fun < best - 1e-13 * abs(best):  # nothing beyond F's rounding
            x, best = (res.x, res.fun) if res.fun < best else (x, best)
            break
        x, best = res.x, res.fun
    return torch.from_numpy(x), {"iters": done, "runs": runs, "stop": message,
                                 "seconds": time.perf_counter() - began}


def check_weight_decay(est):
    """μ from the optimiser's groups, the same for every parameter as sklinfluence uses."""
    import torch

    module, opt = est.net_.module_, est.net_.optimizer_
    by_id = {id(p): float(g.get("weight_decay", 0.0)) for g in opt.param_groups
             for p in g["params"]}
    per_param = [by_id.get(id(p), 0.0) for p in module.parameters()]
    lib = est.model_.weight_decay
    same = all(v == MU for v in per_param) and bool(
        torch.all(lib == torch.tensor(MU, dtype=lib.dtype)))
    print(f"weight decay: optimiser groups {sorted(set(per_param))} over "
          f"{len(per_param)} tensors; sklinfluence per-parameter μ in "
          f"[{float(lib.min()):.6g}, {float(lib.max()):.6g}] ({lib.dtype}) -> "
          f"{'same' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit("weight decay differs from the library's: the comparison is moot")


def library_run(est, X, rows, timing_rows):
    """Time the library, then get Δθ, self-influence and info of ``rows``."""
    from sklearn.exceptions import ConvergenceWarning

    from sklinfluence.response.cache import RESPONSE_CACHE

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RESPONSE_CACHE.clear()
        start = time.perf_counter()
        est.param_change(X[timing_rows])
        t_change = (time.perf_counter() - start) / len(timing_rows)
        RESPONSE_CACHE.clear()
        start = time.perf_counter()
        est.score_samples(X[timing_rows])
        t_score = (time.perf_counter() - start) / len(timing_rows)
        delta = est.param_change(X[rows])
        info = {k: np.asarray(v).tolist() for k, v in est.responder_.last_info.items()
                if k != "rung"}
        scores = est.score_samples(X[rows])
    conv = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    print(f"library: {len(timing_rows)} timed rows; param_change {t_change:.2f} s/row "
          f"(first call, builds the shared factor), score_samples {t_score:.2f} s/row "
          f"(fresh solves, factor reused)")
    print(f"library warnings: {len(conv)} ConvergenceWarning(s) of {len(caught)} warning(s) "
          f"over 4 calls")
    for msg in dict.fromkeys(conv):
        print(f"  ! {msg[:240]}{'…' if len(msg) > 240 else ''}")
    return delta, scores, info, {"param_change_s_per_row": t_change,
                                 "score_samples_s_per_row": t_score,
                                 "n_timing": len(timing_rows),
                                 "n_convergence_warnings": len(conv)}


def sanity_library_gradient(est, theta, m):
    """SANITY CHECK ONLY: the library's own objective (float64) gradient at ``theta``."""
    import torch
    from torch.func import grad

    from sklinfluence.response.pbrf import ResponseObjective

    model = est.model_.astype(torch.float64)
    X, T = est.X_train_.to(torch.float64), est.T_train_
    objective = ResponseObjective(model, X, T, model.params, X[m:m + 1], T[m:m + 1],
                                  torch.ones(1, dtype=torch.float64), est.epsilon_,
                                  est.damping, bregman=True)
    return grad(objective)(theta).detach()


def agreement(est, net_kind, X, y, n):
    from scipy.stats import spearmanr
    from sklearn.frozen import FrozenEstimator

    from sklinfluence import InfluenceEstimator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        pbrf = est.score_samples(X[:n])
        t_pbrf = time.perf_counter() - start
        start = time.perf_counter()
        inf = InfluenceEstimator(FrozenEstimator(est.net_), damping=DAMPING).fit(X, y)
        infl = inf.score_samples(X[:n])
        t_if = time.perf_counter() - start
    rho = float(spearmanr(infl, pbrf).statistic)
    for msg in dict.fromkeys(str(w.message) for w in caught):
        print(f"  ! {msg[:240]}{'…' if len(msg) > 240 else ''}")
    print(f"IF–PBRF agreement ({net_kind}, first {n} rows): Spearman {rho:.3f} "
          f"(PBRF {t_pbrf:.1f} s, IF fit+score {t_if:.1f} s, {len(caught)} warning(s))")
    return {"n": n, "spearman": rho, "if_scores": infl.tolist(), "pbrf_scores": pbrf.tolist()}


def decompose(net_kind, X, y, n):
    """The ``Decomposer``'s five terms (output L2 metric) of the first ``n`` rows."""
    from sklinfluence import Decomposer
    from sklinfluence.response.cache import RESPONSE_CACHE

    RESPONSE_CACHE.clear()  # every rung computed afresh (the PBRF's solves are timed above)
    terms = ("warm_start_gap", "proximity_gap", "non_convergence_gap", "linearization_error",
             "solver_error")
    dec = Decomposer(build_net(net_kind), damping=DAMPING, random_state=0).fit(X, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        values = dec.transform(X[:n], y[:n])
        seconds = time.perf_counter() - start
    rungs = {k: float(sum(v)) for k, v in dec.responder_.timings.items()}
    print(f"\nDecomposer ({net_kind}, first {n} rows, output L2): {seconds:.0f} s, "
          f"{len(caught)} warning(s); seconds per rung: "
          + ", ".join(f"{k} {v:.0f}" for k, v in rungs.items()))
    print("| term | median | mean | max |\n|---|---|---|---|")
    for j, name in enumerate(terms):
        col = values[:, j]
        print(f"| {name} | {np.median(col):.3e} | {col.mean():.3e} | {col.max():.3e} |")
    return {"n": n, "seconds": seconds, "rung_seconds": rungs, "terms": terms,
            "values": values.tolist(), "n_warnings": len(caught)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--rows", type=int, nargs="+", default=[0, 1, 2],
                        help="training rows removed (default: 0 1 2)")
    parser.add_argument("--lbfgs-iters", type=int, default=2000)
    parser.add_argument("--n-timing", type=int, default=None,
                        help="time the first N training rows (default: the --rows)")
    parser.add_argument("--n-agreement", type=int, default=20,
                        help="rows of the IF–PBRF Spearman (0: skip)")
    parser.add_argument("--decompose", type=int, default=0,
                        help="also run the Decomposer on the first N rows (default 0: skip)")
    parser.add_argument("--json", default=None, help="write the numbers to this path")
    args = parser.parse_args(argv)

    import torch

    from sklinfluence import PBRFEstimator

    torch.set_num_threads(1)
    X, y = load_data()
    rows = list(args.rows)
    timing_rows = rows if args.n_timing is None else list(range(args.n_timing))

    start = time.perf_counter()
    est = PBRFEstimator(build_net(args.net), damping=DAMPING, random_state=0).fit(X, y)
    n_params = sum(p.numel() for p in est.net_.module_.parameters())
    print(f"{args.net}: {n_params:,} parameters, {est.model_.dtype}, trained on {len(X)} rows "
          f"in {time.perf_counter() - start:.1f} s; λ={DAMPING:g}, μ={MU:g}, "
          f"ε={est.epsilon_:.6g}")
    check_weight_decay(est)
    if est.epsilon_ != 1.0 / len(X):
        raise SystemExit(f"library ε {est.epsilon_} is not 1/N")

    delta_lib, s_lib32, info, timing = library_run(est, X, rows, timing_rows)

    obj = Objective(est.net_.module_, X, y, MU, DAMPING, 1.0 / len(X))
    assert torch.equal(obj.theta_s, est.model_.params.to(torch.float64)), "θˢ order differs"
    records = []
    for j, m in enumerate(rows):
        with torch.no_grad():
            loss_s = obj.row_loss(obj.theta_s, m)
        d_lib = torch.as_tensor(delta_lib[j], dtype=torch.float64)
        theta_lib = obj.theta_s + d_lib
        f0, g0 = obj.value_and_grad(obj.theta_s, m, loss_s)
        f_lib, g_lib = obj.value_and_grad(theta_lib, m, loss_s)
        g_sanity = sanity_library_gradient(est, theta_lib, m)
        lib_reported = float(info["grad_norm"][j])
        print(f"row {m}: ‖∇F‖ at library answer — library reports {lib_reported:.4e}, "
              f"this objective {float(g_lib.norm()):.4e} (float64): rel. diff "
              f"{abs(lib_reported - float(g_lib.norm())) / float(g_lib.norm()):.1e}")
        lib_initial = float(info["initial_grad_norm"][j])
        print(f"row {m}: ‖∇F‖ at θˢ — library reports {lib_initial:.6e}, this "
              f"objective {float(g0.norm()):.6e} (float64): rel. diff "
              f"{abs(lib_initial - float(g0.norm())) / float(g0.norm()):.1e}")
        print(f"row {m}: [sanity check, library's ResponseObjective in float64] "
              f"‖∇_lib − ∇_mine‖/‖∇_mine‖ = "
              f"{float((g_sanity - g_lib).norm() / g_lib.norm()):.1e}")
        theta_ref, log = reference_solve(obj, m, theta_lib, args.lbfgs_iters)
        f_ref, g_ref = obj.value_and_grad(theta_ref, m, loss_s)
        d_ref = theta_ref - obj.theta_s
        with torch.no_grad():
            s_lib = float(obj.row_loss(theta_lib, m) - loss_s)
            s_ref = float(obj.row_loss(theta_ref, m) - loss_s)
        records.append({
            "row": m, "label": int(y[m]), "lib_converged": bool(info["converged"][j]),
            "lib_grad_norm_f32": lib_reported,
            "lib_initial_grad_norm_f32": lib_initial,
            "grad_norm_theta_s": float(g0.norm()), "grad_norm_lib": float(g_lib.norm()),
            "grad_norm_ref": float(g_ref.norm()), "F_lib": f_lib, "F_ref": f_ref,
            "F_ref_le_F_lib": f_ref <= f_lib + 1e-12 * abs(f_lib),
            "response_norm_lib": float(d_lib.norm()), "response_norm_ref": float(d_ref.norm()),
            "response_move": float((d_ref - d_lib).norm() / d_ref.norm()),
            "self_influence_lib_f32": float(s_lib32[j]), "self_influence_lib": s_lib,
            "self_influence_ref": s_ref, "self_influence_move": abs(s_ref - s_lib) / abs(s_ref),
            "sanity_grad_rel_diff": float((g_sanity - g_lib).norm() / g_lib.norm()),
            "lbfgs": log})

    agree = (agreement(est, args.net, X, y, args.n_agreement)
             if args.n_agreement > 1 else None)
    terms = decompose(args.net, X, y, args.decompose) if args.decompose else None

    print(f"\n### PBRF on the ReLU {args.net} ({n_params:,} parameters), λ={DAMPING:g}: "
          f"library vs float64 L-BFGS ({args.lbfgs_iters} iterations max)\n")
    print("| row | conv. | ‖∇‖ θˢ | ‖∇‖ lib (reported) | ‖∇‖ lib (f64) | ‖∇‖ ref | "
          "F−F(θˢ) lib | F ref − F lib | L-BFGS it / runs | ‖Δθ‖ ref | "
          "Δθ move | s lib | s ref | s move |")
    print("|" + "---|" * 14)
    for r in records:
        print(f"| {r['row']} | {'yes' if r['lib_converged'] else 'no'} | "
              f"{r['grad_norm_theta_s']:.2e} | {r['lib_grad_norm_f32']:.3e} | "
              f"{r['grad_norm_lib']:.3e} | {r['grad_norm_ref']:.2e} | {r['F_lib']:.6e} | "
              f"{r['F_ref'] - r['F_lib']:+.2e}{'' if r['F_ref_le_F_lib'] else ' (>0!)'} | "
              f"{r['lbfgs']['iters']} / {r['lbfgs']['runs']} | "
              f"{r['response_norm_ref']:.3e} | {r['response_move']:.1%} | "
              f"{r['self_influence_lib']:.4e} | {r['self_influence_ref']:.4e} | "
              f"{r['self_influence_move']:.1%} |")
    print(f"\nlibrary time per row: param_change {timing['param_change_s_per_row']:.2f} s, "
          f"score_samples {timing['score_samples_s_per_row']:.2f} s "
          f"({timing['n_timing']} rows; {timing['n_convergence_warnings']} "
          f"ConvergenceWarning(s)); reference "
          f"{np.mean([r['lbfgs']['seconds'] for r in records]):.0f} s/row")
    if agree is not None:
        print(f"IF–PBRF Spearman over {agree['n']} rows: {agree['spearman']:.3f}")
    worst_d = max(r["response_move"] for r in records)
    worst_s = max(r["self_influence_move"] for r in records)
    print(f"worst response move {worst_d:.1%}, worst self-influence move {worst_s:.1%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"net": args.net, "n_params": n_params, "damping": DAMPING, "mu": MU,
                       "epsilon": est.epsilon_, "rows": rows, "lbfgs_iters": args.lbfgs_iters,
                       "timing": timing, "library_info": info, "records": records,
                       "agreement": agree, "decomposer": terms, "worst_response_move": worst_d,
                       "worst_self_influence_move": worst_s}, fh, indent=2)


if __name__ == "__main__":
    main()
