"""EK-FAC, K-FAC and the kernel form on ``nn.MultiheadAttention``, all float64.

- where the factorisation is exact (the out-projection alone, or the
  in-projection of attention whose weights cannot move its output, feeding
  the squared loss), EK-FAC and K-FAC equal the exact damped inverse; with
  ``S`` identical key tokens K-FAC's value block is exactly ``1/S`` of the
  block, which pins each projection's own count of positions;
- everywhere (self- and cross-attention, masks, ``add_zero_attn``, frozen
  ``bias_k``/``bias_v``, ``batch_first`` and ``bias`` either way), EK-FAC's
  eigenvalues are the exact diagonal of each projection's Gauss–Newton block
  (torch.func ``jacrev``) in its Kronecker eigenbasis, and each projection's
  ``A`` is its own input's second moment;
- the capture passes' decomposed attention reproduces the module's outputs;
- through the estimator: EK-FAC and K-FAC run on the zoo transformer and an
  ``nn.TransformerEncoderLayer`` net and agree with the exact influence; the
  kernel form equals it;
- what is not handled is refused, naming the module and what works.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNetClassifier
from torch import nn
from torch.func import jacrev

from sklinfluence import InfluenceEstimator
from sklinfluence.curvature.capture import _capture, _check_rerouted, kronecker_passes
from sklinfluence.curvature.kfac import KroneckerFactors
from sklinfluence.curvature.layers import AttentionProjections, LinearBlock, kronecker_layers
from sklinfluence.exceptions import UnsupportedLayerError
from sklinfluence.model.functional import FunctionalModel
from sklinfluence.model.losses import output_loss_from_criterion
from sklinfluence.zoo import load_zoo_data, make_zoo_net
from tolerances import CLOSED_FORM_RTOL

DAMPING = 0.05
MU = 0.01
E, HEADS, L, S = 4, 2, 3, 5  # embedding, heads, query and key/value positions


def _model(module, criterion="MSELoss", mu=MU):
    module = module.double()
    n = sum(p.requires_grad for p in module.parameters())
    return FunctionalModel(module, output_loss_from_criterion(getattr(nn, criterion)()),
                           [mu] * n)


def _dense_ggn(model, X, T):
    """``(1/N) Σ J_iᵀ H_i J_i + diag(μ)`` from jacrev."""
    J = jacrev(lambda th: model.forward(th, X))(model.params)  # (N, K, P)
    H = model.loss.output_hessian(model.forward(model.params, X), T)
    return torch.einsum("nkp,nkl,nlq->pq", J, H, J) / X.shape[0] + torch.diag(model.weight_decay)


def _targets(model, X, criterion="MSELoss"):
    out = model.forward(model.params, X).detach()
    g = torch.Generator().manual_seed(1)
    if criterion == "MSELoss":
        return out + torch.randn(out.shape, dtype=torch.float64, generator=g)
    return torch.randint(0, out.shape[1], (out.shape[0],), generator=g)


def _inputs(n, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, dtype=torch.float64, generator=g)


class Attend(nn.Module):
    """Rows ``(N, (L + 2S)·E)`` → query ``(N, L, E)``, key and value ``(N, S, E)``
    (self-attention: the query only) → ``nn.MultiheadAttention`` → flattened output,
    or tanh, a mean over positions and a Linear head."""

    def __init__(self, case="self", head=True, batch_first=True, bias=True,
                 train_bias_kv=False, **options):
        super().__init__()
        torch.manual_seed(3)
        self.case, self.batch_first = case, batch_first
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, bias=bias,
                                          **options)
        if self.attn.bias_k is not None:  # add_bias_kv: frozen unless asked
            for extra in (self.attn.bias_k, self.attn.bias_v):
                nn.init.normal_(extra)
                extra.requires_grad_(train_bias_kv)
        self.head = nn.Linear(E, 3) if head else None
        self.double()

    @property
    def width(self):
        """Columns of the rows the net takes."""
        if self.case in ("self", "causal"):
            return L * E
        return L * E + S * (self.attn.kdim + self.attn.vdim)

    def tokens(self, x):
        """The query, key and value tokens ``(N, T_j, dim)`` of rows ``x``."""
        n, kdim = x.shape[0], self.attn.kdim
        query = x[:, :L * E].reshape(n, L, E)
        if self.case in ("self", "causal"):
            return query, query, query
        return (query, x[:, L * E:L * E + S * kdim].reshape(n, S, kdim),
                x[:, L * E + S * kdim:].reshape(n, S, self.attn.vdim))

    def forward(self, x):
        query, key, value = self.tokens(x)
        kwargs = {}
        if self.case != "self":
            if self.case == "cross_masked":
                mask = torch.where(key[:, :, 0] > 0.8, -2.0, 0.0).to(x.dtype)  # additive
                mask[:, 0] = float("-inf")  # the first key masked out altogether
                kwargs = dict(key_padding_mask=mask, attn_mask=torch.triu(
                    torch.full((L, S), -0.7, dtype=x.dtype), diagonal=1))
        if self.case == "causal":
            kwargs = dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(
                L, dtype=x.dtype), is_causal=True)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        h = self.attn(query, key, value, **kwargs)[0]
        if not self.batch_first:
            h = h.transpose(0, 1)
        if self.head is None:
            return h.flatten(1)
        return self.head(torch.tanh(h).mean(1))


def _solve_reference(model, X, T, n_rhs=4):
    exact = _dense_ggn(model, X, T) + DAMPING * torch.eye(model.n_params, dtype=torch.float64)
    B = torch.randn(n_rhs, model.n_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    return B, torch.linalg.solve(exact, B.T).T


# --------------------------------------------------------------------- exact cases
OUT_ONLY = {"self_batch_first": dict(), "self_seq_first": dict(batch_first=False),
            "no_bias": dict(bias=False), "cross_masked": dict(case="cross_masked"),
            "kdim_vdim": dict(case="cross", kdim=3, vdim=2)}


@pytest.mark.parametrize("case", list(OUT_ONLY))
def test_the_out_projection_alone_is_exact_under_the_squared_loss(case):
    """Only ``out_proj`` trains and its flattened output is the net's output:
    ``g_itk = c e_(t,o)``, so EK-FAC and K-FAC equal the exact damped inverse
    (a Linear layer with ``L`` positions, whatever the attention computes)."""
    module = Attend(head=False, **OUT_ONLY[case])
    for name, p in module.attn.named_parameters():
        p.requires_grad_(name.startswith("out_proj"))
    model = _model(module)
    X = _inputs(30, module.width)
    T = _targets(model, X)
    assert [type(layer) for layer in kronecker_layers(model)] == [LinearBlock]
    B, reference = _solve_reference(model, X, T)
    for corrected in (True, False):
        factors = KroneckerFactors(model, X, T, damping=DAMPING, corrected=corrected,
                                   batch_size=7)
        assert_allclose(factors.solve(B), reference, rtol=CLOSED_FORM_RTOL,
                        atol=1e-12 * float(reference.abs().max()))


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_in_projection_is_exact_where_attention_cannot_move_the_output(batch_first):
    """``S`` identical key/value tokens: the attention is uniform and returns the value
    projection, whatever the queries and keys, so only the value block has a gradient,
    ``g = (1/S) W_oᵀ c e`` at each of the ``S`` positions with one input ``ā``. With
    ``out_proj`` frozen the block is ``c² L W_oᵀW_o ⊗ Ā``: EK-FAC equals the exact
    damped inverse, and K-FAC, whose ``A`` sums over the ``S`` positions and ``S``
    averages over them, is exactly ``1/S`` of each eigenvalue of that block — which
    pins the value projection's own count of positions (``S``, not ``L``)."""
    module = Attend("cross", head=False, batch_first=batch_first)
    module.attn.out_proj.requires_grad_(False)
    model = _model(module)
    X = _inputs(30, module.width)
    token = X[:, L * E:(L + 1) * E]
    X[:, L * E:(L + S) * E] = token.repeat(1, S)  # S identical keys
    X[:, (L + S) * E:] = X[:, (L + S) * E:(L + S + 1) * E].repeat(1, S)  # and values
    T = _targets(model, X)
    B, reference = _solve_reference(model, X, T)
    ekfac = KroneckerFactors(model, X, T, damping=DAMPING, batch_size=7)
    assert_allclose(ekfac.solve(B), reference, rtol=CLOSED_FORM_RTOL,
                    atol=1e-12 * float(reference.abs().max()))
    kfac = KroneckerFactors(model, X, T, damping=DAMPING, corrected=False, batch_size=7)
    mu = ekfac.layers[0].weight_decay_diagonal(ekfac.bases[0], model.weight_decay)
    value = slice(2 * E, 3 * E)
    block = ekfac.bases[0].eigenvalues - mu
    assert float(block[:2 * E].abs().max()) == 0.0  # queries and keys: no gradient
    assert_allclose(S * (kfac.bases[0].eigenvalues - mu)[value], block[value],
                    rtol=CLOSED_FORM_RTOL, atol=1e-12 * float(block.abs().max()))


