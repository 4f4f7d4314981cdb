"""GNMT-style LSTM-MoE translation model (paper §5.3, App. E, App. F, App. G).

    encoder:  embed → LSTM₁ (bidirectional) → LSTM₂ → MoE → LSTM₃
    decoder:  embed → LSTM₁ → attention(query = LSTM₁ output) → MoE → LSTM₂([x; context]) → softmax

Every LSTM and MoE layer is residual: x + dropout(layer(x)); the MoE output passes through a
sigmoid first (``ResidualMoE``). LSTMs have ``hidden_size`` units (2048) projected to the model
size (512), torch's ``nn.LSTM(proj_size=...)``. Dropout is on the embedding, LSTM and MoE outputs.

Choices the paper leaves open (documented in the README):
    * The first encoder layer is bidirectional (GNMT); each direction has half the units and
      half the projection, so the layer costs what a unidirectional one does and outputs the
      model size.
    * The bottom decoder LSTM sees only the target embeddings (no input feeding). The whole
      target side therefore runs "convolutionally" in training (§3.1): one cuDNN-style LSTM call
      per layer, the attention for all steps as matrix products, one MoE call over all
      positions. The attention context is concatenated to the input of every later decoder LSTM.
    * The attention query is the bottom layer's residual output; the values are the encoder
      outputs.
    * The decoder MoE sits between decoder LSTM₁ and LSTM₂ on the query path; the context
      joins after it (MoE input and output are the model size, 512, as in the paper).

The MoE statistics go to the criterion as ``extra["moe_stats"] = {"encoder_moe": ...,
"decoder_moe": ...}``. Under incremental decoding (beam search) each call sees one time step,
and the decoder MoE routes exactly that step's tokens; in eval both gates are per-token
deterministic (thresholds for batchwise gating, clean top-k for noisy top-k), so step-by-step
decoding scores what a full forward scores.
"""

import warnings
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.models import (
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    register_model,
    register_model_architecture,
)

from ..modules.attention import ATTENTION_TYPES, EncoderDecoderAttention
from ..modules.residual_moe import ResidualMoE
from ..moe_args import add_moe_args, build_moe_layer, set_moe_defaults
from .parallel import setup_expert_parallel
from .run_checks import (
    check_data,
    check_precision_options,
    check_training_options,
    refuse_distributed_evaluation,
    refuse_in_language_model_tools,
)

DEFAULT_MAX_POSITIONS = 1024


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def make_lstm(input_size: int, output_size: int, hidden_size: int, flag: str,
              bidirectional: bool = False) -> nn.LSTM:
    """One LSTM layer of ``hidden_size`` units (per direction) whose output is ``output_size``
    (per direction): projected when hidden_size > output_size (LSTM-2048-512), plain when equal."""
    _check(hidden_size >= output_size,
           f"{flag} ({hidden_size}) must be at least the model size it projects to ({output_size})")
    proj_size = output_size if hidden_size > output_size else 0
    return nn.LSTM(input_size, hidden_size, batch_first=True, proj_size=proj_size,
                   bidirectional=bidirectional)


