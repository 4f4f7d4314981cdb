"""Checkpoint files: their names, their checksums, and writes that appear all at once.

What the fairseq patches (compat/checkpoint_safety.py), expert-parallel loading
(distributed/checkpoints.py) and the offline tools (scripts/reshard_experts.py,
scripts/average_checkpoints.py) share, in one module that imports nothing else of the plugin:

* Names: worker 0 of an expert-parallel run writes fairseq's usual ``checkpoint_X.pt``, worker
  r > 0 ``checkpoint_X-expert-shard{r}.pt`` beside it (``shard_path``, ``base_path``);
  ``numbered_checkpoints`` lists a directory's ``checkpointE.pt`` / ``checkpoint_E_U.pt``,
  newest first; ``peek`` reads a file's metadata without its tensors.
* Atomic writes: ``atomic_write`` fills ``NAME.tmp-PID``, fsyncs it (``SMOE_CHECKPOINT_FSYNC=0``
  skips that), renames it and fsyncs the directory, so a kill at any moment leaves the old or the
  new file; a dead writer's temp file is removed by the next write of that name. A full,
  read-only or forbidden folder is one ValueError naming it and its free space.
  ``write_all`` does the same for several files that must appear together (a resharded run).
* Checksums: ``add_checksum`` stores a CRC32 of the bytes of every tensor of the model, the
  criterion and the optimizer state (``checked_tensors``) in ``state["moe_checksum"]``;
  ``verify_and_strip`` checks and removes it (``SMOE_CHECKPOINT_CHECKSUM=0``: neither).
* The tools' reading and output checks (``load_file``, ``output_files``, ...) raise ``Refused``,
  a ValueError the tools print as one line, before anything is created.
"""

import errno
import logging
import os
import re
import shutil
import sys
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

import torch

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "moe_checksum"
_CHECKED_SECTIONS = ("model", "criterion", "last_optimizer_state")
_NUMBERED_RE = re.compile(r"checkpoint(?:(\d+)|_(\d+)_(\d+))\.pt")
_COPY_CHUNK = 16 << 20


