"""The layer registry: :class:`KroneckerLayer`, what every layer type implements, and
the discovery of a network's layers (:func:`kronecker_layers`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ...exceptions import UnsupportedLayerError

__all__ = ["KroneckerLayer", "Eigenbasis", "LAYER_TYPES", "LAYERWISE", "ADVICE", "register_layer",
           "kronecker_layers", "handled_types", "unregister_layer"]

ADVICE = "Use solver='cg' or 'arnoldi' for this network."
#: The solvers that need this registry, as the errors name them (the kernel form
#: takes the layers' captures too, but any other parameter from autograd).
LAYERWISE = "solver='ekfac' or 'kfac'"

#: Registered layer classes, tried in order.
LAYER_TYPES: list[type[KroneckerLayer]] = []


def register_layer(cls: type[KroneckerLayer]) -> type[KroneckerLayer]:
    """Class decorator adding a :class:`KroneckerLayer` subclass to :data:`LAYER_TYPES`.

    Raises
    ------
    TypeError
        If the class is not a :class:`KroneckerLayer`, or leaves one of its
        abstract methods unimplemented (named in the message).
    ValueError
        If it is registered already.
    """
    if not (isinstance(cls, type) and issubclass(cls, KroneckerLayer)):
        raise TypeError(f"register_layer expects a KroneckerLayer subclass, got {cls!r}.")
    if cls in LAYER_TYPES:
        raise ValueError(f"layer type {cls.__name__} is registered already.")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"layer type {cls.__name__} does not implement "
                        f"{', '.join(missing)}: every KroneckerLayer method marked abstract "
                        "is needed by the capture passes, the kernel or EK-FAC.")
    LAYER_TYPES.append(cls)
    return cls


def unregister_layer(cls: type[KroneckerLayer]) -> None:
    """Remove a layer type from :data:`LAYER_TYPES`; a ``ValueError`` if it is not there."""
    LAYER_TYPES.remove(cls)


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


@dataclass(eq=False)
class Eigenbasis:
    """One layer's fitted Kronecker eigenbasis (EK-FAC / K-FAC state).

    Attributes
    ----------
    Q_S, Q_A : Tensor or None
        Eigenbases of the output and input factors (``Q_A`` None: the identity).
    eigenvalues : Tensor or None
        ``(d_out, n_cols)``, undamped (None until fitted).
    """

    Q_S: Tensor
    Q_A: Tensor | None
    eigenvalues: Tensor | None = None

    @property
    def memory_elements(self) -> int:
        """Numbers held: eigenbases and eigenvalues."""
        return sum(t.numel() for t in (self.Q_S, self.Q_A, self.eigenvalues) if t is not None)


@dataclass(eq=False)
class KroneckerLayer(ABC):
    """One layer's place in the flat parameter vector and its curvature factors.

    A layer type implements the abstract methods below (a type that misses
    one cannot be instantiated) and registers itself in :data:`LAYER_TYPES`.

    Attributes
    ----------
    name : str
        The module's name (``"<module>"`` for the root).
    d_out, d_in : int
        Rows and columns of the matrix layout are ``d_out`` and
        :attr:`n_cols`; ``d_in`` excludes a bias column.
    """

    name: str
    d_out: int
    d_in: int

    #: Module classes the layer type handles (with their own ``forward``).
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: The module attributes holding its parameters.
    param_attrs: ClassVar[tuple[str, ...]] = ("weight", "bias")

    # ------------------------------------------------------------ registry
    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        """Whether ``module`` is of a handled type and runs that type's ``forward``."""
        return any(isinstance(module, t) and type(module).forward is t.forward
                   for t in cls.module_types)

    @classmethod
    @abstractmethod
    def build(cls, name: str, module: nn.Module,
              slices: dict[str, slice | None]) -> KroneckerLayer | None:
        """The layer for ``module`` given the flat slices of its trainable
        parameters (None: frozen or absent), or None if it trains nothing.

        Raises
        ------
        UnsupportedLayerError
            If the module is configured in a way the type does not handle.
        """

    # -------------------------------------------------------------- layout
    @property
    def n_cols(self) -> int:
        """Columns of the matrix layout."""
        return self.d_in

    @abstractmethod
    def to_matrices(self, V: Tensor) -> Tensor:
        """Rows of flat vectors → ``(k, d_out, n_cols)`` matrices."""

    @abstractmethod
    def put(self, V: Tensor, M: Tensor) -> None:
        """Write ``(k, d_out, n_cols)`` matrices into this layer's part of the rows of ``V``."""

    # ------------------------------------------------------------- capture
    @abstractmethod
    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        """What to keep of the layer's input ``x`` (called in a forward hook)."""

    @abstractmethod
    def capture(self, recorded: Tensor, grads: Tensor) -> NamedTuple:
        """Combine the recorded input with ``grads`` ``(K, B, *output.shape[1:])``,
        the back-propagated root columns at the layer's output, in float64."""

    @abstractmethod
    def factor_sums(self, cap: NamedTuple) -> tuple[Tensor, Tensor, int]:
        """``(Σ ā āᵀ, Σ g gᵀ, M)`` over one batch: ``A = Σ/N``, ``S = Σ/M``."""

    @abstractmethod
    def sample_gradients(self, cap: NamedTuple) -> Tensor:
        """``D_ik``, ``(B, K, d_out, n_cols)``: the gradient of ``L_i``'s root column ``k``."""

    @abstractmethod
    def rotated_squares(self, basis: Eigenbasis, cap: NamedTuple) -> Tensor:
        """``Σ_ik (Q_Sᵀ D_ik Q_A)²`` elementwise in ``basis``, ``(d_out, n_cols)``."""

    @abstractmethod
    def gradient_sums(self, cap: NamedTuple, absolute: bool = False) -> Tensor:
        """``Σ_i D_ik`` per ``k``, ``(K, d_out, n_cols)``; with ``absolute`` a bound
        on the sums of absolute values of its terms (the check's scale)."""

    # --------------------------------------------- optional: outer products
    #: Whether :meth:`outer_factors` may ever return factors: the kernel form
    #: bounds its memory before the first capture by the other layers' sizes.
    factorable: ClassVar[bool] = False

    def outer_factors(self, cap: NamedTuple) -> tuple[Tensor, Tensor] | None:
        """``(ā, g)``, ``(B, n_cols)`` and ``(B, K, d_out)``, where every sample's
        gradient matrix is one outer product ``D_ik = g_ik āᵢᵀ`` (the kernel form
        then keeps the two factors, not the product); None (this default) otherwise."""
        return None

    # --------------------------------------------------------- eigenbases
    def eigenbasis(self, A: Tensor, S: Tensor, corrected: bool) -> Eigenbasis:
        """Eigendecompose the (averaged) factors; K-FAC eigenvalues unless
        ``corrected`` (then EK-FAC fills them in from :meth:`rotated_squares`)."""
        lam_A, Q_A = torch.linalg.eigh(A)
        lam_S, Q_S = torch.linalg.eigh(S)
        eigenvalues = None if corrected else \
            lam_S.clamp_min(0)[:, None] * lam_A.clamp_min(0)[None, :]
        return Eigenbasis(Q_S, Q_A, eigenvalues)

    def rotate(self, basis: Eigenbasis, M: Tensor) -> Tensor:
        """``Q_Sᵀ M Q_A`` for a batch of layout matrices."""
        return basis.Q_S.T @ M @ basis.Q_A

    def unrotate(self, basis: Eigenbasis, M: Tensor) -> Tensor:
        """``Q_S M Q_Aᵀ``, the inverse of :meth:`rotate`."""
        return basis.Q_S @ M @ basis.Q_A.T

    def gradient_products(self, cap: NamedTuple, V: Tensor) -> Tensor:
        """``[i, e] = ⟨D_i, V_e⟩`` for a capture of loss gradients (``K = 1``) and
        ``(k, d_out, n_cols)`` matrices ``V``, ``(B, k)`` in ``V``'s dtype. This
        default forms :meth:`sample_gradients`; a layer whose gradients factor
        contracts the factors instead."""
        D = self.sample_gradients(cap)[:, 0]
        return D.reshape(D.shape[0], -1).to(V.dtype) @ V.reshape(V.shape[0], -1).T

    def rotated_gradients(self, basis: Eigenbasis, cap: NamedTuple) -> Tensor:
        """``Q_Sᵀ D_i Q_A`` per sample, ``(B, d_out, n_cols)``, for a capture of loss
        gradients (one column, ``K = 1``). This default rotates
        :meth:`sample_gradients`; a layer whose gradients factor rotates the
        factors instead. In the bases' dtype."""
        return self.rotate(basis, self.sample_gradients(cap)[:, 0].to(basis.Q_S.dtype))

    def rotated_forms(self, basis: Eigenbasis, cap: NamedTuple, weights: Tensor) -> Tensor:
        """``Σ (Q_Sᵀ D_i Q_A)² ⊙ W`` per sample, ``(B,)``, for ``(d_out, n_cols)``
        weights ``W`` (the damped inverse eigenvalues): each sample's quadratic
        form in this layer's block, in the bases' dtype."""
        return (self.rotated_gradients(basis, cap).square_() * weights).sum(dim=(1, 2))

    def weight_decay_diagonal(self, basis: Eigenbasis, mu: Tensor) -> Tensor:
        """The diagonal of ``diag(μ)`` in ``basis``, ``(d_out, n_cols)``."""
        M = self.to_matrices(mu.unsqueeze(0))[0]
        return (basis.Q_S ** 2).T @ M @ (basis.Q_A ** 2)