def run_lstm(lstm: nn.LSTM, x_BTD: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """Run an LSTM over right-padded sequences. A unidirectional layer runs on the padded batch
    as is: with padding on the right, real positions never see it (padding outputs are garbage;
    the caller masks them). A bidirectional layer's backward direction must start at each
    sentence's last real token: its input is each row's real tokens reversed in place (padding
    stays on the right), so that direction also runs unpacked, and its output is reversed back.
    Packing would do the same but needs the lengths on the host, a GPU sync per call; this
    reads nothing back. Padding outputs of a bidirectional layer are 0."""
    if not lstm.bidirectional:
        return lstm(x_BTD)[0]
    T = x_BTD.shape[1]
    time_T = torch.arange(T, device=x_BTD.device)
    real_BT = time_T[None, :] < lengths_B[:, None]
    # t ↦ length-1-t on real positions, t ↦ t on padding: its own inverse.
    reverse_BT = torch.where(real_BT, lengths_B[:, None] - 1 - time_T[None, :], time_T[None, :])
    forward_BTH = _run_direction(lstm, x_BTD, "")
    reverse_BTD = reverse_BT.unsqueeze(-1)
    backward_BTH = _run_direction(lstm, x_BTD.gather(1, reverse_BTD.expand_as(x_BTD)), "_reverse")
    backward_BTH = backward_BTH.gather(1, reverse_BTD.expand_as(backward_BTH))
    out_BTD = torch.cat([forward_BTH, backward_BTH], dim=-1)
    return out_BTD.masked_fill(~real_BT.unsqueeze(-1), 0.0)


def _run_direction(lstm: nn.LSTM, x_BTD: torch.Tensor, suffix: str) -> torch.Tensor:
    """One direction of a one-layer ``lstm`` (its parameters ``*_l0{suffix}``) from zero state."""
    names = ["weight_ih_l0", "weight_hh_l0"] + (["bias_ih_l0", "bias_hh_l0"] if lstm.bias else []) \
        + (["weight_hr_l0"] if lstm.proj_size > 0 else [])
    weights = [getattr(lstm, name + suffix) for name in names]
    B = x_BTD.shape[0]
    h0 = x_BTD.new_zeros(1, B, lstm.proj_size or lstm.hidden_size)
    c0 = x_BTD.new_zeros(1, B, lstm.hidden_size)
    out_BTH, _, _ = torch.lstm(x_BTD, (h0, c0), weights, lstm.bias, 1, 0.0, lstm.training,
                               False, True)
    return out_BTH


# cuDNN takes one direction's weights from the middle of the layer's flat weight buffer as "not
# one contiguous chunk" and copies them per call (a few MB, against packing's host sync of the
# lengths); its warning about that says nothing the user can act on. The filter is set once here:
# a catch_warnings() around each call would reset Python's once-per-place record of every
# warning in the process, so that fairseq's and torch's warnings printed again at every step.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single")


def make_embedding(num_embeddings: int, dim: int, padding_idx: int) -> nn.Embedding:
    embedding = nn.Embedding(num_embeddings, dim, padding_idx=padding_idx)
    nn.init.normal_(embedding.weight, mean=0.0, std=dim**-0.5)
    nn.init.constant_(embedding.weight[padding_idx], 0.0)
    return embedding


class LSTMMoETranslationEncoder(FairseqEncoder):
    """``layers`` residual LSTM layers with a residual MoE before the last one (paper: 3 layers,
    MoE between layers 2 and 3). Output: encoder states [B, S, D], padded like the input."""

    def __init__(self, dictionary, embed_tokens: nn.Embedding, hidden_size: int, num_layers: int,
                 bidirectional: bool, moe: Optional[nn.Module], dropout: float,
                 max_source_positions: int):
        super().__init__(dictionary)
        dim = embed_tokens.embedding_dim
        hidden = hidden_size
        _check(num_layers >= 2, f"--encoder-layers must be >= 2 (the MoE sits before the last "
                                f"layer); got {num_layers}")
        self.padding_idx = dictionary.pad()
        self.embed_tokens = embed_tokens
        self.dropout = nn.Dropout(dropout)
        self.max_source_positions = max_source_positions
        self.bidirectional = bool(bidirectional)
        layers = []
        for layer in range(num_layers):
            if layer == 0 and self.bidirectional:
                _check(dim % 2 == 0 and hidden % 2 == 0,
                       f"a bidirectional first encoder layer splits --encoder-embed-dim ({dim}) and "
                       f"--encoder-hidden-size ({hidden}) between two directions; use even sizes "
                       f"or --no-encoder-bidirectional")
                lstm = make_lstm(dim, dim // 2, hidden // 2, "--encoder-hidden-size / 2",
                                 bidirectional=True)
            else:
                lstm = make_lstm(dim, dim, hidden, "--encoder-hidden-size")
            layers.append(lstm)
        self.layers = nn.ModuleList(layers)
        self.moe_position = num_layers - 1  # the MoE runs before this layer
        self.moe = ResidualMoE(moe, dropout) if moe is not None else None

    @classmethod
    def from_args(cls, args, dictionary, embed_tokens: nn.Embedding):
        """The options of ``args`` (after ``base_architecture``) as the keyword arguments."""
        return cls(dictionary, embed_tokens,
                   hidden_size=args.encoder_hidden_size,
                   num_layers=args.encoder_layers,
                   bidirectional=args.encoder_bidirectional,
                   moe=build_moe_layer(args, embed_tokens.embedding_dim),
                   dropout=args.dropout,
                   max_source_positions=args.max_source_positions)

    def forward(self, src_tokens: torch.Tensor, src_lengths: Optional[torch.Tensor] = None, **kwargs):
        # The LSTMs run on right padding; fairseq's translation task left-pads sources by
        # default. A stable sort of the padding flags moves each row's real tokens to the front
        # in order, whichever side the padding is on, without reading anything back (fairseq's
        # convert_padding_direction tests the layout on the host). The outputs go back to the
        # caller's layout, so attention weights index the caller's source positions
        # (fairseq-generate --print-alignment).
        caller_padding_BS = src_tokens.eq(self.padding_idx)
        order_BS = torch.sort(caller_padding_BS.to(torch.uint8), dim=1, stable=True).indices
        right_tokens = src_tokens.gather(1, order_BS)
        padding_mask_BS = right_tokens.eq(self.padding_idx)
        lengths_B = (~padding_mask_BS).sum(1)
        x_BSD = self.dropout(self.embed_tokens(right_tokens))
        moe_stats = {}
        for index, lstm in enumerate(self.layers):
            if index == self.moe_position and self.moe is not None:
                # All positions of all sentences in one MoE call (§3.1).
                x_BSD, moe_stats["encoder_moe"] = self.moe(x_BSD, padding_mask_BS)
            x_BSD = x_BSD + self.dropout(run_lstm(lstm, x_BSD, lengths_B))
        x_BSD = x_BSD.masked_fill(padding_mask_BS.unsqueeze(-1), 0.0)
        # Back to the caller's positions: the inverse permutation of order_BS.
        positions_BS = torch.arange(src_tokens.shape[1], device=src_tokens.device).expand_as(order_BS)
        inverse_BS = torch.empty_like(order_BS).scatter_(1, order_BS, positions_BS)
        x_BSD = x_BSD.gather(1, inverse_BS.unsqueeze(-1).expand_as(x_BSD))
        return {
            "encoder_out": x_BSD,  # [B, S, D]
            "encoder_padding_mask": caller_padding_BS,  # [B, S], True = padding
            "moe_stats": moe_stats,  # per batch, not per sentence: never reordered
        }

    def reorder_encoder_out(self, encoder_out: Dict, new_order: torch.Tensor) -> Dict:
        return {
            "encoder_out": encoder_out["encoder_out"].index_select(0, new_order),
            "encoder_padding_mask": encoder_out["encoder_padding_mask"].index_select(0, new_order),
            "moe_stats": encoder_out["moe_stats"],
        }

    def max_positions(self) -> int:
        return self.max_source_positions


class LSTMMoETranslationDecoder(FairseqIncrementalDecoder):
    """``layers`` residual LSTM layers; the first produces the attention query, a residual MoE
    follows it, and the attention context is fed to every later layer (paper: 2 layers)."""

    def __init__(self, dictionary, embed_tokens: nn.Embedding, encoder_dim: int, hidden_size: int,
                 num_layers: int, attention_dim: int, attention_type: str,
                 moe: Optional[nn.Module], dropout: float, share_input_output_embed: bool,
                 max_target_positions: int):
        super().__init__(dictionary)
        dim = embed_tokens.embedding_dim
        hidden = hidden_size
        _check(num_layers >= 2, f"--decoder-layers must be >= 2 (the MoE sits after the first "
                                f"layer); got {num_layers}")
        self.padding_idx = dictionary.pad()
        self.embed_tokens = embed_tokens
        self.dropout = nn.Dropout(dropout)
        self.max_target_positions = max_target_positions
        self.layers = nn.ModuleList(
            make_lstm(dim if layer == 0 else dim + encoder_dim, dim, hidden, "--decoder-hidden-size")
            for layer in range(num_layers)
        )
        self.attention = EncoderDecoderAttention(dim, encoder_dim, attention_dim, attention_type)
        self.moe = ResidualMoE(moe, dropout) if moe is not None else None
        self.share_input_output_embed = bool(share_input_output_embed)
        if self.share_input_output_embed:
            self.output_projection = None
        else:
            self.output_projection = nn.Linear(dim, len(dictionary), bias=False)
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=dim**-0.5)

    @classmethod
    def from_args(cls, args, dictionary, embed_tokens: nn.Embedding, encoder_dim: int):
        """The options of ``args`` (after ``base_architecture``) as the keyword arguments."""
        return cls(dictionary, embed_tokens, encoder_dim,
                   hidden_size=args.decoder_hidden_size,
                   num_layers=args.decoder_layers,
                   attention_dim=args.attention_dim,
                   attention_type=args.attention_type,
                   moe=build_moe_layer(args, embed_tokens.embedding_dim),
                   dropout=args.dropout,
                   share_input_output_embed=args.share_decoder_input_output_embed,
                   max_target_positions=args.max_target_positions)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                features_only: bool = False, **kwargs):
        x, extra = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        if encoder_out is None:
            raise ValueError("the lstm_moe_nmt decoder needs the encoder output (it attends over it)")
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]  # one step; the rest is in the cache
        cache = self.get_incremental_state(incremental_state, "cache") if incremental_state is not None \
            else None
        values_BSK = encoder_out["encoder_out"]
        source_padding_BS = encoder_out["encoder_padding_mask"]
        padding_mask_BT = prev_output_tokens.eq(self.padding_idx)

        new_cache: Dict[str, Optional[torch.Tensor]] = {}
        if cache is not None and cache.get("keys") is not None:
            keys_BSA = cache["keys"]
        else:
            keys_BSA = self.attention.project_keys(values_BSK)
        new_cache["keys"] = keys_BSA

        def step_state(index):
            if cache is None or cache.get(f"h{index}") is None:
                return None
            return cache[f"h{index}"], cache[f"c{index}"]

        x_BTD = self.dropout(self.embed_tokens(prev_output_tokens))
        out_BTD, (new_cache["h0"], new_cache["c0"]) = self.layers[0](x_BTD, step_state(0))
        x_BTD = x_BTD + self.dropout(out_BTD)
        # The bottom layer's output is the attention query (GNMT, §5.3).
        context_BTK, attn_BTS = self.attention(x_BTD, values_BSK, source_padding_BS, keys_BSA)
        moe_stats = dict(encoder_out.get("moe_stats") or {})
        if self.moe is not None:
            x_BTD, moe_stats["decoder_moe"] = self.moe(x_BTD, padding_mask_BT)
        for index in range(1, len(self.layers)):
            out_BTD, (new_cache[f"h{index}"], new_cache[f"c{index}"]) = self.layers[index](
                torch.cat([x_BTD, context_BTK], dim=-1), step_state(index))
            x_BTD = x_BTD + self.dropout(out_BTD)
        if incremental_state is not None:
            self.set_incremental_state(incremental_state, "cache", new_cache)
        return x_BTD, {"attn": [attn_BTS], "moe_stats": moe_stats}

    def output_layer(self, features_BTD):
        weight = self.embed_tokens.weight if self.output_projection is None \
            else self.output_projection.weight
        return F.linear(features_BTD, weight)

    def reorder_incremental_state(self, incremental_state, new_order):
        cache = self.get_incremental_state(incremental_state, "cache")
        if cache is None:
            return
        reordered = {}
        for name, tensor in cache.items():
            if tensor is None:
                reordered[name] = None
            elif name == "keys":
                reordered[name] = tensor.index_select(0, new_order)  # [B, S, A]
            else:
                reordered[name] = tensor.index_select(1, new_order)  # LSTM state [L, B, H]
        self.set_incremental_state(incremental_state, "cache", reordered)

    def max_positions(self) -> int:
        return self.max_target_positions


