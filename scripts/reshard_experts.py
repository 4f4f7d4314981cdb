#!/usr/bin/env python3
"""Merge or reshard the per-worker checkpoint files of an expert-parallel fairseq-smoe run.

A run on N workers saves ``NAME.pt`` (worker 0) and ``NAME-expert-shard{r}.pt`` (workers
r = 1..N-1), each with that worker's share of the experts. fairseq-smoe's loader already merges
or reshards them on load (fairseq-eval-lm, fairseq-generate, fairseq-validate, or training on
any M workers that divide the experts), so this script is only needed to produce standalone
files, e.g. to ship one file or to avoid reading all N files on every worker when resuming.

    # one full checkpoint (all experts), loadable without the other files:
    python scripts/reshard_experts.py checkpoints/checkpoint_best.pt -o model.pt
    # files for resuming on 4 workers: OUT.pt, OUT-expert-shard1.pt .. OUT-expert-shard3.pt
    python scripts/reshard_experts.py checkpoints/checkpoint_last.pt --workers 4 \\
        -o checkpoints4/checkpoint_last.pt

Existing output files are refused unless --force is given; an input is never overwritten. All
checks run before anything is created, and the outputs appear together (each is written under
a temporary name, then all are renamed), so a failed run leaves no partial files behind.
Errors are one line ("reshard_experts.py: error: ...") with exit status 2.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_smoe.compat.checkpoint_safety import add_checksum, verify_and_strip  # noqa: E402
from fairseq_smoe.distributed.checkpoints import (  # noqa: E402
    SHARD_META_KEY,
    base_path,
    load_for_this_process,
    select_expert_shard,
    shard_path,
)


class Refused(ValueError):
    """A check failed: nothing was written."""


def load_file(path):
    print(f"[reshard_experts] reading {path}", file=sys.stderr, flush=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # trusted checkpoints
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise Refused(f"cannot read {path} ({reason}): it is truncated or not a checkpoint; "
                      f"copy it again from the run") from None
    if not isinstance(state, dict) or "model" not in state:
        raise Refused(f"{path} is not a fairseq checkpoint (no 'model' entry)")
    verify_and_strip(state, path)  # the model checksum saved with it: ValueError if damaged
    return state


def output_files(output: str, workers: int) -> list:
    """The files ``-o output`` stands for: ``output`` and, for M > 1 workers, its shard files."""
    if os.path.isdir(output):
        raise Refused(f"-o {output} is a directory; give a file name, e.g. "
                      f"{os.path.join(output, 'checkpoint_last.pt')}")
    if base_path(output) != output:
        raise Refused(f"-o {output} is a shard file name; give worker 0's name "
                      f"{base_path(output)} (the shard files are named after it)")
    return [shard_path(output, rank) for rank in range(workers)]


def check_writable(outputs: list, force: bool) -> None:
    """No existing output unless ``force``; a folder that exists or can be made."""
    existing = [path for path in outputs if os.path.lexists(path)]
    if existing and not force:
        more = f" (and {len(existing) - 1} more of the output files)" if len(existing) > 1 else ""
        raise Refused(f"{existing[0]} exists{more}; choose another -o or add --force to overwrite")
    for path in existing:
        if os.path.isdir(path):
            raise Refused(f"{path} is a directory; choose another -o")
    ancestor = os.path.dirname(os.path.abspath(outputs[0]))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise Refused(f"cannot create the folder of {outputs[0]}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise Refused(f"cannot write to {ancestor} (permission denied); choose another -o")


def check_not_an_input(outputs: list, inputs: list) -> None:
    for out in outputs:
        for path in inputs:
            if os.path.abspath(out) == os.path.abspath(path) or (
                    os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path)):
                raise Refused(f"-o would overwrite the input {path} (even with --force); "
                              f"choose another -o")


def write_all(states: list, outputs: list) -> None:
    """Write every state under a temporary name next to its target (fsynced), then rename them
    all: the outputs appear together or not at all (checkpoint_safety.atomic_torch_save does
    one file; its temporary name NAME.tmp-PID is used here too)."""
    temps = [f"{os.path.abspath(path)}.tmp-{os.getpid()}" for path in outputs]
    renamed, current = 0, outputs[0]  # for the message
    try:
        os.makedirs(os.path.dirname(os.path.abspath(outputs[0])), exist_ok=True)
        for index, state in enumerate(states):
            current = outputs[index]
            add_checksum(state)  # of this file's own tensors, verified when it is loaded
            with open(temps[index], "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        for index, temp in enumerate(temps):
            current = outputs[index]
            os.replace(temp, current)
            renamed += 1
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        done = "nothing was written" if renamed == 0 else f"only {outputs[:renamed]} were written"
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise Refused(f"cannot write {current}: {reason}; {done}") from None
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)


def reshard(checkpoint: str, workers: int, output: str, force: bool = False) -> list:
    """Write ``output`` (and its shard files when workers > 1). Returns the paths written."""
    if workers < 1:
        raise Refused(f"--workers must be >= 1 (got {workers})")
    source = base_path(checkpoint)
    if not os.path.isfile(source):
        raise Refused(f"{source} not found (give the worker-0 file, NAME.pt)")
    outputs = output_files(output, workers)
    check_not_an_input(outputs, [source])
    check_writable(outputs, force)
    first = load_file(source)
    meta = first.get(SHARD_META_KEY)
    if meta is None:
        raise Refused(f"{source} is not an expert-parallel checkpoint (no {SHARD_META_KEY!r}): "
                      f"it already holds all experts, and workers take their share of it "
                      f"when they load it")
    for key, total in meta["model_keys"].items():
        if total % workers:
            raise Refused(f"{workers} workers cannot hold equal shares of the {total} experts "
                          f"of {key}; choose a number of workers that divides {total}")
    check_not_an_input(outputs, [shard_path(source, r) for r in range(meta["world_size"])])
    cache = {source: first}
    full = load_for_this_process(source, lambda p: cache.pop(p, None) or load_file(p), plan=None)
    if workers == 1:
        write_all([full], outputs)
        print(f"[reshard_experts] wrote {output}: all experts of {meta['world_size']} workers",
              file=sys.stderr)
        return outputs
    shards = [select_expert_shard(full, {"world_size": workers, "rank": rank,
                                         "model_keys": meta["model_keys"],
                                         "optimizer_slots": meta["optimizer_slots"]})
              for rank in range(workers)]
    write_all(shards, outputs)
    for rank, path in enumerate(outputs):
        print(f"[reshard_experts] wrote {path}: worker {rank} of {workers}", file=sys.stderr)
    return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reshard_experts.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", help="worker-0 file of the run (NAME.pt)")
    parser.add_argument("--workers", "-n", type=int, default=1,
                        help="1 (default): one merged file; M > 1: files for M workers")
    parser.add_argument("--output", "-o", required=True,
                        help="output file (worker 0's when --workers > 1)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing output files (never an input)")
    args = parser.parse_args(argv)
    try:
        reshard(args.checkpoint, args.workers, args.output, args.force)
    except (ValueError, FileNotFoundError) as error:  # Refused, and the loader's own checks
        parser.error(str(error))  # one line, exit status 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
