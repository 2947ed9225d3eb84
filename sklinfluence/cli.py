"""The ``sklinfluence`` command line: ``decompose``, ``rank`` and ``study``.

``sklinfluence decompose`` trains an MLP on a data set, decomposes the gap
between its influence estimates and leave-one-out retraining into the five
terms of Bae et al. (2022) for some removed samples, prints the table and the
IF–PBRF / IF–LOO agreement, and writes a CSV and a PNG.

``sklinfluence rank`` ranks the training samples by self-influence (influence
function, PBRF, leave-one-out, or plain training loss as a baseline),
optionally after flipping a fraction of the labels, prints the top samples and
the detection curve (fraction of flipped labels found against fraction
inspected), and writes both.

``sklinfluence study`` runs the paper's study across the architectures of
:mod:`sklinfluence.zoo` (:func:`sklinfluence.study_report.run_study`): the
five terms and the agreement of influence with the PBRF and with
leave-one-out per architecture, the same against width and training epochs,
mislabel detection by five self-scores; it prints the main numbers and the
verdict on each of the paper's claims, and writes ``study.csv`` (every
number) and ``report.html`` (one self-contained page). A run restarted on the
same ``--output`` loads every finished cell from its cache.

Every file is written to a temporary name and renamed into place, so an
interrupted run never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["main"]


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from .study_report.files import write_csv

    write_csv(path, header, rows)


def _save_figure(fig: Any, path: Path) -> None:
    from .study_report.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _widths(text: str) -> tuple:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden takes widths like 32 or 64,32, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError("--hidden widths must be positive integers")
    return widths


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--n-threads must be a positive integer, got {text!r}")
    return value


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {low}, got {text!r}")
        return value

    return parse


def _names(choices: Sequence[str], what: str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} from {', '.join(choices)}; got {text!r}")
        return names

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .datasets import BUILTIN

    parser = argparse.ArgumentParser(
        prog="sklinfluence", description="Influence functions, the PBRF and leave-one-out "
        "for neural networks (Bae et al. 2022), from the terminal.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    data = common.add_argument_group("data")
    data.add_argument("--data", default="digits",
                      help=f"built-in data set ({', '.join(BUILTIN)}), a CSV file with a "
                           "header row, or an .npz file with arrays X (rows, or images "
                           "(n, C, H, W): the MLP flattens them) and y (default: digits)")
    data.add_argument("--target", help="CSV target column (default: the last)")
    data.add_argument("--task", choices=("auto", "classification", "regression"),
                      default="auto", help="for a CSV: inferred from the target by default")
    data.add_argument("--n-train", type=int, default=500,
                      help="training rows drawn from the data (0: all; default 500)")
    model = common.add_argument_group("model")
    model.add_argument("--hidden", type=_widths, default=(32,),
                       help="hidden widths, e.g. 32 or 64,32 (default 32)")
    model.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    model.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    model.add_argument("--weight-decay", type=float, default=1e-3,
                       help="SGD weight decay μ (default 1e-3)")
    model.add_argument("--damping", type=float, default=1e-2, help="damping λ (default 1e-2)")
    model.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run = common.add_argument_group("run")
    run.add_argument("--output", type=Path, default=Path("sklinfluence-output"),
                     help="directory for the CSV and PNG files (default sklinfluence-output)")
    run.add_argument("--n-jobs", type=int, default=None, help="joblib workers")
    run.add_argument("--memory", help="directory to keep finished responses in (resumable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--n-threads", type=_threads, default=None,
                     help="torch threads (default: chosen for the model size, or "
                          "OMP_NUM_THREADS when set)")

    decompose = commands.add_parser(
        "decompose", parents=[common], help="the five-term decomposition of the IF–LOO gap",
        description="Train an MLP, decompose the gap between its influence estimates and "
                    "leave-one-out retraining into five terms for --n-removed samples, print "
                    "the table and the IF–PBRF and IF–LOO agreement, write decompose.csv and "
                    "decompose.png.")
    decompose.add_argument("--n-removed", type=int, default=20,
                           help="removed training samples (default 20)")
    decompose.add_argument("--metric", choices=("output_l2", "loss"), default="output_l2",
                           help="function-space distance or signed loss change")

    rank = commands.add_parser(
        "rank", parents=[common], help="rank training samples by self-influence",
        description="Rank the training samples by self-influence, optionally after flipping "
                    "a fraction of the labels, print the top samples and the detection curve, "
                    "write rank.csv and rank.png.")
    rank.add_argument("--method", choices=("if", "pbrf", "loo", "graddot", "tracin", "loss"),
                      default="if",
                      help="influence function, PBRF, leave-one-out, or a baseline: grad-dot "
                           "(the curvature replaced by 0), TracIn-CP (end-of-epoch "
                           "checkpoints of the fit) or the training loss")
    rank.add_argument("--mislabel", type=_fraction, default=0.0,
                      help="fraction of labels to flip before training (classification)")
    rank.add_argument("--top", type=int, default=10, help="samples to print (default 10)")
    _study_parser(commands)
    return parser


def _study_parser(commands: Any) -> None:
    from .study_report import SCALES, SECTIONS
    from .zoo import ZOO

    scales = "; ".join(f"{name}: {', '.join(s.architectures)}, {s.n_train} rows, {s.rows} "
                       f"removed × {s.seeds} seed(s), {s.epochs} epochs"
                       for name, s in SCALES.items())
    study = commands.add_parser(
        "study", help="the paper's study across the zoo, with an HTML report",
        description="Run the study of Bae et al. (2022) on the architectures of "
                    "sklinfluence.zoo: the five terms and the agreement of influence with the "
                    "PBRF and with leave-one-out per architecture, against width and training "
                    "epochs, and mislabel detection; print the main numbers and a verdict on "
                    "each of the paper's claims; write study.csv (every number) and "
                    "report.html (self-contained) to --output. Rerun on the same --output to "
                    "resume: finished cells are loaded from its cache.")
    study.add_argument("--output", type=Path, default=Path("sklinfluence-output/study"),
                       help="directory for study.csv, report.html, figures/ and the "
                            "resumable cache/ (default sklinfluence-output/study)")
    study.add_argument("--scale", choices=("default", "small", "large"), default="default",
                       help=f"how much to compute ({scales}; default: default)")
    sizes = study.add_argument_group("sizes (default: the scale's)")
    sizes.add_argument("--architectures", type=_names(tuple(ZOO), "zoo entries"),
                       help="comma-separated zoo entries, e.g. mlp,lenet")
    sizes.add_argument("--n-train", type=_at_least(3), help="training rows per architecture")
    sizes.add_argument("--rows", type=_at_least(2), help="removed rows per cell")
    sizes.add_argument("--seeds", type=_at_least(1), help="training seeds per cell")
    sizes.add_argument("--epochs", type=_at_least(1), help="training epochs")
    sizes.add_argument("--n-detect", type=_at_least(10), help="training rows of each "
                       "mislabel detection run")
    sizes.add_argument("--sections", type=_names(SECTIONS, "sections"), default=SECTIONS,
                       help=f"parts to run (default: all of {','.join(SECTIONS)})")
    run = study.add_argument_group("run")
    run.add_argument("--n-jobs", type=int, default=-1,
                     help="cells computed in parallel, one torch thread each (default -1: "
                          "every core; the cells are independent)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--n-threads", type=_threads, default=None,
                     help="torch threads of this process (default: chosen for the model "
                          "size, or OMP_NUM_THREADS when set); parallel workers use one")


def _prepare(args: argparse.Namespace):
    from sklearn.preprocessing import StandardScaler

    from .datasets import load_dataset, make_net

    data = load_dataset(args.data, target=args.target, task=args.task, random_state=args.seed)
    rng = np.random.default_rng(args.seed)
    if args.n_train < 0:
        raise ValueError(f"--n-train must be ≥ 0, got {args.n_train}")
    if args.n_train and args.n_train < len(data.X):
        rows = np.sort(rng.choice(len(data.X), args.n_train, replace=False))
        data.X, data.y = data.X[rows], data.y[rows]
    # each input value standardised (images: each pixel), whatever the rows' shape
    data.X = StandardScaler().fit_transform(data.X.reshape(len(data.X), -1)).reshape(
        data.X.shape)
    if data.task == "regression":  # on the scale of its spread, so the loss is O(1)
        data.y = (data.y - data.y.mean()) / (data.y.std() or 1.0)
    elif data.n_classes < 2:
        raise ValueError("the target has a single class")
    net = make_net(data, widths=args.hidden, epochs=args.epochs, lr=args.lr,
                   weight_decay=args.weight_decay)
    execution = dict(n_jobs=args.n_jobs, memory=args.memory, verbose=0 if args.quiet else 1)
    return data, net, rng, execution


#: The label of a term that is 0 for every removed row: no bar on a log axis.
ZERO_LABEL = "exactly 0"


def _plot_terms(terms: np.ndarray, names: Sequence[str], *, ylabel: str, title: str):
    """The bar chart of ``decompose.png``: one bar per term on a log axis.

    Bars are the mean of ``|term|`` over the removed rows (the rows of
    ``terms``); whiskers run from the smallest to the largest ``|term|``
    among them, a whisker that would reach 0 stopping at the bottom of the
    axis. A log axis has no place for 0, so a term that is exactly 0 for
    every row (the solver error of the exact solver, the proximity gap
    without damping) has no bar and is labelled ``ZERO_LABEL`` at the bottom
    of the axis. Returns ``(fig, ax)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = np.abs(np.asarray(terms, dtype=np.float64))
    n = size.shape[0]
    mean, low, high = size.mean(axis=0), size.min(axis=0), size.max(axis=0)
    positive = size[size > 0]
    bottom, top = (positive.min() / 4, positive.max() * 4) if positive.size else (1e-3, 1.0)
    x = np.arange(len(names))
    bar = mean > 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_yscale("log")
    ax.bar(x[bar], mean[bar], color="C0", label=f"bars: mean |term| over the {n} removed rows")
    ax.errorbar(x[bar], mean[bar],
                yerr=[mean[bar] - np.maximum(low[bar], bottom), high[bar] - mean[bar]],
                fmt="none", ecolor="black", capsize=4,
                label="whiskers: smallest to largest |term| (at the bottom edge: down to 0)")
    for k in np.flatnonzero(~bar):
        ax.plot([k], [bottom], marker="o", color="C3", clip_on=False)
        ax.annotate(ZERO_LABEL, xy=(k, bottom), xytext=(0, 6), textcoords="offset points",
                    ha="center", va="bottom", color="C3")
    ax.set_ylim(bottom, top)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, pad=44)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    return fig, ax


