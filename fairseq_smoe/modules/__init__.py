"""Pure-PyTorch Sparsely-Gated Mixture-of-Experts modules (no fairseq dependency)."""

from .balance import coefficient_of_variation, cv_squared, max_over_mean, smooth_load
from .experts import FeedForwardExperts
from .gating import GATING_MODES, BatchwiseGate, GateOutput, NoisyTopKGate, SoftmaxGate, build_gate
from .hierarchical_moe import HierarchicalMoELayer
from .moe_layer import MoELayer, MoELayerBase
from .projected_lstm import ProjectedLSTM
from .stats import MoEStats

__all__ = [
    "GATING_MODES",
    "BatchwiseGate",
    "FeedForwardExperts",
    "GateOutput",
    "HierarchicalMoELayer",
    "MoELayer",
    "MoELayerBase",
    "MoEStats",
    "NoisyTopKGate",
    "ProjectedLSTM",
    "SoftmaxGate",
    "build_gate",
    "coefficient_of_variation",
    "cv_squared",
    "max_over_mean",
    "smooth_load",
]
