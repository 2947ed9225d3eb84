"""Predicted time and memory of the exact solvers, from the sizes and measured rates.

What ``solver="auto"`` weighs (:func:`~sklinfluence.solvers.plan_solvers`): for
``P`` parameters, ``N`` training rows, ``K`` outputs and ``k`` right-hand sides,

- **dense exact**: the build — ``N·K`` per-sample output-Jacobian rows (each
  about half a curvature product, :data:`JACOBIAN_PER_PRODUCT`) and their
  Gram matrix, ``1.25·N·K·P²`` flops (the blocks on and below the diagonal of
  ``2·N·K·P²``), or for the Hessian ``P`` Hessian products over ``N`` rows —
  then ``P³/3`` flops of Cholesky and ``2·k·P²`` of triangular solves;
  ``16·P²`` bytes;
- **kernel** (``n = N·K`` kernel rows): the capture rows as for the dense build,
  ``n²·P_m`` flops for the kernel over the ``P_m`` parameters of materialised
  rows, and for each layer whose rows factor (``Linear``: ``g ⊗ ā``)
  ``n²·d_out + N²·n_cols`` instead of ``n²·d_out·n_cols``
  (:func:`~sklinfluence.curvature.kernel.kernel_widths`), ``n³/3`` of
  Cholesky and ``4·k·(n·P_m + N·Σ d_out·n_cols) + 2·k·n²`` for the solves;
  ``16·n²`` bytes for the kernel and its factor (the materialised rows,
  checked by :func:`~sklinfluence.curvature.kernel.kernel_verdict`, come on
  top). On the digits CNN (71,754 parameters, 1,200 rows) counting every
  parameter as materialised predicted 127 s for a kernel that took 19 s;
- **block CG**: ``½·√κ·ln(2/tol)`` iterations (CG's bound; at most ``P``, or
  ``max_iter``), each one curvature product over ``N`` rows for every
  right-hand side plus ``8·s·k·P`` flops re-orthonormalising blocks of
  ``s = min(k, 512)`` directions; ``κ = λ_max / λ_min`` with ``λ_max`` from
  :data:`LANCZOS_STEPS` Lanczos steps on :data:`SAMPLE_ROWS` evenly spaced
  training rows (a subsample's ``λ_max`` overestimates the whole set's on
  average, the curvature being a mean over rows) and ``λ_min ≥ min(μ) + λ``
  (weight decay plus damping, a lower bound of the damped Gauss–Newton
  matrix's spectrum); ``40·k·P`` bytes. The bound ignores what the block
  Krylov space gains on many right-hand sides, so it errs on the slow side.

Flops are turned into seconds with a dense matrix product's rate, measured once
per process (:func:`gemm_rate`, a ``512 × 512`` float64 product), and curvature
products with their own rate, timed once per net on :data:`SAMPLE_ROWS` rows
(:func:`product_seconds`): together well under half a second, so the prediction
follows the machine and the net. Where the number of right-hand sides is not
known, ``k = min(N, DEFAULT_RHS_BLOCK)``: one block of block CG, the
self-influence of up to 512 training rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..curvature.kernel import kernel_widths
from ..curvature.operator import Curvature
from ..utils.memory import dense_bytes, format_bytes

__all__ = ["Cost", "CostModel", "gemm_rate", "product_seconds", "lanczos_extremes",
           "cg_iterations", "format_seconds", "stand_in_targets",
           "DEFAULT_RHS_BLOCK", "SAMPLE_ROWS", "LANCZOS_STEPS", "JACOBIAN_PER_PRODUCT"]

#: ``k`` where the number of right-hand sides is not known: ``min(N, 512)``, one
#: block of block CG (its default ``block_size``).
DEFAULT_RHS_BLOCK = 512
#: Training rows (evenly spaced) of the timed product and of the Lanczos steps.
SAMPLE_ROWS = 32
#: Vectors of the timed product (CG multiplies blocks of them).
PRODUCT_VECTORS = 8
#: Lanczos steps estimating ``λ_max`` (the extreme Ritz value converges first).
LANCZOS_STEPS = 8
#: A per-sample output-Jacobian row (one backward pass) against a Gauss–Newton
#: product with one vector (one forward-mode and one backward pass).
JACOBIAN_PER_PRODUCT = 0.5
#: Side of the matrix product :func:`gemm_rate` times.
GEMM_SIDE = 512

_GEMM_RATE: list[float] = []


def gemm_rate() -> float:
    """Flops per second of a dense float64 matrix product on this machine.

    Measured once per process (a ``512 × 512`` product, best of three, a few
    milliseconds) and kept: the rate of the Cholesky factorisations and the
    Gram matrices the dense and kernel builds are made of.
    """
    if not _GEMM_RATE:
        A = torch.randn(GEMM_SIDE, GEMM_SIDE, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            A @ A
            best = min(best, time.perf_counter() - start)
        _GEMM_RATE.append(2 * GEMM_SIDE ** 3 / max(best, 1e-9))
    return _GEMM_RATE[0]


def format_seconds(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps the number at least 1 (s, min, h, days)."""
    if not math.isfinite(seconds):
        return "forever"
    for unit, size in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def stand_in_targets(model: Any, X: Tensor) -> Tensor:
    """Targets for timing products where the real ones are not at hand: the net's
    own predictions (class indices for a classification loss). The Gauss–Newton
    matrix of the supported losses does not depend on them."""
    with torch.no_grad():
        out = model.forward(model.params, X)
    return out.argmax(dim=1) if model.loss.target_kind == "index" else out