def _enabled(name: str) -> bool:
    return os.environ.get(name, "1") not in ("0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------
# Atomic files


def _temp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(path: str) -> None:
    """``NAME.tmp-PID`` files of writers that died (their PID no longer runs here)."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix = name + ".tmp-"
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        pid = entry[len(prefix):]
        if not (entry.startswith(prefix) and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.remove(os.path.join(directory, entry))
        except OSError:
            pass


_WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_NEARLY_FULL = 16 << 20


def free_bytes(directory: str) -> Optional[int]:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def cannot_write(directory: str, error: OSError, what: str) -> str:
    """The one line for a checkpoint folder that refuses a write (full, read-only, no rights)."""
    free = free_bytes(directory)
    space = f"; {free / 2**30:.2f} GiB free there" if free is not None else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there or give --save-dir on a disk with room"
    else:
        fix = "give --save-dir a folder this process may write"
    return f"cannot write in {directory} ({os.strerror(error.errno)}{space}): {what}; {fix}"


def check_writable_dir(directory: str, option: str) -> None:
    """``directory`` exists or can be made, and this process can write in it (a probe file)."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".smoe-write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as error:
        if error.errno in _WRITE_FAULTS + (errno.ENOTDIR, errno.EEXIST):
            raise ValueError(f"{option} {directory}: cannot write there "
                             f"({os.strerror(error.errno)}); nothing was trained or written. Give "
                             f"{option} a folder this process may write") from None
        raise


def check_save_dir(save_dir: str, needed: int) -> None:
    """Before training: the save folder can be written and has room for about one checkpoint
    (``needed`` bytes; a save writes a temporary file before it replaces the old one)."""
    check_writable_dir(save_dir, "--save-dir")
    free = free_bytes(save_dir)
    if free is not None and free < needed:
        raise ValueError(f"--save-dir {save_dir} has {free / 2**30:.2f} GiB free, and one checkpoint "
                         f"of this model needs about {needed / 2**30:.2f} GiB (weights and optimizer "
                         f"state); nothing was trained or written. Free some space or give --save-dir "
                         f"on a disk with room (or --no-save)")


def atomic_write(path: str, write: Callable) -> None:
    """``write(file)`` fills ``path`` as it appears all at once: temp name, fsync, rename."""
    path = os.path.abspath(path)
    temp = _temp_name(path)
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            if _enabled("SMOE_CHECKPOINT_FSYNC"):
                os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        # torch.save reports a full disk as a RuntimeError ("file write failed"): judged by the
        # space left while the partial file still holds it.
        full = isinstance(error, RuntimeError) and "write" in str(error) \
            and (free_bytes(os.path.dirname(path)) or 0) < _NEARLY_FULL
        try:
            os.remove(temp)
        except OSError:
            pass
        if full:
            error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if isinstance(error, OSError) and error.errno in _WRITE_FAULTS:
            raise ValueError(cannot_write(os.path.dirname(path), error,
                                          f"{os.path.basename(path)} was not written (the file "
                                          f"there, if any, is the previous save, whole)")) from None
        raise
    if _enabled("SMOE_CHECKPOINT_FSYNC"):
        _fsync_directory(os.path.dirname(path))
    _remove_stale_temps(path)


def atomic_copy(src: str, dst: str) -> None:
    def write(out):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, out, _COPY_CHUNK)

    atomic_write(dst, write)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` that never leaves a partial file; adds the checksum (for scripts)."""
    add_checksum(obj)
    atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------
# Checksums of the tensors: model, criterion, optimizer state


def _tensor_bytes(tensor):
    """The tensor's bytes as a buffer (contiguous CPU copy only when needed); None if it has none."""
    if tensor.is_sparse or tensor.is_quantized:
        return None
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous().reshape(-1)
    if tensor.numel() == 0:
        return b""
    return tensor.view(torch.uint8).numpy()


def _crc32(tensor) -> Optional[int]:
    data = _tensor_bytes(tensor)
    return None if data is None else zlib.crc32(data)


def checked_tensors(state: dict) -> dict:
    """``{name: tensor}`` of what the checksum covers: ``model.<key>`` for the model's state
    dict, ``criterion.<key>``, and ``last_optimizer_state.<path>`` (e.g. ``...state.3.exp_avg``)."""
    found = {}

    def walk(value, name):
        if torch.is_tensor(value):
            found[name] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{name}.{index}")

    for section in _CHECKED_SECTIONS:
        if state.get(section) is not None:
            walk(state[section], section)
    return found


def tensor_checksums(tensors: Mapping, threads: Optional[int] = None) -> dict:
    """``{name: CRC32 of the tensor's bytes}``. zlib releases the GIL: tensors in parallel."""
    names = list(tensors)
    threads = threads or min(8, os.cpu_count() or 1)
    if threads > 1 and len(names) > 1:
        with ThreadPoolExecutor(threads) as pool:
            sums = list(pool.map(lambda n: _crc32(tensors[n]), names))
    else:
        sums = [_crc32(tensors[n]) for n in names]
    return {n: s for n, s in zip(names, sums) if s is not None}


def add_checksum(state) -> None:
    """Store the checksum of ``state``'s tensors in it (fairseq-like checkpoints only)."""
    if (_enabled("SMOE_CHECKPOINT_CHECKSUM") and isinstance(state, dict)
            and isinstance(state.get("model"), Mapping)):
        state.pop(CHECKSUM_KEY, None)
        state[CHECKSUM_KEY] = {"algorithm": "crc32",
                               "tensors": tensor_checksums(checked_tensors(state))}


def damaged_tensors(state: dict, record: dict) -> List[str]:
    """Names whose bytes differ from ``record`` (or that are missing)."""
    expected = record["tensors"]
    tensors = checked_tensors(state)
    now = tensor_checksums({n: tensors[n] for n in expected if n in tensors})
    return [n for n in expected if now.get(n) != expected[n]]


def verify_and_strip(state, path: str) -> None:
    """Check ``state`` against the checksum saved in it (ValueError naming the file), then drop
    the checksum, so that nothing downstream carries it into a changed state."""
    if not isinstance(state, dict):
        return
    record = state.pop(CHECKSUM_KEY, None)
    if not isinstance(state.get("model"), Mapping) or not _enabled("SMOE_CHECKPOINT_CHECKSUM"):
        return
    if record is None:
        logger.info(f"{path}: no checksum (saved without fairseq-smoe's checkpoint files); "
                    f"not verified")
        return
    if not isinstance(record, dict) or record.get("algorithm") != "crc32":
        logger.warning(f"{path}: unknown checksum {type(record).__name__}; not verified")
        return
    bad = damaged_tensors(state, record)
    if bad:
        raise ValueError(
            f"{path} is damaged: {len(bad)} of its {len(record['tensors'])} tensors differ from "
            f"the checksum saved with them ({bad[0]}{', ...' if len(bad) > 1 else ''}). "
            f"{use_another(path)}") from None


# ---------------------------------------------------------------------------------------------
# Which checkpoints a directory holds


def numbered_checkpoints(directory: str) -> List[str]:
    """fairseq's numbered checkpoints in ``directory`` (``checkpointE.pt``, end of epoch E, and
    ``checkpoint_E_U.pt``, update U within epoch E), newest first, as paths."""
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    order = []
    for name in names:
        match = _NUMBERED_RE.fullmatch(name)
        if match:
            epoch_end, epoch, updates = match.groups()
            key = (int(epoch_end), 1, 0) if epoch_end else (int(epoch), 0, int(updates))
            order.append((key, name))
    return [os.path.join(directory, name) for _, name in sorted(order, reverse=True)]


def use_another(path: str) -> str:
    """The fix for an unusable checkpoint file: another checkpoint of the same directory."""
    directory = os.path.dirname(path)
    unusable = os.path.abspath(base_path(path))
    others = numbered_checkpoints(directory) + [os.path.join(directory, n) for n in
                                                ("checkpoint_last.pt", "checkpoint_best.pt")]
    others = [p for p in others if os.path.abspath(p) != unusable and os.path.isfile(p)]
    example = (f", e.g. {others[0]} (fairseq-train --restore-file {others[0]}, or --path "
               f"{others[0]})") if others else ""
    return f"Restore it from a copy or use another checkpoint{example}."


# ---------------------------------------------------------------------------------------------
# Reading


def file_name(f) -> str:
    name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) else "<checkpoint>"


# ---------------------------------------------------------------------------------------------
# Shard file names of expert-parallel runs

_SHARD_SUFFIX = "-expert-shard{}"
_SHARD_SUFFIX_RE = re.compile(r"-expert-shard(\d+)(\.pt)$")


def shard_suffix(rank: int) -> str:
    """fairseq ``checkpoint_suffix`` of worker ``rank`` (worker 0 keeps the plain names)."""
    return "" if rank == 0 else _SHARD_SUFFIX.format(rank)


def shard_path(base_path: str, rank: int) -> str:
    """``checkpoint_best.pt`` → ``checkpoint_best-expert-shard{rank}.pt`` (rank 0: unchanged)."""
    if rank == 0:
        return base_path
    root, ext = os.path.splitext(base_path)
    return root + shard_suffix(rank) + ext


def base_path(path: str) -> str:
    """The worker-0 file of a shard file name (other names unchanged)."""
    return _SHARD_SUFFIX_RE.sub(r"\2", path)


def peek(path: str) -> Optional[dict]:
    """A checkpoint's metadata without reading its tensors (memory-mapped); None if unreadable."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # trusted
    except Exception:  # damaged, truncated, or not in torch's zip format
        return None


# ---------------------------------------------------------------------------------------------
# The offline tools


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


def check_outputs_writable(outputs: list, force: bool) -> None:
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
    all: the outputs appear together or not at all (``atomic_torch_save`` does
    one file; its temporary name NAME.tmp-PID is used here too)."""
    temps = [_temp_name(os.path.abspath(path)) for path in outputs]
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