@register_model("lstm_moe_nmt")
class LSTMMoETranslationModel(FairseqEncoderDecoderModel):
    """GNMT-style LSTM encoder-decoder with sparsely-gated MoE layers (paper §5.3).

    Presets: ``lstm_moe_nmt`` (= ``lstm_moe_nmt_32``), ``lstm_moe_nmt_baseline`` (no MoE),
    ``lstm_moe_nmt_512h``, ``lstm_moe_nmt_2048h``, ``lstm_moe_nmt_multilingual``,
    ``lstm_moe_nmt_tiny`` and ``lstm_moe_nmt_tiny_h`` (tests)."""

    @staticmethod
    def add_args(parser):
        parser.add_argument("--dropout", type=float, metavar="D",
                            help="dropout on the embedding, LSTM and MoE outputs (paper: 0.4)")
        parser.add_argument("--encoder-embed-dim", type=int, metavar="N",
                            help="encoder embedding and layer size (paper: 512)")
        parser.add_argument("--encoder-hidden-size", type=int, metavar="N",
                            help="LSTM units per encoder layer, projected to the embed dim (2048)")
        parser.add_argument("--encoder-layers", type=int, metavar="N",
                            help="encoder LSTM layers; the MoE sits before the last (paper: 3)")
        parser.add_argument("--encoder-bidirectional", dest="encoder_bidirectional",
                            action="store_true", default=None,
                            help="make the first encoder layer bidirectional (GNMT; the default)")
        parser.add_argument("--no-encoder-bidirectional", dest="encoder_bidirectional",
                            action="store_false", help="all encoder layers unidirectional")
        parser.add_argument("--decoder-embed-dim", type=int, metavar="N",
                            help="decoder embedding and layer size (paper: 512)")
        parser.add_argument("--decoder-hidden-size", type=int, metavar="N",
                            help="LSTM units per decoder layer, projected to the embed dim (2048)")
        parser.add_argument("--decoder-layers", type=int, metavar="N",
                            help="decoder LSTM layers; the MoE sits after the first (paper: 2)")
        parser.add_argument("--attention-type", choices=ATTENTION_TYPES,
                            help="separable: Σ V tanh(xU) tanh(yW) (App. G); additive: "
                                 "Σ V tanh(xU + yW) (GNMT)")
        parser.add_argument("--attention-dim", type=int, metavar="N",
                            help="size of the attention projections U, W, V")
        parser.add_argument("--share-decoder-input-output-embed", action="store_true", default=None,
                            help="tie the decoder's input embedding and output projection")
        parser.add_argument("--share-all-embeddings", action="store_true", default=None,
                            help="one embedding for encoder, decoder input and output (needs "
                                 "fairseq-preprocess --joined-dictionary)")
        parser.add_argument("--max-source-positions", type=int, metavar="N")
        parser.add_argument("--max-target-positions", type=int, metavar="N")
        add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        refuse_in_language_model_tools("lstm_moe_nmt")
        refuse_distributed_evaluation()
        check_precision_options(args)
        base_architecture(args)
        src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
        if args.share_all_embeddings:
            if src_dict != tgt_dict:
                raise ValueError("--share-all-embeddings needs one dictionary for both languages: "
                                 "run fairseq-preprocess with --joined-dictionary")
            if args.encoder_embed_dim != args.decoder_embed_dim:
                raise ValueError("--share-all-embeddings needs --encoder-embed-dim == "
                                 "--decoder-embed-dim")
            args.share_decoder_input_output_embed = True
        encoder_embed = make_embedding(len(src_dict), args.encoder_embed_dim, src_dict.pad())
        decoder_embed = encoder_embed if args.share_all_embeddings else make_embedding(
            len(tgt_dict), args.decoder_embed_dim, tgt_dict.pad())
        encoder = LSTMMoETranslationEncoder.from_args(args, src_dict, encoder_embed)
        decoder = LSTMMoETranslationDecoder.from_args(args, tgt_dict, decoder_embed,
                                                      args.encoder_embed_dim)
        check_training_options(args)  # after the model's own options, as in the LM
        check_data(args, task)
        return setup_expert_parallel(cls(encoder, decoder), args)


