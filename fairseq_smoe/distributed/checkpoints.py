"""Checkpoints of expert-parallel training: one file per worker, merged or resharded on load.

Layout (W workers): worker 0 writes fairseq's usual file, e.g. ``checkpoint_best.pt``; worker
r > 0 writes ``checkpoint_best-expert-shard{r}.pt`` next to it. Each file is that worker's whole
trainer state (replicated parameters, its own experts, its optimizer state, the data iterator
state) plus ``state["moe_expert_shards"]``, which names the expert tensors and their totals:

    {"world_size": W, "rank": r, "run_id": a token all W workers of one training share,
     "model_keys": {state-dict key: experts in total},
     "optimizer_slots": {optimizer state index: experts in total}}

Every expert tensor (parameters and their optimizer moments) has the expert as its leading
dimension, so merging is a concatenation along dim 0 in rank order, and sharding a slice.

Loading (``load_for_this_process``, hooked into fairseq's ``load_checkpoint_to_cpu``):
    * the same W workers: each reads its own file — training continues exactly;
    * one process (fairseq-eval-lm, fairseq-generate, fairseq-validate, 1-worker training):
      all W files are read and merged into an ordinary full checkpoint;
    * M workers, M ≠ W: merged, then each worker keeps its share (M must divide the experts).
``scripts/reshard_experts.py`` writes merged or resharded files ahead of time.

Files of one checkpoint that come from different saves (a worker stopped during a save) or a
missing shard stop every worker with an error that names the newest numbered checkpoint whose
W files all exist and agree (``last_consistent_checkpoint``) and how to resume from it. Files
of two trainings (two runs writing one ``--save-dir``: same progress, other weights) differ in
their run id and are refused the same way; files saved before run ids existed carry none and
are compared by progress alone.
"""

import logging
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch

from ..checkpoint_files import CHECKSUM_KEY, base_path, numbered_checkpoints, peek, shard_path
from .data_position import continue_data_position, current_world_size, saved_world_size

logger = logging.getLogger(__name__)

SHARD_META_KEY = "moe_expert_shards"
# ---------------------------------------------------------------------------------------------
# What is sharded in a model