def _decompose(args: argparse.Namespace) -> None:
    from scipy.stats import spearmanr

    from . import Decomposer

    data, net, rng, execution = _prepare(args)
    if not 2 <= args.n_removed <= len(data.X):
        raise ValueError(f"--n-removed must be between 2 and {len(data.X)}")
    start = time.perf_counter()
    dec = Decomposer(net, damping=args.damping, metric=args.metric, random_state=args.seed,
                     **execution).fit(data.X, data.y)
    removed = np.sort(rng.choice(len(data.X), args.n_removed, replace=False))
    terms = dec.transform(data.X[removed])
    scores = dec.rung_scores(data.X[removed])
    names = list(dec.get_feature_names_out())
    n_out = data.n_classes or 1
    print(f"\n{data.name}: {len(data.X)} training rows, MLP {int(np.prod(data.X.shape[1:]))}-"
          f"{'-'.join(map(str, args.hidden))}-{n_out} "
          f"({dec.model_.n_params} parameters), damping {args.damping:g}, "
          f"{args.n_removed} removed samples, {time.perf_counter() - start:.0f} s\n")
    unit = "mean ‖Δf‖ on training inputs" if args.metric == "output_l2" else "Δ mean loss"
    print(f"{'term (' + unit + ')':>48} {'mean':>11} {'std':>11}")
    for k, name in enumerate(names):
        print(f"{name:>48} {terms[:, k].mean():11.3e} {terms[:, k].std():11.3e}")
    influence = scores[:, -1]
    print()
    for label, column in (("IF vs PBRF", "pbrf"), ("IF vs cold-start LOO", "cold_start_loo")):
        rho = spearmanr(influence, scores[:, dec.rungs_.index(column)])[0]
        print(f"{label + ' (self-influence Spearman)':>48} {rho:11.3f}")

    header = ["train_row", "label", *names, *[f"score_{r}" for r in dec.rungs_]]
    rows = [[int(m), data.y[m], *terms[i], *scores[i]] for i, m in enumerate(removed)]
    _write_csv(args.output / "decompose.csv", header, rows)
    fig, _ = _plot_terms(terms, names,
                         ylabel=unit if args.metric == "output_l2" else "|Δ mean loss|",
                         title=f"Five-term decomposition ({data.name})")
    _save_figure(fig, args.output / "decompose.png")
    print(f"\nwrote {args.output / 'decompose.csv'} and {args.output / 'decompose.png'}")


