"""Bad input gets a clear error before any expensive work: one table across the API."""

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetRegressor
from skorch.callbacks import Callback

from nets import MLP, make_net, toy_data
from sklinfluence import Decomposer, InfluenceEstimator, LOOEstimator, PBRFEstimator

X_REG, Y_REG = toy_data("MSELoss", n=30)
X_CLS, Y_CLS = toy_data("CrossEntropyLoss", n=30)


def reg(**kw):
    return make_net("MSELoss", 4, max_epochs=2, **kw)


def cls(**kw):
    return make_net("CrossEntropyLoss", 4, max_epochs=2, **kw)


def spoiled(values, at, value):
    """A float copy of ``values`` with ``value`` (NaN, inf) at position ``at``."""
    values = values.astype(float).copy()
    values[at] = value
    return values


def nan_x(X):
    return spoiled(X, (0, 0), np.nan)


def inf_y(y):
    return spoiled(y, 1, np.inf)


def inf_x(X):
    return spoiled(X, (2, 1), np.inf)


def nan_y(y):
    return spoiled(y, 3, np.nan)


#: One entry per training epoch begun by a :func:`counted` net.
EPOCHS = []


class CountEpochs(Callback):
    def on_epoch_begin(self, net, **kwargs):
        EPOCHS.append(1)


def counted(net):
    """``net`` recording its epochs in ``EPOCHS``: a case with it must refuse untrained."""
    return net.set_params(callbacks=[("count_epochs", CountEpochs())])


class TupleMLP(MLP):
    """Returns ``(outputs, hidden)``, which the stock criterion cannot take."""

    def forward(self, x):
        return super().forward(x), x


