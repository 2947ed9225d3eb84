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

A new layer type is one module of this package: a subclass decorated with
:func:`register_layer`. Its fitted state (eigenbases and eigenvalues) is not
the layer's: EK-FAC/K-FAC keep it in an :class:`Eigenbasis` per layer, which
the layer's methods take.

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

- ``nn.MultiheadAttention`` (``kdim = vdim = embed_dim``): the query, key
  and value projections (rows ``0:E``, ``E:2E``, ``2E:3E`` of
  ``[in_proj_weight | in_proj_bias]``) are three Linear layers with positions
  (the query, key or value sequence), one layer of three blocks with their own
  factors, and ``out_proj`` is a Linear layer with positions (the query
  sequence). The module computes them inside
  ``F.multi_head_attention_forward``, out of a hook's reach; during the
  capture passes it runs decomposed into them (``attention.py``).

EK-FAC's eigenvalues are, for every type, ``Λ = (1/N) Σ_ik (Q_Sᵀ D_ik Q_A)²``
elementwise: the exact diagonal of the block in the Kronecker eigenbasis.
"""

# registration order is the order kronecker_layers tries the types in
from .base import (ADVICE, LAYER_TYPES, LAYERWISE, Eigenbasis, KroneckerLayer,  # noqa: I001
                   handled_types, kronecker_layers, register_layer, unregister_layer)
from .linear import LinearBlock
from .conv import Conv2dLayer
from .embedding import EmbeddingLayer
from .norm import NormLayer
from .attention import AttentionProjections

__all__ = ["KroneckerLayer", "Eigenbasis", "LinearBlock", "Conv2dLayer", "EmbeddingLayer",
           "NormLayer", "AttentionProjections", "LAYER_TYPES", "LAYERWISE", "ADVICE", "register_layer",
           "kronecker_layers", "handled_types", "unregister_layer"]
