"""Layer types with Kronecker-factored curvature: the registry behind K-FAC / EK-FAC.

Each supported layer type is one small class (a :class:`KroneckerLayer`)
that knows

- which trainable parameters of its module it owns and where they sit in the
  flat parameter vector, and the matrix layout ``(d_out, d_in)`` of its
  curvature block (:meth:`~KroneckerLayer.to_matrices` /
  :meth:`~KroneckerLayer.put` convert between the two);
- what to record of the layer's input during a forward pass
  (:meth:`~KroneckerLayer.record`), and how to turn that with the
  back-propagated output-Hessian roots at the layer's output into its
  statistics (:meth:`~KroneckerLayer.capture`): the sums behind the
  Kronecker factors (:meth:`~KroneckerLayer.factor_sums`), the per-sample
  gradient matrices ``D_ik`` (:meth:`~KroneckerLayer.sample_gradients`), the
  EK-FAC eigenvalue sums ``Σ_ik (Q_Sᵀ D_ik Q_A)²``
  (:meth:`~KroneckerLayer.rotated_squares`) and the gradient
  ``Σ_i D_ik`` the first-batch check compares with autograd's
  (:meth:`~KroneckerLayer.gradient_sums`).

A new layer type is one subclass decorated with :func:`register_layer`.

Conventions (``N`` samples, ``K`` columns of the output-Hessian root,
``ā`` the layer input with a 1 for the bias, ``g_itk`` the back-propagation
of root column ``k`` of sample ``i`` to output position ``t``):

- ``nn.Linear`` and ``nn.Conv2d`` (KFC, Grosse & Martens 2016): a Linear layer
  applied to ``(N, ..., d_in)`` inputs and a Conv2d layer (``groups=1``, any
  ``padding``/``padding_mode``/``stride``/``dilation``) both act on ``T``
  positions per sample — the middle dimensions of a Linear input, the output
  pixels of a convolution, whose inputs ``ā_it`` are the unfolded patches
  (``C_in·kh·kw`` values, in the order of ``weight.reshape(d_out, -1)``). With
  ``D_ik = Σ_t g_itk ā_itᵀ`` the exact block is ``G = (1/N) Σ_ik vec(D_ik)
  vec(D_ik)ᵀ`` and the factors are

      ``A = (1/N) Σ_i Σ_t ā_it ā_itᵀ``,
      ``S = (1/(N T)) Σ_i Σ_t Σ_k g_itk g_itkᵀ``,

  so that ``S ⊗ A`` is exact when the derivatives at different positions are
  uncorrelated and alike (KFC's SUD and spatial homogeneity). ``T = 1`` is
  plain K-FAC.
- ``nn.Embedding`` (``max_norm=None``): the input is a one-hot index, so
  ``A`` is diagonal — the token counts ``(1/N) Σ_i #{t : x_it = v}`` —, its
  eigenbasis the identity (never stored), and the matrix layout is the
  transposed weight ``(embedding_dim, num_embeddings)``. Tokens equal to
  ``padding_idx`` get no gradient and are left out of ``A``, ``S`` and the
  count ``M`` of positions that ``S`` averages over (``M = N T`` without
  padding).
- Normalisation layers (``BatchNorm1d/2d/3d`` in eval mode, ``LayerNorm``,
  ``GroupNorm`` with affine parameters): their ``C`` scales and ``C`` shifts
  act elementwise, so their block is small and its per-sample gradients
  ``d_ik = (Σ_t g_itk ⊙ x̂_it, Σ_t g_itk)`` are cheap (``x̂`` the normalised
  input). They get their *exact* ``2C × 2C`` block ``(1/N) Σ_ik d_ik d_ikᵀ``
  as ``A`` with ``S = 1`` (layout ``(1, 2C)``): K-FAC and EK-FAC both equal
  the exact block.

EK-FAC's eigenvalues are, for every type, ``Λ = (1/N) Σ_ik (Q_Sᵀ D_ik Q_A)²``
elementwise: the exact diagonal of the block in the Kronecker eigenbasis.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..exceptions import UnsupportedLayerError

__all__ = ["KroneckerLayer", "LinearBlock", "Conv2dLayer", "EmbeddingLayer", "NormLayer",
           "UnsupportedLayerError", "LAYER_TYPES", "register_layer",
           "kronecker_layers"]

#: Elements of the per-sample gradient matrices ``rotated_squares`` forms at once
#: (4 MiB in float64: small enough to stay in cache, measured faster than 16 or 64 MiB).
ROTATED_SQUARES_WORK_ELEMENTS = 2 ** 19

ADVICE = "Use solver='cg' or 'arnoldi' for this network."
#: The solvers built on this registry, as the errors name them (the kernel form
#: and EK-FAC/K-FAC both take the layers' captures).
LAYERWISE = "solver='kernel', 'ekfac' or 'kfac'"

#: Registered layer classes, tried in order.
LAYER_TYPES: list[type[KroneckerLayer]] = []


def register_layer(cls: type[KroneckerLayer]) -> type[KroneckerLayer]:
    """Class decorator adding a :class:`KroneckerLayer` subclass to :data:`LAYER_TYPES`.

    Raises
    ------
    TypeError
        If the class leaves one of :class:`KroneckerLayer`'s abstract methods
        unimplemented (named in the message).
    """
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"layer type {cls.__name__} does not implement "
                        f"{', '.join(missing)}: every KroneckerLayer method marked abstract "
                        "is needed by the capture passes, the kernel or EK-FAC.")
    LAYER_TYPES.append(cls)
    return cls


def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


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
    Q_S, Q_A : Tensor or None
        Eigenbases of the factors (``Q_A`` None: the identity).
    eigenvalues : Tensor or None
        ``(d_out, n_cols)``, undamped.
    """

    name: str
    d_out: int
    d_in: int
    Q_S: Tensor | None = None
    Q_A: Tensor | None = None
    eigenvalues: Tensor | None = None

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
    def rotated_squares(self, cap: NamedTuple) -> Tensor:
        """``Σ_ik (Q_Sᵀ D_ik Q_A)²`` elementwise, ``(d_out, n_cols)``."""

    @abstractmethod
    def gradient_sums(self, cap: NamedTuple, absolute: bool = False) -> Tensor:
        """``Σ_i D_ik`` per ``k``, ``(K, d_out, n_cols)``; with ``absolute`` a bound
        on the sums of absolute values of its terms (the check's scale)."""

    # --------------------------------------------------------- eigenbases
    def set_factors(self, A: Tensor, S: Tensor, corrected: bool) -> None:
        """Eigendecompose the (averaged) factors; K-FAC eigenvalues unless ``corrected``."""
        lam_A, self.Q_A = torch.linalg.eigh(A)
        lam_S, self.Q_S = torch.linalg.eigh(S)
        if not corrected:
            self.eigenvalues = lam_S.clamp_min(0)[:, None] * lam_A.clamp_min(0)[None, :]

    def rotate(self, M: Tensor) -> Tensor:
        """``Q_Sᵀ M Q_A`` for a batch of layout matrices."""
        return self.Q_S.T @ M @ self.Q_A

    def unrotate(self, M: Tensor) -> Tensor:
        """``Q_S M Q_Aᵀ``, the inverse of :meth:`rotate`."""
        return self.Q_S @ M @ self.Q_A.T

    def weight_decay_diagonal(self, mu: Tensor) -> Tensor:
        """The diagonal of ``diag(μ)`` in the eigenbasis, ``(d_out, n_cols)``."""
        M = self.to_matrices(mu.unsqueeze(0))[0]
        return (self.Q_S ** 2).T @ M @ (self.Q_A ** 2)

    @property
    def memory_elements(self) -> int:
        """Numbers held: eigenbases and eigenvalues."""
        return sum(t.numel() for t in (self.Q_S, self.Q_A, self.eigenvalues) if t is not None)


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


