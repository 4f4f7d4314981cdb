"""The lstm_moe_nmt translation model: shapes, MoE wiring, incremental decoding, beam reordering,
padding invariance, attention math, presets and argument errors."""

import sys
import warnings

import pytest
import torch
from nmt_helpers import build_model, make_args, make_dictionary, random_batch

from fairseq_smoe.models import lstm_moe_nmt as nmt
from fairseq_smoe.modules.attention import EncoderDecoderAttention

VARIANTS = [
    dict(arch="lstm_moe_nmt_tiny"),  # batchwise, separable attention, bidirectional
    dict(arch="lstm_moe_nmt_tiny", moe_gating="noisy_top_k"),
    dict(arch="lstm_moe_nmt_tiny_h"),  # hierarchical batchwise
    dict(arch="lstm_moe_nmt_tiny", attention_type="additive", encoder_bidirectional=False),
    dict(arch="lstm_moe_nmt_tiny", moe_num_experts=0, share_all_embeddings=True),  # no MoE
]


def _ids(variant):
    return "-".join(f"{k}={v}" for k, v in variant.items())


def decode_step_by_step(model, src, lengths, prev, new_order=None):
    """Decoder outputs one step at a time with an incremental state, as beam search runs it.
    ``new_order`` (optional) reorders the batch after the first step, as beam search does."""
    encoder_out = model.encoder(src, lengths)
    state, outputs, attns = {}, [], []
    for step in range(prev.shape[1]):
        if step == 1 and new_order is not None:
            encoder_out = model.encoder.reorder_encoder_out(encoder_out, new_order)
            model.decoder.reorder_incremental_state_scripting(state, new_order)
            prev = prev.index_select(0, new_order)
            outputs = [o.index_select(0, new_order) for o in outputs]
            attns = [a.index_select(0, new_order) for a in attns]
        out, extra = model.decoder(prev[:, : step + 1], encoder_out, incremental_state=state)
        outputs.append(out)
        attns.append(extra["attn"][0])
    return torch.cat(outputs, 1), torch.cat(attns, 1), extra


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_incremental_decoding_matches_full_forward(variant):
    dictionary = make_dictionary()
    model = build_model(dictionary=dictionary, **variant)
    src, lengths, prev = random_batch(dictionary)
    model.train()
    logits, extra = model(src, lengths, prev)  # a train step first: thresholds, gates move off init
    (logits.logsumexp(-1).mean() + sum(s.loss for s in extra["moe_stats"].values())).backward()
    model.eval()
    with torch.no_grad():
        full, full_extra = model(src, lengths, prev)
        stepped, stepped_attn, step_extra = decode_step_by_step(model, src, lengths, prev)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stepped_attn, full_extra["attn"][0], atol=1e-6, rtol=1e-4)
    if model.decoder.moe is not None:
        # The step call routed exactly the batch's tokens of that one step.
        assert int(step_extra["moe_stats"]["decoder_moe"].num_tokens) == src.shape[0]
        assert set(full_extra["moe_stats"]) == {"encoder_moe", "decoder_moe"}
    else:
        assert full_extra["moe_stats"] == {}


def test_beam_reordering_keeps_each_hypothesis_state():
    dictionary = make_dictionary()
    model = build_model(dictionary=dictionary).eval()
    src, lengths, prev = random_batch(dictionary, batch=4)
    new_order = torch.tensor([2, 2, 0, 3, 1, 0])  # beam search duplicates and drops rows
    with torch.no_grad():
        reordered, _, _ = decode_step_by_step(model, src, lengths, prev, new_order)
        expected, _ = model(src.index_select(0, new_order), lengths.index_select(0, new_order),
                            prev.index_select(0, new_order))
    torch.testing.assert_close(reordered, expected, atol=1e-5, rtol=1e-4)


