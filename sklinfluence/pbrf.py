"""Tight full-batch minimisation of a response objective (rung 3, the PBRF).

The proximal Bregman response function of removing ``z_m`` minimises, from
``θˢ``,

    ``(1/N) Σ_i D_L(f(θ, x_i), f(θˢ, x_i); t_i) + (μ/2)‖θ − θˢ‖²
    − ε L_m(θ) + (λ/2)‖θ − θˢ‖²``.

Its driving force ``ε ∇L_m = O(1/N)`` is tiny, so it is solved full batch with
a second-order method — scipy's trust-region Newton–CG (``trust-ncg``) with
exact Hessian-vector products from :mod:`torch.func` — to a gradient norm
``tol`` times the initial one (SPEC §6). scipy's implementation is used rather
than a hand-written Newton loop: it handles the indefinite curvature that a
network can show away from ``θˢ``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from torch.func import grad, vjp

from .functional import FunctionalModel

__all__ = ["ResponseObjective", "MinimizeResult", "minimize_response"]


@dataclass
class ResponseObjective:
    """``(1/N) Σ_i ℓ_i(θ) + decay − ε L_m(θ) + (λ/2)‖θ − θˢ‖²`` for one removed sample.

    ``ℓ_i`` is the training loss (``bregman=False``) or its Bregman
    divergence around ``θˢ`` (``bregman=True``, whose weight decay becomes
    ``(μ/2)‖θ − θˢ‖²``: SPEC §2's choice).
    """

    model: FunctionalModel
    X: Tensor
    T: Tensor
    theta_s: Tensor
    x_m: Tensor
    t_m: Tensor
    epsilon: float
    damping: float
    bregman: bool = True

    def __post_init__(self) -> None:
        if self.bregman:
            with torch.no_grad():
                self._ref_outputs = self.model.forward(self.theta_s, self.X)

    def __call__(self, theta: Tensor) -> Tensor:
        model, diff = self.model, theta - self.theta_s
        if self.bregman:
            outputs = model.forward(theta, self.X)
            data = model.loss.bregman(outputs, self._ref_outputs, self.T).mean()
            decay = model.penalty(diff)
        else:
            data = model.losses(theta, self.X, self.T).mean()
            decay = model.penalty(theta)
        removed = model.losses(theta, self.x_m[None], self.t_m[None])[0]
        return data + decay - self.epsilon * removed + 0.5 * self.damping * (diff * diff).sum()


@dataclass
class MinimizeResult:
    """Outcome of one response minimisation."""

    theta: Tensor
    grad_norm: float
    initial_grad_norm: float
    n_iter: int
    converged: bool
    seconds: float


def minimize_response(objective: ResponseObjective, *, tol: float = 1e-9,
                      max_iter: int = 200) -> MinimizeResult:
    """Minimise ``objective`` from ``θˢ`` with trust-region Newton–CG.

    Parameters
    ----------
    objective : ResponseObjective
        The objective; computations run in its model's dtype.
    tol : float, default=1e-9
        Stop when ``‖∇‖ ≤ tol · ‖∇ at θˢ‖``.
    max_iter : int, default=200
        Newton iterations at most.

    Returns
    -------
    MinimizeResult
    """
    start = time.perf_counter()
    theta_s = objective.theta_s
    dtype, device = theta_s.dtype, theta_s.device

    def to_torch(v: np.ndarray) -> Tensor:
        return torch.as_tensor(v, dtype=dtype, device=device)

    grad_fn = grad(objective)

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        theta = to_torch(v)
        value = objective(theta)
        return float(value), grad_fn(theta).detach().cpu().numpy().astype(np.float64)

    def hessp(v: np.ndarray, p: np.ndarray) -> np.ndarray:
        _, pullback = vjp(grad_fn, to_torch(v))
        return pullback(to_torch(p))[0].detach().cpu().numpy().astype(np.float64)

    x0 = theta_s.detach().cpu().numpy().astype(np.float64)
    g0 = float(np.linalg.norm(fun(x0)[1]))
    gtol = max(tol * g0, np.finfo(np.float64).tiny)
    if g0 == 0.0:
        return MinimizeResult(theta_s.clone(), 0.0, 0.0, 0, True, time.perf_counter() - start)
    result = minimize(fun, x0, jac=True, hessp=hessp, method="trust-ncg",
                      options={"gtol": gtol, "maxiter": int(max_iter)})
    theta = to_torch(result.x)
    g = float(np.linalg.norm(fun(result.x)[1]))
    return MinimizeResult(theta, g, g0, int(result.nit), g <= gtol,
                          time.perf_counter() - start)