def tuple_net():
    return NeuralNetRegressor(TupleMLP, max_epochs=2, lr=0.1, train_split=None, verbose=0,
                              module__n_in=4, module__n_out=3)


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
    # nets, criteria and targets that cannot work together: refused before any epoch
    ("classifier-with-mse-loss", lambda: InfluenceEstimator(counted(cls(
        criterion=torch.nn.MSELoss))).fit(X_CLS, Y_CLS), ValueError,
     "outputs 3 values per row but y holds 1.*criterion=torch.nn.CrossEntropyLoss"),
    ("two-target-columns-one-output", lambda: InfluenceEstimator(counted(reg(
        module__n_out=1))).fit(X_REG, Y_REG[:, :2]), ValueError,
     r"y has 2 column\(s\) but the module outputs 1 value\(s\).*Make the module output 2"),
    ("more-classes-than-outputs", lambda: InfluenceEstimator(counted(cls(
        module__n_out=2))).fit(X_CLS, Y_CLS), ValueError,
     "y has 3 classes but the module gives 2 values per row.*output 3 values"),
    ("binary-net-with-three-classes", lambda: InfluenceEstimator(counted(make_net(
        "BCEWithLogitsLoss", 4, max_epochs=2))).fit(X_CLS, Y_CLS), ValueError,
     "binary classifier needs at most 2 classes.*Use NeuralNetClassifier"),
    ("binary-net-with-two-outputs", lambda: InfluenceEstimator(counted(make_net(
        "BCEWithLogitsLoss", 4, max_epochs=2, module__n_out=2))).fit(X_CLS, Y_CLS == 0),
     ValueError, "needs one logit per row.*outputs 2 values per row"),
    ("single-class", lambda: InfluenceEstimator(counted(cls())).fit(
        X_CLS, np.zeros(len(X_CLS), dtype=int)), ValueError, "single class.*at least 2"),
    ("module-built-for-other-width", lambda: InfluenceEstimator(counted(reg())).fit(
        np.c_[X_REG, X_REG[:, :1]], Y_REG), ValueError,
     r"module failed on the first rows of X.*input size matches X's rows of shape \(5,\)"),
    ("module-returns-a-tuple", lambda: InfluenceEstimator(counted(tuple_net())).fit(
        X_REG, Y_REG), ValueError, "returns a tuple.*return only the outputs"),
    ("criterion-reduction-sum", lambda: InfluenceEstimator(counted(reg(
        criterion__reduction="sum"))).fit(X_REG, Y_REG), ValueError,
     r"reduction='sum'\) is not supported.*Use the default reduction='mean'"),
    ("criterion-class-weights", lambda: InfluenceEstimator(counted(cls(
        criterion__weight=torch.ones(3, dtype=torch.float64)))).fit(X_CLS, Y_CLS),
     ValueError, "`weight` tensor is not supported.*Remove `criterion__weight`"),
    ("nll-on-logits", lambda: InfluenceEstimator(counted(make_net(
        "NLLLoss", 4, max_epochs=2, module__softmax=False))).fit(X_CLS, Y_CLS), ValueError,
     "expects the module to output probabilities.*outputs negative values.*end the "
     "module with Softmax.*CrossEntropyLoss"),
    ("net-is-a-class", lambda: InfluenceEstimator(NeuralNetRegressor).fit(X_REG, Y_REG),
     TypeError, r"NeuralNetRegressor is a class: pass an instance, e.g. NeuralNetRegressor\("),
    ("net-is-a-pipeline", lambda: InfluenceEstimator(make_pipeline(StandardScaler(), Ridge()))
     .fit(X_REG, Y_REG), TypeError, "got Pipeline.*at the end of the pipeline"),
    # values and types of X and y
    ("fit-complex-X", lambda: InfluenceEstimator(reg()).fit(X_REG + 1j, Y_REG), ValueError,
     r"Complex data not supported: X must be real numbers.*X\.real"),
    ("fit-object-X-with-None", lambda: InfluenceEstimator(reg()).fit(
        np.where(np.arange(4) == 1, None, X_REG.astype(object)), Y_REG), ValueError,
     "contains NaN"),
    ("fit-inf-X", lambda: InfluenceEstimator(reg()).fit(inf_x(X_REG), Y_REG), ValueError,
     "infinity"),
    ("fit-nan-y", lambda: InfluenceEstimator(reg()).fit(X_REG, nan_y(Y_REG)), ValueError,
     "y contains NaN"),
    ("fit-y-None", lambda: InfluenceEstimator(reg()).fit(X_REG, None), ValueError,
     "requires y to be passed"),
    ("fit-sparse-X", lambda: InfluenceEstimator(reg()).fit(csr_matrix(X_REG), Y_REG),
     TypeError, r"dense data is required.*toarray"),
    ("fit-3d-X-to-ridge", lambda: InfluenceEstimator(Ridge()).fit(
        X_REG.reshape(len(X_REG), 2, 2), Y_REG), ValueError, "dim 3"),
    ("nan-damping", lambda: InfluenceEstimator(reg(), damping=np.nan).fit(X_REG, Y_REG),
     ValueError, "'damping' parameter"),
    ("epsilon-minus-one", lambda: InfluenceEstimator(reg(), epsilon=-1.0).fit(X_REG, Y_REG),
     ValueError, "'epsilon' parameter"),
    # scoring a fitted estimator
    ("groups-of-wrong-length", lambda: fitted("reg").score_samples(X_REG[:4], groups=[0, 1]),
     ValueError, "groups must be 1-D with one label per row: 4 rows"),
    ("groups-with-nan", lambda: fitted("reg").score_samples(
        X_REG[:4], groups=[0.0, np.nan, 1.0, 1.0]), ValueError,
     r"no label \(None or NaN\) for 1 of its 4 rows.*give every row a group label"),
    ("groups-of-mixed-types", lambda: fitted("reg").score_samples(
        X_REG[:4], groups=np.array([0, "a", 1, "b"], dtype=object)), ValueError,
     "one kind that sorts"),
    ("X-eval-with-wrong-n-features", lambda: fitted("reg").loss_change(
        X_REG[:2], None, X_REG[:3, :3], Y_REG[:3]), ValueError, "has 3 features.*expecting 4"),
    ("y-eval-of-wrong-length", lambda: fitted("reg").loss_change(
        X_REG[:2], None, X_REG[:3], Y_REG[:2]), ValueError,
     "X_eval and its targets have different lengths"),
    ("images-to-a-flat-net", lambda: fitted("reg").score_samples(
        X_REG[:2].reshape(2, 1, 2, 2), Y_REG[:2]), ValueError,
     r"rows of shape \(1, 2, 2\), but the net was fitted on rows of shape \(4,\)"),
    ("empty-groups", lambda: fitted("reg").score_samples(X_REG[:0], groups=[]), ValueError,
     "0 sample"),
    ("score-text-X", lambda: fitted("reg").score_samples(np.full((2, 4), "a")), ValueError,
     "X must be numeric.*OneHotEncoder"),
    ("not-fitted-pbrf", lambda: PBRFEstimator(reg()).score_samples(X_REG), NotFittedError,
     "not fitted"),
]


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(call, error, fragment):
    EPOCHS.clear()
    with pytest.raises(error, match=fragment):
        call()
    assert not EPOCHS, f"{len(EPOCHS)} training epochs ran before the input was refused"


def test_counted_nets_count_their_epochs():
    """The control for the check above: a counted net that trains is seen training."""
    EPOCHS.clear()
    InfluenceEstimator(counted(reg()), random_state=0).fit(X_REG, Y_REG)
    assert len(EPOCHS) == 2
