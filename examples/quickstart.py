"""
Quickstart: which training digits matter for a prediction?
===========================================================

Fits a small MLP (skorch) on scikit-learn's handwritten digits, wraps it in
:class:`sklinfluence.InfluenceEstimator` and prints

1. the 10 training samples whose removal would most increase, and the 10 whose
   removal would most decrease, the loss on one test digit (helpful and
   harmful samples for that prediction);
2. the 10 training samples with the largest self-influence — those the model
   had to bend most to fit, often mislabeled or unusual digits.

Sign convention: a positive score means that removing the sample *increases*
the measured loss (the sample helped).

Run ``python examples/quickstart.py`` (about 15 s on 2 cores); add
``--plot influence.png`` to also save a picture of the digits in each table.
"""

import argparse
import time

import numpy as np
import torch
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from sklinfluence import InfluenceEstimator


class MLP(torch.nn.Sequential):
    def __init__(self, n_in=64, hidden=32, n_out=10):
        super().__init__(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(),
                         torch.nn.Linear(hidden, n_out))


def table(title, rows, header):
    print(f"\n{title}")
    widths = [max(len(h), 10) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(f"{v:>{w}.3e}" if isinstance(v, float) else str(v).rjust(w)
                        for v, w in zip(row, widths)))


def plot(path, X_train, groups):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 10, figsize=(10, 1.3 * len(groups)))
    for r, (name, idx, labels) in enumerate(groups):
        for c in range(10):
            ax = axes[r, c]
            ax.imshow(X_train[idx[c]].reshape(8, 8), cmap="gray_r")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(str(labels[c]), fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-index", type=int, default=None,
                        help="test digit to explain (default: the first misclassified one)")
    parser.add_argument("--plot", metavar="PNG", help="also save the digits of each table")
    parser.add_argument("--random-state", type=int, default=0)
    args = parser.parse_args(argv)

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=args.random_state, stratify=y)

    net = NeuralNetClassifier(
        MLP, criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
        optimizer__weight_decay=1e-4, max_epochs=40, batch_size=64,
        iterator_train__shuffle=True, verbose=0)
    start = time.perf_counter()
    est = InfluenceEstimator(net, damping=1e-3, random_state=args.random_state)
    est.fit(X_train, y_train)
    fitted = time.perf_counter() - start
    accuracy = (est.net_.predict(X_test.astype(np.float32)) == y_test).mean()
    print(f"MLP 64-32-10 on digits: {len(X_train)} training samples, "
          f"{est.model_.n_params} parameters, test accuracy {accuracy:.3f}; "
          f"trained and prepared the exact damped Gauss-Newton solve in {fitted:.1f} s")

    predicted = est.net_.predict(X_test.astype(np.float32))
    if args.test_index is None:
        wrong = np.flatnonzero(predicted != y_test)
        args.test_index = int(wrong[0]) if wrong.size else 0
    i = args.test_index
    effect = est.loss_change(X_train, y_train, X_test[[i]], y_test[[i]])[:, 0]
    order = np.argsort(effect)
    helpful, harmful = order[::-1][:10], order[:10]
    header = ["rank", "train row", "label", "score"]
    print(f"\nTest digit #{i}: true label {y_test[i]}, predicted {predicted[i]}")
    table("Most helpful training samples (removing them raises this test loss most)",
          [(r + 1, j, y_train[j], float(effect[j])) for r, j in enumerate(helpful)], header)
    table("Most harmful training samples (removing them lowers this test loss most)",
          [(r + 1, j, y_train[j], float(effect[j])) for r, j in enumerate(harmful)], header)

    self_influence = est.score_samples(X_train)  # y=None: looked up among training rows
    top = np.argsort(self_influence)[::-1][:10]
    table("Highest self-influence (candidates for mislabeled or atypical samples)",
          [(r + 1, j, y_train[j], float(self_influence[j])) for r, j in enumerate(top)], header)
    print(f"\ntotal time {time.perf_counter() - start:.1f} s")

    if args.plot:
        plot(args.plot, X_train, [("helpful", helpful, y_train[helpful]),
                                  ("harmful", harmful, y_train[harmful]),
                                  ("self-infl.", top, y_train[top])])


if __name__ == "__main__":
    main()
