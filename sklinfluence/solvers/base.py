"""The solvers' common ground: the base classes, what a solve reports, and the registry.

A solver is one class in one module of this package: it declares its
``name`` (what ``solver=`` takes), its ``params`` (the ``solver_params`` it
accepts, besides ``tol`` and ``max_iter``), whether it is ``approximate``
whatever its settings, and what it ``needs`` of the curvature; it builds
itself from a request in :meth:`Solver.build` and implements ``solve`` (or,
for a fixed inverse, :class:`DirectSolver`'s ``_apply``). Every optional
fast path — ``apply`` for preconditioning, ``self_products`` for
self-influence, ``removal_products`` for influence matrices — has a default
here that a solver overrides where it knows better. :func:`register_solver`
adds the class to :data:`SOLVER_TYPES`, which the estimators' ``solver``
parameter and :func:`~sklinfluence.solvers.make_solver` read.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from ..curvature.layers import kronecker_layers
from ..curvature.operator import Curvature
from ..model.removal import removal_chunks
from ..utils._warnings import right_hand_side_name, warn

__all__ = ["Solver", "DirectSolver", "SolveInfo", "NEEDS", "SOLVER_TYPES", "SOLVER_NAMES",
           "RESIDUAL_CHECKS", "RESIDUAL_CHECK_MAX_WORK", "FLOAT64_TOL", "FLOAT32_TOL", "default_tol", "measured_rows",
           "register_solver", "unregister_solver", "solver_names"]

#: Right-hand sides whose residual an approximate direct solve (EK-FAC, K-FAC,
#: Arnoldi) measures under the true curvature (:func:`measured_rows`).
RESIDUAL_CHECKS = 8
#: ... where training rows × parameters are at most this: above, one curvature
#: product of those vectors over all rows costs more than the scores of the
#: fast tier (2.1 s against 3.3 s for a whole 4,000 × 100 EK-FAC influence
#: matrix of a 71,754-parameter CNN; 23 s of 34 s on 1,200 rows of a
#: 372,234-parameter one, and 2.9 GB).
RESIDUAL_CHECK_MAX_WORK = 10**7
#: ``tol=None`` means this relative residual for a float64 net ...
FLOAT64_TOL = 1e-10
#: ... and this one for a float32 net (skorch's default), whose gradients carry
#: float32 rounding: on a 38,282-parameter digits CNN its self-influence differs
#: from that of the same weights in float64 by up to 2.5e-7 relative, so a
#: tighter solve buys digits its inputs do not have.
FLOAT32_TOL = 1e-6


def default_tol(dtype: torch.dtype) -> float:
    """The solves' relative residual for ``tol=None``: :data:`FLOAT64_TOL` for a
    float64 net, :data:`FLOAT32_TOL` for a lower-precision one."""
    return FLOAT64_TOL if dtype == torch.float64 else FLOAT32_TOL


def measured_rows(n_rhs: int) -> Tensor:
    """Rows of ``B`` whose residual an approximate direct solve measures.

    Up to :data:`RESIDUAL_CHECKS` of the ``n_rhs`` right-hand sides, evenly
    spaced from the first to the last (all of them when there are few):
    deterministic, so a repeated call reports the same number.
    """
    if n_rhs <= RESIDUAL_CHECKS:
        return torch.arange(n_rhs)
    return torch.linspace(0, n_rhs - 1, RESIDUAL_CHECKS, dtype=torch.float64).round().long()


@dataclass
class SolveInfo:
    """What one call to ``solve`` did.

    Attributes
    ----------
    n_rhs : int
        Number of right-hand sides.
    n_iter : int
        Iterations (0 for a direct solve), summed over CG's blocks and
        refinement rounds; ``max_iter`` caps each block of each round.
    max_relative_residual : float or None
        Largest ``‖b − A x‖ / ‖b‖`` over the right-hand sides it was measured
        on (``n_measured`` of them), ``A`` the true damped curvature,
        recomputed from the returned solution. CG and LiSSA measure every
        right-hand side (mixed-precision CG reports an upper bound); the
        approximate direct solvers (EK-FAC, K-FAC, Arnoldi) measure up to
        :data:`RESIDUAL_CHECKS` of them (:func:`measured_rows`), one batched
        curvature product — their actual error; ``None`` for the exact
        solver, which is backward stable and would pay a full curvature
        product to check.
    converged : bool or None
        Whether every right-hand side met ``tol`` (CG, LiSSA); ``True`` for
        an exact direct solve; ``None`` for an approximation (``approximate``),
        which has no stopping rule to meet — read ``max_relative_residual``.
    seconds : float
        Wall time of the call.
    approximate : bool, default=False
        Whether the solver applies an approximate inverse whatever its
        settings (EK-FAC, K-FAC, Arnoldi below full rank), as opposed to one
        exact up to rounding or ``tol``.
    n_measured : int, default=0
        Right-hand sides ``max_relative_residual`` covers.
    """

    n_rhs: int
    n_iter: int
    max_relative_residual: float | None
    converged: bool | None
    seconds: float
    approximate: bool = False
    n_measured: int = 0


#: What a solver may need of the curvature (its ``needs``), checked when it is
#: built: ``"ggn"``, the Gauss–Newton matrix (``curvature="ggn"``); ``"layers"``,
#: every trainable parameter in a registered layer type
#: (:func:`~sklinfluence.curvature.layers.kronecker_layers` raises
#: :class:`~sklinfluence.exceptions.UnsupportedLayerError` otherwise).
NEEDS = frozenset({"ggn", "layers"})
#: Registered solver classes by name, in registration order (:func:`register_solver`).
SOLVER_TYPES: dict[str, type["Solver"]] = {}
#: ``"auto"`` and every registered name: the live set the estimators' ``solver``
#: parameter is validated against, so a solver registered later is accepted.
SOLVER_NAMES: set[str] = {"auto"}


@dataclass
class Solver(ABC):
    """Base class of the solvers of ``(C + λI) X = B``: the defaults of every fast path.

    Subclasses declare the class attributes below and implement ``solve``;
    ``__init__`` takes the :class:`~sklinfluence.curvature.operator.Curvature`
    first and calls ``super().__init__(curvature)``, which checks ``needs``.

    Attributes
    ----------
    curvature : Curvature
        The damped operator.
    info : dict
        What the set-up did (``"solver"``, ``"approximate"``, ``"n_params"``,
        timings and sizes).
    last_solve : SolveInfo or None
        What the latest call did.
    """

    curvature: Curvature
    info: dict = field(default_factory=dict)
    last_solve: SolveInfo | None = None

    #: What ``solver=`` takes.
    name: ClassVar[str]
    #: The ``solver_params`` it accepts (besides ``tol`` and ``max_iter``).
    params: ClassVar[tuple[str, ...]] = ()
    #: Whether its inverse is an approximation whatever its settings (an
    #: instance may say otherwise: Arnoldi at full rank).
    approximate: ClassVar[bool] = False
    #: What it needs of the curvature (a subset of :data:`NEEDS`).
    needs: ClassVar[frozenset] = frozenset()
    #: Whether :meth:`self_products` and :meth:`query_products` stream the removed
    #: rows themselves within ``working_memory_bytes`` (then the estimators hand
    #: them every removal at once, and a residual is measured once per call), and
    #: :meth:`query_products` takes the queries as rows (``B=None``).
    streams_rows: ClassVar[bool] = False

    def __post_init__(self) -> None:
        c = self.curvature
        if "ggn" in self.needs and c.kind != "ggn":
            hessian = [n for n, cls in SOLVER_TYPES.items() if "ggn" not in cls.needs]
            verb = "approximates" if self.approximate else "inverts"
            raise ValueError(
                f"solver={self.name!r} {verb} the Gauss–Newton matrix; got "
                f"curvature={c.kind!r}. Use curvature='ggn', or "
                f"{' / '.join(repr(n) for n in hessian)} for the Hessian.")
        if "layers" in self.needs:
            kronecker_layers(c.model)  # UnsupportedLayerError naming the layer and the solvers

    @classmethod
    def build(cls, curvature: Curvature, *, tol: float, max_iter: int | None,
              verbose: int, **params: Any) -> "Solver":
        """The solver for a request (:func:`~sklinfluence.solvers.make_solver`):
        ``params`` are its checked ``solver_params``. This default passes them
        to the constructor as keywords (``tol``, ``max_iter`` and ``verbose`` are
        for the solvers that take them: override to pass those)."""
        return cls(curvature, **params)

    @abstractmethod
    def solve(self, B: Tensor) -> Tensor:
        """``(C + λI)⁻¹`` applied to each row of ``B`` (``(k, P)``), float64;
        records ``last_solve``."""

    def _relative_residual(self, X: Tensor, B: Tensor) -> Tensor:
        R = B - self.curvature.matmat(X.to(B.dtype))
        return R.norm(dim=1) / B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)

    def apply(self, B: Tensor) -> Tensor:
        """The inverse applied to each row of ``B`` as cheaply as the solver can,
        float64 — what a preconditioner calls. Here :meth:`solve` itself; a direct
        solver skips its residual check, the mixed-precision kernel its refinement.
        """
        return self.solve(B)

    def self_products(self, removals: list, forces: Callable) -> Tensor:
        """``g_sᵀ (C + λI)⁻¹ g_s`` for the force ``g_s = Σ_{i∈S_s} ∇L_i`` of each
        removal, float64 — what self-influence needs.

        ``forces(removals)`` gives the forces ``(len(removals), P)``. This
        default solves for them and takes the products; the direct solvers
        with a factorisation read the forms off it instead (no way back to
        parameters). Records ``last_solve``.
        """
        F = forces(removals)
        return (F.to(torch.float64) * self.solve(F)).sum(dim=1)

    def query_products(self, B: Tensor | None, X: Tensor, T: Tensor,
                       forces: Callable) -> Callable[[list], Tensor]:
        """Prepare products with the queries ``B`` (loss gradients of the samples
        ``(X, T)``, rows): a function giving ``[s, e] = g_sᵀ (C + λI)⁻¹ b_e``,
        float64, for any list of removals — what an influence matrix or a top-k
        search streams over chunks of training rows. A solver that
        :attr:`streams_rows` also takes ``B=None`` and differentiates the
        queries itself.

        This default solves for ``B`` once (recording ``last_solve``) and takes
        products with ``forces(removals)``; the Kronecker solvers contract the
        removed rows' layer captures instead.
        """
        S = self.solve(B).to(torch.float64)

        def products(removals: list) -> Tensor:
            if not removals:
                return S.new_zeros((0, S.shape[0]))
            return forces(removals).to(torch.float64) @ S.T
        return products

    def removal_products(self, B: Tensor, X: Tensor, T: Tensor, removals: list,
                         forces: Callable, max_rows: int | None = None) -> Tensor:
        """``[s, e] = g_sᵀ (C + λI)⁻¹ b_e`` for the loss gradients ``B`` (rows) of
        the samples ``(X, T)`` and ``g_s = Σ_{i∈S_s} ∇L_i`` the force of each
        removal, float64, ``(len(removals), len(B))`` — an influence matrix.

        This default prepares :meth:`query_products` once and applies it to
        parts of at most ``max_rows`` removed rows
        (:func:`~sklinfluence.model.removal.removal_chunks`; ``None``: all at once);
        :meth:`~sklinfluence.solvers.KernelSolver.removal_products` needs most forces
        not at all.
        Records ``last_solve`` (the solve for ``B``).
        """
        products = self.query_products(B, X, T, forces)
        blocks = [products(part) for part in removal_chunks(removals, max_rows)]
        if len(blocks) == 1:
            return blocks[0]
        return torch.cat(blocks) if blocks else products([])

    def _warn_short(self, name: str, n_left: int, n_rhs: int, worst: float,
                    worst_at: int, rounding: str | None = None,
                    collapsed: bool = False) -> None:
        """Warn that ``n_left`` right-hand sides stopped above tol, naming the worst
        (row ``worst_at`` of ``B``, named by :func:`~._warnings.naming_right_hand_sides`).

        ``rounding``: the precision whose rounding kept the true residual above
        ``tol`` (no ``max_iter`` then): although the iteration's own residual met
        it, or, with ``collapsed``, because the iteration stalled at that rounding
        (its search directions collapsed) before meeting it.
        """
        if rounding is None:
            how, advice = f"stopped at max_iter={self.max_iter}", "Increase max_iter or damping."
        else:
            how = (f"stalled at {rounding} rounding (its search directions collapsed), "
                   "before max_iter, with" if collapsed else
                   f"met tol on its own recurrence, but the true residual recomputed in "
                   f"{rounding} left")
            advice = (f"The {rounding} products cannot get closer: loosen tol, or use a "
                      "float64 net (net.module_.double()) or solver='kernel' (refined in "
                      "float64).")
        warn(
            f"{name} {how} {n_left} of {n_rhs} right-hand sides above tol={self.tol:g}; "
            f"largest relative residual {worst:.3e}, for {right_hand_side_name(worst_at)}. "
            f"{advice}",
            ConvergenceWarning,
        )


class DirectSolver(Solver):
    """A solver that applies a fixed (exact or approximate) inverse: no iterations.

    An approximate one (``approximate``) measures its relative residual under
    the true curvature on :func:`measured_rows` of each ``B`` (one batched
    curvature product of at most :data:`RESIDUAL_CHECKS` vectors) and reports
    ``converged=None``; an exact one reports ``converged=True`` and no residual.
    """

    #: Whether ``solve`` measures residuals (every solver but the exact one) —
    #: where training rows × parameters are at most :data:`RESIDUAL_CHECK_MAX_WORK`.
    measures_residual: ClassVar[bool] = True

    @property
    def checks_residual(self) -> bool:
        """Whether solves measure their residual now (:attr:`measures_residual`,
        and at most :data:`RESIDUAL_CHECK_MAX_WORK` training rows × parameters)."""
        c = self.curvature
        return self.measures_residual and c.X.shape[0] * c.n_params <= RESIDUAL_CHECK_MAX_WORK

    def measured_residual(self, B: Tensor, X: Tensor | None = None) -> tuple[float | None, int]:
        """``(largest relative residual, how many)`` of the solutions ``X`` of ``B``
        on :func:`measured_rows` (``X``: None to solve for those rows here);
        ``(None, 0)`` where the solver does not check (:attr:`checks_residual`)."""
        if not (self.checks_residual and B.shape[0]):
            return None, 0
        rows = measured_rows(int(B.shape[0])).to(B.device)
        solved = self._apply(B[rows].to(torch.float64)) if X is None else X[rows]
        return float(self._relative_residual(solved, B[rows]).max()), int(rows.numel())

    @abstractmethod
    def _apply(self, B: Tensor) -> Tensor:
        """The inverse applied to each row of the float64 ``B``, float64."""

    def apply(self, B: Tensor) -> Tensor:
        """The inverse applied to each row of ``B``, float64, recording nothing.

        What a preconditioner calls (every CG iteration): no residual check;
        the mixed-precision kernel applies its float32 factor unrefined.
        """
        return self._apply(B.to(torch.float64))

    def solve(self, B: Tensor) -> Tensor:
        """The inverse applied to each row of ``B``; float64 result.

        Records ``last_solve``; see the class notes for its residual.
        """
        start = time.perf_counter()
        X = self._apply(B.to(torch.float64))
        residual, n_measured = self.measured_residual(B, X)
        self.last_solve = SolveInfo(int(B.shape[0]), 0, residual,
                                    None if self.approximate else True,
                                    time.perf_counter() - start, self.approximate, n_measured)
        return X


def solver_names() -> tuple[str, ...]:
    """``"auto"`` and the registered solvers' names, in registration order."""
    return ("auto", *SOLVER_TYPES)


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator adding a :class:`Solver` subclass to :data:`SOLVER_TYPES`.

    Checks its declarations: a new ``name`` (not ``"auto"``), ``params`` a
    tuple of strings, ``approximate`` a bool and ``needs`` within :data:`NEEDS`.

    Raises
    ------
    TypeError
        For a class that is not a :class:`Solver` or declares them wrongly.
    ValueError
        For a name already registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise TypeError(f"register_solver expects a Solver subclass, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise TypeError(f"{cls.__name__} must declare a name (a non-empty str, not 'auto'); "
                        f"got {name!r}.")
    if name in SOLVER_TYPES:
        raise ValueError(f"solver {name!r} is registered already ({SOLVER_TYPES[name].__name__}).")
    if not (isinstance(cls.params, tuple) and all(isinstance(p, str) for p in cls.params)):
        raise TypeError(f"{cls.__name__}.params must be a tuple of str, got {cls.params!r}.")
    if not isinstance(cls.approximate, bool):
        raise TypeError(f"{cls.__name__}.approximate must be a bool, got {cls.approximate!r}.")
    if not set(cls.needs) <= NEEDS:
        raise TypeError(f"{cls.__name__}.needs {sorted(set(cls.needs) - NEEDS)} are not among "
                        f"{sorted(NEEDS)}.")
    SOLVER_TYPES[name] = cls
    SOLVER_NAMES.add(name)
    return cls


def unregister_solver(name: str) -> None:
    """Remove the solver called ``name`` from :data:`SOLVER_TYPES` (and
    :data:`SOLVER_NAMES`); a ``KeyError`` if there is none."""
    del SOLVER_TYPES[name]
    SOLVER_NAMES.discard(name)
