"""Process helpers the benchmarks share: warm-up and resident-memory probes (Linux)."""


def warm_up():
    import torch

    import sklinfluence  # noqa: F401  (imports torch, skorch, scikit-learn)

    first_transform(torch)


def first_transform(torch):
    """torch.func's first transform imports torch._dynamo (~1 s, ~75 MiB once per process)."""
    torch.func.vmap(torch.func.grad(lambda v: (v * v).sum()))(torch.ones(2, 2))


def status_mib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss():
    """Reset this process's peak resident memory (Linux); return the current one, MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return status_mib("VmRSS")
    except OSError:
        return None


def in_subprocess(script, config):
    """Run ``script --run CONFIG`` (JSON) in a fresh process with one torch thread and
    return the JSON its last line prints: each configuration its own peak memory."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--run", json.dumps(config)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
