"""smoe_cross_entropy: loss = CE + sample_size·Σ stats.loss; logged balance metrics equal the
ones recomputed from the layer's stats; several logging outputs (data-parallel workers,
gradient accumulation) are summed per expert before the ratios; adaptive softmax."""

import argparse
import math
import types

import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.logging import metrics
from fairseq.models import ARCH_CONFIG_REGISTRY, FairseqLanguageModel

from fairseq_smoe.criterions.smoe_cross_entropy import SMoECrossEntropyCriterion
from fairseq_smoe.models.lstm_moe_lm import LSTMMoEDecoder
from fairseq_smoe.plugin import install

install()  # the plugin, as --user-dir does: registers it with fairseq, installs its patches


def build_model(arch="lstm_moe_lm_tiny", num_words=60, **overrides):
    d = Dictionary()
    for i in range(num_words):
        d.add_symbol(f"w{i}")
    args = argparse.Namespace(**overrides)
    ARCH_CONFIG_REGISTRY[arch](args)
    model = FairseqLanguageModel(LSTMMoEDecoder.from_args(args, d, 1024))
    with torch.no_grad():  # route tokens differently from the start
        for name, p in model.named_parameters():
            if "gate" in name:
                p.add_(torch.randn_like(p))
    return model, types.SimpleNamespace(target_dictionary=d, source_dictionary=d)


def make_sample(dictionary, bsz=4, seqlen=9, pad_last=3):
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (bsz, seqlen + 1))
    target = tokens[:, 1:].clone()
    target[-1, seqlen - pad_last:] = dictionary.pad()
    src = tokens[:, :-1].clone()
    src[-1, seqlen - pad_last:] = dictionary.pad()
    ntokens = int(target.ne(dictionary.pad()).sum())
    return {"net_input": {"src_tokens": src, "src_lengths": src.ne(dictionary.pad()).sum(1)},
            "target": target, "ntokens": ntokens, "nsentences": bsz}


def run_criterion(model, task, sample, **kwargs):
    """Criterion forward; also returns the net_output the criterion saw."""
    seen = []
    forward = model.forward

    def spy(*args, **kw):
        seen.append(forward(*args, **kw))
        return seen[-1]

    model.forward = spy
    loss, sample_size, log = SMoECrossEntropyCriterion(task, sentence_avg=False, **kwargs)(model, sample)
    model.forward = forward
    return loss, sample_size, log, seen[0]


def logged(logging_outputs):
    with metrics.aggregate(new_root=True) as agg:
        SMoECrossEntropyCriterion.reduce_metrics(logging_outputs)
    return agg.get_smoothed_values()


def cv(v):
    v = v.double().reshape(-1)
    return float(((v - v.mean()) ** 2).mean().sqrt() / v.mean())


