"""LSTM-MoE language models of the paper (§5.1, App. C) as a fairseq model.

    tokens → embedding → LSTM → MoE → LSTM → softmax

Every layer's output is dropped out and added to its input (residual); the MoE output goes
through a sigmoid before its dropout (``ResidualMoE``). The embedding's output is dropped out
too (it has no input to add). The LSTMs run over the whole sequence first and the MoE then
runs once on all time steps of the batch (the "convolutional" application of §3.1), never
inside a per-time-step loop; padding positions are never routed.

The same class builds the computationally matched baselines: ``--moe-num-experts 0`` removes
the MoE (4xLSTM-512: two LSTMs below and two above; LSTM-2048-512: one projected LSTM), and
MoE-1-Wide / MoE-1-Deep are one-expert MoE layers. Presets for every row of the paper's
Table 7 are registered at the end of this file.

    fairseq-train DATA --task language_modeling --user-dir fairseq_smoe \\
        --arch lstm_moe_lm_1b_moe_256_h --criterion smoe_cross_entropy ...

The decoder's extra dict carries ``{"attn": None, "moe_stats": {"moe": MoEStats}}``; the
``smoe_*`` criteria add the balance losses from it.
"""

import logging
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.models import (
    FairseqIncrementalDecoder,
    FairseqLanguageModel,
    register_model,
    register_model_architecture,
)
from fairseq.modules import AdaptiveSoftmax, FairseqDropout
from torch import Tensor