# ------------------------------------------------------------ eigenvalue identity
GENERAL = {"self": dict(), "self_seq_first_no_bias": dict(batch_first=False, bias=False),
           "cross_masked": dict(case="cross_masked"), "causal": dict(case="causal"),
           "zero_attn_frozen_bias_kv": dict(case="cross", add_zero_attn=True,
                                            add_bias_kv=True)}


def _layout_index(block, P):
    index = torch.arange(P, dtype=torch.float64).unsqueeze(0)
    return block.to_matrices(index)[0].round().long()


@pytest.mark.parametrize("case", list(GENERAL))
def test_ekfac_eigenvalues_are_the_exact_diagonal_of_each_projection_block(case):
    """For the query, key, value and output projections: the block from jacrev is
    ``(1/N) Σ_ik vec(D_ik) vec(D_ik)ᵀ`` of the captured gradients, EK-FAC's
    eigenvalues are its diagonal in ``Q_S ⊗ Q_A``, and ``Q_A`` diagonalises the
    projection's own input second moment ``Σ_t ā_t ā_tᵀ`` (query, key or value)."""
    options = dict(GENERAL[case])
    module = Attend(**options)
    model = _model(module, "CrossEntropyLoss")
    X = _inputs(20, module.width)
    T = _targets(model, X, "CrossEntropyLoss")
    dense = _dense_ggn(model, X, T)
    ekfac = KroneckerFactors(model, X, T, damping=0.0, batch_size=8)
    layer, out_proj = ekfac.layers[0], ekfac.layers[1]
    assert isinstance(layer, AttentionProjections) and out_proj.name == "attn.out_proj"
    D = torch.cat([layer.sample_gradients(captures[0]).flatten(0, 1)  # (N·K, 3E, C)
                   for captures in kronecker_passes(model, model.params, ekfac.layers, X, T, 8)])
    tokens = module.tokens(X)
    C = layer.n_cols
    index = _layout_index(layer, model.n_params)
    for j in range(3):  # q, k, v
        order = index[j * E:(j + 1) * E].flatten()
        G = dense[np.ix_(order, order)]
        rows = D[:, j * E:(j + 1) * E].flatten(1)
        assert_allclose(rows.T @ rows / X.shape[0] + torch.diag(model.weight_decay[order]), G,
                        rtol=CLOSED_FORM_RTOL, atol=1e-12 * float(G.abs().max()))
        Q = torch.kron(ekfac.bases[0].Q_S[j], ekfac.bases[0].Q_A[j])
        diagonal = torch.diagonal(Q.T @ G @ Q).reshape(E, C)
        got = ekfac.bases[0].eigenvalues[j * E:(j + 1) * E]
        assert_allclose(got, diagonal, rtol=1e-12, atol=1e-12 * float(diagonal.abs().max()))
        a = tokens[j].reshape(-1, E)
        if C > E:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        Q_A = ekfac.bases[0].Q_A[j]
        rotated = Q_A.T @ (a.T @ a / X.shape[0]) @ Q_A
        off = rotated - torch.diag(torch.diagonal(rotated))
        assert float(off.abs().max()) <= 1e-12 * float(rotated.abs().max())
    order = _layout_index(out_proj, model.n_params).flatten()
    G = dense[np.ix_(order, order)]
    Q = torch.kron(ekfac.bases[1].Q_S, ekfac.bases[1].Q_A)
    diagonal = torch.diagonal(Q.T @ G @ Q).reshape(ekfac.bases[1].eigenvalues.shape)
    assert_allclose(ekfac.bases[1].eigenvalues, diagonal, rtol=1e-12,
                    atol=1e-12 * float(diagonal.abs().max()))