def _sample(curvature: Curvature) -> Curvature:
    """The same operator on :data:`SAMPLE_ROWS` evenly spaced training rows."""
    N = curvature.n_samples
    rows = torch.linspace(0, N - 1, min(N, SAMPLE_ROWS), dtype=torch.float64).round().long()
    rows = rows.to(curvature.X.device)
    return Curvature(curvature.model, curvature.X[rows], curvature.T[rows],
                     kind=curvature.kind, damping=curvature.damping, theta=curvature.theta)


def product_seconds(curvature: Curvature) -> float:
    """Seconds of a curvature product per (training row × vector), timed on this net.

    One product with :data:`PRODUCT_VECTORS` vectors on :data:`SAMPLE_ROWS` rows,
    after a one-vector product that warms it up.
    """
    sample = _sample(curvature)
    V = torch.randn(PRODUCT_VECTORS, curvature.n_params, dtype=curvature.model.dtype,
                    generator=torch.Generator().manual_seed(0)).to(curvature.X.device)
    sample.matmat(V[:1])
    start = time.perf_counter()
    sample.matmat(V)
    elapsed = time.perf_counter() - start
    return elapsed / (sample.n_samples * PRODUCT_VECTORS)


def lanczos_extremes(curvature: Curvature, steps: int = LANCZOS_STEPS) -> tuple[float, float]:
    """``(θ_min, θ_max)``: the extreme Ritz values of ``steps`` Lanczos steps.

    Plain Lanczos with full reorthogonalisation from the normalised ones vector
    (deterministic), one product per step: scipy's ``eigsh`` (ARPACK) restarts
    until a tolerance is met and has no fixed budget of products, which is what
    a prediction needs. ``θ_max ≤ λ_max`` and ``θ_min ≥ λ_min``; the top Ritz
    value converges first.
    """
    P = curvature.n_params
    q = torch.full((P,), P ** -0.5, dtype=torch.float64, device=curvature.X.device)
    basis, alphas, betas = [q], [], []
    for _ in range(min(steps, P)):
        w = curvature.matmat(q[None])[0].to(torch.float64)
        alphas.append(float(q @ w))
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)  # twice is enough (Kahan)
        beta = float(w.norm())
        if beta <= 1e-12 * max(abs(a) for a in alphas) or len(alphas) == steps:
            break
        betas.append(beta)
        q = w / beta
        basis.append(q)
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(T)
    return float(ritz[0]), float(ritz[-1])


def cg_iterations(condition: float, tol: float) -> float:
    """CG's iteration bound ``½·√κ·ln(2/tol)`` (at least 1) for condition number ``κ``."""
    if not math.isfinite(condition):
        return math.inf
    return max(1.0, 0.5 * math.sqrt(max(condition, 1.0)) * math.log(2.0 / tol))


@dataclass(frozen=True)
class Cost:
    """One exact option's predicted cost.

    Attributes
    ----------
    solver : str
        ``"exact"``, ``"kernel"`` or ``"cg"``.
    seconds : float
        Predicted wall time: the build (factorisations) plus one solve for the
        right-hand sides.
    bytes : int
        Predicted peak memory of what it holds.
    how : str
        The terms, in a line.
    """

    solver: str
    seconds: float
    bytes: int
    how: str

    def describe(self) -> dict:
        """``{"seconds", "bytes", "how"}``, as ``diagnostics_["solver_policy"]`` shows it."""
        return {"seconds": self.seconds, "bytes": self.bytes, "how": self.how}

    def __str__(self) -> str:
        return f"{format_seconds(self.seconds)} and {format_bytes(self.bytes)} ({self.solver})"


