"""Command-line options for MoE layers in fairseq models, and the layer they describe.

Shared by every fairseq model of the plugin, so ``--moe-*`` flags mean the same everywhere:

    --moe-num-experts N     total experts (0: no MoE layer, as in the dense baselines)
    --moe-groups G          G > 1: hierarchical MoE (App. B), G groups of N/G experts each
    --moe-k K               experts per example (per level when hierarchical)
    --moe-hidden-dim H      expert hidden width
    --moe-expert-layers L   ReLU hidden layers per expert (MoE-1-Deep: 4)
    --moe-gating MODE       noisy_top_k | top_k | softmax | batchwise
    --moe-noise-epsilon E   added to the noise std, as in the reference code
    --moe-w-importance W, --moe-w-load W   balance-loss weights (paper: 0.1 LM, 0.01 MT)
    --moe-recompute         recompute expert activations in backward (App. D)
    --[no-]moe-expert-parallel   shard experts across distributed workers (default: on)
    --moe-experts-backend B auto | loop | grouped_mm | triton (default: SMOE_EXPERTS_BACKEND,
                            else auto; see fairseq_smoe/ops)

Models set their own defaults in their ``base_architecture`` with ``getattr(args, ..., default)``.
"""

import math

from .modules import GATING_MODES, HierarchicalMoELayer, MoELayer
from .ops import BACKENDS


def add_moe_args(parser) -> None:
    group = parser.add_argument_group("Mixture of Experts")
    group.add_argument("--moe-num-experts", type=int, metavar="N",
                       help="number of experts (0: no MoE layer); with --moe-groups G > 1 the "
                            "total of all groups, so each group has N/G experts")
    group.add_argument("--moe-groups", type=int, metavar="G",
                       help="number of primary groups for a hierarchical MoE (App. B); "
                            "0 or 1 means a flat MoE")
    group.add_argument("--moe-k", type=int, metavar="K",
                       help="experts per example (per level for a hierarchical MoE)")
    group.add_argument("--moe-hidden-dim", type=int, metavar="H", help="expert hidden width")
    group.add_argument("--moe-expert-layers", type=int, metavar="L",
                       help="ReLU hidden layers in each expert")
    group.add_argument("--moe-gating", choices=GATING_MODES,
                       help="gating network: noisy_top_k (§2.1), top_k (no noise), softmax "
                            "(dense), batchwise (App. F strictly balanced)")
    group.add_argument("--moe-noise-epsilon", type=float, metavar="E",
                       help="added to softplus(x W_noise) in noisy top-k gating")
    group.add_argument("--moe-w-importance", type=float, metavar="W",
                       help="weight of the importance loss w_importance·CV(Importance)^2")
    group.add_argument("--moe-w-load", type=float, metavar="W",
                       help="weight of the load loss w_load·CV(Load)^2")
    group.add_argument("--moe-recompute", action="store_true", default=None,
                       help="recompute expert hidden activations in backward to save memory")
    group.add_argument("--moe-expert-parallel", dest="moe_expert_parallel", action="store_true",
                       default=None,
                       help="when training is distributed, shard each MoE layer's experts across "
                            "the workers (the default)")
    group.add_argument("--no-moe-expert-parallel", dest="moe_expert_parallel",
                       action="store_false",
                       help="replicate the experts on every worker (plain data parallelism)")
    group.add_argument("--moe-experts-backend", choices=BACKENDS, default=None,
                       help="how the experts run: loop (CPU expert loop), grouped_mm "
                            "(torch._grouped_mm), triton (Triton kernels), auto (loop on CPU; on "
                            "CUDA grouped_mm for bf16 on compute capability 9.x, else triton); "
                            "default: $SMOE_EXPERTS_BACKEND, else auto")