def count_parameters(args, src_vocab_size: int, tgt_vocab_size: int) -> int:
    """Parameters of the model that ``args`` (after an architecture function) describe, counted
    on the meta device: nothing is allocated, so the 8.7B-parameter MoE-2048-h counts in seconds."""
    from argparse import Namespace
    from types import SimpleNamespace

    from fairseq.data import Dictionary

    def dictionary(size):
        d = Dictionary()
        while len(d) < size:
            d.add_symbol(f"w{len(d)}")
        return d

    src_dict = dictionary(src_vocab_size)
    tgt_dict = src_dict if getattr(args, "share_all_embeddings", False) else dictionary(tgt_vocab_size)
    task = SimpleNamespace(source_dictionary=src_dict, target_dictionary=tgt_dict)
    with torch.device("meta"):
        model = LSTMMoETranslationModel.build_model(Namespace(**vars(args)), task)
    return sum(p.numel() for p in model.parameters())


def _default(args, name: str, value) -> None:
    """Set option ``name`` to ``value`` unless given (None = not given; 0 is a value)."""
    if getattr(args, name, None) is None:
        setattr(args, name, value)


def base_architecture(args):
    """The paper's model dimensions (§5.3) with a flat 32-expert MoE (k = 4) and strictly
    balanced gating (App. F); the other presets change the MoE."""
    _default(args, "dropout", 0.4)
    _default(args, "encoder_embed_dim", 512)
    _default(args, "encoder_hidden_size", 2048)
    _default(args, "encoder_layers", 3)
    _default(args, "encoder_bidirectional", True)
    _default(args, "decoder_embed_dim", args.encoder_embed_dim)
    _default(args, "decoder_hidden_size", args.encoder_hidden_size)
    _default(args, "decoder_layers", 2)
    _default(args, "attention_type", "separable")
    _default(args, "attention_dim", args.decoder_embed_dim)
    args.share_decoder_input_output_embed = bool(getattr(args, "share_decoder_input_output_embed", None))
    args.share_all_embeddings = bool(getattr(args, "share_all_embeddings", None))
    _default(args, "max_source_positions", DEFAULT_MAX_POSITIONS)
    _default(args, "max_target_positions", DEFAULT_MAX_POSITIONS)
    set_moe_defaults(args, num_experts=32, groups=0, k=4, hidden_dim=2048, gating="batchwise",
                     w_importance=0.01, w_load=0.01)


