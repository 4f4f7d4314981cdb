"""Each formula of the paper's layer (§2, §4, App. A, B, F) on small hand-made tensors, with the
expected values worked out by hand in the comments."""

import math

import pytest
import torch

from fairseq_smoe.modules import MoELayer, cv_squared, smooth_load
from fairseq_smoe.modules.balance import coefficient_of_variation, max_over_mean
from fairseq_smoe.modules.gating import (
    BatchwiseGate,
    NoisyTopKGate,
    batchwise_capacity,
    batchwise_mask,
    batchwise_threshold_loss,
    threshold_mask,
)
from fairseq_smoe.ops.noisy_topk import gate_noise, noisy_top_k


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_cv_squared_uses_population_variance():
    # [1, 3]: mean 2, population variance 1 → CV² = 1/4 (the sample variance would give 1/2).
    assert cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)
    # [0, 2]: mean 1, variance 1 → 1.
    assert cv_squared(torch.tensor([0.0, 2.0])).item() == pytest.approx(1.0)
    assert cv_squared(torch.tensor([5.0, 5.0, 5.0])).item() == 0.0
    # One expert gives 0, all zeros stays finite (the reference code's epsilons).
    assert cv_squared(torch.tensor([7.0])).item() == 0.0
    assert cv_squared(torch.zeros(4)).item() == 0.0
    # A grid (hierarchical) is one population of cells.
    assert cv_squared(torch.tensor([[1.0, 3.0], [1.0, 3.0]])).item() == pytest.approx(0.25)
    assert coefficient_of_variation(torch.tensor([1.0, 3.0])) == pytest.approx(0.5)
    assert max_over_mean(torch.tensor([1.0, 3.0])) == pytest.approx(1.5)


def _gate_with_logits(clean_logits_E, k, noisy=False):
    """A gate whose clean logits x·W_g equal ``clean_logits_E`` for x = e_0 (first unit vector)."""
    E = len(clean_logits_E)
    gate = NoisyTopKGate(2, E, k, noisy=noisy)
    with torch.no_grad():
        gate.w_gate[0] = torch.tensor(clean_logits_E)
    return gate, torch.tensor([[1.0, 0.0]])


def test_top_k_gate_values_are_softmax_over_the_kept_logits():
    # Logits [2, 1, 0, -1], k = 2: keep experts 0 and 1, G = softmax([2, 1]) = [e/(e+1), 1/(e+1)].
    gate, x = _gate_with_logits([2.0, 1.0, 0.0, -1.0], k=2)
    out = gate.eval()(x)
    dense = torch.zeros(4).index_add(0, out.expert_A, out.gate_A)
    e = math.e
    assert dense.tolist() == pytest.approx([e / (e + 1), 1 / (e + 1), 0.0, 0.0])
    assert out.counts_E.tolist() == [1, 1, 0, 0]
    assert out.load_E.tolist() == [1.0, 1.0, 0.0, 0.0]  # no noise: hard counts


def test_k_equal_one_gives_gate_one():
    gate, x = _gate_with_logits([0.3, 0.9, -2.0], k=1)
    out = gate.eval()(x)
    assert out.expert_A.tolist() == [1] and out.gate_A.tolist() == [1.0]


def test_noise_is_drawn_only_in_training_with_softplus_std_plus_epsilon():
    gate, x = _gate_with_logits([0.0, 0.0, 0.0], k=1, noisy=True)
    with torch.no_grad():
        gate.w_noise[0] = torch.tensor([0.5, -1.0, 2.0])
    torch.manual_seed(7)
    noise = gate_noise(1, 3, torch.float32, "cpu")
    std = torch.nn.functional.softplus(torch.tensor([0.5, -1.0, 2.0])) + 1e-2
    expected_expert = int((noise[0] * std).argmax())
    torch.manual_seed(7)
    assert gate.train()(x).expert_A.tolist() == [expected_expert]
    # In eval the logits are all 0: deterministic, no randomness consumed.
    state = torch.get_rng_state()
    gate.eval()(x)
    assert torch.equal(state, torch.get_rng_state())


def test_smooth_load_thresholds_come_from_the_noisy_logits():
    # One token, 3 experts, k = 1. Clean logits [1, 0, 0], noisy [1.5, 0.2, -0.3], std 1.
    # Expert 0 is in the top 1: threshold = the 2nd largest noisy logit overall = 0.2 → Φ(1 − 0.2).
    # Experts 1, 2 are out: threshold = the largest noisy logit = 1.5 → Φ(0 − 1.5).
    clean = torch.tensor([[1.0, 0.0, 0.0]])
    noisy = torch.tensor([[1.5, 0.2, -0.3]])
    std = torch.ones(1, 3)
    top = noisy.topk(2, dim=-1).values
    P = smooth_load(clean, noisy, std, top, k=1)
    assert P[0].tolist() == pytest.approx([phi(0.8), phi(-1.5), phi(-1.5)], abs=1e-6)


