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
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_smoe.distributed.checkpoints import (  # noqa: E402
    SHARD_META_KEY,
    base_path,
    load_for_this_process,
    select_expert_shard,
    shard_path,
)


def load_file(path):
    print(f"[reshard_experts] reading {path}", file=sys.stderr, flush=True)
    return torch.load(path, map_location="cpu", weights_only=False)  # trusted fairseq checkpoints


def reshard(checkpoint: str, workers: int, output: str) -> list:
    """Write ``output`` (and its shard files when workers > 1). Returns the paths written."""
    if workers < 1:
        raise ValueError("--workers must be >= 1")
    source = base_path(checkpoint)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source} not found (give the worker-0 file, NAME.pt)")
    first = load_file(source)
    meta = first.get(SHARD_META_KEY)
    if meta is None:
        raise ValueError(f"{source} is not an expert-parallel checkpoint (no {SHARD_META_KEY!r}): "
                         f"it already holds all experts, and workers take their share of it "
                         f"when they load it")
    cache = {source: first}
    full = load_for_this_process(source, lambda p: cache.pop(p, None) or load_file(p), plan=None)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if workers == 1:
        torch.save(full, output)
        print(f"[reshard_experts] wrote {output}: all experts of {meta['world_size']} workers",
              file=sys.stderr)
        return [output]
    for key, total in meta["model_keys"].items():
        if total % workers:
            raise ValueError(f"{workers} workers cannot hold equal shares of the {total} experts "
                             f"of {key}; choose a number of workers that divides {total}")
    written = []
    for rank in range(workers):
        plan = {"world_size": workers, "rank": rank, "model_keys": meta["model_keys"],
                "optimizer_slots": meta["optimizer_slots"]}
        path = shard_path(output, rank)
        torch.save(select_expert_shard(full, plan), path)
        written.append(path)
        print(f"[reshard_experts] wrote {path}: worker {rank} of {workers}", file=sys.stderr)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", help="worker-0 file of the run (NAME.pt)")
    parser.add_argument("--workers", "-n", type=int, default=1,
                        help="1 (default): one merged file; M > 1: files for M workers")
    parser.add_argument("--output", "-o", required=True,
                        help="output file (worker 0's when --workers > 1)")
    args = parser.parse_args(argv)
    if os.path.abspath(base_path(args.output)) == os.path.abspath(base_path(args.checkpoint)):
        parser.error("--output must differ from the input checkpoint")
    try:
        reshard(args.checkpoint, args.workers, args.output)
    except (ValueError, FileNotFoundError) as error:
        print(f"[reshard_experts] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