class CostModel:
    """The predicted cost of each exact option for one damped curvature.

    Rates are measured on first use and kept (:func:`gemm_rate` per process,
    :func:`product_seconds` and the Lanczos estimate per model).

    Parameters
    ----------
    curvature : Curvature
        The damped operator (its ``kind`` decides the dense build's route and
        CG's products).
    n_rhs : int, optional
        Right-hand sides of a solve (``None``: ``min(N, DEFAULT_RHS_BLOCK)``).
    tol : float
        CG's relative residual.
    max_iter : int, optional
        CG's iteration cap.
    """

    def __init__(self, curvature: Curvature, *, n_rhs: int | None = None, tol: float = 1e-10,
                 max_iter: int | None = None) -> None:
        self.curvature = curvature
        N = curvature.n_samples
        self.n_rhs = int(min(N, DEFAULT_RHS_BLOCK) if n_rhs is None else n_rhs)
        self.tol = float(tol)
        self.max_iter = max_iter
        self.n_outputs = int(curvature.model.forward(curvature.theta, curvature.X[:1]).shape[1])
        self._product: float | None = None
        self._extremes: tuple[float, float] | None = None
        self._widths: tuple[int, list] | None = None

    # ------------------------------------------------------------- rates
    def product(self) -> float:
        """Seconds per (row × vector) of this curvature's product (timed once)."""
        if self._product is None:
            self._product = product_seconds(self.curvature)
        return self._product

    def condition(self) -> float:
        """``κ`` estimate: Lanczos ``λ_max`` on a subsample over ``min(μ) + λ``."""
        if self._extremes is None:
            self._extremes = lanczos_extremes(_sample(self.curvature))
        lowest = float(self.curvature.model.damped_diagonal(self.curvature.damping).min())
        return self._extremes[1] / lowest if lowest > 0 else math.inf

    def _capture_seconds(self) -> float:
        """The per-sample rows the dense and kernel builds start from."""
        rows = self.curvature.n_samples * self.n_outputs
        return JACOBIAN_PER_PRODUCT * rows * self.product()

    # ------------------------------------------------------------ options
    def exact(self) -> Cost:
        """The dense matrix, its Cholesky factor and one solve."""
        c, P, k = self.curvature, self.curvature.n_params, self.n_rhs
        rate = gemm_rate()
        factor = (P ** 3 / 3 + 2 * k * P ** 2) / rate
        if c.kind == "hessian":
            build = P * c.n_samples * self.product()
            how = "P Hessian products over N rows + P³/3 Cholesky"
        else:
            n = c.n_samples * self.n_outputs
            build = self._capture_seconds() + 1.25 * n * P ** 2 / rate
            how = "N·K Jacobian rows + 1.25·N·K·P² Gram + P³/3 Cholesky"
        return Cost("exact", build + factor, dense_bytes(P), how)

    def kernel(self, n_rows: int | None = None) -> Cost:
        """The kernel form on ``n_rows = N·K`` rows (default), factorised, one solve."""
        N, k = self.curvature.n_samples, self.n_rhs
        n = N * self.n_outputs if n_rows is None else int(n_rows)
        if self._widths is None:
            self._widths = kernel_widths(self.curvature.model)
        W, factored = self._widths
        gram = n ** 2 * W + sum(n ** 2 * d_out + N ** 2 * n_cols for d_out, n_cols in factored)
        solves = 4 * k * (n * W + N * sum(d_out * n_cols for d_out, n_cols in factored))
        flops = gram + n ** 3 / 3 + solves + 2 * k * n ** 2
        return Cost("kernel", self._capture_seconds() + flops / gemm_rate(), 16 * n ** 2,
                    "N·K capture rows + n²·P_m kernel (factored layers n²·d_out + N²·d_in) "
                    "+ n³/3 Cholesky, n = N·K")

    def cg(self) -> Cost:
        """Block CG for the right-hand sides, to ``tol``."""
        c, P, k = self.curvature, self.curvature.n_params, self.n_rhs
        kappa = self.condition()
        iterations = min(cg_iterations(kappa, self.tol), float(P))
        if self.max_iter is not None:
            iterations = min(iterations, float(self.max_iter))
        block = min(k, DEFAULT_RHS_BLOCK)
        per_iteration = c.n_samples * k * self.product() + 8 * block * k * P / gemm_rate()
        return Cost("cg", iterations * per_iteration, 40 * k * P,
                    f"{iterations:.0f} iterations (½·√κ·ln(2/tol), κ ≈ {kappa:.3g}) × "
                    f"a product over N = {c.n_samples:,} rows × k = {k:,} right-hand sides")