def test_smooth_load_with_k_two_and_unequal_std():
    # k = 2, noisy [3, 1, 2, 0]: top-2 = {0, 2}; the 3rd largest is 1, the 2nd largest is 2.
    # In experts (0, 2) use threshold 1, out experts (1, 3) use threshold 2.
    clean = torch.tensor([[2.5, 0.5, 1.0, -1.0]])
    noisy = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    std = torch.tensor([[0.5, 1.0, 2.0, 4.0]])
    P = smooth_load(clean, noisy, std, noisy.topk(3, dim=-1).values, k=2)
    expected = [phi((2.5 - 1) / 0.5), phi((0.5 - 2) / 1.0), phi((1.0 - 1) / 2.0), phi((-1.0 - 2) / 4.0)]
    assert P[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_batchwise_capacity_rounding():
    assert batchwise_capacity(k=2, num_rows=60, num_experts=6) == 20
    assert batchwise_capacity(k=2, num_rows=7, num_experts=3) == 5  # 4.67 rounds to 5
    assert batchwise_capacity(k=1, num_rows=3, num_experts=8) == 1  # at least one row each
    assert batchwise_capacity(k=4, num_rows=3, num_experts=2) == 3  # at most every row
    assert batchwise_capacity(k=4, num_rows=0, num_experts=2) == 0


def test_batchwise_and_threshold_masks_and_loss():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    # m = 1: each column keeps its largest row: col 0 → row 0, col 1 → row 1, col 2 → row 1.
    mask, rows = batchwise_mask(probs, 1)
    assert mask.int().tolist() == [[1, 0, 0], [0, 1, 1]]
    assert rows.tolist() == [[0, 1, 1]]
    thresholds = torch.tensor([0.4, 0.4, 0.25])
    t_mask = threshold_mask(probs, thresholds)
    assert t_mask.int().tolist() == [[1, 0, 0], [0, 1, 1]]
    assert batchwise_threshold_loss(probs, thresholds, t_mask, mask).item() == 0.0  # masks agree
    # Lower T_0 to 0.05: row 1 passes it although the batchwise mask says no.
    # Term (1 − 0)·(0.1 − 0.05) = 0.05, averaged over the 2 rows → 0.025.
    thresholds = torch.tensor([0.05, 0.4, 0.25], requires_grad=True)
    t_mask = threshold_mask(probs, thresholds)
    loss = batchwise_threshold_loss(probs, thresholds, t_mask, mask)
    assert loss.item() == pytest.approx(0.025)
    loss.backward()
    # Only T gets gradient: −(M_thr − M_bw) summed over rows / 2 → T_0 is pushed up.
    assert thresholds.grad.tolist() == pytest.approx([-0.5, 0.0, 0.0])
    # Raise T_1 to 0.7: row 1 misses it although chosen: term (0 − 1)·(0.6 − 0.7) = 0.1 ≥ 0.
    thresholds = torch.tensor([0.4, 0.7, 0.25])
    loss = batchwise_threshold_loss(probs, thresholds, threshold_mask(probs, thresholds), mask)
    assert loss.item() == pytest.approx(0.05)


def test_batchwise_gate_normalises_over_the_mask_and_uses_thresholds_in_eval():
    gate = BatchwiseGate(2, 3, k=1)
    with torch.no_grad():
        gate.w_gate.zero_()
        gate.w_gate[0] = torch.tensor([1.0, 0.0, -1.0])
        gate.log_thresholds.copy_(torch.tensor([0.5, 0.2, 0.5]).log())
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    probs = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), -1).tolist()  # row 0; row 1 is 1/3 each
    out = gate.eval()(x)
    G = torch.zeros(2, 3).index_put((out.row_A, out.expert_A), out.gate_A)
    # Row 0: probs ≈ [0.665, 0.245, 0.090] → passes T_0 and T_1 → renormalised over those two.
    kept = probs[0] + probs[1]
    assert G[0].tolist() == pytest.approx([probs[0] / kept, probs[1] / kept, 0])
    # Row 1: 1/3 passes only T_1 = 0.2 → gate 1 on expert 1.
    assert G[1].tolist() == pytest.approx([0.0, 1.0, 0.0])
    # Training with m = round(1·2/3) = 1: column-wise top-1.
    out = gate.train()(x)
    assert out.counts_E.tolist() == [1, 1, 1]
    assert out.aux_loss.item() >= 0


