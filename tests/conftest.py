import lzma
import math
import os

# The triton backend runs on CPU tensors under Triton's interpreter, which triton sets up only if
# TRITON_INTERPRET is set when it is first imported (torch imports it lazily, e.g. for some of
# its own native ops): set for the whole test process here, before anything imports torch.
# (The plugin never sets it on import; ops.get_backend sets it only if triton is not loaded yet.)
os.environ.setdefault("TRITON_INTERPRET", "1")
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_file(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """scripts/NAME.py as a module (the command-line tools are not a package)."""
    return _load_file(os.path.join(ROOT, "scripts", f"{name}.py"))


def load_example(relative_path: str):
    """examples/RELATIVE_PATH (a .py experiment script) as a module."""
    return _load_file(os.path.join(ROOT, "examples", relative_path))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    yield


# ---------------------------------------------------------------------------------------------
# Corpora of the end-to-end tests, built once per session (fairseq-preprocess takes seconds).

_PTB_CANDIDATES = [os.path.join(ROOT, "data", "ptb"), "/work/shared/data/ptb",
                   os.path.join(os.path.dirname(ROOT), "shared", "data", "ptb")]


def _preprocess(*args):
    venv_bin = os.path.join(ROOT, ".venv", "bin")
    tool = os.path.join(venv_bin if os.path.isdir(venv_bin) else os.path.dirname(sys.executable),
                        "fairseq-preprocess")
    subprocess.run([tool, "--only-source", "--workers", "1", *map(str, args)], check=True,
                   capture_output=True, timeout=300)


def _read_ptb_lines(name, count):
    for folder in _PTB_CANDIDATES:
        path = os.path.join(folder, name + ".xz")
        if os.path.exists(path):
            with lzma.open(path, "rt") as f:
                return [next(f) for _ in range(count)]
    pytest.fail(f"PTB not found in {_PTB_CANDIDATES}")


def _exactly_tokens(lines, total):
    """Whole lines, then part of the next, so that words + end-of-line tokens = total."""
    out, count = [], 0
    for line in lines:
        words = line.split()
        if count + len(words) + 1 >= total:
            out.append(" ".join(words[:total - count - 1]) + "\n")
            return "".join(out)
        out.append(" ".join(words) + "\n")
        count += len(words) + 1
    pytest.fail("not enough text")


@pytest.fixture(scope="session")
def ptb_lm_corpus(tmp_path_factory):
    """400 training sentences of PTB; validation text of exactly 1024 tokens = 32 blocks of
    32 = 4 full batches of 256 tokens, 2 per worker, so one process and two workers see the
    same batches. Returns the binarized folder."""
    work = tmp_path_factory.mktemp("ptb_corpus")
    (work / "train.txt").write_text("".join(_read_ptb_lines("ptb.train.txt", 400)))
    (work / "valid.txt").write_text(_exactly_tokens(_read_ptb_lines("ptb.valid.txt", 100), 1024))
    _preprocess("--trainpref", work / "train.txt", "--validpref", work / "valid.txt",
                "--destdir", work / "bin")
    return str(work / "bin")


def synthetic_sentences(rng, n):
    """A 30-word language: each word has two likely successors, sentences of 6-12 words."""
    words = [f"w{i}" for i in range(30)]
    successors = {w: rng.sample(words, 2) for w in words}
    sentences = []
    for _ in range(n):
        w = rng.choice(words[:5])
        sentence = [w]
        for _ in range(rng.randint(5, 11)):
            w = rng.choice(successors[w]) if rng.random() < 0.9 else rng.choice(words)
            sentence.append(w)
        sentences.append(" ".join(sentence))
    return sentences


@pytest.fixture(scope="session")
def synthetic_lm_corpus(tmp_path_factory):
    """A tiny corpus that a language model can learn: (folder with bin/, unigram test ppl)."""
    root = tmp_path_factory.mktemp("lm_corpus")
    sentences = synthetic_sentences(random.Random(0), 1700)
    splits = {"train": sentences[:1500], "valid": sentences[1500:1600], "test": sentences[1600:]}
    for name, lines in splits.items():
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    _preprocess("--task", "language_modeling", "--trainpref", root / "train.txt",
                "--validpref", root / "valid.txt", "--testpref", root / "test.txt",
                "--destdir", root / "bin")
    # Unigram perplexity of the test split (with one </s> per line), train-set frequencies.
    train_counts = Counter(w for s in splits["train"] for w in s.split() + ["</s>"])
    total = sum(train_counts.values())
    test_tokens = [w for s in splits["test"] for w in s.split() + ["</s>"]]
    unigram_ppl = math.exp(-sum(math.log(train_counts[w] / total) for w in test_tokens) / len(test_tokens))
    return root, unigram_ppl