def set_moe_defaults(args, num_experts=0, groups=0, k=4, hidden_dim=1024, expert_layers=1,
                     gating="noisy_top_k", noise_epsilon=1e-2, w_importance=0.1, w_load=0.1,
                     recompute=False, expert_parallel=True) -> None:
    """Fill unset ``--moe-*`` options (for ``base_architecture`` functions)."""
    defaults = dict(moe_num_experts=num_experts, moe_groups=groups, moe_k=k,
                    moe_hidden_dim=hidden_dim, moe_expert_layers=expert_layers,
                    moe_gating=gating, moe_noise_epsilon=noise_epsilon,
                    moe_w_importance=w_importance, moe_w_load=w_load, moe_recompute=recompute,
                    moe_expert_parallel=expert_parallel)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


_INTEGER_OPTIONS = ("moe_num_experts", "moe_groups", "moe_k", "moe_hidden_dim", "moe_expert_layers")
_NUMBER_OPTIONS = ("moe_noise_epsilon", "moe_w_importance", "moe_w_load")


def _check_option_types(args) -> None:
    """Values of the wrong type (a hydra override ``+model.moe_k=two`` arrives as a string)."""
    for name in _INTEGER_OPTIONS + _NUMBER_OPTIONS:
        value = getattr(args, name, None)
        integer = name in _INTEGER_OPTIONS
        wanted = int if integer else (int, float)
        if value is not None and (isinstance(value, bool) or not isinstance(value, wanted)):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} (model.{name}) must be {'an integer' if integer else 'a number'}; "
                             f"got {value!r}")
    gating = getattr(args, "moe_gating", None)
    if gating is not None and gating not in GATING_MODES:
        raise ValueError(f"--moe-gating (model.moe_gating) must be one of {', '.join(GATING_MODES)}; "
                         f"got {gating!r}")


def build_moe_layer(args, dim: int):
    """The MoE layer that ``args`` describe (dim → dim), or None if --moe-num-experts is 0.

    Raises ValueError with the flag to fix for impossible settings."""
    _check_option_types(args)
    num_experts = args.moe_num_experts
    if num_experts is None or num_experts == 0:
        return None
    if num_experts < 0:
        raise ValueError(f"--moe-num-experts must be >= 0; got {num_experts}")
    common = dict(hidden_dim=args.moe_hidden_dim, gating=args.moe_gating,
                  num_hidden_layers=args.moe_expert_layers, noise_epsilon=args.moe_noise_epsilon,
                  w_importance=args.moe_w_importance, w_load=args.moe_w_load,
                  recompute_activations=bool(args.moe_recompute),
                  backend=getattr(args, "moe_experts_backend", None))
    groups = args.moe_groups or 0
    if groups < 0:
        raise ValueError(f"--moe-groups must be >= 0 (0 or 1: a flat MoE, G > 1: G groups); "
                         f"got {groups}")
    for flag, value in (("--moe-w-importance", args.moe_w_importance),
                        ("--moe-w-load", args.moe_w_load),
                        ("--moe-noise-epsilon", args.moe_noise_epsilon)):
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(f"{flag} must be a finite number >= 0; got {value}")
    k = args.moe_k
    for flag, value in (("--moe-hidden-dim", args.moe_hidden_dim),
                        ("--moe-expert-layers", args.moe_expert_layers), ("--moe-k", k)):
        if value is None or value < 1:
            raise ValueError(f"{flag} must be a positive integer; got {value}")
    if groups > 1:
        if num_experts % groups:
            raise ValueError(f"--moe-num-experts {num_experts} is not divisible by --moe-groups "
                             f"{groups}; use a multiple of {groups}")
        per_group = num_experts // groups
        if k > min(groups, per_group):
            raise ValueError(f"--moe-k {k} is larger than --moe-groups {groups} or the experts "
                             f"per group ({per_group}); use --moe-k <= {min(groups, per_group)}")
        return HierarchicalMoELayer(dim, dim, groups, per_group, k_primary=k, k_secondary=k,
                                    **common)
    if k > num_experts:
        raise ValueError(f"--moe-k {k} is larger than --moe-num-experts {num_experts}; "
                         f"use --moe-k <= {num_experts}")
    return MoELayer(dim, dim, num_experts, k=k, **common)