def test_importance_is_the_sum_of_gates_and_padding_is_not_counted():
    layer = MoELayer(4, 4, num_experts=3, hidden_dim=5, k=2, gating="top_k").eval()
    with torch.no_grad():
        layer.gate.w_gate.copy_(torch.randn(4, 3))
    x = torch.randn(2, 3, 4)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    _, stats = layer(x, pad)
    G_real = []
    for t in x[~pad]:
        logits = t @ layer.gate.w_gate
        top = logits.topk(2)
        G_real.append(torch.zeros(3).index_put((top.indices,), torch.softmax(top.values, -1)))
    assert stats.importance.tolist() == pytest.approx(torch.stack(G_real).sum(0).tolist(), abs=1e-6)
    assert stats.counts.sum().item() == 3 * 2  # 3 real tokens × k
    assert stats.num_tokens.item() == 3


def test_batchwise_gate_loads_checkpoints_that_stored_linear_thresholds():
    gate = BatchwiseGate(2, 3, k=1)
    state = {"w_gate": torch.randn(2, 3), "thresholds": torch.tensor([0.5, 0.2, 0.1])}
    gate.load_state_dict(state)
    assert gate.thresholds.tolist() == pytest.approx([0.5, 0.2, 0.1])


def _smooth_load_by_autograd(logits, noise, valid, k, eps):
    """Noisy top-k (eq. 3-5) and Load (eq. 10) composed from torch ops and balance.smooth_load."""
    E = noise.shape[1]
    clean, raw = logits[:, :E], logits[:, E:]
    std = torch.nn.functional.softplus(raw) + eps
    noisy = clean + noise * std
    top_values, top_experts = noisy.topk(k + 1, dim=-1)
    gate = torch.softmax(top_values[:, :k], dim=-1)
    prob = smooth_load(clean, noisy, std, top_values, k) * valid[:, None]
    return gate, top_experts[:, :k], prob.sum(0)


