"""Benchmark: torch thread counts for the command line's main job and a large net.

The README's main command (``sklinfluence decompose``: an MLP 64-32-10 on
500 digits, 20 removed samples, the whole ladder) runs in a fresh process in
three configurations:

- ``library default``: no thread variable set (the library chooses, see
  :mod:`sklinfluence.utils.threads`);
- ``OMP_NUM_THREADS=1``: the setting the README used to ask for;
- ``torch default``: ``--n-threads`` set to the machine's cores, which is
  what torch does on its own (and what the library did before it chose);

each on an idle machine and while a competing process keeps one core busy
(a pure-Python loop, as another notebook or a build would). A second
workload checks the other side of the choice: a net large enough that the
library gives it every core (an MLP 64-300-300-10, 112,810 parameters:
training plus an EK-FAC influence matrix) with 1 thread and with all cores,
idle. It prints wall times (process start to exit, imports included: what a
user waits for) and ratios against ``OMP_NUM_THREADS=1`` measured in the
same run (these machines are noisy: compare ratios, not absolute times).
Run::

    python benchmarks/bench_threads.py            # (no thread variable needed)

``--repeats`` takes the best of several runs of each configuration.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

CORES = len(os.sched_getaffinity(0))
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

LARGE = """
import time, numpy as np, torch
from skorch import NeuralNetClassifier
from sklearn.datasets import load_digits
from sklinfluence import InfluenceEstimator, set_config
set_config(n_threads={threads})
X, y = load_digits(return_X_y=True)
X, y = X[:1200] / 16.0, y[:1200]
module = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Tanh(), torch.nn.Linear(300, 300),
                             torch.nn.Tanh(), torch.nn.Linear(300, 10)).double()
net = NeuralNetClassifier(module, criterion=torch.nn.CrossEntropyLoss, max_epochs=5, lr=0.1,
                          batch_size=64, verbose=0)
est = InfluenceEstimator(net, solver="ekfac", damping=1e-3, random_state=0).fit(X, y)
est.loss_change(X, y, X[:100], y[:100])
"""


def _environment(threads_variable):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    if threads_variable is not None:
        env["OMP_NUM_THREADS"] = str(threads_variable)
    return env


def _time(command, env, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def _busy_core():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    job = [sys.executable, "-m", "sklinfluence", "decompose", "--quiet", "--output", out]
    configs = [("library default", job, _environment(None)),
               ("OMP_NUM_THREADS=1", job, _environment(1)),
               (f"torch default ({CORES} threads)", job + ["--n-threads", str(CORES)],
                _environment(None))]
    print(f"{CORES} cores; main job: sklinfluence decompose (MLP 64-32-10, 500 digits, "
          f"20 removed samples)\n")
    print(f"{'machine':>22} {'configuration':>26} {'seconds':>9} {'vs OMP=1':>9}")
    for machine in ("idle", "one core busy"):
        busy = _busy_core() if machine != "idle" else None
        try:
            times = {name: _time(command, env, args.repeats) for name, command, env in configs}
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        for name, seconds in times.items():
            print(f"{machine:>22} {name:>26} {seconds:9.2f} "
                  f"{seconds / times['OMP_NUM_THREADS=1']:9.2f}")
    if args.skip_large:
        return
    print("\nlarge net: MLP 64-300-300-10 (112,810 parameters), 1,200 digits, 5 epochs, "
          "EK-FAC influence matrix 1,200 x 100, idle machine\n")
    print(f"{'configuration':>26} {'seconds':>9} {'vs 1 thread':>12}")
    times = {}
    for name, threads in (("1 thread", 1), (f"library default ({CORES})", None)):
        command = [sys.executable, "-c", LARGE.format(threads=threads)]
        times[name] = _time(command, _environment(None), args.repeats)
    for name, seconds in times.items():
        print(f"{name:>26} {seconds:9.2f} {seconds / times['1 thread']:12.2f}")


if __name__ == "__main__":
    main()
