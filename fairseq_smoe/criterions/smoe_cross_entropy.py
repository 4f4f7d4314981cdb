"""Cross-entropy plus the MoE balance losses, with per-layer balance metrics.

    loss = Σ_tokens CE  +  sample_size · Σ_layers stats.loss

fairseq divides the summed loss by the total ``sample_size`` before the backward pass, so the
balance part enters the gradient as exactly Σ_layers (w_importance·CV(Importance)² +
w_load·CV(Load)² [+ L_batchwise]) whatever the batch size: the weights mean what they mean in
the paper (0.1 for LM, 0.01 for MT). The weights themselves live in the layers
(``--moe-w-importance``, ``--moe-w-load``).

Models hand their layers' statistics over in the decoder's extra dict:
``net_output[1]["moe_stats"]``, an ordered dict {layer name: MoEStats}.

Metrics. ``loss`` is the task loss alone (cross-entropy, label-smoothed when asked), in
training and in validation, so ``checkpoint_best.pt``, ``--patience`` and the lr schedulers that
watch the validation loss follow the model, not the balance terms; ``nll_loss``/``ppl`` as in
fairseq. The balance term that training adds to the objective is logged apart:
    moe_loss       Σ_layers stats.loss (training optimises loss + moe_loss, in base e per token)
and per MoE layer ``NAME`` (per-expert vectors summed over data-parallel workers and
gradient-accumulation steps before the ratios are taken, so they describe the global batch):
    NAME_cv_imp    CV(Importance)            (paper Table 6)
    NAME_cv_load   CV(Load), the vector the load loss sees
    NAME_max_load  max/mean of the tokens actually sent to each expert (Table 6 "max/mean load")
    NAME_min_load  min/mean of the same: the least-loaded expert's share (0 when one got none)
    NAME_dead      how many experts received no token in the batch
    NAME_unrouted  share of tokens that reached no expert (App. F thresholds in eval; batchwise
                   gating's per-batch threshold in training too)
    NAME_balance   that layer's stats.loss (only with several MoE layers; else = moe_loss)
Every value fairseq logs is a scalar; the per-expert vectors travel in the logging outputs only
(shown as ``[E values]`` where fairseq prints a raw logging output, e.g. fairseq-validate).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from ..modules.balance import coefficient_of_variation, max_over_mean

MOE_STATS_KEY = "moe_stats"
_VECTOR_FIELDS = ("importance", "load", "counts")


@dataclass
class SMoECrossEntropyConfig(FairseqDataclass):
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing, 0 means no label smoothing"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@dataclass
class SMoELabelSmoothedCrossEntropyConfig(SMoECrossEntropyConfig):
    label_smoothing: float = field(
        default=0.1, metadata={"help": "epsilon for label smoothing, 0 means no label smoothing"}
    )


class PerExpert(torch.Tensor):
    """A per-expert vector in a logging output. Any operation on it gives a plain tensor (sums
    over workers and steps work as before); only where fairseq prints a raw logging output
    (fairseq-validate's per-batch progress) it shows as ``[E values]``, not the numbers."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def tolist(self):  # fairseq's progress_bar.format_stat prints tensors as .tolist()
        return f"[{self.numel()} values]"


def _per_expert(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().as_subclass(PerExpert)


def min_over_mean(values_E: torch.Tensor) -> float:
    """The least-loaded expert's share of the mean: 0 when an expert got nothing, 1 balanced."""
    values = values_E.double().reshape(-1)
    mean = values.mean()
    return float(values.min() / mean) if mean > 0 else 0.0


def moe_stats_of(net_output):
    """The {layer name: MoEStats} a model put in its decoder's extra dict ({} if none)."""
    extra = net_output[1] if isinstance(net_output, (tuple, list)) and len(net_output) > 1 else None
    if isinstance(extra, dict):
        return extra.get(MOE_STATS_KEY) or {}
    return {}


@register_criterion("smoe_cross_entropy", dataclass=SMoECrossEntropyConfig)
class SMoECrossEntropyCriterion(FairseqCriterion):
    consumes_moe_balance = True  # compat.trainer_hooks warns for criteria without it
    def __init__(self, task, sentence_avg, label_smoothing=0.0):
        super().__init__(task)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1); got {label_smoothing}")
        self.sentence_avg = sentence_avg
        self.eps = label_smoothing

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_task_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        moe_total = loss.new_zeros(())
        for name, stats in moe_stats_of(net_output).items():
            moe_total = moe_total + stats.loss
            logging_output[f"{name}_balance"] = stats.loss.detach() * sample_size
            logging_output[f"{name}_tokens"] = stats.num_tokens.detach().float()
            logging_output[f"{name}_unrouted"] = stats.unrouted.detach().float()
            for vector in _VECTOR_FIELDS:
                logging_output[f"{name}_{vector}"] = _per_expert(getattr(stats, vector))
        if reduce:
            # The returned loss (what training optimises) adds the balance losses; the logged
            # "loss" stays the task loss and the balance term is logged apart as moe_loss.
            logging_output["moe_loss"] = moe_total.detach() * sample_size
            loss = loss + moe_total * sample_size
        return loss, sample_size, logging_output

    def compute_task_loss(self, model, net_output, sample, reduce=True):
        """Summed token cross-entropy (label-smoothed when eps > 0) and summed NLL."""
        target = model.get_targets(sample, net_output).view(-1)
        adaptive_softmax = getattr(getattr(model, "decoder", None), "adaptive_softmax", None)
        if adaptive_softmax is not None:
            if self.eps > 0:
                raise ValueError("label smoothing is not supported with an adaptive softmax; "
                                 "use --label-smoothing 0 or drop --adaptive-softmax-cutoff")
            return self._adaptive_softmax_nll(adaptive_softmax, net_output, target, reduce)
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        lprobs = lprobs.view(-1, lprobs.size(-1))
        reduction = "sum" if reduce else "none"
        nll_loss = F.nll_loss(lprobs, target, ignore_index=self.padding_idx, reduction=reduction)
        if self.eps == 0:
            return nll_loss, nll_loss
        # Uniform smoothing over the other classes: (1-ε)·NLL + ε/(V-1)·Σ_{v≠y} −log p_v.
        smooth_loss = -lprobs.sum(dim=-1)
        smooth_loss = smooth_loss.masked_fill(target.eq(self.padding_idx), 0.0)
        smooth_loss = smooth_loss.sum() if reduce else smooth_loss
        eps_other = self.eps / (lprobs.size(-1) - 1)
        loss = (1.0 - self.eps - eps_other) * nll_loss + eps_other * smooth_loss
        return loss, nll_loss

    def _adaptive_softmax_nll(self, adaptive_softmax, net_output, target, reduce):
        if not reduce:  # per-token NLL: gather each target's log-probability
            lprobs = adaptive_softmax.get_log_prob(net_output[0], target.view(1, -1))
            nll = -lprobs.view(-1, lprobs.size(-1)).gather(1, target.view(-1, 1)).squeeze(1)
            nll = nll.masked_fill(target.eq(self.padding_idx), 0.0)
            return nll, nll
        logits, targets = adaptive_softmax(net_output[0], target)
        loss = net_output[0].new_zeros(())
        for cluster, (cluster_logits, cluster_target) in enumerate(zip(logits, targets)):
            if cluster_target is not None:
                # Padding is always in the head (pad < cutoff[0]). A tail cluster's targets are
                # offsets into that cluster, and offset == padding_idx is a real word there:
                # it must not be ignored (fairseq's adaptive_loss drops it).
                loss = loss + F.cross_entropy(cluster_logits.float(), cluster_target,
                                              ignore_index=self.padding_idx if cluster == 0 else -100,
                                              reduction="sum")
        return loss, loss

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        loss_sum, nll_sum = utils.item(total("loss")), utils.item(total("nll_loss"))
        ntokens, sample_size = utils.item(total("ntokens")), utils.item(total("sample_size"))
        sample_size = max(sample_size, 1)
        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        names = _layer_names(logging_outputs)
        if names:
            metrics.log_scalar("moe_loss", utils.item(total("moe_loss")) / sample_size,
                               sample_size, round=4)
        for name in names:
            importance, load, counts = (_vector_total(logging_outputs, f"{name}_{v}")
                                        for v in _VECTOR_FIELDS)
            tokens = max(utils.item(total(f"{name}_tokens")), 1)
            metrics.log_scalar(f"{name}_cv_imp", coefficient_of_variation(importance), 1, round=3)
            metrics.log_scalar(f"{name}_cv_load", coefficient_of_variation(load), 1, round=3)
            metrics.log_scalar(f"{name}_max_load", max_over_mean(counts), 1, round=3)
            metrics.log_scalar(f"{name}_min_load", min_over_mean(counts), 1, round=3)
            metrics.log_scalar(f"{name}_dead", float((counts.reshape(-1) == 0).sum()), 1, round=2)
            metrics.log_scalar(f"{name}_unrouted",
                               utils.item(total(f"{name}_unrouted")) / tokens, tokens, round=4)
            if len(names) > 1:
                metrics.log_scalar(f"{name}_balance",
                                   utils.item(total(f"{name}_balance")) / sample_size,
                                   sample_size, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # Every value is a scalar or a fixed-size per-expert vector: fairseq's all_reduce_dict
        # sums those elementwise across workers.
        return True


@register_criterion("smoe_label_smoothed_cross_entropy",
                    dataclass=SMoELabelSmoothedCrossEntropyConfig)
class SMoELabelSmoothedCrossEntropyCriterion(SMoECrossEntropyCriterion):
    """``smoe_cross_entropy`` with label smoothing 0.1 by default, for translation."""


def _layer_names(logging_outputs):
    suffix = "_importance"
    names = []
    for log in logging_outputs:
        for key in log:
            if key.endswith(suffix) and key[: -len(suffix)] not in names:
                names.append(key[: -len(suffix)])
    return names


def _vector_total(logging_outputs, key) -> torch.Tensor:
    vectors = [torch.as_tensor(log[key]).float().cpu().as_subclass(torch.Tensor)
               for log in logging_outputs if key in log]
    return torch.stack(vectors).sum(0)
