#!/usr/bin/env python3
"""Average the model parameters of several checkpoints of one fairseq-smoe run.

The output is the last input with its model replaced by the element-wise mean of the inputs'
models (accumulated in float64, stored in each tensor's own dtype) and without the optimizer's
moments, which an average has no meaning for: it loads wherever a checkpoint is read for
inference (fairseq-generate, -eval-lm, -validate, -interactive: --path AVG.pt); fairseq-train
--restore-file AVG.pt goes on from it with a fresh optimizer, as --reset-optimizer would.

    # the last 5 epoch checkpoints
    python scripts/average_checkpoints.py checkpoints/checkpoint{6,7,8,9,10}.pt -o average.pt

Inputs must hold the same tensors (names, shapes, dtypes) and come from the same
architecture and moe_* options (--moe-k, --moe-gating, ...; the runtime-only
--moe-experts-backend, --moe-recompute and --moe-expert-parallel may differ); non-float tensors
(step counters) must be equal. Expert-parallel files are refused: merge each with scripts/reshard_experts.py
first. Each input's checksum is verified, the output gets its own and is written atomically.
Existing outputs are refused unless --force is given; an input is never overwritten. Errors are
one line ("average_checkpoints.py: error: ...") with exit status 2.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_smoe.checkpoint_files import (  # noqa: E402
    Refused,
    check_not_an_input,
    check_outputs_writable,
    load_file,
    output_files,
    write_all,
)
from fairseq_smoe.compat.checkpoint_safety import MOE_OPTIONS_KEY  # noqa: E402
from fairseq_smoe.distributed.checkpoints import SHARD_META_KEY  # noqa: E402

# Options that change how the model runs, not what it computes: one run may be resumed with
# another value, and its checkpoints still average.
RUNTIME_OPTIONS = ("moe_experts_backend", "moe_recompute", "moe_expert_parallel")


def _get(config, key):
    """``config[key]`` of a dict or DictConfig, ``config.key`` of a Namespace; None if absent."""
    if config is None:
        return None
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)


def model_options(state: dict) -> dict:
    """The architecture and the ``moe_*`` options a checkpoint was trained with: from its
    configuration (cfg["model"], a Namespace for these models, or state["args"] in older files),
    completed by the options recorded beside it (``smoe_moe_options``)."""
    config = _get(state.get("cfg"), "model")
    if config is None:
        config = state.get("args")
    items = {}
    if config is not None:
        items = dict(config.items()) if hasattr(config, "items") else dict(vars(config))
    options = {key: value for key, value in items.items()
               if str(key).startswith("moe_") and key not in RUNTIME_OPTIONS}
    for key, value in (state.get(MOE_OPTIONS_KEY) or {}).items():
        if key not in RUNTIME_OPTIONS:
            options.setdefault(key, value)
    arch = items.get("arch") or items.get("_name")
    if arch is not None:
        options["arch"] = arch
    return options


def check_same_options(first: dict, other: dict, first_path: str, other_path: str) -> None:
    for key in sorted(first.keys() & other.keys()):  # an option one file lacks is not compared
        if first[key] != other[key]:
            flag = "--arch" if key == "arch" else "--" + key.replace("_", "-")
            raise Refused(f"{other_path} was trained with {flag} {other[key]} but {first_path} with "
                          f"{flag} {first[key]}: these are different models; average checkpoints "
                          f"of one run")


def check_same_tensors(first: dict, other: dict, first_path: str, other_path: str) -> None:
    if first.keys() != other.keys():
        extra = sorted(set(first) ^ set(other))
        raise Refused(f"{other_path} and {first_path} hold different parameters ({extra[0]}"
                      f"{', ...' if len(extra) > 1 else ''}): average checkpoints of one run")
    for name, tensor in first.items():
        theirs = other[name]
        if theirs.shape != tensor.shape or theirs.dtype != tensor.dtype:
            raise Refused(f"{name} is {tuple(theirs.shape)} {theirs.dtype} in {other_path} but "
                          f"{tuple(tensor.shape)} {tensor.dtype} in {first_path}: average "
                          f"checkpoints of one run")
        if not tensor.is_floating_point() and not torch.equal(theirs, tensor):
            raise Refused(f"{name} (a {tensor.dtype} tensor) differs between {first_path} and "
                          f"{other_path}: it cannot be averaged")


def average(inputs: list, output: str, force: bool = False) -> dict:
    """Write the average of ``inputs`` to ``output``; returns the state written."""
    if len(inputs) < 1:
        raise Refused("give at least one checkpoint to average")
    if len(set(map(os.path.abspath, inputs))) != len(inputs):
        raise Refused("a checkpoint is given twice; give each once (it would weigh double)")
    for path in inputs:
        if not os.path.isfile(path):
            raise Refused(f"{path} not found")
    outputs = output_files(output, 1)
    check_not_an_input(outputs, inputs)
    check_outputs_writable(outputs, force)
    sums, first_model, first_options, state = None, None, None, None
    for path in inputs:
        state = load_file(path, "average_checkpoints")
        if state.get(SHARD_META_KEY) is not None:
            raise Refused(f"{path} is one worker's share of an expert-parallel checkpoint; merge "
                          f"it first: python scripts/reshard_experts.py {path} -o MERGED.pt")
        model = state["model"]
        if sums is None:
            first_options = model_options(state)
            first_model = {name: tensor for name, tensor in model.items()}
            sums = {name: tensor.to(torch.float64) for name, tensor in model.items()
                    if tensor.is_floating_point()}
            continue
        check_same_options(first_options, model_options(state), inputs[0], path)
        check_same_tensors(first_model, model, inputs[0], path)
        for name in sums:
            sums[name] += model[name].to(torch.float64)
    averaged = {name: (sums[name] / len(inputs)).to(tensor.dtype) if name in sums else tensor
                for name, tensor in first_model.items()}
    state["model"] = averaged
    state["last_optimizer_state"] = None  # moments of the last input only: meaningless here
    state["averaged_from"] = [os.path.abspath(path) for path in inputs]
    write_all([state], outputs)
    print(f"[average_checkpoints] wrote {output}: the mean of {len(inputs)} checkpoints",
          file=sys.stderr)
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="average_checkpoints.py",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files of one run")
    parser.add_argument("--output", "-o", required=True, help="output file")
    parser.add_argument("--force", action="store_true",
                        help="overwrite an existing output file (never an input)")
    args = parser.parse_args(argv)
    try:
        average(args.checkpoints, args.output, args.force)
    except (ValueError, FileNotFoundError) as error:  # Refused, and the checksum's ValueError
        parser.error(str(error))  # one line, exit status 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