class PatchCapture(NamedTuple):
    """Layer inputs and output gradients at ``T`` positions per sample."""

    a: Tensor  # (B, T, n_cols): inputs with a 1 for the bias
    g: Tensor  # (B, K, T, d_out)


@dataclass(eq=False)
class _PatchLayer(KroneckerLayer):
    """``s_t = W ā_t`` at ``T`` positions per sample (Linear, Conv2d): the common maths."""

    weight: slice | None = None
    bias: slice | None = None

    @property
    def n_cols(self) -> int:
        return self.d_in + (self.bias is not None)

    def to_matrices(self, V: Tensor) -> Tensor:
        W = V[:, self.weight].reshape(-1, self.d_out, self.d_in)
        if self.bias is None:
            return W
        return torch.cat([W, V[:, self.bias].unsqueeze(-1)], dim=-1)

    def put(self, V: Tensor, M: Tensor) -> None:
        V[:, self.weight] = M[..., :self.d_in].reshape(M.shape[0], -1)
        if self.bias is not None:
            V[:, self.bias] = M[..., self.d_in]

    def _augment(self, a: Tensor) -> Tensor:
        """``(B, T, d_in)`` → float64 with a column of ones for the bias."""
        a = _f64(a)
        if self.bias is None:
            return a
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)

    def factor_sums(self, cap: PatchCapture) -> tuple[Tensor, Tensor, int]:
        a = cap.a.reshape(-1, cap.a.shape[-1])
        g = cap.g.reshape(-1, self.d_out)
        return a.T @ a, g.T @ g, a.shape[0]

    def sample_gradients(self, cap: PatchCapture) -> Tensor:
        return torch.einsum("bkto,btc->bkoc", cap.g, cap.a)

    def rotated_squares(self, cap: PatchCapture) -> Tensor:
        B, K, T, O = cap.g.shape
        if T == 1:  # D_ik = g_ik ā_iᵀ: the squares factor, (Q_Sᵀg)² (Q_Aᵀā)²ᵀ
            ga = (cap.g.reshape(-1, O) @ self.Q_S) ** 2  # (B·K, d_out)
            aa = (cap.a.reshape(B, -1) @ self.Q_A) ** 2  # (B, n_cols)
            return ga.T @ aa.repeat_interleave(K, dim=0)
        a = cap.a @ self.Q_A  # (B, T, C)
        C = a.shape[-1]
        g = torch.matmul(self.Q_S.T, cap.g.transpose(-1, -2)).reshape(B, K * O, T)
        total = torch.zeros(O, C, dtype=torch.float64, device=a.device)
        step = max(1, ROTATED_SQUARES_WORK_ELEMENTS // (K * O * C))
        for s in range(0, B, step):  # chunks of samples bound the D_ik held at once
            D = torch.bmm(g[s:s + step], a[s:s + step])  # (b, K·O, C): Q_Sᵀ D_ik Q_A
            total += D.square_().view(-1, O, C).sum(0)
        return total

    def gradient_sums(self, cap: PatchCapture, absolute: bool = False) -> Tensor:
        g, a = (cap.g.abs(), cap.a.abs()) if absolute else (cap.g, cap.a)
        return torch.einsum("bkto,btc->koc", g, a)


@register_layer
@dataclass(eq=False)
class LinearBlock(_PatchLayer):
    """``nn.Linear``: inputs ``(N, ..., d_in)``, the middle dimensions are positions.

    Layout ``[W | b]``, ``(out_features, in_features + 1)``.
    """

    module_types: ClassVar = (nn.Linear,)

    @classmethod
    def build(cls, name, module, slices):
        weight, bias = _weight_and_bias(name, module, slices)
        if weight is None:
            return None
        return cls(name, module.out_features, module.in_features, weight=weight, bias=bias)

    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        return x.detach().clone()  # an in-place operation later must not change it

    def capture(self, recorded: Tensor, grads: Tensor) -> PatchCapture:
        B, K = recorded.shape[0], grads.shape[0]
        a = self._augment(recorded.reshape(B, -1, self.d_in))
        g = _f64(grads).reshape(K, B, -1, self.d_out).transpose(0, 1)
        return PatchCapture(a, g)


def _conv_padding(module: nn.Conv2d) -> list[int]:
    """``F.pad`` amounts (left, right, top, bottom) the convolution applies."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [0, 0, 0, 0]
        amounts = []  # 'same': the extra one of an even total on the right/bottom
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return amounts
    ph, pw = module.padding
    return [pw, pw, ph, ph]


@register_layer
@dataclass(eq=False)
class Conv2dLayer(_PatchLayer):
    """``nn.Conv2d`` with ``groups=1`` (KFC): unfolded patches at ``T`` output pixels.

    Layout ``[W.reshape(C_out, C_in·kh·kw) | b]``.
    """

    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, ...] = (0, 0, 0, 0)
    padding_mode: str = "zeros"

    module_types: ClassVar = (nn.Conv2d,)

    @classmethod
    def build(cls, name, module, slices):
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"layer {name!r} is a Conv2d with groups={module.groups}; {LAYERWISE} "
                "handles convolutions with groups=1 only (a grouped convolution's "
                f"block is not one Kronecker product). {ADVICE}")
        weight, bias = _weight_and_bias(name, module, slices)
        if weight is None:
            return None
        return cls(name, module.out_channels, module.weight[0].numel(), weight=weight,
                   bias=bias, kernel_size=tuple(module.kernel_size),
                   stride=tuple(module.stride), dilation=tuple(module.dilation),
                   padding=tuple(_conv_padding(module)), padding_mode=module.padding_mode)

    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise UnsupportedLayerError(
                f"layer {self.name!r} (Conv2d) receives inputs of shape {tuple(x.shape)}; "
                f"{LAYERWISE} needs batched (N, C, H, W) inputs, one sample per "
                f"row. {ADVICE}")
        x = x.detach()
        if any(self.padding):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, list(self.padding), mode=mode)
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
        return patches.transpose(1, 2)  # (B, T, C_in·kh·kw)

    def capture(self, recorded: Tensor, grads: Tensor) -> PatchCapture:
        K, B = grads.shape[:2]
        g = _f64(grads).reshape(K, B, self.d_out, -1).permute(1, 0, 3, 2)  # (B, K, T, O)
        return PatchCapture(self._augment(recorded), g)


class TokenCapture(NamedTuple):
    """Embedding indices and output gradients at ``T`` tokens per sample."""

    index: Tensor  # (B, T) long
    keep: Tensor  # (B, T) bool: not padding_idx
    g: Tensor  # (B, K, T, d_out)


@register_layer
@dataclass(eq=False)
class EmbeddingLayer(KroneckerLayer):
    """``nn.Embedding``: one-hot inputs, a diagonal input factor (token counts).

    The matrix layout is the transposed weight, ``(embedding_dim,
    num_embeddings)``; no bias.
    """

    weight: slice | None = None
    padding_idx: int | None = None

    module_types: ClassVar = (nn.Embedding,)
    param_attrs: ClassVar = ("weight",)

    @classmethod
    def build(cls, name, module, slices):
        for option, value, fine in (("max_norm", module.max_norm, None),
                                    ("scale_grad_by_freq", module.scale_grad_by_freq, False),
                                    ("sparse", module.sparse, False)):
            if value != fine:
                raise UnsupportedLayerError(
                    f"layer {name!r} is an Embedding with {option}={value!r}; "
                    f"{LAYERWISE} needs {option}={fine!r} (the plain lookup). {ADVICE}")
        if slices.get("weight") is None:
            return None
        return cls(name, module.embedding_dim, module.num_embeddings, weight=slices["weight"],
                   padding_idx=module.padding_idx)

    def to_matrices(self, V: Tensor) -> Tensor:
        return V[:, self.weight].reshape(-1, self.d_in, self.d_out).transpose(1, 2)

    def put(self, V: Tensor, M: Tensor) -> None:
        V[:, self.weight] = M.transpose(1, 2).reshape(M.shape[0], -1)

    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        if x.dim() < 1 or x.is_floating_point():
            raise UnsupportedLayerError(
                f"layer {self.name!r} (Embedding) receives {x.dtype} inputs of shape "
                f"{tuple(x.shape)}; expected integer indices (N, ...). {ADVICE}")
        return x.detach().clone()

    def capture(self, recorded: Tensor, grads: Tensor) -> TokenCapture:
        K, B = grads.shape[:2]
        index = recorded.reshape(B, -1)
        keep = (index != self.padding_idx) if self.padding_idx is not None \
            else torch.ones_like(index, dtype=torch.bool)
        g = _f64(grads).reshape(K, B, -1, self.d_out).transpose(0, 1)
        return TokenCapture(index, keep, g)

    def _kept(self, cap: TokenCapture, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sample numbers, token ids and ``(M, K, d_out)`` gradients of the kept tokens."""
        rows, cols = cap.keep.nonzero(as_tuple=True)
        return rows, cap.index[rows, cols], g[rows, :, cols]

    def factor_sums(self, cap: TokenCapture) -> tuple[Tensor, Tensor, int]:
        _, tokens, g = self._kept(cap, cap.g)
        counts = torch.bincount(tokens, minlength=self.d_in).to(torch.float64)
        g = g.reshape(-1, self.d_out)
        return counts, g.T @ g, int(tokens.shape[0])

    def sample_gradients(self, cap: TokenCapture) -> Tensor:
        onehot = F.one_hot(cap.index, self.d_in).to(torch.float64) * cap.keep[..., None]
        return torch.einsum("bkto,btv->bkov", cap.g, onehot)

    def rotated_squares(self, cap: TokenCapture) -> Tensor:
        rows, tokens, g = self._kept(cap, cap.g @ self.Q_S)
        # (Q_Sᵀ D_ik)[:, v] = Σ_{t: x_it = v} Q_Sᵀ g_itk: sum per distinct (sample, token)
        pairs, which = torch.unique(rows * self.d_in + tokens, return_inverse=True)
        summed = g.new_zeros(pairs.shape[0], *g.shape[1:]).index_add_(0, which, g)
        squares = summed.square().sum(1)  # (pairs, d_out)
        total = g.new_zeros(self.d_in, self.d_out).index_add_(0, pairs % self.d_in, squares)
        return total.T

    def gradient_sums(self, cap: TokenCapture, absolute: bool = False) -> Tensor:
        _, tokens, g = self._kept(cap, cap.g.abs() if absolute else cap.g)
        K = cap.g.shape[1]
        total = g.new_zeros(K, self.d_in, self.d_out)
        return total.index_add_(1, tokens, g.transpose(0, 1)).transpose(1, 2)

    def set_factors(self, A: Tensor, S: Tensor, corrected: bool) -> None:
        lam_S, self.Q_S = torch.linalg.eigh(S)
        self.Q_A = None  # A is diagonal: its eigenbasis is the identity
        if not corrected:
            self.eigenvalues = lam_S.clamp_min(0)[:, None] * A.clamp_min(0)[None, :]

    def rotate(self, M: Tensor) -> Tensor:
        return self.Q_S.T @ M

    def unrotate(self, M: Tensor) -> Tensor:
        return self.Q_S @ M

    def weight_decay_diagonal(self, mu: Tensor) -> Tensor:
        return (self.Q_S ** 2).T @ self.to_matrices(mu.unsqueeze(0))[0]


class NormCapture(NamedTuple):
    """Per-sample gradients of a normalisation layer's scales and shifts."""

    d: Tensor  # (B, K, n_cols)
    bound: Tensor  # (B, K, n_cols): the same sums of absolute values


@register_layer
@dataclass(eq=False)
class NormLayer(KroneckerLayer):
    """Elementwise affine parameters of BatchNorm (eval mode), LayerNorm, GroupNorm.

    Layout ``(1, [γ | β])`` over the trainable ones; ``A`` is the exact block
    and ``S = 1``. ``channel_dim`` is the dimension of the ``C`` channels
    (BatchNorm/GroupNorm: 1), or None when they are the trailing
    ``normalized_shape`` (LayerNorm).
    """

    weight: slice | None = None
    bias: slice | None = None
    channels: int = 0
    channel_dim: int | None = 1

    module_types: ClassVar = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)

    @classmethod
    def build(cls, name, module, slices):
        weight, bias = slices.get("weight"), slices.get("bias")
        if weight is None and bias is None:
            return None
        if isinstance(module, nn.LayerNorm):
            channels, channel_dim = math.prod(module.normalized_shape), None
        else:
            channels = module.num_features if hasattr(module, "num_features") \
                else module.num_channels
            channel_dim = 1
        return cls(name, 1, channels * ((weight is not None) + (bias is not None)),
                   weight=weight, bias=bias, channels=channels, channel_dim=channel_dim)

    def _parts(self) -> list[slice]:
        return [s for s in (self.weight, self.bias) if s is not None]

    def to_matrices(self, V: Tensor) -> Tensor:
        return torch.cat([V[:, s] for s in self._parts()], dim=1).unsqueeze(1)

    def put(self, V: Tensor, M: Tensor) -> None:
        for j, s in enumerate(self._parts()):
            V[:, s] = M[:, 0, j * self.channels:(j + 1) * self.channels]

    def _channels_last(self, x: Tensor) -> Tensor:
        """``(B, ...)`` → ``(B, T, C)``."""
        if self.channel_dim is not None:
            x = x.movedim(self.channel_dim, -1)
        return x.reshape(x.shape[0], -1, self.channels)

    def record(self, module: nn.Module, x: Tensor) -> Tensor:
        x = x.detach()
        if isinstance(module, nn.LayerNorm):
            normalised = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        elif isinstance(module, nn.GroupNorm):
            normalised = F.group_norm(x, module.num_groups, eps=module.eps)
        else:
            if module.training or module.running_mean is None:
                raise UnsupportedLayerError(
                    f"layer {self.name!r} normalises with batch statistics; "
                    f"{LAYERWISE} needs BatchNorm in eval mode with running statistics. "
                    f"{ADVICE}")
            shape = (1, -1) + (1,) * (x.dim() - 2)
            normalised = (x - module.running_mean.reshape(shape)) \
                / torch.sqrt(module.running_var.reshape(shape) + module.eps)
        return self._channels_last(normalised)

    def capture(self, recorded: Tensor, grads: Tensor) -> NormCapture:
        K, B = grads.shape[:2]
        g = self._channels_last(_f64(grads).flatten(0, 1))  # (K·B, T, C)
        g = g.reshape(K, B, *g.shape[1:]).transpose(0, 1)  # (B, K, T, C)
        x = _f64(recorded)
        d, bound = [], []
        if self.weight is not None:
            d.append(torch.einsum("bktc,btc->bkc", g, x))
            bound.append(torch.einsum("bktc,btc->bkc", g.abs(), x.abs()))
        if self.bias is not None:
            d.append(g.sum(2))
            bound.append(g.abs().sum(2))
        return NormCapture(torch.cat(d, dim=-1), torch.cat(bound, dim=-1))

    def factor_sums(self, cap: NormCapture) -> tuple[Tensor, Tensor, int]:
        d = cap.d.reshape(-1, self.d_in)
        B = cap.d.shape[0]
        return d.T @ d, d.new_full((1, 1), float(B)), B

    def sample_gradients(self, cap: NormCapture) -> Tensor:
        return cap.d.unsqueeze(2)

    def rotated_squares(self, cap: NormCapture) -> Tensor:
        return ((cap.d.reshape(-1, self.d_in) @ self.Q_A) ** 2).sum(0, keepdim=True)

    def gradient_sums(self, cap: NormCapture, absolute: bool = False) -> Tensor:
        return (cap.bound if absolute else cap.d).sum(0).unsqueeze(1)


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
            f"{LAYERWISE} handles nn.Conv2d, nn.Embedding, BatchNorm, LayerNorm, "
            f"GroupNorm and nn.Linear layers only, but the parameters {others[:3]} belong to "
            f"other layers: {', '.join(where[:3])}. Use solver='cg' or solver='arnoldi' for "
            "this network.")
    return layers