@pytest.mark.parametrize("arch", ["lstm_moe_lm_tiny", "lstm_moe_lm_tiny_h", "lstm_moe_lm_tiny_batchwise"])
def test_logged_metrics_equal_those_recomputed_from_the_layer_stats(arch):
    model, task = build_model(arch)
    model.train()
    sample = make_sample(task.target_dictionary)
    loss, sample_size, log, net_output = run_criterion(model, task, sample)
    stats = net_output[1]["moe_stats"]["moe"]

    # the loss: summed token NLL + sample_size · balance loss
    lprobs = model.get_normalized_probs(net_output, log_probs=True).view(-1, 60 + 4)
    nll = F.nll_loss(lprobs, sample["target"].view(-1), ignore_index=1, reduction="sum")
    assert sample_size == sample["ntokens"] == 33
    torch.testing.assert_close(loss, nll + sample_size * stats.loss)
    assert stats.loss > 0

    values = logged([log])
    assert values["moe_cv_imp"] == pytest.approx(cv(stats.importance), abs=1e-3)
    assert values["moe_cv_load"] == pytest.approx(cv(stats.load), abs=1e-3)
    counts = stats.counts.double().reshape(-1)
    assert values["moe_max_load"] == pytest.approx(float(counts.max() / counts.mean()), abs=1e-3)
    assert values["moe_min_load"] == pytest.approx(float(counts.min() / counts.mean()), abs=1e-3)
    assert values["moe_dead"] == float((counts == 0).sum())
    assert values["moe_loss"] == pytest.approx(float(stats.loss.detach()), abs=1e-4)
    assert "moe_balance" not in values  # one layer: its balance is moe_loss
    assert values["moe_unrouted"] == pytest.approx(float(stats.unrouted) / 33, abs=1e-4)
    assert values["nll_loss"] == pytest.approx(float(nll.detach()) / 33 / math.log(2), abs=1e-3)
    # the logged loss is the task loss alone; the balance term is moe_loss
    assert values["loss"] == pytest.approx(float(nll.detach()) / 33 / math.log(2), abs=1e-3)
    assert values["loss"] == pytest.approx(values["nll_loss"], abs=1e-3)
    # the CV is not degenerate: the metric can tell balanced from unbalanced
    assert values["moe_cv_imp"] > 0.01


def test_several_logging_outputs_are_summed_per_expert_before_the_ratios():
    """Two workers, each with all its tokens on a different expert: globally balanced."""

    def worker_log(importance, counts):
        return {"loss": torch.tensor(10.0), "nll_loss": torch.tensor(10.0), "ntokens": 5,
                "nsentences": 1, "sample_size": 5, "moe_loss": torch.tensor(0.5),
                "moe_balance": torch.tensor(0.5), "moe_tokens": torch.tensor(5.0),
                "moe_unrouted": torch.tensor(1.0),
                "moe_importance": torch.tensor(importance), "moe_load": torch.tensor(importance),
                "moe_counts": torch.tensor(counts)}

    logs = [worker_log([5.0, 0.0], [5.0, 0.0]), worker_log([0.0, 5.0], [0.0, 5.0])]
    each = logged(logs[:1])
    assert each["moe_cv_imp"] == pytest.approx(1.0) and each["moe_max_load"] == pytest.approx(2.0)
    assert each["moe_min_load"] == 0 and each["moe_dead"] == 1  # one of two experts got nothing
    both = logged(logs)
    assert both["moe_cv_imp"] == pytest.approx(0.0, abs=1e-6)
    assert both["moe_cv_load"] == pytest.approx(0.0, abs=1e-6)
    assert both["moe_max_load"] == pytest.approx(1.0)
    assert both["moe_unrouted"] == pytest.approx(2 / 10)
    assert both["moe_min_load"] == pytest.approx(1.0) and both["moe_dead"] == 0
    assert both["moe_loss"] == pytest.approx(1.0 / 10)
    assert both["nll_loss"] == pytest.approx(20 / 10 / math.log(2), abs=1e-3)


def test_real_model_logs_from_two_batches_aggregate_like_one_summed_batch():
    model, task = build_model("lstm_moe_lm_tiny_h")
    model.eval()  # deterministic routing
    logs, stats = [], []
    for _ in range(2):
        _, _, log, net_output = run_criterion(model, task, make_sample(task.target_dictionary))
        logs.append(log)
        stats.append(net_output[1]["moe_stats"]["moe"])
    values = logged(logs)
    assert stats[0].importance.shape == (4, 4)  # hierarchical: [groups, experts per group]
    assert values["moe_cv_imp"] == pytest.approx(cv(stats[0].importance + stats[1].importance), abs=1e-3)
    counts = (stats[0].counts + stats[1].counts).double()
    assert values["moe_max_load"] == pytest.approx(float(counts.max() / counts.mean()), abs=1e-3)


def test_dense_baseline_logs_no_moe_metrics():
    model, task = build_model("lstm_moe_lm_tiny_4xlstm")
    _, _, log, _ = run_criterion(model, task, make_sample(task.target_dictionary))
    values = logged([log])
    assert not any(key.startswith("moe_") for key in values)
    assert values["loss"] == values["nll_loss"]