register_model_architecture("lstm_moe_nmt", "lstm_moe_nmt")(base_architecture)


@register_model_architecture("lstm_moe_nmt", "lstm_moe_nmt_32")
def lstm_moe_nmt_32(args):
    """MoE-32: flat, 32 experts, k = 4 (§5.3)."""
    base_architecture(args)


@register_model_architecture("lstm_moe_nmt", "lstm_moe_nmt_baseline")
def lstm_moe_nmt_baseline(args):
    """The same LSTMs and attention without MoE layers."""
    _default(args, "moe_num_experts", 0)
    base_architecture(args)


@register_model_architecture("lstm_moe_nmt", "lstm_moe_nmt_512h")
def lstm_moe_nmt_512h(args):
    """MoE-512-h: hierarchical, 16 groups × 32 experts, k = 2 per level (App. E)."""
    set_moe_defaults(args, num_experts=512, groups=16, k=2, hidden_dim=2048, gating="batchwise",
                     w_importance=0.01, w_load=0.01)
    base_architecture(args)


@register_model_architecture("lstm_moe_nmt", "lstm_moe_nmt_2048h")
def lstm_moe_nmt_2048h(args):
    """MoE-2048-h: hierarchical, 16 groups × 128 experts, k = 2 per level (App. E)."""
    set_moe_defaults(args, num_experts=2048, groups=16, k=2, hidden_dim=2048, gating="batchwise",
                     w_importance=0.01, w_load=0.01)
    base_architecture(args)