@pytest.mark.parametrize("case", ["self", "cross_masked", "causal", "zero_attn_frozen_bias_kv"])
def test_the_capture_pass_reproduces_the_modules_outputs(case):
    """Under the capture hooks the attention runs decomposed (projections, attention with
    identity projections, ``out_proj`` called as a module): the same outputs to
    rounding, and the records hold the projections' inputs, batch first."""
    module = Attend(**GENERAL[case])
    model = _model(module, "CrossEntropyLoss")
    X = _inputs(6, module.width)
    plain = model.forward(model.params, X)
    layers = kronecker_layers(model)
    with _capture(model.module, layers) as (records, rerouted), torch.enable_grad():
        decomposed = model.forward(model.params, X)
    assert rerouted
    assert_allclose(decomposed.detach(), plain.detach(), rtol=1e-13, atol=1e-14)
    (inputs, outputs), = records["attn"]
    for got, expected in zip(inputs, module.tokens(X)):
        assert_allclose(got, expected, rtol=0, atol=0)
    assert [tuple(o.shape) for o in outputs] == [tuple(t.shape[:2]) + (E,) for t in inputs]
    (context, _), = records["attn.out_proj"]
    assert tuple(context.shape) == (6, L, E)
    _check_rerouted(model, model.params, X, decomposed.detach())  # passes: same outputs
    with pytest.raises(UnsupportedLayerError, match=r"does not reproduce.*difference 1.0e-06"):
        _check_rerouted(model, model.params, X, decomposed.detach() + 1e-6)


