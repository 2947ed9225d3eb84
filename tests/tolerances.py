"""Every numerical tolerance of the test suite, in one place.

float64 closed forms are checked to what the arithmetic allows: the dense
references and the library take different but backward-stable routes, so
agreement to ~1e-10 relative is expected; a looser bound would hide bugs.
"""

#: Library vs closed form or dense torch.func reference, float64.
CLOSED_FORM_RTOL = 1e-9
#: Absolute floor for entries that are exactly zero in theory, float64.
CLOSED_FORM_ATOL = 1e-12
#: CG run to tol=1e-12 against the exact solve, float64.
CG_VS_EXACT_RTOL = 1e-8
#: float32 results against float64 results of the same net.
FLOAT32_RTOL = 1e-3
#: Influence vs refitted leave-one-out on L2 logistic regression (correlations).
IF_LOO_MIN_CORRELATION = 0.9
#: Retrained (recipe) parameters vs closed forms: full-batch heavy-ball descent to
#: float64 precision, relative to the response's own size.
RETRAIN_RTOL = 1e-8
#: Absolute floor, as a fraction of the largest expected entry.
LADDER_ATOL_REL = 1e-9
#: Scores of the same frozen net under a different batch_size or training-row order
#: (sums taken in another order), float64.
INVARIANCE_RTOL = 1e-10
#: Relative residual ‖b − A x‖/‖b‖ of a backward-stable solve, per unit of the condition
#: number κ(A) (64 unit roundoffs; measured worst ≈ 1.3 on random least squares).
SOLVE_RESIDUAL_PER_CONDITION = 64 * 2.220446049250313e-16
#: Mean loss at a ladder rung (library vs numpy at closed-form or replayed parameters),
#: float64, as a fraction of the largest loss compared (measured worst ≈ 1e-14 with the
#: PBRF solved to ``pbrf_tol=1e-12``).
LOSS_AT_RUNGS_ATOL_REL = 5e-14
#: Vectorised leave-one-out ensemble vs one-at-a-time retraining (same recipe, float64):
#: largest difference as a fraction of the largest entry (measured worst 3.8e-15 over the
#: 4 losses × 2 optimisers × 3 rungs of ``test_execution.py``).
ENSEMBLE_VS_ONE_AT_A_TIME_REL = 1e-14
#: Low-rank Arnoldi (eigsh at tol=ARNOLDI_EIGSH_TOL) against its closed form from a dense
#: eigendecomposition, float64. The kept eigenspace errs by about tol·ν₁/gap (the tests
#: assert a relative gap (ν_r − ν_{r+1})/ν₁ ≥ 0.05, so ≤ 2e-11), which moves the solution
#: by about that much relative to its size; 50× margin. Measured: ~1e-14.
ARNOLDI_EIGSH_TOL = 1e-12
ARNOLDI_VS_CLOSED_FORM_RTOL = 1e-9
