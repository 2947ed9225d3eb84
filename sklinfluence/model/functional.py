"""The functional model: a trained net as a pure function of its parameters.

This is the only bridge between skorch/torch modules and the rest of
sklinfluence.  :class:`FunctionalModel` holds

- a private copy of the module in eval mode (dropout off, batch-norm
  statistics frozen), called with :func:`torch.func.functional_call`;
- the trained parameters ``θˢ`` as one flat vector, in the order of
  ``module.parameters()`` (trainable parameters only);
- the output loss (:mod:`sklinfluence.model.losses`) that mirrors the net's
  ``get_loss``;
- the weight decay ``μ`` as a per-parameter vector, read from the optimiser's
  parameter groups.

Everything above it (curvature, responses, estimators) works on flat parameter
vectors and tensors ``X`` / ``T`` already in the module's dtype and device.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Union

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .losses import OutputLoss, output_loss_from_criterion

__all__ = ["FunctionalModel", "read_weight_decay"]

WeightDecay = Union[str, float]

# Layers whose eval-mode output for one sample depends on the rest of the batch.
_BATCH_COUPLED = (torch.nn.modules.batchnorm._BatchNorm,)


def _is_skorch_classifier(net: Any) -> bool:
    from skorch import NeuralNetClassifier

    return isinstance(net, NeuralNetClassifier)


def _is_skorch_binary(net: Any) -> bool:
    from skorch import NeuralNetBinaryClassifier

    return isinstance(net, NeuralNetBinaryClassifier)


def read_weight_decay(net: Any, module: torch.nn.Module) -> list[float]:
    """Per-parameter L2 coefficient ``μ`` that the net's optimiser applied.

    Parameters
    ----------
    net : skorch.NeuralNet
        An initialised net (``optimizer_`` exists).
    module : torch.nn.Module
        The net's module; its trainable parameters define the order.

    Returns
    -------
    list of float
        One coefficient per trainable parameter tensor.

    Raises
    ------
    ValueError
        For ``AdamW`` (and other decoupled decays) with a non-zero decay:
        decoupled weight decay is not an L2 term of the objective, so the
        objective the net minimised is unknown. Pass an explicit
        ``weight_decay=`` to the estimator to choose ``μ`` yourself.
    """
    optimizer = getattr(net, "optimizer_", None)
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer is None:
        return [0.0] * len(params)
    by_id: dict[int, float] = {}
    for group in optimizer.param_groups:
        decay = float(group.get("weight_decay", 0.0) or 0.0)
        decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(
            optimizer, torch.optim.AdamW
        )
        if decay != 0.0 and decoupled:
            raise ValueError(
                f"the net's optimizer {type(optimizer).__name__} uses decoupled weight "
                f"decay ({decay}), which is not an L2 term (μ/2)‖θ‖² of the training "
                "objective. Pass weight_decay=<float> to the estimator to "
                "state the μ to use, or train with SGD/Adam weight_decay."
            )
        for p in group["params"]:
            by_id[id(p)] = decay
    return [by_id.get(id(p), 0.0) for p in params]


class FunctionalModel:
    """A trained network as a pure function ``f(θ, X)`` with its loss.

    Build it with :meth:`from_net`; the constructor takes the parts.

    Parameters
    ----------
    module : torch.nn.Module
        Module to call functionally; it is copied and put in eval mode.
    loss : OutputLoss
        The per-sample output loss.
    weight_decay : sequence of float
        ``μ`` per trainable parameter tensor (in ``parameters()`` order).
    flatten_output : bool, default=False
        Reshape the module output to ``(n, 1)`` (skorch's binary classifier
        squeezes a single logit).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        loss: OutputLoss,
        weight_decay: list[float],
        *,
        flatten_output: bool = False,
    ) -> None:
        self.module = copy.deepcopy(module).eval()
        for layer in self.module.modules():
            if isinstance(layer, _BATCH_COUPLED) and not layer.track_running_stats:
                raise ValueError(
                    f"layer {layer!r} normalises with batch statistics even in eval "
                    "mode (track_running_stats=False), so one sample's output depends "
                    "on the others and per-sample losses are not defined. Supported: "
                    "layers whose eval-mode output is a per-sample function (Linear, "
                    "Conv, activations, Dropout, BatchNorm with running statistics, "
                    "LayerNorm, Embedding, ...)."
                )
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the module has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.param_shapes = [p.shape for _, p in named]
        self.param_numels = [p.numel() for _, p in named]
        self.params = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        self.frozen = {
            n: p.detach() for n, p in self.module.named_parameters() if not p.requires_grad
        }
        self.frozen.update({n: b.detach() for n, b in self.module.named_buffers()})
        self.loss = loss
        if len(weight_decay) != len(named):
            raise ValueError("weight_decay needs one value per trainable parameter tensor")
        self.weight_decay = torch.cat(
            [torch.full((k,), float(mu), dtype=self.dtype, device=self.device)
             for k, mu in zip(self.param_numels, weight_decay)]
        )
        self.flatten_output = flatten_output
        self._attention = any(isinstance(layer, torch.nn.MultiheadAttention)
                              for layer in self.module.modules())

    # ------------------------------------------------------------------ build
    @classmethod
    def from_net(cls, net: Any, *, weight_decay: WeightDecay = "auto") -> "FunctionalModel":
        """Build the functional model of an initialised skorch net.

        Parameters
        ----------
        net : skorch.NeuralNet
            ``NeuralNetRegressor``, ``NeuralNetClassifier``,
            ``NeuralNetBinaryClassifier`` or a plain ``NeuralNet`` whose
            criterion is one of :data:`~sklinfluence.model.losses.SUPPORTED_CRITERIA`.
        weight_decay : "auto" or float, default="auto"
            ``"auto"`` reads ``μ`` from the optimiser's parameter groups; a
            float overrides it for every parameter.

        Returns
        -------
        FunctionalModel
        """
        module = getattr(net, "module_", None)
        criterion = getattr(net, "criterion_", None)
        if not isinstance(module, torch.nn.Module) or criterion is None:
            raise ValueError(
                f"{type(net).__name__} is not an initialised skorch net (no module_ "
                "or criterion_); fit it first or let the estimator fit it."
            )
        loss = output_loss_from_criterion(
            criterion, nll_takes_probabilities=_is_skorch_classifier(net)
        )
        n_tensors = sum(1 for p in module.parameters() if p.requires_grad)
        if weight_decay == "auto":
            decay = read_weight_decay(net, module)
        else:
            decay = [float(weight_decay)] * n_tensors
        return cls(module, loss, decay, flatten_output=_is_skorch_binary(net))

    # ------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    @property
    def device(self) -> torch.device:
        return self.params.device

    @property
    def n_params(self) -> int:
        return int(self.params.numel())

    def astype(self, dtype: torch.dtype) -> "FunctionalModel":
        """A copy computing in ``dtype`` (e.g. float32 products for mixed precision)."""
        other = copy.copy(self)
        other.module = copy.deepcopy(self.module).to(dtype)
        other.params = self.params.to(dtype)
        other.weight_decay = self.weight_decay.to(dtype)
        other.frozen = {k: v.to(dtype) if v.is_floating_point() else v
                        for k, v in self.frozen.items()}
        return other

    # ------------------------------------------------------------ functional
    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into the module's named parameter tensors."""
        chunks = torch.split(theta, self.param_numels)
        return {
            name: c.reshape(shape)
            for name, c, shape in zip(self.param_names, chunks, self.param_shapes)
        }

    def forward(self, theta: Tensor, X: Tensor) -> Tensor:
        """Network outputs ``f(θ, X)``, shape ``(n, K)``.

        Attention layers run on differentiable kernels (see
        :func:`differentiable_attention`).
        """
        with differentiable_attention() if self._attention else nullcontext():
            out = functional_call(self.module, {**self.unflatten(theta), **self.frozen}, (X,))
        if isinstance(out, tuple):  # skorch convention: first output is the prediction
            out = out[0]
        if self.flatten_output or out.dim() == 1:
            out = out.reshape(out.shape[0], 1)
        return out

    def losses(self, theta: Tensor, X: Tensor, T: Tensor) -> Tensor:
        """Per-sample losses ``L_i(θ)``, shape ``(n,)``."""
        return self.loss(self.forward(theta, X), T)

    def penalty(self, theta: Tensor) -> Tensor:
        """The weight-decay term ``(1/2) Σ_j μ_j θ_j²``."""
        return 0.5 * (self.weight_decay * theta * theta).sum()

    def damped_diagonal(self, damping: float) -> Tensor:
        """``μ_j + λ`` per parameter: the diagonal every damped curvature adds (the one
        place it is formed)."""
        return self.weight_decay + damping

    def objective(self, theta: Tensor, X: Tensor, T: Tensor) -> Tensor:
        """Training objective ``J(θ) = mean_i L_i(θ) + (μ/2)‖θ‖²`` over ``X``."""
        return self.losses(theta, X, T).mean() + self.penalty(theta)

    def per_sample_grads(
        self, theta: Tensor, X: Tensor, T: Tensor, batch_size: int | None = None
    ) -> Tensor:
        """Per-sample loss gradients ``∇_θ L_i(θ)``, shape ``(n, P)``.

        Vectorised with ``torch.func.vmap(grad(...))``; ``batch_size`` bounds
        how many samples are differentiated at once.
        """

        if X.shape[0] == 0:
            return theta.new_zeros((0, self.n_params))

        def single(th: Tensor, x: Tensor, t: Tensor) -> Tensor:
            return self.losses(th, x.unsqueeze(0), t.unsqueeze(0))[0]

        grad_fn = vmap(grad(single), in_dims=(None, 0, 0))
        return torch.cat(
            [grad_fn(theta, xb, tb) for xb, tb in iterate_batches(X, T, batch_size)]
        )


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention on kernels that ``torch.func`` can differentiate, for a ``with`` block.

    In eval mode ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention``
    take a fused "fast path" (``_transformer_encoder_layer_fwd``) whenever no
    input requires grad — which is the case under forward-mode AD, so
    Jacobian-vector products fail — and scaled dot-product attention picks
    the flash kernel on CPU, whose backward has no derivative, so
    Hessian-vector products fail. Inside the block the fast path is off and
    attention uses the math kernel (plain matrix products and a softmax):
    the same values to rounding, differentiable to any order and under
    ``vmap``. The caller's fast-path setting is restored on exit.
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def iterate_batches(
    X: Tensor, T: Tensor, batch_size: int | None
) -> list[tuple[Tensor, Tensor]]:
    """Split ``(X, T)`` into consecutive batches of at most ``batch_size`` rows."""
    n = X.shape[0]
    step = n if not batch_size else int(batch_size)
    return [(X[i:i + step], T[i:i + step]) for i in range(0, n, max(step, 1))]