# --------------------------------------------------------------------- estimators
class Encoder(nn.Module):
    """Token ids → Embedding → two pre-norm ``nn.TransformerEncoderLayer`` (GELU,
    eval-mode dropout, token 0 masked as padding) → mean over tokens → Linear: every
    parameter in a factored layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1,
                                           activation="gelu", norm_first=True,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(8, 3)
        self.double()

    def forward(self, x):
        tokens = x.long()
        padding = tokens == 0
        padding[:, 0] = False  # never a sequence of padding only
        h = self.encoder(self.embed(tokens), src_key_padding_mask=padding)
        return self.out(h.mean(dim=1))


def _pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def encoder_net():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 12, size=(60, 5)).astype(np.float64)
    y = (X[:, 0] + X[:, 1]).astype(np.int64) % 3
    torch.manual_seed(0)
    net = NeuralNetClassifier(Encoder, criterion=nn.CrossEntropyLoss, max_epochs=15, lr=0.1,
                              batch_size=20, optimizer__weight_decay=1e-3, train_split=None,
                              verbose=0).fit(X, y)
    return net, X, y


@pytest.fixture(scope="module")
def zoo_transformer():
    """The zoo's transformer, float64, its positional embedding (a bare
    ``nn.Parameter``, in no layer) frozen after training."""
    X, y = load_zoo_data("transformer", n_samples=80, dtype="float64")
    torch.manual_seed(0)  # the batch order
    net = make_zoo_net("transformer", max_epochs=10, random_state=0, dtype="float64").fit(X, y)
    net.module_.position.requires_grad_(False)
    return net, X, y


SELF_INFLUENCE_ROWS = 20
#: Pearson correlation of EK-FAC's / K-FAC's self-influence with the exact one on 20
#: training rows, damping 0.1 (measured: two-layer encoder 0.895 / 0.800, zoo
#: transformer 0.947 / 0.881).
MIN_CORRELATION = {"ekfac": 0.85, "kfac": 0.75}


@pytest.mark.parametrize("which", ["encoder", "zoo"])
def test_ekfac_and_kfac_run_on_transformers_and_agree_with_exact(which, request):
    fixture = {"encoder": "encoder_net", "zoo": "zoo_transformer"}[which]
    net, X, y = request.getfixturevalue(fixture)
    rows = slice(0, SELF_INFLUENCE_ROWS)
    kwargs = dict(damping=0.1, batch_size=40)
    exact = InfluenceEstimator(FrozenEstimator(net), solver="exact", **kwargs).fit(X, y)
    reference = exact.score_samples(X[rows], y[rows])
    correlations = {}
    for solver in ("ekfac", "kfac"):
        est = InfluenceEstimator(FrozenEstimator(net), solver=solver, **kwargs).fit(X, y)
        scores = est.score_samples(X[rows], y[rows])
        assert np.all(np.isfinite(scores)) and est.diagnostics_["approximate"]
        correlations[solver] = _pearson(scores, reference)
    print(f"\n{which}: self-influence Pearson with exact on {SELF_INFLUENCE_ROWS} rows: "
          f"EK-FAC {correlations['ekfac']:.3f}, K-FAC {correlations['kfac']:.3f}")
    assert all(correlations[s] >= MIN_CORRELATION[s] for s in correlations), correlations
    assert correlations["ekfac"] > correlations["kfac"]


def test_the_kernel_form_of_a_transformer_equals_exact(encoder_net):
    """The kernel form reads the attention projections' per-sample gradients: it
    inverts the same damped Gauss–Newton matrix exactly."""
    net, X, y = encoder_net
    kwargs = dict(damping=0.1)
    exact = InfluenceEstimator(FrozenEstimator(net), solver="exact", **kwargs).fit(X, y)
    kernel = InfluenceEstimator(FrozenEstimator(net), solver="kernel", **kwargs).fit(X, y)
    expected = exact.loss_change(X[:6], y[:6], X[6:11], y[6:11])
    assert_allclose(kernel.loss_change(X[:6], y[:6], X[6:11], y[6:11]), expected,
                    rtol=CLOSED_FORM_RTOL, atol=1e-12 * np.abs(expected).max())
    assert kernel.diagnostics_["solver"] == "kernel"


# ----------------------------------------------------------------------- refusals
def _refused(case):
    if case == "bias_kv":
        return Attend("cross", add_bias_kv=True, train_bias_kv=True)
    if case == "kdim":
        return Attend("cross", kdim=3, vdim=2)
    if case == "frozen_weight":
        module = Attend()
        module.attn.in_proj_weight.requires_grad_(False)
        return module
    if case == "subclass":
        module = Attend()

        class Custom(nn.MultiheadAttention):
            def forward(self, *args, **kwargs):
                return super().forward(*args, **kwargs)

        module.attn.__class__ = Custom
        return module
    raise ValueError(case)


REFUSALS = {
    "bias_kv": r"'attn' is an nn.MultiheadAttention with add_bias_kv=True.*Freeze bias_k and "
               r"bias_v.*solver='cg' or 'arnoldi'",
    "kdim": r"'attn' is an nn.MultiheadAttention with kdim=3, vdim=2 \(embed_dim=4\).*"
            r"\['q_proj_weight', 'k_proj_weight', 'v_proj_weight'\].*out_proj is factored.*"
            r"solver='cg' or 'arnoldi'",
    "frozen_weight": r"'attn' is an nn.MultiheadAttention with a frozen in_proj_weight but a "
                     r"trainable in_proj_bias.*solver='cg' or 'arnoldi'",
    "subclass": r"layers only.*'attn.in_proj_weight'.*attn \(Custom\).*solver='cg'",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unhandled_attention_is_refused_naming_the_module_and_what_works(case):
    model = _model(_refused(case), "CrossEntropyLoss")
    with pytest.raises(UnsupportedLayerError, match=REFUSALS[case]):
        kronecker_layers(model)


def test_dropout_in_training_mode_and_unbatched_inputs_are_refused():
    module = Attend(dropout=0.2)
    model = _model(module, "CrossEntropyLoss")
    model.module.train()
    with pytest.raises(UnsupportedLayerError, match=r"dropout=0.2 in training mode.*eval mode"):
        kronecker_layers(model)
    model.module.eval()
    assert len(kronecker_layers(model)) == 3  # eval mode: dropout is off

    class Unbatched(nn.Module):  # one sequence for the whole batch: samples are positions
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, HEADS)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = _model(Unbatched(), "MSELoss")
    X = _inputs(5, E)
    with pytest.raises(UnsupportedLayerError, match=r"'attn'.*unbatched inputs of shape \(\d, 4\)"):
        KroneckerFactors(model, X, _targets(model, X), damping=0.1)
