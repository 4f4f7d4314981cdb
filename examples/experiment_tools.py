"""What the long experiment scripts under examples/ share: running a logged command on one
thread, the training time in a fairseq log, writing a results file atomically, a mean and spread
over seeds, writing a table, and matplotlib when installed."""

import decimal
import json
import os
import re
import subprocess
import time


def say(tool: str, message: str) -> None:
    print(f"[{tool} {time.strftime('%H:%M:%S')}] {message}", flush=True)


# glibc hands every buffer above its mmap threshold (at most 32 MiB) back to the kernel when it is
# freed, and a step of a CPU training allocates many bigger ones (the output layer's logits and
# their gradients): each comes back as fresh pages the kernel has to zero, so much of a step's time
# is spent in the kernel. Serving them from the heap and never trimming it keeps the pages; the
# process holds its peak memory instead. A variable already set in the environment wins.
GLIBC_MALLOC_KEEP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def run_logged(cmd, log_path: str, cwd: str, mode: str = "a", threads: int = 1) -> None:
    """Run ``cmd`` with ``threads`` intra-op threads (one by default: two jobs side by side on
    two cores), its output to ``log_path``; a failure raises RuntimeError with the end of the log."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update({name: value for name, value in GLIBC_MALLOC_KEEP.items() if name not in os.environ})
    with open(log_path, mode) as log:
        status = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed (status {status}); end of {log_path}:\n{tail}")


def training_wall(log: str):
    """Seconds of training in a log, summed over its resumes (fairseq's wall clock starts again
    at 0 in each), the partial epochs that a stop threw away included; None without any."""
    walls = [int(w) for w in re.findall(r"\bwall[= ](\d+)", log)]
    if not walls:
        return None
    ends = [before for before, after in zip(walls, walls[1:]) if after < before]
    return sum(ends) + walls[-1]


def load_json(path: str, empty):
    if not os.path.exists(path):
        return empty
    with open(path) as f:
        return json.load(f)


def save_json(obj, path: str) -> None:
    """Write ``obj`` to ``path`` through a temporary file: an interrupted run leaves the old one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def mean_and_half_range(values) -> str:
    """"mean ± half range" of ``values`` (the spread over seeds), the value alone for one, "-" for none.

    Rounded half up in decimal from the values as written (157.855 -> 157.86), not from their binary
    floats, whose error would round a mean and a half range of the same runs in different directions.
    """
    if not values:
        return "-"
    exact = [decimal.Decimal(repr(v)) for v in values]
    cent = decimal.Decimal("0.01")

    def fixed(x):
        return str(x.quantize(cent, rounding=decimal.ROUND_HALF_UP))

    if len(exact) == 1:
        return fixed(exact[0])
    return f"{fixed(sum(exact) / len(exact))} ± {fixed((max(exact) - min(exact)) / 2)}"


def write_table(lines, path: str) -> str:
    table = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(table)
    print(table)
    return table


def pyplot(tool: str):
    """matplotlib.pyplot on the Agg backend, or None (with a line saying so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(tool, "matplotlib not installed: no plot")
        return None
    return plt


def learning_curves(log_path: str, per_update: int = 1):
    """(x, training perplexity) at every fairseq log interval and (x, validation perplexity) at
    every validation of the log at ``log_path``; x counts updates times ``per_update`` (e.g. the
    tokens of a batch, for tokens seen)."""
    train, valid = [], []
    with open(log_path) as f:
        for line in f:
            m = re.search(r"train_inner \|.* ppl=([\d.]+),.*num_updates=(\d+)", line)
            if m:
                train.append((int(m.group(2)) * per_update, float(m.group(1))))
            m = re.search(r"valid on 'valid' subset \|.* ppl ([\d.]+) \|.* num_updates (\d+)", line)
            if m:
                valid.append((int(m.group(2)) * per_update, float(m.group(1))))
    return train, valid


def eval_lm_result(log_path: str):
    """(perplexity, tokens evaluated) of a fairseq-eval-lm log."""
    with open(log_path) as f:
        text = f.read()
    perplexity = float(re.findall(r"Perplexity: ([\d.]+)", text)[-1])
    tokens = int(re.findall(r"Evaluated ([\d,]+) tokens", text)[-1].replace(",", ""))
    return perplexity, tokens


def last_train_stats(log: str) -> dict:
    """{name: value as text} of the last end-of-epoch 'train' line of a fairseq-train log."""
    last_train = re.findall(r"\| train \| epoch (\d+) \| (.*)", log)[-1][1]
    return dict(re.findall(r"(\w+) ([-\d.e+]+)(?: \||$)", last_train))