def test_adaptive_softmax_loss_is_the_exact_nll_including_tail_word_at_offset_pad():
    model, task = build_model(num_words=60, adaptive_softmax_cutoff="20,40")
    model.eval()
    sample = make_sample(task.target_dictionary, pad_last=0)
    # The word with index cutoff+pad sits at offset pad inside its tail cluster.
    sample["target"][0, :3] = torch.tensor([20 + 1, 40 + 1, 40 + 1])
    _, _, log, net_output = run_criterion(model, task, sample)
    lprobs = model.get_normalized_probs(net_output, log_probs=True, sample=None).view(-1, 64)
    exact = F.nll_loss(lprobs, sample["target"].view(-1), reduction="sum")
    torch.testing.assert_close(log["nll_loss"], exact, atol=1e-3, rtol=1e-4)

    per_token, _ = SMoECrossEntropyCriterion(task, sentence_avg=False).compute_task_loss(
        model, net_output, sample, reduce=False)
    assert per_token.shape == (sample["target"].numel(),)
    torch.testing.assert_close(per_token.sum(), exact, atol=1e-3, rtol=1e-4)


def test_label_smoothing_with_adaptive_softmax_is_refused():
    model, task = build_model(adaptive_softmax_cutoff="20,40")
    with pytest.raises(ValueError, match="label smoothing"):
        run_criterion(model, task, make_sample(task.target_dictionary), label_smoothing=0.1)


def test_validation_loss_is_the_task_loss_and_vectors_print_compactly():
    from fairseq.logging.progress_bar import format_stat

    model, task = build_model("lstm_moe_lm_tiny")
    model.eval()
    sample = make_sample(task.target_dictionary)
    loss, sample_size, log, net_output = run_criterion(model, task, sample)
    stats = net_output[1]["moe_stats"]["moe"]
    assert float(stats.loss.detach()) > 0  # eval mode has a balance term too...
    assert float(log["loss"]) == pytest.approx(float(log["nll_loss"]), rel=1e-6)  # ...not in "loss"
    torch.testing.assert_close(loss, log["nll_loss"] + sample_size * stats.loss)  # optimised
    values = logged([log])
    assert values["loss"] == pytest.approx(values["nll_loss"], abs=1e-3)
    assert values["moe_loss"] == pytest.approx(float(stats.loss.detach()), abs=1e-4)
    # fairseq-validate prints raw logging outputs: no per-expert numbers there
    assert format_stat(log["moe_importance"]) == f"[{stats.importance.numel()} values]"
    assert all(not isinstance(format_stat(v), list) for v in log.values())


def test_two_layers_log_each_balance_and_the_total():
    def layer_log(name, balance):
        return {f"{name}_balance": torch.tensor(balance * 4), f"{name}_tokens": torch.tensor(4.0),
                f"{name}_unrouted": torch.tensor(0.0),
                f"{name}_importance": torch.tensor([1.0, 1.0, 2.0]),
                f"{name}_load": torch.tensor([1.0, 1.0, 2.0]),
                f"{name}_counts": torch.tensor([2.0, 2.0, 0.0])}

    log = {"loss": torch.tensor(8.0), "nll_loss": torch.tensor(8.0), "ntokens": 4,
           "nsentences": 1, "sample_size": 4, "moe_loss": torch.tensor(0.5 * 4),
           **layer_log("encoder_moe", 0.2), **layer_log("decoder_moe", 0.3)}
    values = logged([log])
    assert values["encoder_moe_balance"] == pytest.approx(0.2)
    assert values["decoder_moe_balance"] == pytest.approx(0.3)
    assert values["moe_loss"] == pytest.approx(0.5)
    assert values["decoder_moe_dead"] == 1 and values["decoder_moe_min_load"] == 0