def expert_plan(model, rank: int, world_size: int) -> Optional[dict]:
    """Shard metadata of a model whose experts are sharded over workers (None if none).

    Optimizer slots are the positions of the expert parameters among the trainable parameters
    in ``model.parameters()`` order, which is how fairseq's trainer lists them to the optimizer
    (criterion parameters come after the model's)."""
    from .expert_parallel import is_expert_shard

    totals = {}
    for module_name, module in model.named_modules():
        if is_expert_shard(module):
            for param_name, param in module.named_parameters():
                key = f"{module_name}.{param_name}" if module_name else param_name
                totals[id(param)] = (key, module.num_experts_total)
    if not totals:
        return None
    model_keys, slots = {}, {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for index, param in enumerate(trainable):
        if id(param) in totals:
            slots[index] = totals[id(param)][1]
    for key, total in totals.values():
        model_keys[key] = total
    return {"world_size": world_size, "rank": rank, "model_keys": model_keys,
            "optimizer_slots": slots}


# ---------------------------------------------------------------------------------------------
# Merge and slice


def _progress(state) -> tuple:
    history = state.get("optimizer_history") or [{}]
    itr = (state.get("extra_state") or {}).get("train_iterator") or {}
    return history[-1].get("num_updates"), itr.get("epoch"), itr.get("iterations_in_epoch")


def _run_id(state) -> Optional[str]:
    return ((state or {}).get(SHARD_META_KEY) or {}).get("run_id")


def _same_save(state: dict, base_state: dict) -> bool:
    return _progress(state) == _progress(base_state) and _run_id(state) == _run_id(base_state)


def merge_expert_shards(states: List[dict], names: Optional[List[str]] = None) -> dict:
    """One full checkpoint from the W per-worker checkpoints of one save (in rank order)."""
    names = names or [f"shard {r}" for r in range(len(states))]
    meta = states[0].get(SHARD_META_KEY)
    if meta is None:
        raise ValueError(f"{names[0]} is not an expert-parallel checkpoint (no {SHARD_META_KEY!r})")
    world_size = meta["world_size"]
    if len(states) != world_size:
        raise ValueError(f"{names[0]} was saved by {world_size} workers; got {len(states)} files")
    for rank, (state, name) in enumerate(zip(states, names)):
        shard_meta = state.get(SHARD_META_KEY) or {}
        if shard_meta.get("rank") != rank or shard_meta.get("world_size") != world_size:
            raise ValueError(f"{name} is not worker {rank} of {world_size} of {names[0]}")
        if not _same_save(state, states[0]):
            raise ValueError(_different_saves(name, names[0], state, states[0], world_size))

    full = dict(states[0])
    full.pop(SHARD_META_KEY)
    full.pop(CHECKSUM_KEY, None)  # of worker 0's share only
    model = OrderedDict(states[0]["model"])
    for key in meta["model_keys"]:
        model[key] = torch.cat([state["model"][key] for state in states], dim=0)
    full["model"] = model
    optimizer_states = [state.get("last_optimizer_state") for state in states]
    if all(isinstance(s, dict) and "state" in s for s in optimizer_states):
        full["last_optimizer_state"] = _map_optimizer_slots(
            optimizer_states[0], meta["optimizer_slots"],
            lambda index, name, value, local: torch.cat(
                [s["state"][index][name] for s in optimizer_states], dim=0))
    return full


def select_expert_shard(state: dict, plan: dict) -> dict:
    """This worker's share of a full checkpoint: expert tensors of ``plan['model_keys']`` and
    ``plan['optimizer_slots']`` cut to the worker's experts; everything else unchanged."""
    rank, world_size = plan["rank"], plan["world_size"]

    def cut(tensor, total):
        if not (torch.is_tensor(tensor) and tensor.dim() >= 1 and tensor.shape[0] == total):
            return tensor
        per_worker = total // world_size
        return tensor[rank * per_worker:(rank + 1) * per_worker].clone()

    shard = dict(state)
    model = OrderedDict(state["model"])
    for key, total in plan["model_keys"].items():
        if key in model:
            model[key] = cut(model[key], total)
    shard["model"] = model
    optimizer_state = state.get("last_optimizer_state")
    if isinstance(optimizer_state, dict) and "state" in optimizer_state:
        shard["last_optimizer_state"] = _map_optimizer_slots(
            optimizer_state, plan["optimizer_slots"],
            lambda index, name, value, total: cut(value, total), use_total=True)
    shard[SHARD_META_KEY] = dict(plan)
    shard.pop(CHECKSUM_KEY, None)  # of the full model
    return shard


def _map_optimizer_slots(optimizer_state: dict, slots: Dict[int, int], fn: Callable,
                         use_total: bool = False) -> dict:
    """Copy of a torch optimizer state dict where each per-expert tensor of each expert slot
    (leading dimension = the slot's experts) is replaced by ``fn(index, name, value, n)``.

    ``n`` is the slot's total experts (use_total) or the local count found in the state."""
    new_state = dict(optimizer_state)
    per_param = dict(optimizer_state["state"])
    for index, total in slots.items():
        index = int(index)
        if index not in per_param:
            continue
        entry = dict(per_param[index])
        leading = _leading_dim(entry)
        for name, value in entry.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == leading:
                entry[name] = fn(index, name, value, total if use_total else leading)
        per_param[index] = entry
    new_state["state"] = per_param
    return new_state


def _leading_dim(entry: dict) -> Optional[int]:
    """Experts in a slot's state: the leading dimension of its largest tensor."""
    tensors = [v for v in entry.values() if torch.is_tensor(v) and v.dim() >= 1]
    if not tensors:
        return None
    return max(tensors, key=lambda t: t.dim()).shape[0]


# ---------------------------------------------------------------------------------------------
# Loading for the current process


def load_for_this_process(path: str, load_one: Callable[[str], dict],
                          plan: Optional[dict]) -> dict:
    """The state this process needs from checkpoint ``path`` (see the module docstring).

    ``load_one(path)`` reads one file; ``plan`` is this worker's ``expert_plan`` when its
    model's experts are sharded, else None (a full model)."""
    base = base_path(path)
    state = load_one(base)
    meta = state.get(SHARD_META_KEY)
    if meta is None:
        if plan is None:
            return state
        return continue_data_position(select_expert_shard(state, plan), saved_world_size(state),
                                      plan["world_size"])

    saved_world = meta["world_size"]
    if plan is not None and plan["world_size"] == saved_world:
        if plan["rank"] == 0:
            # The others compare their own file with this one; worker 0 reads only the
            # progress of theirs (no tensor data), so that it stops with the same message.
            for rank in range(1, saved_world):
                other = shard_path(base, rank)
                _require_file(other, base, saved_world)
                peer = peek(other)
                if peer is not None and not _same_save(peer, state):
                    raise ValueError(_different_saves(other, base, peer, state, saved_world))
            return state
        own_path = shard_path(base, plan["rank"])
        _require_file(own_path, base, saved_world)
        own = load_one(own_path)
        if not _same_save(own, state):
            raise ValueError(_different_saves(own_path, base, own, state, saved_world))
        return own

    paths = [shard_path(base, r) for r in range(saved_world)]
    for p in paths[1:]:
        _require_file(p, base, saved_world)
    logger.info(f"merging the expert shards of {saved_world} workers: {base} + "
                f"{saved_world - 1} x *-expert-shard*.pt")
    full = merge_expert_shards([state] + [load_one(p) for p in paths[1:]], paths)
    if plan is None:
        return continue_data_position(full, saved_world, current_world_size())
    logger.info(f"resharding experts from {saved_world} to {plan['world_size']} workers "
                f"(this is worker {plan['rank']})")
    return continue_data_position(select_expert_shard(full, plan), saved_world, plan["world_size"])


def _require_file(path: str, base: str, world_size: int) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{base} holds 1/{world_size} of the experts of an expert-parallel run; its other "
            f"shards are files named like {path} in the same directory. Copy all "
            f"{world_size} files together (or merge them with scripts/reshard_experts.py). "
            f"{_resume_hint(base, world_size)}")


