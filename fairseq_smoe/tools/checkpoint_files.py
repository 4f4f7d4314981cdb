"""Reading and writing checkpoint files for the offline tools (scripts/reshard_experts.py,
scripts/average_checkpoints.py): every refusal is a ``Refused`` (a ValueError the tools print as
one line), checked before anything is created; outputs appear together or not at all."""

import os
import sys

import torch

from ..compat.checkpoint_safety import add_checksum, verify_and_strip
from ..distributed.checkpoints import base_path, shard_path


class Refused(ValueError):
    """A check failed: nothing was written."""


def load_file(path: str, tool: str) -> dict:
    """The checkpoint at ``path``, its checksum verified (ValueError naming the file if damaged)."""
    print(f"[{tool}] reading {path}", file=sys.stderr, flush=True)
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
