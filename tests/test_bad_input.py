"""Bad input gets a clear error before any expensive work: one table across the API."""

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, Ridge

from nets import make_net, toy_data
from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator

X_REG, Y_REG = toy_data("MSELoss", n=30)
X_CLS, Y_CLS = toy_data("CrossEntropyLoss", n=30)


def reg(**kw):
    return make_net("MSELoss", 4, max_epochs=2, **kw)


def cls(**kw):
    return make_net("CrossEntropyLoss", 4, max_epochs=2, **kw)


def nan_x(X):
    X = X.copy()
    X[0, 0] = np.nan
    return X


def inf_y(y):
    y = y.astype(float).copy()
    y[1] = np.inf
    return y


FITTED = {}


def fitted(kind):
    if kind not in FITTED:
        FITTED[kind] = (InfluenceEstimator(reg(), random_state=0).fit(X_REG, Y_REG)
                        if kind == "reg" else
                        InfluenceEstimator(cls(), random_state=0).fit(X_CLS, Y_CLS))
    return FITTED[kind]


CASES = [
    # (id, call, exception, message fragment)
    ("fit-nan-X", lambda: InfluenceEstimator(reg()).fit(nan_x(X_REG), Y_REG), ValueError, "NaN"),
    ("fit-inf-y", lambda: InfluenceEstimator(reg()).fit(X_REG, inf_y(Y_REG)), ValueError, "inf"),
    ("fit-short-y", lambda: InfluenceEstimator(reg()).fit(X_REG, Y_REG[:-2]), ValueError,
     "inconsistent numbers of samples"),
    ("fit-1d-X", lambda: InfluenceEstimator(reg()).fit(X_REG[:, 0], Y_REG), ValueError,
     "Expected 2D array"),
    ("fit-empty", lambda: InfluenceEstimator(reg()).fit(X_REG[:0], Y_REG[:0]), ValueError,
     "0 sample"),
    ("fit-one-sample", lambda: InfluenceEstimator(reg()).fit(X_REG[:1], Y_REG[:1]), ValueError,
     "at least 2 samples"),
    ("fit-strings-X", lambda: InfluenceEstimator(reg()).fit(np.full((5, 4), "a"), Y_REG[:5]),
     ValueError, "X must be numeric: could not convert values like 'a'.*OneHotEncoder"),
    ("fit-labels-to-regressor", lambda: InfluenceEstimator(reg()).fit(
        X_REG[:6], np.array(list("abcabc"))), ValueError, "needs numeric targets.*classifier"),
    ("fit-continuous-to-classifier", lambda: InfluenceEstimator(cls()).fit(
        X_CLS, np.linspace(0, 1, len(X_CLS))), ValueError,
     "Unknown label type: continuous.*use a regressor"),
    ("fit-continuous-to-logistic", lambda: LOOEstimator(LogisticRegression()).fit(
        X_CLS, np.linspace(0, 1, len(X_CLS))), ValueError,
     "Unknown label type: continuous.*use a regressor"),
    ("fit-2d-labels", lambda: InfluenceEstimator(cls()).fit(X_CLS, np.c_[Y_CLS, Y_CLS]),
     ValueError, "1d array|1-D"),
    ("negative-damping", lambda: InfluenceEstimator(reg(), damping=-1).fit(X_REG, Y_REG),
     ValueError, "'damping' parameter"),
    ("unknown-solver", lambda: InfluenceEstimator(reg(), solver="qr").fit(X_REG, Y_REG),
     ValueError, "'solver' parameter"),
    ("unknown-curvature", lambda: InfluenceEstimator(reg(), curvature="fisher").fit(X_REG, Y_REG),
     ValueError, "'curvature' parameter"),
    ("epsilon-zero", lambda: InfluenceEstimator(reg(), epsilon=0.0).fit(X_REG, Y_REG),
     ValueError, "epsilon must be non-zero"),
    ("epsilon-too-big", lambda: InfluenceEstimator(reg(), epsilon=1.5).fit(X_REG, Y_REG),
     ValueError, "'epsilon' parameter"),
    ("negative-tol", lambda: InfluenceEstimator(reg(), tol=-1.0).fit(X_REG, Y_REG), ValueError,
     "'tol' parameter"),
    ("bad-batch-size", lambda: InfluenceEstimator(reg(), batch_size=0).fit(X_REG, Y_REG),
     ValueError, "'batch_size' parameter"),
    ("bad-weight-decay", lambda: InfluenceEstimator(reg(), weight_decay="max").fit(X_REG, Y_REG),
     ValueError, "'weight_decay' parameter"),
    ("bad-removal-batch", lambda: LOOEstimator(reg(), removal_batch_size=0).fit(X_REG, Y_REG),
     ValueError, "'removal_batch_size' parameter"),
    ("bad-memory", lambda: LOOEstimator(reg(), memory=3).fit(X_REG, Y_REG), ValueError,
     "memory must be None, a directory path or a joblib.Memory"),
    ("bad-metric", lambda: Decomposer(reg(), metric="l1").fit(X_REG, Y_REG), ValueError,
     "'metric' parameter"),
    ("not-a-net", lambda: InfluenceEstimator(torch.nn.Linear(4, 1)).fit(X_REG, Y_REG), TypeError,
     "skorch NeuralNet"),
    ("unsupported-criterion", lambda: InfluenceEstimator(reg(criterion=torch.nn.HuberLoss)).fit(
        X_REG, Y_REG), ValueError, "supported criteria are"),
    ("unfitted-frozen", lambda: InfluenceEstimator(FrozenEstimator(reg())).fit(X_REG, Y_REG),
     ValueError, "needs an already fitted net"),
    ("unfitted-frozen-ridge", lambda: InfluenceEstimator(FrozenEstimator(Ridge())).fit(
        X_REG, Y_REG), ValueError, "needs a fitted model"),
    ("not-fitted", lambda: InfluenceEstimator(reg()).score_samples(X_REG), NotFittedError,
     "not fitted"),
    ("not-fitted-decomposer", lambda: Decomposer(reg()).transform(X_REG), NotFittedError,
     "not fitted"),
    ("wrong-n-features", lambda: fitted("reg").score_samples(X_REG[:, :3]), ValueError,
     "features"),
    ("unknown-row-without-y", lambda: fitted("reg").score_samples(X_REG[:2] + 9.0), ValueError,
     "not training rows"),
    ("y-length-mismatch", lambda: fitted("reg").score_samples(X_REG[:3], Y_REG[:2]), ValueError,
     "different lengths"),
    ("unseen-class", lambda: fitted("cls").score_samples(X_CLS[:2], [0, 7]), ValueError,
     "labels not seen in fit"),
    ("wrong-target-width", lambda: fitted("reg").score_samples(X_REG[:2], np.ones((2, 5))),
     ValueError, "targets for X have shape"),
    ("loss-change-without-eval", lambda: fitted("reg").loss_change(X_REG[:2]), ValueError,
     "needs X_eval"),
    ("nan-in-eval", lambda: fitted("reg").loss_change(X_REG[:2], None, nan_x(X_REG[:2]),
                                                     Y_REG[:2]), ValueError, "NaN"),
    ("bad-score-reference", lambda: fitted("reg").score(X_REG[:4], reference="oracle"),
     ValueError, "reference must be one of"),
    ("bad-score-metric", lambda: fitted("reg").score(X_REG[:4], metric="r2"), ValueError,
     "metric must be one of"),
    ("solver-params-not-a-dict", lambda: InfluenceEstimator(reg(), solver_params=[1]).fit(
        X_REG, Y_REG), ValueError, "'solver_params' parameter"),
    ("solver-param-of-another-solver", lambda: InfluenceEstimator(
        reg(), solver="exact", solver_params={"rank": 5}).fit(X_REG, Y_REG), ValueError,
     r"\['rank'\] are not options of solver='exact'"),
    ("unknown-preconditioner", lambda: InfluenceEstimator(
        reg(), solver="cg", solver_params={"preconditioner": "ilu"}).fit(X_REG, Y_REG),
     ValueError, r"preconditioner'\] must be one of"),
    ("arnoldi-rank-above-P", lambda: InfluenceEstimator(
        reg(), solver="arnoldi", solver_params={"rank": 10_000}).fit(X_REG, Y_REG), ValueError,
     r"solver_params\['rank'\] must be between 1 and the number of parameters"),
    ("lissa-negative-scale", lambda: InfluenceEstimator(
        reg(), solver="lissa", solver_params={"scale": -2.0}).fit(X_REG, Y_REG), ValueError,
     "scale must be a positive number"),
    ("ekfac-with-hessian", lambda: InfluenceEstimator(
        reg(), solver="ekfac", curvature="hessian").fit(X_REG, Y_REG), ValueError,
     "approximates the Gauss–Newton matrix"),
    ("arnoldi-without-damping", lambda: InfluenceEstimator(
        reg(), solver="arnoldi", damping=0.0, solver_params={"rank": 3}).fit(X_REG, Y_REG),
     ValueError, "needs damping > 0"),
]


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call()
