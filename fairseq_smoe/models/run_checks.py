"""Refusals that every plugin model makes when fairseq builds it, before fairseq fails deeper.

They raise ``ValueError`` naming the fix; ``fairseq_smoe.compat.cli_errors`` turns that into one line.
"""

import importlib.util
import os
import sys


def _program() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""


def check_precision_options(args) -> None:
    """fairseq 0.12 reads ``--bf16`` as TPU training: ``options.parse_args_and_arch`` sets
    ``--tpu``, and the trainer then asks torch_xla for its device (an AttributeError without
    it). On a GPU the BF16_CUDA patch (``compat/bf16_cuda.py``) has cleared ``--tpu`` by now;
    what is left here is bf16 on CPU, or with that patch switched off."""
    check_half_precision_on_cpu(args)
    if getattr(args, "bf16", False) and getattr(args, "tpu", True) \
            and importlib.util.find_spec("torch_xla") is None:
        raise ValueError("--bf16 (and --memory-efficient-bf16) in fairseq 0.12 means TPU training "
                         "and needs torch_xla, which is not installed; on CPU train in fp32; on a "
                         "GPU fairseq-smoe trains --bf16 in CUDA bf16 unless SMOE_PATCH_BF16_CUDA=0 "
                         "(or use --fp16 / --amp)")


HALF_PRECISION_FLAGS = (("--fp16", "fp16"), ("--memory-efficient-fp16", "memory_efficient_fp16"),
                        ("--amp", "amp"))


def check_half_precision_on_cpu(args) -> None:
    """fairseq's fp16 training (loss scaling, fp16 optimizer wrappers, autocast) is for CUDA: on
    CPU it ended in an AssertionError deep in the optimizer, or trained in fp32 without a word.
    Training only: the evaluation tools' --fp16 is fairseq's own business."""
    import torch

    flags = [flag for flag, name in HALF_PRECISION_FLAGS if getattr(args, name, False)]
    on_cpu = getattr(args, "cpu", False) or not torch.cuda.is_available()
    if flags and on_cpu and _program() not in EVALUATION_TOOLS:
        raise ValueError(f"{' '.join(flags)} trains in half precision on a CUDA GPU, and this run "
                         f"is on CPU; drop {' and '.join(flags)} to train in fp32 here (the "
                         f"plugin's CPU kernels are fp32), or run on a GPU")


def refuse_in_language_model_tools(model_name: str) -> None:
    """A translation checkpoint given to fairseq-eval-lm (it would fail on a missing LM
    attribute after loading the data)."""
    if _program() in ("fairseq-eval-lm", "eval_lm.py"):
        raise ValueError(f"this checkpoint holds a translation model ({model_name}); "
                         "fairseq-eval-lm evaluates language models. Score it with "
                         "fairseq-generate DATA --path CHECKPOINT (BLEU) or fairseq-validate DATA "
                         "--path CHECKPOINT --task translation (loss)")


EVALUATION_TOOLS = ("fairseq-eval-lm", "fairseq-generate", "fairseq-validate", "fairseq-interactive")


def refuse_distributed_evaluation() -> None:
    """fairseq-eval-lm under W workers reports worker 0's share of the data only, and with
    sharded experts every worker would have to run the same number of batches (the all-to-all
    is collective) or hang. Every worker raises this at model build, before any exchange."""
    import torch.distributed as dist

    program = _program()
    if program in EVALUATION_TOOLS and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1:
        raise ValueError(f"{program} of fairseq-smoe models runs in one process (this run has "
                         f"{dist.get_world_size()} workers): it reads and merges the expert shards "
                         "of a checkpoint saved by any number of workers. Pass the worker-0 file "
                         "as --path and run it without scripts/launch_cpu.py, torchrun or "
                         "--distributed-world-size")


# ---------------------------------------------------------------------------------------------
# Options and data that fairseq would otherwise reject with a traceback, checked when the model
# is built (fairseq-train builds it before it loads any data split).