def test_encoder_ignores_padding_side_and_batch_mates():
    dictionary = make_dictionary()
    model = build_model(dictionary=dictionary).eval()  # bidirectional first layer
    src, lengths, _ = random_batch(dictionary, batch=4, left_pad=True)
    right, _, _ = random_batch(dictionary, batch=4, left_pad=False)
    for row, length in enumerate(lengths.tolist()):  # the same sentences, right-padded
        right[row] = dictionary.pad()
        right[row, :length] = src[row, src.shape[1] - length:]
    with torch.no_grad():
        left_out = model.encoder(src, lengths)
        right_out = model.encoder(right, lengths)
        alone = model.encoder(right[3:4, : lengths[3]], lengths[3:4])
    S = src.shape[1]
    for row, length in enumerate(lengths.tolist()):  # outputs keep the input's padding side
        torch.testing.assert_close(left_out["encoder_out"][row, S - length:],
                                   right_out["encoder_out"][row, :length])
    torch.testing.assert_close(right_out["encoder_out"][3, : lengths[3]], alone["encoder_out"][0])
    for out, tokens in ((left_out, src), (right_out, right)):
        pad = out["encoder_padding_mask"]
        assert torch.equal(pad, tokens.eq(dictionary.pad()))
        assert out["encoder_out"][pad].abs().max() == 0


