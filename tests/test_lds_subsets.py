"""The linear datamodeling score away from ``alpha = 0.5``: each subset keeps
``⌊αN⌋`` rows and its model is the recipe on those rows; ``bootstrap_std`` resamples
subsets, not evaluation points — on inputs built so that the two resamplings give
answers known in advance (one exactly zero, the other not)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from linear_problems import design, minimiser, recipe, theta_of, well_conditioned_data
from sklinfluence import LinearDatamodelingScore
from tolerances import RETRAIN_RTOL

MU, N, ALPHA, N_SUBSETS = 0.1, 31, 0.3, 12


@pytest.fixture(scope="module")
def lds():
    X, y = well_conditioned_data(n=N)
    # three copies of one evaluation point: its columns of measurements are identical
    X_eval, y_eval = np.repeat(X[:1] + 0.1, 3, axis=0), np.repeat(y[:1], 3)
    fitted = LinearDatamodelingScore(recipe(X, MU, max_epochs=200), n_subsets=N_SUBSETS,
                                     alpha=ALPHA, random_state=0).fit(X, y, X_eval, y_eval)
    return X, y, X_eval, y_eval, fitted


def test_each_subset_keeps_floor_alpha_n_rows_and_its_model_is_trained_on_them(lds):
    X, y, X_eval, y_eval, fitted = lds
    kept_rows = int(np.floor(ALPHA * N))  # 9 of 31 (the complement would keep 22)
    assert fitted.subsets_.shape == (N_SUBSETS, N) and fitted.subsets_.dtype == bool
    assert np.all(fitted.subsets_.sum(axis=1) == kept_rows)
    assert len({row.tobytes() for row in fitted.subsets_}) == N_SUBSETS
    theta_s = theta_of(fitted.net_)
    for j, kept in enumerate(fitted.subsets_):
        # the recipe on the kept rows minimises J − Σ_C L_m/N with μ|S|/N
        theta = minimiser(X[kept], y[kept], MU * kept_rows / N, extra=N)
        scale = np.abs(theta - theta_s).max()
        assert_allclose(fitted.param_changes_[j], theta - theta_s, rtol=RETRAIN_RTOL,
                        atol=1e-9 * scale)
        assert_allclose(fitted.measurements_[j], (design(X_eval) @ theta - y_eval) ** 2,
                        rtol=1e-7)


def _attributions_predicting(fitted, predictions):
    """Scores ``s`` whose additive predictions ``Q(θˢ) + Σ_{i∈C_j} s(i, z)`` are
    ``predictions`` (the removal matrix has full row rank: M ≤ N)."""
    removed = (~fitted.subsets_).astype(np.float64)
    scores = np.linalg.lstsq(removed, predictions - fitted.base_losses_, rcond=None)[0]
    assert_allclose(fitted.base_losses_ + removed @ scores, predictions, rtol=1e-12)
    return scores


def test_the_bootstrap_resamples_subsets_not_evaluation_points(lds):
    *_, fitted = lds
    m = fitted.measurements_[:, 0]
    assert np.all(fitted.measurements_ == m[:, None]) and np.unique(m).size == N_SUBSETS
    # predictions increasing, decreasing, increasing in m: per point +1, −1, +1 on
    # any resampling of the subsets, so the mean is 1/3 every time (spread 0), while
    # resampled evaluation points give means −1 … 1
    mixed = fitted.score_attributions(_attributions_predicting(
        fitted, np.stack([m, -m, m], axis=1)), n_bootstrap=200)
    assert_allclose(mixed.per_point, [1.0, -1.0, 1.0], rtol=1e-12)
    assert mixed.bootstrap_std < 1e-12
    # the same noisy prediction for the three copies: per point one value, so
    # resampled evaluation points would spread by 0; resampled subsets do not
    noise = np.random.default_rng(0).normal(size=N_SUBSETS)
    same = fitted.score_attributions(_attributions_predicting(
        fitted, np.repeat(fitted.base_losses_[0] + noise[:, None], 3, axis=1)), n_bootstrap=200)
    assert np.ptp(same.per_point) == 0.0
    assert same.bootstrap_std > 0.05