def _flip_labels(y: np.ndarray, fraction: float, rng: np.random.Generator):
    n_flip = int(round(fraction * len(y)))
    flipped = np.sort(rng.choice(len(y), n_flip, replace=False)) if n_flip else np.array([], int)
    classes = np.unique(y)
    y = y.copy()
    for i in flipped:
        y[i] = rng.choice(classes[classes != y[i]])
    return y, flipped


def _rank(args: argparse.Namespace) -> None:
    from . import InfluenceEstimator, LOOEstimator, PBRFEstimator, TracInCP, training_loss

    data, net, rng, execution = _prepare(args)
    if args.mislabel and data.task != "classification":
        raise ValueError("--mislabel flips class labels: it needs a classification problem")
    y, flipped = _flip_labels(data.y, args.mislabel, rng)
    start = time.perf_counter()
    kw = dict(damping=args.damping, random_state=args.seed)
    est = {"if": lambda: InfluenceEstimator(net, **kw),
           "graddot": lambda: InfluenceEstimator(net, solver="identity", **kw),
           "tracin": lambda: TracInCP(net, random_state=args.seed),
           "loss": lambda: InfluenceEstimator(net, **kw),
           "pbrf": lambda: PBRFEstimator(net, **kw, **execution),
           "loo": lambda: LOOEstimator(net, random_state=args.seed, **execution)}[args.method]()
    est.fit(data.X, y)
    if args.method == "loss":
        scores = training_loss(est, data.X, y)
    else:
        scores = est.score_samples(data.X)
    order = np.argsort(-scores, kind="stable")
    is_flipped = np.isin(order, flipped)
    print(f"\n{data.name}: {len(y)} training rows, {len(flipped)} labels flipped, ranked by "
          f"{args.method} in {time.perf_counter() - start:.0f} s\n")
    print(f"{'rank':>6} {'train row':>10} {'label':>8} {'score':>12} {'flipped':>8}")
    for r, i in enumerate(order[:args.top]):
        print(f"{r + 1:>6} {i:>10} {str(y[i]):>8} {scores[i]:12.4e} {str(i in flipped):>8}")
    rows = [[r + 1, int(i), y[i], scores[i], bool(f)] for r, (i, f) in
            enumerate(zip(order, is_flipped))]
    _write_csv(args.output / "rank.csv", ["rank", "train_row", "label", "score", "flipped"], rows)
    written = [args.output / "rank.csv"]
    if len(flipped):
        inspected = np.arange(1, len(y) + 1) / len(y)
        found = np.cumsum(is_flipped) / len(flipped)
        print("\nDetection curve (fraction of flipped labels found after inspecting a fraction "
              "of the ranking):")
        for fraction in (0.05, 0.1, 0.2, 0.3, 0.5):
            k = max(1, int(round(fraction * len(y))))
            print(f"  inspect {fraction:>4.0%}: found {found[k - 1]:6.1%}  "
                  f"(random: {fraction:.0%})")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(inspected, found, label=f"ranked by {args.method}")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="random")
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_title(f"Mislabel detection ({data.name}, {args.mislabel:.0%} flipped)")
        ax.legend()
        fig.tight_layout()
        _save_figure(fig, args.output / "rank.png")
        written.append(args.output / "rank.png")
    print("\nwrote " + " and ".join(str(p) for p in written))


def _study(args: argparse.Namespace) -> None:
    from .study_report import format_summary, run_study

    start = time.perf_counter()
    results = run_study(args.output, args.scale, sections=args.sections, n_jobs=args.n_jobs,
                        verbose=0 if args.quiet else 1, architectures=args.architectures,
                        n_train=args.n_train, rows=args.rows, seeds=args.seeds,
                        epochs=args.epochs, n_detect=args.n_detect)
    print("\n" + format_summary(results))
    print(f"\nwrote {results.paths.html} and {results.paths.csv} in "
          f"{time.perf_counter() - start:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sklinfluence`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    from ._config import config_context

    try:
        with config_context(n_threads=args.n_threads):
            {"decompose": _decompose, "rank": _rank, "study": _study}[args.command](args)
    except ValueError as exc:
        parser.exit(2, f"sklinfluence {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