@register_model_architecture("lstm_moe_nmt", "lstm_moe_nmt_multilingual")
def lstm_moe_nmt_multilingual(args):
    """Multilingual model (§5.4): flat 512 experts, k = 2, expert hidden 8192, noisy top-k."""
    set_moe_defaults(args, num_experts=512, groups=0, k=2, hidden_dim=8192, gating="noisy_top_k",
                     w_importance=0.01, w_load=0.01)
    base_architecture(args)


@register_model_architecture("lstm_moe_nmt", "lstm_moe_nmt_tiny")
def lstm_moe_nmt_tiny(args):
    """For tests: 32-dim layers, 64-unit LSTMs, 4 experts of hidden 64, k = 2, batchwise gating
    (about 0.13M parameters with a 20-symbol vocabulary)."""
    _default(args, "dropout", 0.1)
    _default(args, "encoder_embed_dim", 32)
    _default(args, "encoder_hidden_size", 64)
    _default(args, "attention_dim", 32)
    set_moe_defaults(args, num_experts=4, groups=0, k=2, hidden_dim=64, gating="batchwise",
                     w_importance=0.01, w_load=0.01)
    base_architecture(args)


@register_model_architecture("lstm_moe_nmt", "lstm_moe_nmt_tiny_h")
def lstm_moe_nmt_tiny_h(args):
    """The tiny model with a hierarchical MoE: 2 groups × 4 experts, k = 2 per level."""
    set_moe_defaults(args, num_experts=8, groups=2, k=2, hidden_dim=64, gating="batchwise",
                     w_importance=0.01, w_load=0.01)
    lstm_moe_nmt_tiny(args)
