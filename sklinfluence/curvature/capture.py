"""Capture passes: one forward and backward pass per batch recording, for every
registered layer, its inputs and the back-propagated output-Hessian roots at its
output — what EK-FAC/K-FAC (:mod:`~sklinfluence.curvature.kfac`), the kernel form
(:mod:`~sklinfluence.curvature.kernel`) and the dense Gauss–Newton build
(:mod:`~sklinfluence.curvature.dense_ggn`) are made of.

On the first samples the parameter gradients the captures imply, ``Σ_i D_ik``,
are checked against autograd's, which catches a weight also used outside its
layer's call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from ..exceptions import UnsupportedLayerError
from ..model.functional import FunctionalModel, iterate_batches
from ..utils.memory import chunk_rows
from .layers import LAYER_TYPES, LAYERWISE, KroneckerLayer

__all__ = ["CHECK_SAMPLES", "kronecker_passes", "capture_rows"]


@contextmanager
def _capture(module: torch.nn.Module, layers: list[KroneckerLayer]):
    """Hooks recording each layer's input (what the layer keeps of it) and output.

    The layer hands on a copy of its output, so that an in-place operation
    after it (``ReLU(inplace=True)``) cannot change the recorded one.

    A layer type whose module does not expose its layers' inputs and outputs
    to a forward hook (``nn.MultiheadAttention``) has a classmethod
    ``capture_hooks(root, layers, records)`` instead, returning the hooks it
    registers: they append ``(recorded, outputs)`` to ``records[name]``, both
    tuples, and may route a submodule's work through a call of that
    submodule, whose own hook then records it. Yields ``records`` and whether
    such hooks are in place.
    """
    modules = dict(module.named_modules())
    records: dict[str, list] = {layer.name: [] for layer in layers}
    custom = tuple(cls for cls in LAYER_TYPES if hasattr(cls, "capture_hooks"))

    def hook(layer: KroneckerLayer):
        def record(module_, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            records[layer.name].append((layer.record(module_, x), output))
            return output.clone()
        return record

    handles = [modules["" if layer.name == "<module>" else layer.name].register_forward_hook(
        hook(layer), with_kwargs=True) for layer in layers if not isinstance(layer, custom)]
    rerouted = False
    try:
        for kind in custom:
            extra = kind.capture_hooks(module, layers, records)
            handles.extend(extra)
            rerouted = rerouted or bool(extra)
        yield records, rerouted
    finally:
        for handle in handles:
            handle.remove()


#: Samples the first-batch gradient check differentiates: autograd's parameter
#: gradient, batched over the ``K`` root columns, is the costliest part of a pass.
CHECK_SAMPLES = 64


def kronecker_passes(model: FunctionalModel, theta: Tensor, layers: list[KroneckerLayer],
                     X: Tensor, T: Tensor, batch_size: int | None, *,
                     check: bool = True, gradients: bool = False,
                     row_bytes: int = 0) -> Iterator[list[NamedTuple]]:
    """Yield, per batch, every layer's capture (:meth:`KroneckerLayer.capture`):
    its recorded inputs with the back-propagated output-Hessian roots, float64
    (with ``gradients``: the back-propagated loss gradient ``∇_y L_i``, one
    column, so that the captures give the samples' loss gradients).

    With ``check`` (a caller's first pass over the data), the parameter
    gradients the captures imply on the first ``CHECK_SAMPLES`` samples (at
    most a pass's rows), ``Σ_i D_i`` for one fixed random combination of the
    root's columns, are first checked against autograd's: a
    weight also used outside its layer's call, or any other way the layers'
    inputs and outputs miss part of the parameters' effect, is caught there.
    Only the parameters of ``layers`` are compared: the kernel form passes the
    registered layers of a net whose other parameters it differentiates itself.

    Without a ``batch_size``, the batches are as large as :func:`capture_rows`
    allows: their captures, the pass's own tensors and ``row_bytes`` more per
    row (what the caller builds from a capture) within ``working_memory_bytes``
    (:func:`sklinfluence.set_config`), sized from one row's captures (the
    output-Hessian roots make a row of a wide convolutional net capture
    megabytes: 64 rows at once would not fit).

    Raises
    ------
    UnsupportedLayerError
        If a layer is applied more than once per forward pass, to inputs
        whose first dimension is not the samples, or the check fails; its
        ``layer_names`` name the layers at fault.
    """
    theta = theta.detach().clone().requires_grad_(True)
    if batch_size is None and X.shape[0] > 1:  # one row's captures size the passes
        batch_size = capture_rows(_batch_captures(model, theta, layers, X[:1], T[:1],
                                                  gradients=gradients), row_bytes, X.shape[0])
    if check:  # within a pass's rows too
        n = min(CHECK_SAMPLES, batch_size or CHECK_SAMPLES)
        _batch_captures(model, theta, layers, X[:n], T[:n], verify=True)
    for xb, tb in iterate_batches(X, T, batch_size):
        yield _batch_captures(model, theta, layers, xb, tb, gradients=gradients)


def capture_rows(captures: list[NamedTuple], row_bytes: int, n_rows: int) -> int:
    """Rows per capture pass within ``working_memory_bytes``, from a pass's ``captures``.

    Per row: four times the bytes of the captured tensors (the captures, the
    pass's own activations, gradients and float64 conversions: measured on the
    digits CNN, twice was not enough), plus ``row_bytes``.
    """
    def flat(x):  # the tensors of a capture, through nested tuples (attention's parts)
        return [x] if isinstance(x, Tensor) else \
            [t for part in x for t in flat(part)] if isinstance(x, tuple) else []
    tensors = flat(tuple(captures))
    rows = max(1, min(int(t.shape[0]) for t in tensors)) if tensors else 1
    captured = sum(t.numel() * t.element_size() for t in tensors) / rows
    return chunk_rows(4 * captured + row_bytes, n_rows)


def _batch_captures(model: FunctionalModel, theta: Tensor, layers: list[KroneckerLayer],
                    xb: Tensor, tb: Tensor, verify: bool = False,
                    gradients: bool = False) -> list[NamedTuple]:
    """One forward and one backward (batched over the root's ``K`` columns) pass.

    With ``verify`` and a layer type's own capture hooks in place (which may
    run a module's computation decomposed), the outputs are also compared
    with a plain forward pass.
    """
    with _capture(model.module, layers) as (records, rerouted), torch.enable_grad():
        out = model.forward(theta, xb)
        for layer in layers:
            if len(records[layer.name]) != 1:
                raise _refusal(
                    f"layer {layer.name!r} is applied {len(records[layer.name])} "
                    f"times per forward pass; {LAYERWISE} needs each "
                    "layer used once. Use solver='cg' or 'arnoldi'.", [layer])
            for a in _tensors(records[layer.name][0][0]):
                if a.dim() < 1 or a.shape[0] != xb.shape[0]:
                    raise _refusal(
                        f"layer {layer.name!r} receives inputs of shape {tuple(a.shape)} "
                        f"for {xb.shape[0]} samples; {LAYERWISE} needs one "
                        "row per sample (the samples along the first dimension). "
                        "Use solver='cg' or 'arnoldi'.", [layer])
        if gradients:
            cotangents = model.loss.output_grad(out.detach(), tb).unsqueeze(0)  # (1, B, K)
        else:
            root = model.loss.output_hessian_root(out.detach(), tb)  # (B, K, K)
            if verify:  # one fixed random mix of the columns: the check's memory is P, not K·P
                mix = torch.randn(root.shape[2], generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64).to(root)
                cotangents = (root @ mix).unsqueeze(0)  # (1, B, K)
            else:
                cotangents = root.permute(2, 0, 1)  # (K, B, K): column k for every sample
        outputs = [records[layer.name][0][1] for layer in layers]
        wrt = [t for output in outputs for t in _tensors(output)] + ([theta] if verify else [])
        grads = torch.autograd.grad(out, wrt, grad_outputs=cotangents,
                                    is_grads_batched=True, allow_unused=True)
        grads = [torch.zeros((cotangents.shape[0], *w.shape), dtype=w.dtype,
                             device=w.device) if g is None else g  # output not used
                 for g, w in zip(grads, wrt)]
    if verify and rerouted:
        _check_rerouted(model, theta, xb, out.detach())
    captures, start = [], 0
    for layer, output in zip(layers, outputs):
        stop = start + len(_tensors(output))
        captures.append(layer.capture(records[layer.name][0][0], tuple(grads[start:stop])
                                      if isinstance(output, tuple) else grads[start]))
        start = stop
    if verify:
        _check_gradients(layers, captures, grads[-1])
    return captures


def _refusal(message: str, layers: list[KroneckerLayer]) -> UnsupportedLayerError:
    """The error refusing ``layers``, which it names in ``layer_names`` (what the
    kernel form, which can take any parameter from autograd instead, reads)."""
    error = UnsupportedLayerError(message)
    error.layer_names = tuple(layer.name for layer in layers)
    return error


def _tensors(x: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A layer's recorded inputs or outputs as a tuple (a tuple for layer types with
    their own capture hooks, one tensor otherwise)."""
    return x if isinstance(x, tuple) else (x,)


def _check_rerouted(model: FunctionalModel, theta: Tensor, xb: Tensor, out: Tensor) -> None:
    """Raise :class:`UnsupportedLayerError` unless the capture pass's outputs, some
    computed decomposed by a layer type's capture hooks, are the plain forward's
    to rounding."""
    with torch.no_grad():
        plain = model.forward(theta.detach(), xb)
    tol = torch.finfo(out.dtype).eps ** 0.5 * max(float(plain.abs().max()), 1.0)
    error = float((out - plain).abs().max())
    if not error <= tol:
        raise UnsupportedLayerError(
            "the capture pass, which runs attention decomposed into its projections, "
            f"does not reproduce the network's outputs (largest difference {error:.1e}); "
            f"{LAYERWISE} cannot handle this network; use solver='cg' or 'arnoldi'.")


def _check_gradients(layers: list[KroneckerLayer], captures: list, expected: Tensor) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``Σ_i D_ik`` is autograd's gradient
    on every layer's own parameters (those outside ``layers`` are not compared).

    Each layer is checked on its own, against the sums of absolute values of its
    terms, and the error names every layer that fails (``layer_names``).
    """
    eps = torch.finfo(expected.dtype).eps  # the model's arithmetic
    expected = expected.to(torch.float64)
    failed, worst = [], 0.0
    for layer, cap in zip(layers, captures):
        wanted = layer.to_matrices(expected)  # (K, d_out, n_cols)
        error = float((layer.gradient_sums(cap) - wanted).norm())
        scale = float(layer.gradient_sums(cap, absolute=True).norm())
        if error > 1e3 * eps * scale:
            failed.append(layer)
            worst = max(worst, error / max(float(wanted.norm()), 1e-300))
    if failed:
        raise _refusal(
            "the layers' inputs and outputs do not account for the parameters' "
            f"gradients (relative difference {worst:.1e} in "
            f"{', '.join(repr(layer.name) for layer in failed)}"
            "): a weight is used outside its layer's call, or a layer's forward is "
            f"not the plain one. {LAYERWISE} cannot handle this network; "
            "use solver='cg' or 'arnoldi'.", failed)