@pytest.mark.parametrize("proj", [False, True])
def test_bidirectional_layer_equals_packed_sequences(proj):
    """run_lstm's in-place reversal (no host read) computes what packing computes: the backward
    direction starts at each sentence's last real token; padding outputs are 0."""
    torch.manual_seed(0)
    lstm = nmt.make_lstm(8, 4 if proj else 6, 6, "--hidden", bidirectional=True)
    lengths_B = torch.tensor([7, 3, 5, 1])
    x_BTD = torch.randn(4, 7, 8, requires_grad=True)
    out_BTD = nmt.run_lstm(lstm, x_BTD, lengths_B)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x_BTD, lengths_B, batch_first=True,
                                                     enforce_sorted=False)
    expected_BTD = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True,
                                                          total_length=7)[0]
    torch.testing.assert_close(out_BTD, expected_BTD, atol=1e-6, rtol=1e-5)
    weights = torch.randn_like(out_BTD)
    grads = torch.autograd.grad((out_BTD * weights).sum(), [x_BTD, *lstm.parameters()])
    expected = torch.autograd.grad((expected_BTD * weights).sum(), [x_BTD, *lstm.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bidirectional_layer_leaves_other_warnings_once_per_place():
    """A warning raised at one place between forward passes prints once, as Python's default
    filter intends: the layer touches no warning filters per call (that would make fairseq's
    deprecation warnings print at every training step)."""
    lstm = nmt.make_lstm(8, 6, 6, "--hidden", bidirectional=True)
    x_BTD, lengths_B = torch.randn(2, 5, 8), torch.tensor([5, 3])

    def warn_here():
        warnings.warn("smoe test: once per place", FutureWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            warn_here()
            nmt.run_lstm(lstm, x_BTD, lengths_B)
    assert [str(w.message) for w in caught].count("smoe test: once per place") == 1


@pytest.mark.parametrize("gating", ["noisy_top_k", "batchwise"])
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_training_step_adds_no_host_syncs(backend, gating):
    """Encoder (left-padded sources, bidirectional first layer) and decoder with MoE layers on a
    device-resident backend: a training step reads nothing back to the host and makes no tensor
    from Python data (a blocking host-to-device copy on CUDA), target padding or none."""
    from fairseq_smoe.ops.counting import count_step

    dictionary = make_dictionary()
    model = build_model(dictionary=dictionary, moe_gating=gating, moe_experts_backend=backend).train()
    src, lengths, prev = random_batch(dictionary)
    padded = prev.clone()
    padded[1, -2:] = dictionary.pad()

    def step(prev):
        logits, extra = model(src, lengths, prev)
        (logits.logsumexp(-1).mean() + sum(s.loss for s in extra["moe_stats"].values())).backward()

    step(padded)  # warm-up: lazy initialisation may read
    for batch in (padded, prev):
        with count_step() as counts:
            step(batch)
        assert counts.syncs == []
    with count_step() as counts:  # the counter sees reads: the loop backend reads its counts
        build_model(dictionary=dictionary, moe_gating=gating,
                    moe_experts_backend="loop").train()(src, lengths, prev)
    assert counts.host_reads


@pytest.mark.parametrize("gating", ["noisy_top_k", "batchwise"])
def test_incremental_decoding_step_syncs(gating):
    """One beam-search step of the decoder (incremental state, beams reordered) on a resident
    backend: no sync with noisy top-k; batchwise gating's thresholds (App. F) make the number
    of assignments data-dependent, which costs exactly one read per MoE layer and step (the
    ``nonzero`` of its mask, docs/layer.md)."""
    from fairseq_smoe.ops.counting import count_step

    dictionary = make_dictionary()
    model = build_model(dictionary=dictionary, moe_gating=gating, moe_experts_backend="grouped_mm").eval()
    src, lengths, prev = random_batch(dictionary, batch=4)
    with torch.no_grad():
        encoder_out = model.encoder(src, lengths)
        state = {}
        model.decoder(prev[:, :1], encoder_out, incremental_state=state)  # warm-up
        order = torch.tensor([1, 0, 3, 2])
        model.decoder.reorder_incremental_state(state, order)
        encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
        with count_step() as counts:
            model.decoder.reorder_incremental_state(state, order)
            model.decoder(prev[:, :2], encoder_out, incremental_state=state)
    assert counts.host_copies == []
    if gating == "batchwise":
        assert counts.host_reads == ["aten.nonzero"], counts.read_sites
    else:
        assert counts.host_reads == [], counts.read_sites


def test_training_step_routes_every_expert_exactly_m_tokens_and_pads_never():
    dictionary = make_dictionary()
    model = build_model(dictionary=dictionary).train()
    src, lengths, prev = random_batch(dictionary, batch=6)
    prev[0, -2:] = dictionary.pad()  # target-side padding is not routed either
    _, extra = model(src, lengths, prev)
    enc, dec = extra["moe_stats"]["encoder_moe"], extra["moe_stats"]["decoder_moe"]
    assert int(enc.num_tokens) == int(lengths.sum())
    assert int(dec.num_tokens) == prev.numel() - 2
    for stats in (enc, dec):  # App. F: m = round(k·|X|/n) tokens per expert
        m = round(2 * int(stats.num_tokens) / 4)
        assert stats.counts.tolist() == [m] * 4


def test_moe_loss_reaches_gates_and_thresholds():
    dictionary = make_dictionary()
    model = build_model(dictionary=dictionary).train()
    src, lengths, prev = random_batch(dictionary)
    logits, extra = model(src, lengths, prev)
    loss = logits.logsumexp(-1).mean() + sum(s.loss for s in extra["moe_stats"].values())
    loss.backward()
    for moe in (model.encoder.moe.moe, model.decoder.moe.moe):
        assert moe.gate.w_gate.grad.abs().sum() > 0
        assert moe.gate.log_thresholds.grad is not None
        assert moe.experts.weights[0].grad.abs().sum() > 0


@pytest.mark.parametrize("attention_type", ["separable", "additive"])
def test_attention_scores_follow_the_formula(attention_type):
    torch.manual_seed(0)
    attention = EncoderDecoderAttention(6, 5, 4, attention_type)
    query, keys = torch.randn(2, 3, 6), torch.randn(2, 7, 5)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    context, weights = attention(query, keys, pad)
    U, W, V = attention.query_proj.weight.t(), attention.key_proj.weight.t(), attention.v
    expected = torch.empty(2, 3, 7)
    for b in range(2):
        for t in range(3):
            for s in range(7):
                xu, yw = query[b, t] @ U, keys[b, s] @ W
                if attention_type == "separable":  # App. G
                    expected[b, t, s] = (V * torch.tanh(xu) * torch.tanh(yw)).sum()
                else:  # GNMT
                    expected[b, t, s] = (V * torch.tanh(xu + yw)).sum()
    expected = expected.masked_fill(pad[:, None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(weights, expected)
    assert weights[1, :, 5:].abs().max() == 0
    torch.testing.assert_close(context, expected @ keys)


def test_lstm_projection_sizes():
    model = build_model(encoder_hidden_size=96)
    first, second = model.encoder.layers[0], model.encoder.layers[1]
    assert first.bidirectional and first.hidden_size == 48 and first.proj_size == 16
    assert not second.bidirectional and second.hidden_size == 96 and second.proj_size == 32
    decoder_top = model.decoder.layers[1]
    assert decoder_top.input_size == 64  # [x; attention context]
    plain = build_model(encoder_hidden_size=32, decoder_hidden_size=32)  # hidden == dim: no projection
    assert plain.encoder.layers[1].proj_size == 0


def test_presets_describe_the_paper_models():
    cases = {
        "lstm_moe_nmt_baseline": (0, 0, None, None),
        "lstm_moe_nmt_32": (32, 0, 4, "batchwise"),
        "lstm_moe_nmt_512h": (512, 16, 2, "batchwise"),
        "lstm_moe_nmt_2048h": (2048, 16, 2, "batchwise"),
        "lstm_moe_nmt_multilingual": (512, 0, 2, "noisy_top_k"),
    }
    for arch, (experts, groups, k, gating) in cases.items():
        args = make_args(arch)
        assert (args.encoder_embed_dim, args.encoder_hidden_size, args.encoder_layers,
                args.decoder_layers, args.dropout) == (512, 2048, 3, 2, 0.4)
        assert args.moe_num_experts == experts and args.moe_groups == groups
        if experts:
            assert (args.moe_k, args.moe_gating) == (k, gating)
            assert args.moe_w_importance == args.moe_w_load == 0.01
    assert make_args("lstm_moe_nmt_multilingual").moe_hidden_dim == 8192
    assert make_args("lstm_moe_nmt_2048h").moe_hidden_dim == 2048
    # Command-line values win over the preset.
    assert make_args("lstm_moe_nmt_2048h", moe_num_experts=256).moe_num_experts == 256


def test_parameter_count_on_meta_device_matches_real_model():
    dictionary = make_dictionary()
    for arch in ("lstm_moe_nmt_tiny", "lstm_moe_nmt_tiny_h"):
        real = sum(p.numel() for p in build_model(arch, dictionary=dictionary).parameters())
        assert nmt.count_parameters(make_args(arch), len(dictionary), len(dictionary)) == real


@pytest.mark.parametrize("overrides, message", [
    (dict(encoder_hidden_size=16), "--encoder-hidden-size"),
    (dict(decoder_hidden_size=16), "--decoder-hidden-size"),
    (dict(encoder_embed_dim=33, encoder_hidden_size=66, attention_dim=8), "--no-encoder-bidirectional"),
    (dict(encoder_layers=1), "--encoder-layers"),
    (dict(moe_num_experts=6, moe_groups=4), "--moe-groups"),
    (dict(attention_type="dot"), "attention_type"),
])
def test_bad_arguments_name_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(**overrides)


def test_share_all_embeddings_needs_joined_dictionary():
    from types import SimpleNamespace

    task = SimpleNamespace(source_dictionary=make_dictionary(10), target_dictionary=make_dictionary(12))
    with pytest.raises(ValueError, match="--joined-dictionary"):
        nmt.LSTMMoETranslationModel.build_model(make_args(share_all_embeddings=True), task)


def test_translation_model_refuses_fairseq_eval_lm(monkeypatch):
    """fairseq-eval-lm builds the checkpoint's model before it fails on a missing LM attribute."""
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fairseq-eval-lm", "data-bin"])
    with pytest.raises(ValueError, match="translation model .* fairseq-generate DATA --path"):
        build_model()