def check_training_options(args) -> None:
    """--update-freq, --adam-betas and, for language models, --max-tokens against
    --tokens-per-sample."""
    import ast

    update_freq = getattr(args, "update_freq", None)
    if update_freq is not None:
        values = update_freq if isinstance(update_freq, (list, tuple)) else [update_freq]
        if any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"--update-freq must be a positive integer (batches per update); got "
                             f"{','.join(map(str, values))}")
    betas = getattr(args, "adam_betas", None)
    if isinstance(betas, str) and getattr(args, "optimizer", None) in ("adam", "smoe_adam"):
        try:
            parsed = ast.literal_eval(betas)
            ok = len(parsed) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in parsed)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            ok = False
        if not ok:
            raise ValueError(f"--adam-betas must be two numbers in [0, 1), written like "
                             f"'(0.9, 0.98)'; got {betas!r}")
    max_tokens, per_sample = getattr(args, "max_tokens", None), getattr(args, "tokens_per_sample", None)
    if max_tokens and per_sample and getattr(args, "task", None) == "language_modeling" \
            and max_tokens < per_sample:
        raise ValueError(f"--max-tokens {max_tokens} is smaller than --tokens-per-sample "
                         f"{per_sample}: no batch can hold one sample; raise --max-tokens to at "
                         f"least {per_sample} or lower --tokens-per-sample")


# Reading every token of a split to compare it with the dictionary costs a pass over the file:
# done for files up to this size (the sizes and the file length are checked for any size).
_SCAN_BYTES = 1 << 30


def _splits(args):
    names = []
    if _program() in ("fairseq-train", "fairseq-hydra-train", "train.py", "hydra_train.py"):
        names.append(getattr(args, "train_subset", None) or "train")
        if not getattr(args, "disable_validation", False):
            names += (getattr(args, "valid_subset", None) or "valid").split(",")
    elif getattr(args, "gen_subset", None) and _program() != "fairseq-interactive":
        names.append(args.gen_subset)
    return [n for n in names if n]


def _check_split_file(prefix: str, dictionary, label: str) -> None:
    """One binarized split (``prefix``.idx/.bin): readable, not truncated, not empty (training),
    and no token past the dictionary."""
    import numpy as np

    if not (os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin")):
        return  # fairseq's own "Dataset not found" names it; other formats are not ours to check
    try:
        from fairseq.data.indexed_dataset import MMapIndexedDataset

        index = MMapIndexedDataset.Index(prefix + ".idx")
    except Exception:  # not the mmap format (fairseq's older ones), or a damaged header
        return
    sizes, itemsize = index.sizes, np.dtype(index.dtype).itemsize
    if len(index):
        last_pointer, last_size = index[len(index) - 1]
        expected = int(last_pointer) + int(last_size) * itemsize
    else:
        expected = 0
    actual = os.path.getsize(prefix + ".bin")
    if actual < expected:
        raise ValueError(f"{prefix}.bin is truncated ({actual:,} of {expected:,} bytes that "
                         f"{prefix}.idx describes): binarize the data again (fairseq-preprocess, or "
                         f"the scripts/prepare-*.sh that made it)")
    if label == "train" and not len(sizes):
        raise ValueError(f"the training set {prefix} is empty (0 sentences): check the text given "
                         f"to fairseq-preprocess --trainpref")
    if dictionary is not None and 0 < expected <= _SCAN_BYTES:
        data = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r", shape=(expected // itemsize,))
        largest = int(data.max())
        if largest >= len(dictionary):
            raise ValueError(f"{prefix}.bin holds token id {largest}, but the dictionary has "
                             f"{len(dictionary)} entries: the data was binarized with another "
                             f"dictionary. Binarize it again with this one (fairseq-preprocess "
                             f"--srcdict), or point to the folder whose dict.*.txt made it")


def check_data(args, task) -> None:
    """Each split the command will read, in each data folder: binarized whole and with this
    dictionary. (A folder whose name holds ':' fails earlier, in fairseq's task setup; the
    CLI_ERRORS hook names that case.)"""
    data = getattr(args, "data", None)
    if not data or not isinstance(data, str):
        return
    parts = data.split(os.pathsep)
    source, target = getattr(args, "source_lang", None), getattr(args, "target_lang", None)
    for folder in parts:
        if not os.path.isdir(folder):
            continue
        for split in _splits(args):
            label = "train" if split == (getattr(args, "train_subset", None) or "train") else split
            if source and target:  # translation: split.src-tgt.lang (either pair order)
                for lang, dictionary in ((source, getattr(task, "source_dictionary", None)),
                                         (target, getattr(task, "target_dictionary", None))):
                    for pair in (f"{source}-{target}", f"{target}-{source}"):
                        _check_split_file(os.path.join(folder, f"{split}.{pair}.{lang}"),
                                          dictionary, label)
            else:
                _check_split_file(os.path.join(folder, split),
                                  getattr(task, "source_dictionary", None), label)
