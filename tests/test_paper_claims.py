"""The paper's claims, pinned as the small study measures them.

``make_scale("small")``, per-architecture section only: four neural networks
(``mlp``, ``mlp_diabetes``, ``lenet``, ``autoencoder``) and the logistic
regression, 100 training rows, 8 removed rows × 2 seeds, 10 epochs, damping
1e-2, EK-FAC influence. The settings are the study's; they were not tuned to
make anything hold, and these tests assert what is measured — including
where a claim of the paper does *not* hold here, which the report says too.

What is measured (mean over the 2 seeds; Spearman over the 8 removed rows):

==============  ================  ================  =====================================
architecture    IF–PBRF Spearman  IF–LOO Spearman   first three terms ÷ last two
==============  ================  ================  =====================================
mlp             +0.80             +0.48             14× (proximity gap < solver error)
mlp_diabetes    +0.98             +0.11             8× (proximity gap < solver error)
lenet           +0.68             +0.32             22× (proximity gap < solver error)
autoencoder     +0.98             −0.29             36×
==============  ================  ================  =====================================

- Influence agrees better with the PBRF than with cold-start retraining on
  every network: the paper's thesis holds.
- The IF–PBRF correlation is inside or above the paper's range (0.52–0.99)
  everywhere.
- The IF–LOO correlation is outside the paper's range (−0.08 to 0.12) on
  three of four networks: these small nets, trained with weight decay, are
  closer to convex than the paper's, and 8 rows make a noisy correlation
  (standard deviation about 0.38 for unrelated rankings). ``mlp_diabetes``'s
  +0.11 is at the range's edge and is not pinned.
- The first three terms dominate the last two by an order of magnitude on
  three of four networks, but the proximity gap is *below* the EK-FAC solver
  error on three: "dominate" holds for the sum, not term by term.
"""

import pytest

from sklinfluence.study_report import assess_claims, compute_study, make_scale
from sklinfluence.study_report.html import render_report

#: Per claim, per network: "holds", "partly" or "fails", as measured.
MEASURED = {
    "pbrf_over_loo": {"mlp": "holds", "mlp_diabetes": "holds", "lenet": "holds",
                      "autoencoder": "holds"},
    "if_pbrf": {"mlp": "holds", "mlp_diabetes": "holds", "lenet": "holds",
                "autoencoder": "holds"},
    "if_loo": {"mlp": "fails", "lenet": "fails", "autoencoder": "fails"},
    "terms": {"mlp": "partly", "mlp_diabetes": "fails", "lenet": "partly",
              "autoencoder": "holds"},
}
VERDICTS = {"pbrf_over_loo": "reproduced", "if_pbrf": "reproduced", "if_loo": "partly",
            "terms": "partly", "detection": "not measured"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    results = compute_study(make_scale("small"), tmp_path_factory.mktemp("cache"),
                            sections=("architectures",), verbose=0)
    results.claims = assess_claims(results)
    return results


def _claim(results, key):
    return next(c for c in results.claims if c.key == key)


def test_the_study_judges_the_neural_networks_not_the_linear_model(small):
    assert list(small.architectures) == ["logistic", "mlp", "mlp_diabetes", "lenet",
                                         "autoencoder"]
    for claim in small.claims:
        assert "logistic" not in claim.per_entry


@pytest.mark.parametrize("key", list(MEASURED))
def test_each_claim_holds_where_measured_and_only_there(small, key):
    statuses = {entry: status for entry, (_, status) in _claim(small, key).per_entry.items()}
    assert {e: statuses[e] for e in MEASURED[key]} == MEASURED[key]
    assert _claim(small, key).verdict == VERDICTS[key]


def test_influence_agrees_better_with_the_pbrf_than_with_retraining(small):
    """The paper's thesis, on each network: IF–PBRF above IF–LOO (means over seeds)."""
    for entry, curve in small.architectures.items():
        if entry == "logistic":
            continue
        pbrf = curve.agreement["self"]["spearman"]["pbrf"].mean()
        loo = curve.agreement["self"]["spearman"]["loo"].mean()
        assert pbrf > loo, entry


def test_the_first_three_terms_dominate_the_last_two_in_sum(small):
    """By a factor 10 on three networks, 8 on ``mlp_diabetes``; never term by term
    where the proximity gap is small (see the module)."""
    for entry, curve in small.architectures.items():
        if entry == "logistic":
            continue
        means = curve.terms[0].mean(axis=(0, 1))
        ratio = means[:3].sum() / means[3:].sum()
        assert ratio > (5 if entry == "mlp_diabetes" else 10), (entry, ratio)
        assert means[0] > means[3:].max() and means[2] > means[3:].max(), entry


def test_the_report_says_where_a_claim_does_not_hold(small):
    page = render_report(small, small.claims, figures=[])
    assert '<span class="verdict partly">partly</span>' in page
    assert "✗ mlp_diabetes: 8× (proximity gap below solver error)" in page
    assert "~ lenet: 22× (proximity gap below solver error)" in page
    assert "✗ mlp: +0.48" in page  # IF–LOO outside the paper's range
