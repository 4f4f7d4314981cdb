"""Statistical properties: the smooth load estimator is unbiased, the load loss trains the gate,
batchwise gating is strictly balanced."""

import pytest
import torch

from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smooth_load_is_an_unbiased_estimate_of_the_counts(k):
    # Many training-mode draws of the same examples: E[P(x, i)] = P(i selected), so the summed
    # smooth load matches the summed hard counts per expert. Replicating a batch R times is R
    # independent noise draws in one forward.
    torch.manual_seed(0)
    layer = MoELayer(6, 3, num_experts=5, hidden_dim=4, k=k).train()
    with torch.no_grad():
        layer.gate.w_gate.copy_(torch.randn(6, 5) * 0.5)
        layer.gate.w_noise.copy_(torch.randn(6, 5) * 0.5)
    x = torch.randn(8, 6)
    draws = 6000
    _, stats = layer(x.repeat(draws, 1))
    load, counts = stats.load / draws, stats.counts.float() / draws
    # Per-draw count totals are at most 8 per expert: standard error ≈ 8 · 0.5 / sqrt(draws) ≈ 0.05.
    torch.testing.assert_close(load, counts, atol=0.12, rtol=0.03)
    assert counts.sum().item() == pytest.approx(8 * k)
    # A biased estimator (e.g. thresholds from probabilities) would miss by far more: make sure
    # the test can tell, by checking that the loads are not all equal.
    assert counts.max() - counts.min() > 0.5


def test_smooth_load_unbiased_for_hierarchical_load_h():
    # App. B: Load_H = Load_primary_i · Load_i(X^(i))_j / |X^(i)|, whose expectation tracks the
    # counts per expert cell.
    torch.manual_seed(1)
    layer = HierarchicalMoELayer(6, 3, num_groups=3, experts_per_group=3, hidden_dim=4,
                                 k_primary=1, k_secondary=1).train()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "w_gate" in name or "w_noise" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(6, 6)
    draws = 6000
    _, stats = layer(x.repeat(draws, 1))
    torch.testing.assert_close(stats.load / draws, stats.counts.float() / draws, atol=0.12, rtol=0.05)


def test_load_loss_sends_gradient_to_both_gate_weights():
    layer = MoELayer(6, 3, num_experts=5, hidden_dim=4, k=2, w_importance=0.0, w_load=1.0).train()
    with torch.no_grad():
        layer.gate.w_gate.copy_(torch.randn(6, 5))
    x = torch.randn(30, 6)
    torch.manual_seed(0)  # the same noise before and after the step
    _, stats = layer(x)
    assert stats.importance_loss == 0 and stats.loss > 0
    stats.loss.backward()
    assert layer.gate.w_gate.grad.abs().sum() > 0
    assert layer.gate.w_noise.grad.abs().sum() > 0
    # Gradient descent on the load loss alone lowers CV(Load).
    before = stats.loss.item()
    with torch.no_grad():
        layer.gate.w_gate -= 0.5 * layer.gate.w_gate.grad
        layer.gate.w_noise -= 0.5 * layer.gate.w_noise.grad
    torch.manual_seed(0)
    after = layer(x)[1].loss.item()
    assert after < before


def test_load_loss_has_gradient_even_from_zero_initialised_gates():
    layer = MoELayer(6, 3, num_experts=4, hidden_dim=4, k=1, w_importance=0.0, w_load=1.0).train()
    _, stats = layer(torch.randn(40, 6))
    stats.loss.backward()
    assert layer.gate.w_gate.grad.abs().sum() > 0  # with k = 1 only the balance losses train W_g


def test_balance_losses_reduce_imbalance_when_trained():
    # A few steps on the balance losses alone take a deliberately skewed gate towards equal use.
    torch.manual_seed(2)
    layer = MoELayer(6, 3, num_experts=4, hidden_dim=4, k=1).train()
    with torch.no_grad():
        layer.gate.w_gate[:, 0] = 2.0
    x = torch.randn(200, 6).abs()
    optimizer = torch.optim.Adam([layer.gate.w_gate, layer.gate.w_noise], lr=0.05)
    first = None
    for _ in range(60):
        _, stats = layer(x)
        first = first if first is not None else stats.counts.float().std().item()
        optimizer.zero_grad()
        stats.loss.backward()
        optimizer.step()
    assert stats.counts.float().std().item() < 0.5 * first


@pytest.mark.parametrize("tokens, num_experts, k, expected_m", [(60, 6, 2, 20), (7, 3, 2, 5), (50, 8, 1, 6)])
def test_batchwise_gives_every_expert_exactly_m_tokens(tokens, num_experts, k, expected_m):
    layer = MoELayer(6, 3, num_experts=num_experts, hidden_dim=4, k=k, gating="batchwise").train()
    _, stats = layer(torch.randn(tokens, 6))
    assert stats.counts.tolist() == [expected_m] * num_experts


def test_batchwise_counts_only_real_tokens():
    layer = MoELayer(6, 3, num_experts=4, hidden_dim=4, k=2, gating="batchwise").train()
    x = torch.randn(4, 10, 6)
    pad = torch.zeros(4, 10, dtype=torch.bool)
    pad[:, 6:] = True  # 24 real tokens → m = 2·24/4 = 12
    y, stats = layer(x, pad)
    assert stats.counts.tolist() == [12] * 4
    assert y[pad].abs().sum() == 0


def test_batchwise_hierarchical_balances_each_level():
    layer = HierarchicalMoELayer(6, 3, num_groups=2, experts_per_group=3, hidden_dim=4,
                                 k_primary=1, k_secondary=1, gating="batchwise").train()
    _, stats = layer(torch.randn(24, 6))
    # Level 1: m = 1·24/2 = 12 rows per group; level 2: m = 1·12/3 = 4 rows per expert.
    assert stats.counts.tolist() == [[4, 4, 4], [4, 4, 4]]


@pytest.mark.parametrize("gate_scale", [1.0, 6.0])
def test_batchwise_thresholds_learn_the_training_masks(gate_scale):
    # Training only the thresholds on L_batchwise makes the eval-time threshold masks reproduce
    # the training-time share of tokens per expert (App. F). With gate_scale 6 the gate is
    # confident: the training masks cut at small probabilities, which log-T updates can reach.
    torch.manual_seed(3)
    layer = MoELayer(6, 3, num_experts=4, hidden_dim=4, k=1, gating="batchwise")
    with torch.no_grad():
        layer.gate.w_gate.copy_(torch.randn(6, 4) * gate_scale)
    optimizer = torch.optim.Adam([layer.gate.log_thresholds], lr=0.05)
    for _ in range(300):
        layer.train()
        _, stats = layer(torch.randn(256, 6))
        optimizer.zero_grad()
        stats.loss.backward()
        optimizer.step()
    layer.eval()
    with torch.no_grad():
        _, stats = layer(torch.randn(4000, 6))
    share = stats.counts.float() / 4000
    torch.testing.assert_close(share, torch.full((4,), 0.25), atol=0.06, rtol=0)
    assert stats.unrouted.item() < 0.1 * 4000
