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