from ..criterions.smoe_cross_entropy import MOE_STATS_KEY
from ..modules.projected_lstm import ProjectedLSTM
from ..modules.residual_moe import ResidualMoE
from ..moe_args import add_moe_args, build_moe_layer, set_moe_defaults
from .parallel import setup_expert_parallel
from .run_checks import (
    check_data,
    check_precision_options,
    check_training_options,
    refuse_distributed_evaluation,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_TARGET_POSITIONS = 100000
MOE_LAYER_NAME = "moe"  # the name of the (single) MoE layer in the logged metrics


@register_model("lstm_moe_lm")
class LSTMMoELanguageModel(FairseqLanguageModel):
    """embedding → LSTM(s) → MoE → LSTM(s) → softmax, residual everywhere (App. C)."""

    @staticmethod
    def add_args(parser):
        parser.add_argument("--dropout", type=float, metavar="D",
                            help="dropout on every layer's output before the residual add "
                                 "(paper: 0.1 small models, 0.2 MoE-1024-h/4096-h)")
        parser.add_argument("--decoder-embed-dim", type=int, metavar="N",
                            help="model width: word embedding, LSTM outputs, MoE input/output")
        parser.add_argument("--decoder-hidden-size", type=int, metavar="N",
                            help="LSTM units (cell size)")
        parser.add_argument("--decoder-lstm-proj-size", type=int, metavar="N",
                            help="project each LSTM's hidden state to N (LSTMP, as in "
                                 "LSTM-2048-512); 0 = no projection")
        parser.add_argument("--lstm-layers-before-moe", type=int, metavar="N",
                            help="LSTM layers between the embedding and the MoE")
        parser.add_argument("--lstm-layers-after-moe", type=int, metavar="N",
                            help="LSTM layers between the MoE and the softmax")
        parser.add_argument("--share-decoder-input-output-embed", action="store_true",
                            default=None, help="tie the word embedding and the softmax weights")
        parser.add_argument("--adaptive-softmax-cutoff", metavar="EXPR",
                            help="comma-separated cutoffs of an adaptive softmax (large "
                                 "vocabularies, e.g. 1B Word's 793k words); empty: full softmax")
        parser.add_argument("--adaptive-softmax-dropout", type=float, metavar="D",
                            help="dropout inside the adaptive softmax tail projections")
        parser.add_argument("--adaptive-softmax-factor", type=float, metavar="F",
                            help="each adaptive-softmax tail cluster is F times narrower")
        add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        # An LSTM has no positional limit: sequences longer than the training blocks are fine
        # (fairseq-eval-lm --tokens-per-sample, long generations) unless the user sets one.
        max_target_positions = getattr(args, "max_target_positions", None) or DEFAULT_MAX_TARGET_POSITIONS
        try:
            check_precision_options(args)
            refuse_distributed_evaluation()
            decoder = LSTMMoEDecoder.from_args(args, task.target_dictionary, max_target_positions)
            # after the model's own options: those errors name the model's flags first
            check_training_options(args)
            check_data(args, task)
        except ValueError as error:  # bad option combinations: say which flag to change
            raise ValueError(f"lstm_moe_lm: {error}") from None
        return setup_expert_parallel(cls(decoder), args)


class LSTMMoEDecoder(FairseqIncrementalDecoder):
    """The network of App. C over [B, T] tokens. Time-major inside: x_TBD."""

    def __init__(self, dictionary, embed_dim: int, lstm_hidden_size: int, lstm_proj_size: int,
                 lstm_layers_before_moe: int, lstm_layers_after_moe: int,
                 moe: Optional[nn.Module], dropout: float, share_input_output_embed: bool = False,
                 adaptive_softmax_cutoff: Optional[List[int]] = None,
                 adaptive_softmax_dropout: float = 0.0, adaptive_softmax_factor: float = 4.0,
                 max_target_positions: int = DEFAULT_MAX_TARGET_POSITIONS):
        super().__init__(dictionary)
        lstm_output_size = lstm_proj_size or lstm_hidden_size
        if lstm_output_size != embed_dim:
            raise ValueError(
                f"the residual connections need LSTM outputs of the model width "
                f"(--decoder-embed-dim {embed_dim}); the LSTMs output {lstm_output_size} "
                f"(--decoder-hidden-size {lstm_hidden_size}, --decoder-lstm-proj-size "
                f"{lstm_proj_size}): set --decoder-lstm-proj-size {embed_dim} or "
                f"--decoder-hidden-size {embed_dim}")
        if lstm_layers_before_moe < 0 or lstm_layers_after_moe < 0:
            raise ValueError("--lstm-layers-before-moe and --lstm-layers-after-moe must be >= 0")
        if lstm_layers_before_moe + lstm_layers_after_moe == 0 and moe is None:
            raise ValueError("the model has no LSTM and no MoE layer; set --lstm-layers-before-moe "
                             "or --moe-num-experts")
        if share_input_output_embed and adaptive_softmax_cutoff:
            raise ValueError("--share-decoder-input-output-embed and --adaptive-softmax-cutoff "
                             "cannot be combined; drop one of them")
        self.embed_dim = embed_dim
        self.max_target_positions = max_target_positions
        self.share_input_output_embed = share_input_output_embed
        self.padding_idx = dictionary.pad()
        num_embeddings = len(dictionary)

        self.embed_tokens = nn.Embedding(num_embeddings, embed_dim, padding_idx=self.padding_idx)
        nn.init.uniform_(self.embed_tokens.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed_tokens.weight[self.padding_idx].zero_()
        self.dropout_module = FairseqDropout(dropout, module_name=self.__class__.__name__)

        def lstm():
            return ProjectedLSTM(embed_dim, lstm_hidden_size, proj_size=lstm_proj_size)

        self.lstms_before_moe = nn.ModuleList(lstm() for _ in range(lstm_layers_before_moe))
        self.moe = ResidualMoE(moe, dropout) if moe is not None else None
        self.lstms_after_moe = nn.ModuleList(lstm() for _ in range(lstm_layers_after_moe))

        self.adaptive_softmax = None
        self.output_projection = None
        if adaptive_softmax_cutoff:
            self.adaptive_softmax = AdaptiveSoftmax(num_embeddings, embed_dim,
                                                    adaptive_softmax_cutoff,
                                                    dropout=adaptive_softmax_dropout,
                                                    factor=adaptive_softmax_factor)
        elif not share_input_output_embed:
            self.output_projection = nn.Linear(embed_dim, num_embeddings, bias=False)
            nn.init.uniform_(self.output_projection.weight, -0.1, 0.1)

    @classmethod
    def from_args(cls, args, dictionary, max_target_positions):
        cutoff = adaptive_softmax_cutoffs(args.adaptive_softmax_cutoff, len(dictionary))
        return cls(
            dictionary,
            embed_dim=args.decoder_embed_dim,
            lstm_hidden_size=args.decoder_hidden_size,
            lstm_proj_size=args.decoder_lstm_proj_size,
            lstm_layers_before_moe=args.lstm_layers_before_moe,
            lstm_layers_after_moe=args.lstm_layers_after_moe,
            moe=build_moe_layer(args, args.decoder_embed_dim),
            dropout=args.dropout,
            share_input_output_embed=args.share_decoder_input_output_embed,
            adaptive_softmax_cutoff=cutoff,
            adaptive_softmax_dropout=args.adaptive_softmax_dropout,
            adaptive_softmax_factor=args.adaptive_softmax_factor,
            max_target_positions=max_target_positions,
        )

    # ----------------------------------------------------------------------------------------
    def forward(self, prev_output_tokens: Tensor,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                features_only: bool = False, **unused):
        x_BTD, extra = self.extract_features(prev_output_tokens, incremental_state)
        if not features_only:
            x_BTD = self.output_layer(x_BTD)
        return x_BTD, extra

    def extract_features(self, prev_output_tokens: Tensor,
                         incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                         **unused):
        """Features [B, T, D] before the softmax, and the extra dict with the MoE stats.

        With ``incremental_state`` only the last token is fed, starting from the cached LSTM
        states; the MoE then sees just that step's tokens, which gives the same result as the
        full forward because an MoE in eval mode routes each token on its own (§1.1 eval gate
        is deterministic; batchwise gating uses its learned thresholds)."""
        cached = self._cached_states(incremental_state)
        if cached is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
        # Always passed (no `.any()` test: that would read a value back from the device).
        padding_mask_TB = prev_output_tokens.eq(self.padding_idx).t()

        x_TBD = self.dropout_module(self.embed_tokens(prev_output_tokens.t()))
        new_states: Dict[str, Optional[Tensor]] = {}
        x_TBD = self._run_lstms(self.lstms_before_moe, "before", x_TBD, cached, new_states)
        extra: Dict[str, object] = {"attn": None}
        if self.moe is not None:
            x_TBD, stats = self.moe(x_TBD, padding_mask_TB)  # all time steps at once (§3.1)
            extra[MOE_STATS_KEY] = {MOE_LAYER_NAME: stats}
        x_TBD = self._run_lstms(self.lstms_after_moe, "after", x_TBD, cached, new_states)
        if incremental_state is not None and new_states:
            self.set_incremental_state(incremental_state, "lstm_states", new_states)
        return x_TBD.transpose(0, 1), extra

    def _run_lstms(self, lstms: nn.ModuleList, where: str, x_TBD: Tensor,
                   cached: Optional[Dict[str, Optional[Tensor]]],
                   new_states: Dict[str, Optional[Tensor]]) -> Tensor:
        for i, lstm in enumerate(lstms):
            key = f"{where}{i}"
            state = None
            if cached is not None:
                state = (cached[f"h_{key}"], cached[f"c_{key}"])
            y_TBD, (h, c) = lstm(x_TBD, state)
            x_TBD = x_TBD + self.dropout_module(y_TBD)  # residual around each LSTM (App. C)
            new_states[f"h_{key}"], new_states[f"c_{key}"] = h, c
        return x_TBD

    def _cached_states(self, incremental_state):
        if incremental_state is None:
            return None
        return self.get_incremental_state(incremental_state, "lstm_states")

    def output_layer(self, features_BTD: Tensor) -> Tensor:
        """Logits over the vocabulary; with an adaptive softmax the features pass unchanged
        (the criterion and ``get_normalized_probs`` apply it)."""
        if self.adaptive_softmax is not None:
            return features_BTD
        if self.share_input_output_embed:
            return F.linear(features_BTD, self.embed_tokens.weight)
        return self.output_projection(features_BTD)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        cached = self._cached_states(incremental_state)
        if cached is None:
            return
        reordered = {key: (None if state is None else state.index_select(1, new_order))
                     for key, state in cached.items()}  # states are [layers, B, ...]
        self.set_incremental_state(incremental_state, "lstm_states", reordered)

    def max_positions(self):
        return self.max_target_positions


def adaptive_softmax_cutoffs(spec, vocab_size: int) -> Optional[List[int]]:
    """Parse ``--adaptive-softmax-cutoff``. Cutoffs at or beyond the vocabulary are dropped with
    a warning (the 1B Word presets then run on small corpora with a full softmax)."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    cutoffs = utils.eval_str_list(spec, type=int) if isinstance(spec, str) else list(spec)
    if any(b <= a for a, b in zip(cutoffs, cutoffs[1:])) or (cutoffs and cutoffs[0] < 1):
        raise ValueError(f"--adaptive-softmax-cutoff must be increasing positive integers; got {spec}")
    kept = [c for c in cutoffs if c < vocab_size]
    if len(kept) < len(cutoffs):
        logger.warning(f"adaptive softmax: the dictionary has {vocab_size} entries, so cutoffs "
                       f"{[c for c in cutoffs if c >= vocab_size]} are dropped"
                       + ("" if kept else "; using a full softmax"))
    return kept or None


# ------------------------------------------------------------------------------------------
# Architectures. Paper defaults: width 512, 512-unit LSTMs, dropout 0.1, experts with one ReLU
# hidden layer of 1024, noisy top-k gating, w_importance = w_load = 0.1 (§5.1, App. C).


@register_model_architecture("lstm_moe_lm", "lstm_moe_lm")
def base_architecture(args):
    """The paper's 512-wide model with a flat MoE-32 (k = 4)."""
    args.dropout = getattr(args, "dropout", 0.1)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 512)
    args.decoder_hidden_size = getattr(args, "decoder_hidden_size", args.decoder_embed_dim)
    args.decoder_lstm_proj_size = getattr(args, "decoder_lstm_proj_size", 0)
    args.lstm_layers_before_moe = getattr(args, "lstm_layers_before_moe", 1)
    args.lstm_layers_after_moe = getattr(args, "lstm_layers_after_moe", 1)
    if getattr(args, "share_decoder_input_output_embed", None) is None:
        args.share_decoder_input_output_embed = False
    args.adaptive_softmax_cutoff = getattr(args, "adaptive_softmax_cutoff", None)
    args.adaptive_softmax_dropout = getattr(args, "adaptive_softmax_dropout", 0.0)
    args.adaptive_softmax_factor = getattr(args, "adaptive_softmax_factor", 4.0)
    set_moe_defaults(args, num_experts=32, groups=0, k=4, hidden_dim=1024, expert_layers=1,
                     gating="noisy_top_k", w_importance=0.1, w_load=0.1)


def _preset(name: str, **defaults):
    """Register ``name`` as an architecture of lstm_moe_lm whose unset options default to
    ``defaults`` (keys are option names; ``moe_*`` ones included) and then to the base."""

    def architecture(args):
        for key, value in defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        base_architecture(args)

    architecture.__name__ = name
    architecture.__doc__ = f"lstm_moe_lm preset {name}: {defaults}"
    register_model_architecture("lstm_moe_lm", name)(architecture)
    return architecture


# 1B Word, App. C.1: about 8.4M ops per time step. The paper used a sampled softmax over the
# 793k-word vocabulary; these presets use fairseq's adaptive softmax instead.
_1B = dict(adaptive_softmax_cutoff="60000,160000")
_FLAT = dict(moe_groups=0, moe_k=4, moe_hidden_dim=1024, **_1B)
_HIER = dict(moe_groups=16, moe_k=2, moe_hidden_dim=1024, **_1B)
_preset("lstm_moe_lm_1b_moe_4", moe_num_experts=4, **_FLAT)
_preset("lstm_moe_lm_1b_moe_32", moe_num_experts=32, **_FLAT)
_preset("lstm_moe_lm_1b_moe_256", moe_num_experts=256, **_FLAT)
_preset("lstm_moe_lm_1b_moe_256_h", moe_num_experts=256, **_HIER)
_preset("lstm_moe_lm_1b_moe_1024_h", moe_num_experts=1024, dropout=0.2, **_HIER)
_preset("lstm_moe_lm_1b_moe_4096_h", moe_num_experts=4096, dropout=0.2, **_HIER)
# Computationally matched baselines (App. C.1). A one-expert MoE has nothing to choose: its
# gate is always 1, so it uses plain top-k gating (no W_noise that would get no gradient).
_preset("lstm_moe_lm_1b_moe_1_wide", moe_num_experts=1, moe_k=1, moe_hidden_dim=4096,
        moe_gating="top_k", **_1B)
_preset("lstm_moe_lm_1b_moe_1_deep", moe_num_experts=1, moe_k=1, moe_hidden_dim=1024,
        moe_expert_layers=4, moe_gating="top_k", **_1B)
_preset("lstm_moe_lm_1b_4xlstm_512", moe_num_experts=0, lstm_layers_before_moe=2,
        lstm_layers_after_moe=2, **_1B)
_preset("lstm_moe_lm_1b_lstm_2048_512", moe_num_experts=0, decoder_hidden_size=2048,
        decoder_lstm_proj_size=512, lstm_layers_before_moe=1, lstm_layers_after_moe=0, **_1B)
# Larger budgets (App. C.2): width 1024, hierarchical MoE with 16 groups, k = 2 per level.
# The dropout of these two is our choice (the restated paper gives none for them).
_preset("lstm_moe_lm_1b_moe_34m", decoder_embed_dim=1024, decoder_hidden_size=1024,
        moe_num_experts=1024, moe_groups=16, moe_k=2, moe_hidden_dim=2048, dropout=0.2, **_1B)
_preset("lstm_moe_lm_1b_moe_143m", decoder_embed_dim=1024, decoder_hidden_size=4096,
        decoder_lstm_proj_size=1024, moe_num_experts=256, moe_groups=16, moe_k=2,
        moe_hidden_dim=8192, dropout=0.2, **_1B)

# Small presets: the CPU demo on WikiText-2 and the tests.
_preset("lstm_moe_lm_wikitext2_demo", decoder_embed_dim=256, decoder_hidden_size=256,
        moe_num_experts=16, moe_k=2, moe_hidden_dim=512, dropout=0.1,
        adaptive_softmax_cutoff="2000,10000")
_TINY = dict(decoder_embed_dim=32, decoder_hidden_size=32, moe_hidden_dim=48, dropout=0.0)
_preset("lstm_moe_lm_tiny", moe_num_experts=4, moe_k=2, **_TINY)
_preset("lstm_moe_lm_tiny_h", moe_num_experts=16, moe_groups=4, moe_k=2, **_TINY)
_preset("lstm_moe_lm_tiny_batchwise", moe_num_experts=4, moe_k=2, moe_gating="batchwise", **_TINY)
_preset("lstm_moe_lm_tiny_4xlstm", moe_num_experts=0, lstm_layers_before_moe=2,
        lstm_layers_after_moe=2, **_TINY)
