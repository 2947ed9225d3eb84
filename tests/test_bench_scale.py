"""The pure helpers of ``benchmarks/bench_scale.py``: data, architectures, conventions.

No peer library and no subprocess: the benchmark itself compares sklinfluence with
Kronfluence; these tests check what both sides are given and how the peer's
scores are converted.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shifted_digits_shapes_dtypes_and_determinism(bench):
    X, y, Xq, yq = bench.shifted_digits(500, n_query=100)
    assert X.shape == (500, 64) and X.dtype == np.float32
    assert Xq.shape == (100, 64) and Xq.dtype == np.float32
    assert y.shape == (500,) and yq.shape == (100,)
    assert y.dtype == np.int64 and yq.dtype == np.int64
    assert set(np.unique(y)) <= set(range(10))
    again = bench.shifted_digits(500, n_query=100)
    for a, b in zip((X, y, Xq, yq), again):
        np.testing.assert_array_equal(a, b)
    X64 = bench.shifted_digits(500, n_query=100, dtype=np.float64)[0]
    assert X64.dtype == np.float64
    np.testing.assert_allclose(X64, X, rtol=1e-6, atol=1e-6)


def test_shifted_digits_beyond_thirteen_copies(bench):
    """50,000 rows need 30 copies of the 1,697 non-held-out digits."""
    X, y, _, _ = bench.shifted_digits(50_000)
    assert X.shape == (50_000, 64) and y.shape == (50_000,)
    assert len(np.unique(X, axis=0)) == 50_000  # noise makes every copy distinct


def test_shifted_digits_queries_are_shifted_noised_held_out_digits(bench):
    """Query i is held-out digit i (the seed's first permutation) rolled as copy i % 9,
    plus N(0, 0.5) noise on the 0-16 scale."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    held = np.random.default_rng(0).permutation(len(images))[:100]
    _, _, Xq, yq = bench.shifted_digits(1_000, n_query=100)
    np.testing.assert_array_equal(yq, labels[held])
    clean = np.stack([np.roll(images[j].reshape(8, 8), (i % 3 - 1, i // 3 % 3 - 1), axis=(0, 1))
                      for i, j in enumerate(held)]).reshape(100, 64)
    noise = Xq.astype(np.float64) * 16 - clean
    assert abs(noise.mean()) < 0.03
    assert abs(noise.std() - 0.5) < 0.02  # 6,400 draws: standard error of the std 0.004


@pytest.mark.parametrize("bad", [dict(n_train=0), dict(n_train=10, n_query=0),
                                 dict(n_train=10, n_query=1797)])
def test_shifted_digits_rejects_bad_sizes(bench, bad):
    with pytest.raises(ValueError, match="n_query"):
        bench.shifted_digits(**bad)


@pytest.mark.parametrize("arch, expected", [("digits_cnn", 71_754), ("wide_cnn", 372_234),
                                            ("mlp1m", 1_126_410), ("linear", 11)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_architectures_have_the_stated_parameter_counts(bench, arch, expected, dtype):
    module = bench.build_module(arch, dtype)
    assert bench.n_params(module) == expected == bench.N_PARAMS[arch]
    assert all(p.dtype == getattr(torch, dtype) for p in module.parameters())
    width = 10 if arch == "linear" else 64
    assert module(torch.zeros(3, width, dtype=getattr(torch, dtype))).shape == \
        (3, 1 if arch == "linear" else 10)


def test_unknown_architecture(bench):
    with pytest.raises(ValueError, match="unknown architecture"):
        bench.build_module("resnet", "float32")


def test_kronfluence_scores_convert_to_our_convention(bench):
    """Kronfluence's (query, train) scores without 1/N become our (train, query) M."""
    scores = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)  # 2 queries, N=3
    M = bench.from_kronfluence_pairwise(scores, 3)
    assert M.dtype == np.float64
    np.testing.assert_array_equal(M, np.array([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]) / 3)
    np.testing.assert_array_equal(bench.from_kronfluence_self(np.array([3.0, 6.0]), 2),
                                  [1.5, 3.0])
    with pytest.raises(ValueError, match="shape"):
        bench.from_kronfluence_pairwise(scores.T, 3)
    with pytest.raises(ValueError, match="shape"):
        bench.from_kronfluence_self(np.ones(3), 2)


def test_ridge_check_closed_form(bench):
    """The check task's reference: θ minimises the ridge objective, and its matrix and
    self-influence equal (1/N) g_eᵀ (H + (μ + λ) I)⁻¹ g_m from torch.func gradients
    and Hessian of the same objective."""
    d = bench.ridge_check_data()
    X, y = torch.from_numpy(d["X_train"]), torch.from_numpy(d["y_train"][:, 0])
    Xq, yq = torch.from_numpy(d["X_query"]), torch.from_numpy(d["y_query"][:, 0])
    theta = torch.from_numpy(np.concatenate([d["params"][0][0], d["params"][1]]))
    mu, lam, n = bench.WEIGHT_DECAY, bench.DAMPING, len(X)

    def loss(t, x, target):
        return (x @ t[:10] + t[10] - target) ** 2

    def objective(t):
        return loss(t, X, y).mean() + 0.5 * mu * (t ** 2).sum()

    assert torch.func.grad(objective)(theta).abs().max() < 1e-12
    H = torch.func.hessian(lambda t: loss(t, X, y).mean())(theta)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    g, gq = per_sample(theta, X, y), per_sample(theta, Xq, yq)
    damped = H + (mu + lam) * torch.eye(11, dtype=torch.float64)
    solved = torch.linalg.solve(damped, gq.T)
    assert bench.max_relative_difference(d["matrix"], (g @ solved / n).numpy()) < 1e-12
    self_influence = (g * torch.linalg.solve(damped, g.T).T).sum(1) / n
    assert bench.max_relative_difference(d["self"], self_influence.numpy()) < 1e-12


def test_agreement_helpers(bench):
    a = np.array([[1.0, 2.0], [3.0, 5.0]])
    assert bench.pearson(a, 2 * a + 1) == pytest.approx(1.0, abs=1e-15)
    assert bench.pearson(a, -a) == pytest.approx(-1.0, abs=1e-15)
    assert bench.max_relative_difference(a + 0.5, a) == pytest.approx(0.1)
