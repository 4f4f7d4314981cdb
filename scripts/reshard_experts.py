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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_smoe.checkpoint_files import (  # noqa: E402
    Refused,
    base_path,
    check_not_an_input,
    check_outputs_writable,
    load_file,
    output_files,
    shard_path,
    write_all,
)
from fairseq_smoe.distributed.checkpoints import (  # noqa: E402
    SHARD_META_KEY,
    load_for_this_process,
    select_expert_shard,
)


def read(path):
    return load_file(path, "reshard_experts")


def reshard(checkpoint: str, workers: int, output: str, force: bool = False) -> list:
    """Write ``output`` (and its shard files when workers > 1). Returns the paths written."""
    if workers < 1:
        raise Refused(f"--workers must be >= 1 (got {workers})")
    source = base_path(checkpoint)
    if not os.path.isfile(source):
        raise Refused(f"{source} not found (give the worker-0 file, NAME.pt)")
    outputs = output_files(output, workers)
    check_not_an_input(outputs, [source])
    check_outputs_writable(outputs, force)
    first = read(source)
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
    full = load_for_this_process(source, lambda p: cache.pop(p, None) or read(p), plan=None)
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
