"""Linear least-squares problems with closed-form rungs (docs/theory.rst, "Closed forms")
for the ladder tests.

Model ``f(θ, x) = φ(x)ᵀθ`` with ``φ(x) = [x, 1]`` (skorch ``Linear`` weight, then
bias) and skorch's ``MSELoss``: ``L_i = (φ_iᵀθ − t_i)²``, so ``∇L_i = 2 r_i φ_i``,
``∇²L_i = 2 φ_i φ_iᵀ`` and the curvature of ``J`` is ``A = (2/N) ΦᵀΦ + μI``.
The recipe is full-batch heavy-ball gradient descent (skorch ``SGD`` with
momentum and ``weight_decay=μ``) tuned to the data's spectrum, so a few hundred
epochs reach float64 precision.
"""

from __future__ import annotations

import numpy as np
import torch
from skorch import NeuralNetRegressor


class Linear(torch.nn.Linear):
    """float64 ``Linear(n_in, 1)`` that skorch initialises from a class."""

    def __init__(self, n_in: int = 3):
        super().__init__(n_in, 1, dtype=torch.float64)


def design(X: np.ndarray) -> np.ndarray:
    return np.hstack([X, np.ones((X.shape[0], 1))])


def well_conditioned_data(n: int = 30, d: int = 3, seed: int = 0):
    """Inputs with orthogonal centred columns of decreasing scale, and noisy targets."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d))
    Z -= Z.mean(0)
    Q, _ = np.linalg.qr(Z)
    X = Q * np.sqrt(n) * np.linspace(1.0, 0.6, d)
    y = X @ rng.normal(size=d) + 0.5 + 0.3 * rng.normal(size=n)
    return X, y


def heavy_ball(curvature: np.ndarray) -> dict:
    """Heavy-ball step and momentum for a quadratic with this Hessian.

    Tuned to a spectrum widened by margins, so that the same recipe also
    converges on the N − 1 rows of a leave-one-out retraining.
    """
    eig = np.linalg.eigvalsh(curvature)
    big, small = np.sqrt(1.5 * eig[-1]), np.sqrt(0.5 * max(eig[0], 1e-12))
    return {"lr": 4.0 / (big + small) ** 2,
            "optimizer__momentum": ((big - small) / (big + small)) ** 2}


def recipe(X: np.ndarray, mu: float, max_epochs: int, *, rank_deficient: bool = False):
    """A full-batch heavy-ball skorch recipe for least squares on ``X``."""
    Phi = design(X)
    A = 2.0 / len(X) * Phi.T @ Phi + mu * np.eye(Phi.shape[1])
    if rank_deficient:  # tune to the non-zero spectrum
        eig = np.linalg.eigvalsh(A)
        nonzero = eig[eig > 1e-10 * eig[-1]]
        A = np.diag([nonzero[0], nonzero[-1]])
    return NeuralNetRegressor(
        Linear, module__n_in=X.shape[1], max_epochs=max_epochs, batch_size=len(X) + 1,
        optimizer__weight_decay=mu, verbose=0, train_split=None, **heavy_ball(A))


def theta_of(net) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in net.module_.parameters()]).numpy()


def curvature(X: np.ndarray, mu: float) -> np.ndarray:
    Phi = design(X)
    return 2.0 / len(X) * Phi.T @ Phi + mu * np.eye(Phi.shape[1])


def minimiser(X: np.ndarray, y: np.ndarray, mu: float, extra: np.ndarray | None = None,
              lam: float = 0.0, anchor: np.ndarray | None = None) -> np.ndarray:
    """argmin (1/N)Σ(φᵀθ − t)² + (μ/2)‖θ‖² [+ (λ/2)‖θ − anchor‖²] over rows of X.

    ``extra`` rescales the mean: the data term is (1/extra)Σ instead of (1/N)Σ.
    """
    Phi = design(X)
    n = len(X) if extra is None else extra
    P = Phi.shape[1]
    lhs = 2.0 / n * Phi.T @ Phi + (mu + lam) * np.eye(P)
    rhs = 2.0 / n * Phi.T @ y + (lam * anchor if lam else 0.0)
    return np.linalg.solve(lhs, rhs)


def grads(X: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    Phi = design(X)
    return 2.0 * (Phi @ theta - y)[:, None] * Phi


def mean_loss(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``Q(θ)``: skorch's MSE, the mean over rows of ``(φᵀθ − t)²`` (one per row of θ)."""
    return ((design(X) @ np.atleast_2d(theta).T - y[:, None]) ** 2).mean(axis=0)


def replay_recipe(net, X: np.ndarray, y: np.ndarray, start: np.ndarray, epochs: int,
                  proximity: float = 0.0, anchor: np.ndarray | None = None,
                  learning_rates=None) -> np.ndarray:
    """``recipe``'s training in numpy, independently of skorch and the library.

    Full-batch ``torch.optim.SGD`` (heavy ball, dampening 0, fresh momentum buffer)
    on the mean squared error over the rows of ``X`` plus ``(proximity/2)‖θ − anchor‖²``,
    weight decay ``μ`` added to the gradient: ``g = ∇ + μθ``, ``b ← momentum·b + g``
    (``b = g`` at the first step), ``θ ← θ − lr·b``, once per epoch; ``lr`` is
    ``learning_rates[k]`` in epoch ``k`` when given (a schedule), else the net's.
    """
    params = net.get_params()
    lr, momentum = params["lr"], params["optimizer__momentum"]
    rates = [lr] * epochs if learning_rates is None else list(learning_rates)
    mu = params["optimizer__weight_decay"]
    assert params["batch_size"] > len(X)  # one full batch per epoch
    Phi = design(X)
    theta, buf = np.array(start, dtype=np.float64), None
    for k in range(epochs):
        g = 2.0 / len(X) * Phi.T @ (Phi @ theta - y) + mu * theta
        if proximity:
            g = g + proximity * (theta - anchor)
        buf = g if buf is None else momentum * buf + g
        theta = theta - rates[k] * buf
    return theta