# ---------------------------------------------------------------------------------------------
# After a worker died during a save


def consistent_save(base: str, world_size: int) -> bool:
    """Whether all ``world_size`` files of checkpoint ``base`` exist and come from one save."""
    states = []
    for rank in range(world_size):
        path = shard_path(base, rank)
        state = peek(path) if os.path.isfile(path) else None
        meta = (state or {}).get(SHARD_META_KEY) or {}
        if meta.get("rank") != rank or meta.get("world_size") != world_size:
            return False
        states.append(state)
    return all(_same_save(s, states[0]) for s in states)


def last_consistent_checkpoint(directory: str, world_size: int, limit: int = 20) -> Optional[str]:
    """The newest numbered checkpoint (``checkpointE.pt`` / ``checkpoint_E_U.pt``) of
    ``directory`` whose ``world_size`` files all exist and agree (of the newest ``limit``)."""
    for path in numbered_checkpoints(directory)[:limit]:
        if consistent_save(path, world_size):
            return path
    return None


def _resume_hint(base: str, world_size: int) -> str:
    if not os.path.isfile(base):
        return ""
    directory = os.path.dirname(base) or "."
    found = last_consistent_checkpoint(directory, world_size)
    if found is None:
        return (f"No numbered checkpoint in {directory} has all {world_size} files of one save; "
                f"resume from a copy, or start afresh in a new --save-dir.")
    return (f"The newest checkpoint whose {world_size} files all agree is {found}: resume from it "
            f"with --restore-file {found}")


def _different_saves(name: str, base: str, state: dict, base_state: dict, world_size: int) -> str:
    if _progress(state) == _progress(base_state):
        return (f"{name} and {base} come from different trainings (run ids {_run_id(state)} and "
                f"{_run_id(base_state)}, at the same progress {_progress(state)}), as when two runs "
                f"write into one --save-dir; the {world_size} files of one checkpoint must come from "
                f"one run. Give each run its own --save-dir. {_resume_hint(base, world_size)}")
    return (f"{name} and {base} come from different saves (updates/epoch/iteration "
            f"{_progress(state)} vs {_progress(base_state)}), as when a worker stopped during a "
            f"save; the {world_size} files of one checkpoint must be written together. "
            f"{_resume_hint(base, world_size)}")