# ----------------------------------------------------------- weight and bias
def _weight_and_bias(name: str, module: nn.Module,
                     slices: dict[str, slice | None]) -> tuple[slice | None, slice | None]:
    weight, bias = slices.get("weight"), slices.get("bias")
    if weight is None and bias is not None:
        raise UnsupportedLayerError(
            f"layer {name!r} ({type(module).__name__}) has a frozen weight but a trainable "
            f"bias; {LAYERWISE} handles whole layers. Freeze the bias too, or use "
            "solver='cg' or 'arnoldi'.")
    return weight, bias


def handled_types() -> str:
    """The module types of the registered layer types, as the errors name them
    (the latest registered first)."""
    names = [("nn." if t.__module__.startswith("torch.nn") else "") + t.__name__.lstrip("_")
             for cls in reversed(LAYER_TYPES) for t in reversed(cls.module_types)]
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


# ---------------------------------------------------------------- discovery
def _owner(name: str, module: nn.Module) -> str:
    """``'1 (Conv1d)'``: the module holding parameter ``name``."""
    path = name.rsplit(".", 1)[0] if "." in name else ""
    owner = module.get_submodule(path)
    return f"{path or '<module>'} ({type(owner).__name__})"


def kronecker_layers(model) -> list[KroneckerLayer]:
    """The registered layers holding ``model``'s trainable parameters.

    Parameters
    ----------
    model : FunctionalModel
        The network.

    Returns
    -------
    list of KroneckerLayer
        In module order, without factors yet.

    Raises
    ------
    UnsupportedLayerError
        If some trainable parameter is outside a registered layer type
        (subclasses with their own ``forward`` count as other layers), is
        shared by two layers, or a layer is configured in a way its type
        does not handle.
    """
    offsets, start = {}, 0
    for name, numel in zip(model.param_names, model.param_numels):
        offsets[name] = slice(start, start + numel)
        start += numel
    trainable = {id(p): name for name, p in model.module.named_parameters() if name in offsets}
    layers, covered = [], set()
    for layer_name, module in model.module.named_modules():
        kind = next((cls for cls in LAYER_TYPES if cls.handles(module)), None)
        if kind is None:
            continue
        owned = {attr: trainable.get(id(getattr(module, attr, None)))
                 for attr in kind.param_attrs if getattr(module, attr, None) is not None}
        shared = set(owned.values()) & covered - {None}
        if shared:
            raise UnsupportedLayerError(
                f"layer {layer_name!r} shares the parameter {shared.pop()!r} with another "
                f"layer; {LAYERWISE} needs every layer to have its own. "
                "Use solver='cg' or 'arnoldi'.")
        layer = kind.build(layer_name or "<module>", module,
                           {attr: None if p is None else offsets[p] for attr, p in owned.items()})
        if layer is not None:
            layers.append(layer)
            covered.update(set(owned.values()) - {None})
    others = [n for n in model.param_names if n not in covered]
    if others:
        where = sorted({_owner(n, model.module) for n in others})
        raise UnsupportedLayerError(
            f"{LAYERWISE} handles {handled_types()} layers only, but the parameters "
            f"{others[:3]} belong to "
            f"other layers: {', '.join(where[:3])}. Use solver='cg' or solver='arnoldi' for "
            "this network, or solver='kernel' (exact; it differentiates those parameters "
            "with autograd).")
    return layers
