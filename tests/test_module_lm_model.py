"""lstm_moe_lm: wiring of App. C, incremental decoding, padding, presets and their costs."""

import argparse

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY

from fairseq_smoe.models.lm_costs import lm_costs
from fairseq_smoe.models.lstm_moe_lm import LSTMMoEDecoder, adaptive_softmax_cutoffs
from fairseq_smoe.modules import ProjectedLSTM
from fairseq_smoe.plugin import install

install()  # the plugin, as --user-dir does: registers it with fairseq, installs its patches


def make_dictionary(num_words=50):
    d = Dictionary()
    for i in range(num_words):
        d.add_symbol(f"w{i}")
    return d


def make_args(arch="lstm_moe_lm_tiny", **overrides):
    args = argparse.Namespace(**overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


def build_decoder(arch="lstm_moe_lm_tiny", num_words=50, randomize=True, **overrides):
    decoder = LSTMMoEDecoder.from_args(make_args(arch, **overrides), make_dictionary(num_words), 1024)
    if randomize:  # zero-initialised gates would route every token alike
        with torch.no_grad():
            for name, p in decoder.named_parameters():
                if "gate" in name:
                    p.add_(torch.randn_like(p) * 0.5)
    return decoder


def full_and_incremental_lprobs(decoder, tokens_BT):
    decoder.eval()
    with torch.no_grad():
        full = decoder.get_normalized_probs(decoder(tokens_BT), log_probs=True)
        state, steps = {}, []
        for t in range(tokens_BT.shape[1]):
            out = decoder(tokens_BT[:, : t + 1], incremental_state=state)
            steps.append(decoder.get_normalized_probs(out, log_probs=True))
    return full, torch.cat(steps, dim=1)


CASES = {
    "flat": dict(arch="lstm_moe_lm_tiny"),
    "hierarchical": dict(arch="lstm_moe_lm_tiny_h"),
    "batchwise": dict(arch="lstm_moe_lm_tiny_batchwise"),
    "softmax_gating": dict(arch="lstm_moe_lm_tiny", moe_gating="softmax"),
    "4xlstm_baseline": dict(arch="lstm_moe_lm_tiny_4xlstm"),
    "projected_lstm": dict(arch="lstm_moe_lm_tiny", decoder_hidden_size=64, decoder_lstm_proj_size=32),
    "tied": dict(arch="lstm_moe_lm_tiny", share_decoder_input_output_embed=True),
    "adaptive_softmax": dict(arch="lstm_moe_lm_tiny", num_words=60, adaptive_softmax_cutoff="20,40"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_incremental_decoding_matches_full_forward(case):
    decoder = build_decoder(**CASES[case])
    tokens = torch.randint(4, len(decoder.dictionary), (3, 7))
    full, incremental = full_and_incremental_lprobs(decoder, tokens)
    assert full.shape == (3, 7, len(decoder.dictionary))
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


def test_reorder_incremental_state_follows_the_beam():
    decoder = build_decoder().eval()
    tokens = torch.randint(4, 50, (3, 5))
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        state = {}
        for t in range(3):
            decoder(tokens[:, : t + 1], incremental_state=state)
        decoder.reorder_incremental_state(state, order)
        reordered = tokens[order]
        step = decoder(reordered[:, :4], incremental_state=state)[0]
        full = decoder(reordered[:, :4])[0][:, -1:]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["lstm_moe_lm_tiny", "lstm_moe_lm_tiny_h"])
def test_training_and_decoding_steps_add_no_host_syncs(arch):
    """On a device-resident backend, a training step (padded or not) and an incremental
    decoding step with a reordered beam read nothing back to the host and make no tensor from
    Python data (each would make the host wait for a GPU)."""
    from fairseq_smoe.ops.counting import count_step

    decoder = build_decoder(arch, moe_experts_backend="grouped_mm").train()
    tokens = torch.randint(4, 50, (3, 6))
    padded = tokens.clone()
    padded[0, 4:] = decoder.dictionary.pad()

    def train_step(batch):
        out, extra = decoder(batch)
        (out.logsumexp(-1).mean() + extra["moe_stats"]["moe"].loss).backward()

    train_step(padded)  # warm-up: lazy imports
    for batch in (padded, tokens):
        with count_step() as counts:
            train_step(batch)
        assert counts.syncs == []
    decoder.eval()
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        state = {}
        decoder(tokens[:, :1], incremental_state=state)
        with count_step() as counts:
            decoder.reorder_incremental_state(state, order)
            decoder(tokens[order][:, :2], incremental_state=state)
    assert counts.syncs == []


def test_layers_are_wired_as_in_appendix_c():
    """x1 = e + LSTM(e); x2 = x1 + sigmoid(MoE(x1)); x3 = x2 + LSTM(x2) (dropout off in eval)."""
    decoder = build_decoder().eval()
    tokens = torch.randint(4, 50, (2, 6))
    with torch.no_grad():
        features, extra = decoder(tokens, features_only=True)
        e = decoder.embed_tokens(tokens.t())
        x1 = e + decoder.lstms_before_moe[0](e)[0]
        moe_out, _ = decoder.moe.moe(x1)
        x2 = x1 + torch.sigmoid(moe_out)
        x3 = x2 + decoder.lstms_after_moe[0](x2)[0]
    torch.testing.assert_close(features, x3.transpose(0, 1))
    assert set(extra) == {"attn", "moe_stats"} and list(extra["moe_stats"]) == ["moe"]


def test_moe_runs_once_on_all_time_steps_and_skips_padding():
    decoder = build_decoder().train()
    calls = []
    decoder.moe.moe.register_forward_hook(lambda m, inp, out: calls.append((inp[0].shape, inp[1])))
    pad = decoder.dictionary.pad()
    tokens = torch.randint(4, 50, (3, 8))
    tokens[0, 5:] = pad
    tokens[2, 7:] = pad
    _, extra = decoder(tokens)
    assert len(calls) == 1, "the MoE must run once per forward, not once per time step"
    shape, padding_mask = calls[0]
    assert tuple(shape) == (8, 3, decoder.embed_dim)
    assert int(padding_mask.sum()) == 4
    stats = extra["moe_stats"]["moe"]
    assert int(stats.num_tokens) == 3 * 8 - 4
    assert int(stats.counts.sum()) == (3 * 8 - 4) * decoder.moe.moe.k


def test_right_padding_does_not_change_real_positions():
    decoder = build_decoder().eval()
    tokens = torch.randint(4, 50, (2, 6))
    padded = tokens.clone()
    padded[1, 4:] = decoder.dictionary.pad()
    with torch.no_grad():
        out_full = decoder(tokens)[0]
        out_padded = decoder(padded)[0]
    torch.testing.assert_close(out_padded[0], out_full[0])
    torch.testing.assert_close(out_padded[1, :4], out_full[1, :4])


def test_baseline_without_moe_has_no_stats_and_no_moe_module():
    decoder = build_decoder("lstm_moe_lm_tiny_4xlstm")
    _, extra = decoder(torch.randint(4, 50, (2, 5)))
    assert decoder.moe is None and "moe_stats" not in extra
    assert len(decoder.lstms_before_moe) == 2 and len(decoder.lstms_after_moe) == 2


def test_width_mismatch_names_the_flag_to_fix():
    with pytest.raises(ValueError, match="--decoder-lstm-proj-size 32"):
        build_decoder(decoder_hidden_size=64)


def test_tied_embeddings_with_adaptive_softmax_is_refused():
    with pytest.raises(ValueError, match="cannot be combined"):
        build_decoder(share_decoder_input_output_embed=True, adaptive_softmax_cutoff="20")


def test_adaptive_softmax_cutoffs_beyond_the_vocabulary_are_dropped():
    assert adaptive_softmax_cutoffs("60000,160000", 33280) is None
    assert adaptive_softmax_cutoffs("2000,10000,60000", 33280) == [2000, 10000]
    assert adaptive_softmax_cutoffs("", 100) is None
    with pytest.raises(ValueError, match="increasing"):
        adaptive_softmax_cutoffs("10,5", 100)


# Table 7 of the paper: parameters excluding embedding and softmax, and ops per time step (M).
PAPER_COSTS = {
    "lstm_moe_lm_1b_moe_4": (8.4, 8.4),
    "lstm_moe_lm_1b_moe_32": (37.8, 8.4),
    "lstm_moe_lm_1b_moe_256": (272.9, 8.4),
    "lstm_moe_lm_1b_moe_256_h": (272.9, 8.4),
    "lstm_moe_lm_1b_moe_1024_h": (1079.0, 8.4),
    "lstm_moe_lm_1b_moe_4096_h": (4303.4, 8.4),
    "lstm_moe_lm_1b_moe_1_wide": (8.4, 8.4),
    "lstm_moe_lm_1b_moe_1_deep": (8.4, 8.4),
    "lstm_moe_lm_1b_4xlstm_512": (8.4, 8.4),
    "lstm_moe_lm_1b_lstm_2048_512": (9.4, 9.4),
    "lstm_moe_lm_1b_moe_34m": (4313.9, 33.8),
    "lstm_moe_lm_1b_moe_143m": (4371.1, 142.7),
}


@pytest.mark.parametrize("arch", sorted(PAPER_COSTS))
def test_presets_have_the_papers_size_and_compute(arch):
    costs = lm_costs(make_args(arch))
    params, ops = PAPER_COSTS[arch]
    assert costs["params"] / 1e6 == pytest.approx(params, abs=0.15)
    assert costs["ops"] / 1e6 == pytest.approx(ops, abs=0.25)


@pytest.mark.parametrize("arch", ["lstm_moe_lm_tiny", "lstm_moe_lm_tiny_h", "lstm_moe_lm_tiny_batchwise",
                                  "lstm_moe_lm_tiny_4xlstm", "lstm_moe_lm_1b_moe_1_deep",
                                  "lstm_moe_lm_1b_lstm_2048_512"])
def test_cost_count_matches_the_built_modules(arch):
    decoder = build_decoder(arch, randomize=False, adaptive_softmax_cutoff="")
    built = sum(p.numel() for name, p in decoder.named_parameters()
                if not name.startswith(("embed_tokens", "output_projection", "adaptive_softmax")))
    assert lm_costs(make_args(arch))["params_with_biases"] == built


def test_every_registered_preset_builds_its_options():
    for arch in ARCH_MODEL_INV_REGISTRY["lstm_moe_lm"]:
        args = make_args(arch)
        assert args.decoder_embed_dim == (args.decoder_lstm_proj_size or args.decoder_hidden_size), arch
        assert args.moe_w_importance == args.moe_w_load == 0.1, arch


def test_projected_lstm_sizes_and_packing():
    lstm = ProjectedLSTM(8, 16, proj_size=4)
    assert lstm.output_size == 4
    x = torch.randn(5, 3, 8)
    lengths = torch.tensor([5, 2, 4])
    y, (h, c) = lstm(x, lengths_B=lengths)
    assert y.shape == (5, 3, 4) and h.shape == (1, 3, 4) and c.shape == (1, 3, 16)
    for b, n in enumerate(lengths.tolist()):
        y_alone, (h_alone, _) = lstm(x[:n, b : b + 1])
        torch.testing.assert_close(y[:n, b], y_alone[:, 0])
        torch.testing.assert_close(h[:, b], h_alone[:, 0])  # the state stops at the real end
        assert torch.all(y[n:, b] == 0)
    # the forget-gate bias starts at 1 (i, f, g, o gate order)
    total_bias = lstm.lstm.bias_ih_l0 + lstm.lstm.bias_hh_l0
    assert torch.all(total_bias[16:32] == 1)


def test_projected_lstm_rejects_bad_sizes():
    with pytest.raises(ValueError, match="smaller than hidden_size"):
        ProjectedLSTM(8, 16, proj_size=16)
    with pytest.raises(ValueError, match=r"expected input \[T, B, 8\]"):
        ProjectedLSTM(8, 16)(torch.randn(3, 8))