@pytest.mark.parametrize("k,E", [(1, 6), (2, 6), (4, 6), (9, 12)])  # k+1 > 8: torch.topk
def test_fused_noisy_top_k_equals_the_formulas_and_their_autograd_gradients(monkeypatch, k, E):
    """noisy_topk.py computes gates, experts and Load block by block (here 7 blocks, split over
    the threads) with a hand-written backward; values and all gradients must equal the plain
    composition of the formulas."""
    from fairseq_smoe.ops import noisy_topk

    monkeypatch.setattr(noisy_topk, "_BLOCK_ELEMENTS", 100 * E)
    torch.manual_seed(k)
    T = 700
    logits = torch.randn(T, 2 * E, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(T, E, dtype=torch.float64)
    valid = torch.rand(T) > 0.2
    fused = noisy_top_k(logits, noise, valid, k, 1e-2)
    reference = _smooth_load_by_autograd(logits, noise, valid.double(), k, 1e-2)
    torch.testing.assert_close(fused[0], reference[0])
    assert torch.equal(fused[1], reference[1])
    torch.testing.assert_close(fused[2], reference[2])
    weight_gate, weight_load = torch.randn(T, k, dtype=torch.float64), torch.randn(E, dtype=torch.float64)
    grads = [torch.autograd.grad((out[0] * weight_gate).sum() + (out[2] * weight_load).sum(), logits)[0]
             for out in (fused, reference)]
    torch.testing.assert_close(grads[0], grads[1])


def test_fused_noisy_top_k_passes_gradcheck_across_blocks(monkeypatch):
    from fairseq_smoe.ops import noisy_topk

    monkeypatch.setattr(noisy_topk, "_BLOCK_ELEMENTS", 64)  # 16-row blocks: many of them
    torch.manual_seed(0)
    T, E = 50, 5
    logits = torch.randn(T, 2 * E, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(T, E, dtype=torch.float64)
    valid = torch.rand(T) > 0.3
    assert torch.autograd.gradcheck(lambda lg: noisy_top_k(lg, noise, valid, 2, 1e-2)[::2], (logits,))


def test_fused_noisy_top_k_rejects_bad_shapes():
    with pytest.raises(ValueError, match="0 < k < number of experts"):
        noisy_top_k(torch.zeros(3, 8), torch.zeros(3, 4), None, 4, 1e-2)
    with pytest.raises(ValueError, match="logits must be"):
        noisy_top_k(torch.zeros(3, 6), torch.zeros(3, 4), None, 2, 1e-2)


def test_fused_noisy_top_k_per_segment_load_equals_separate_calls(monkeypatch):
    """segment_rows: consecutive row blocks gated alike (a hierarchical layer's groups), the load
    summed per segment; equal to one call per segment, values and gradients, with blocks that
    would otherwise cross segment ends and an empty segment."""
    from fairseq_smoe.ops import noisy_topk

    monkeypatch.setattr(noisy_topk, "_BLOCK_ELEMENTS", 16 * 5)  # 16-row blocks
    torch.manual_seed(5)
    segments, E, k = [7, 0, 40, 21], 5, 2
    T = sum(segments)
    logits = torch.randn(T, 2 * E, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(T, E, dtype=torch.float64)
    gate, experts, load = noisy_top_k(logits, noise, None, k, 1e-2, segment_rows=segments)
    assert load.shape == (len(segments), E)
    parts = [noisy_top_k(lg, nz, None, k, 1e-2) for lg, nz in
             zip(torch.split(logits, segments), torch.split(noise, segments))]
    torch.testing.assert_close(gate, torch.cat([p[0] for p in parts]))
    assert torch.equal(experts, torch.cat([p[1] for p in parts]))
    torch.testing.assert_close(load, torch.stack([p[2] for p in parts]))
    assert load[1].abs().sum() == 0
    weight_gate = torch.randn(T, k, dtype=torch.float64)
    weight_load = torch.randn(len(segments), E, dtype=torch.float64)
    grad = torch.autograd.grad((gate * weight_gate).sum() + (load * weight_load).sum(), logits)[0]
    reference = torch.autograd.grad(
        (torch.cat([p[0] for p in parts]) * weight_gate).sum()
        + sum((p[2] * w).sum() for p, w in zip(parts, weight_load)), logits)[0]
    torch.testing.assert_close(grad, reference)
    with pytest.raises(ValueError, match="segment_rows"):
        noisy_top_k(logits, noise, None, k, 1e-2, segment_rows=[T, 1])


def test_grouped_matmul_equals_one_product_per_block():
    """grouped_matmul (the hierarchical layer's secondary gate projections): block g of rows
    times weight g; values and gradients equal per-block products, empty block included."""
    from fairseq_smoe.ops.loop_experts import grouped_matmul

    torch.manual_seed(2)
    counts = [3, 0, 5, 4]
    x = torch.randn(sum(counts), 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(counts), 6, 4, dtype=torch.float64, requires_grad=True)
    y = grouped_matmul(x, counts, weight)
    reference = torch.cat([xb @ weight[g] for g, xb in enumerate(torch.split(x, counts))])
    torch.testing.assert_close(y, reference)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight), grad_y)
    reference_grads = torch.autograd.grad(reference, (x, weight), grad_y)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want)
    assert grads[1][1].abs().sum() == 0  # no rows: zero gradient, not garbage
    with pytest.raises(ValueError, match="counts must give rows"):
        grouped_matmul(x, [3, 5, 4], weight)


def test_gate_noise_is_standard_normal_reproducible_and_independent_of_threads():
    torch.manual_seed(3)
    one = gate_noise(2000, 64, torch.float32, "cpu")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        single = gate_noise(2000, 64, torch.float32, "cpu")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, single)
    assert abs(one.mean().item()) < 0.01 and abs(one.std().item() - 1) < 0.01
    # One stream for all rows: a block of rows does not repeat the block before it.
    rows = 256
    assert not torch.equal(one[:rows], one[rows : 2 * rows])
    assert not torch.equal(gate_noise(5, 3, torch.float32, "cpu"), gate_noise(5, 3, torch.float32, "cpu"))


def test_fused_noisy_top_k_with_tied_logits_picks_distinct_experts():
    T, E, k = 5, 6, 3
    logits = torch.zeros(T, 2 * E, requires_grad=True)
    gate, experts, load = noisy_top_k(logits, torch.zeros(T, E), None, k, 1e-2)
    assert all(len(set(row)) == k for row in experts.tolist())
    torch.testing.assert_close(gate, torch.full((T, k), 1 / k))
    # Every expert's bar equals its own logit: Φ(0) = 1/2 for each row.
    torch.testing.assert_close(load, torch.full((E,), T / 2))
    load.sum().backward()
    assert torch.isfinite(logits.grad).all()
