"""A slow, dense reference of the MoE layers, written straight from the paper's equations.

Every expert runs on every token and the gates are full [T, n] matrices, so nothing here shares
code with the sparse implementation except the parameters it reads and the noise sampler
(``gate_noise``, the layer's random input, not its math): noise is drawn in the same order and
shapes as the layer draws it, so seeding both identically gives identical noise.
"""

import math

import torch
import torch.nn.functional as F

from fairseq_smoe.ops.noisy_topk import gate_noise


def expert_outputs(experts, x_TD):
    """E_i(x) for every expert i and token: [T, n, out]."""
    h = x_TD.unsqueeze(1).expand(-1, experts.num_experts, -1)  # [T, n, d]
    last = len(experts.weights) - 1
    for layer, (w, b) in enumerate(zip(experts.weights, experts.biases)):
        h = torch.einsum("tnd,ndh->tnh", h, w) + b
        if layer < last:
            h = torch.relu(h)
    return h


def _phi(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))


def dense_gate(gate, x_TD, training, keep_T=None, noise=None):
    """(G [T, n], Load [n], aux loss) of one gate module, dense, on the rows ``keep_T`` of x_TD.

    The layer draws noise for every row (padding included), so we draw for all rows too, unless
    ``noise`` (for the rows of x_TD) is given."""
    name = type(gate).__name__
    noise_rows = x_TD.shape[0]
    if keep_T is not None:
        x_TD = x_TD[keep_T]
    clean = (x_TD @ gate.w_gate).float()
    T, n = clean.shape
    if name == "SoftmaxGate":
        G = torch.softmax(clean, -1)
        return G, torch.full((n,), float(T)), clean.new_zeros(())
    if name == "BatchwiseGate":
        probs = torch.softmax(clean, -1)
        thresholds = gate.thresholds.float()
        threshold_mask = (probs > thresholds).float()
        if training:
            m = min(T, max(1, int(gate.k * T / n + 0.5))) if T else 0
            mask = torch.zeros_like(probs)
            for i in range(n):  # column by column, as eq. (16) reads
                mask[probs[:, i].topk(m).indices, i] = 1.0
            aux = ((threshold_mask - mask) * (probs.detach() - thresholds)).sum() / max(T, 1)
        else:
            mask, aux = threshold_mask, clean.new_zeros(())
        masked = probs * mask
        G = masked / masked.sum(-1, keepdim=True).clamp_min(1e-30)
        return G, mask.sum(0), aux
    # Noisy top-k / top-k.
    k = gate.k
    noisy_training = training and gate.noisy
    if noisy_training:
        std = F.softplus((x_TD @ gate.w_noise).float()) + gate.noise_epsilon
        if noise is None:
            noise = gate_noise(noise_rows, n, clean.dtype, clean.device)
        H = clean + (noise if keep_T is None else noise[keep_T]) * std
    else:
        H = clean
    kth = H.topk(k, -1).values[:, -1:]
    keep = H >= kth
    G = torch.softmax(H.masked_fill(~keep, float("-inf")), -1) if T else H
    if noisy_training and k < n:
        load = clean.new_zeros(n)
        for i in range(n):  # kth_excluding(H, k, i): k-th largest of the others
            others = torch.cat([H[:, :i], H[:, i + 1 :]], 1)
            threshold = others.topk(k, -1).values[:, -1]
            load[i] = _phi((clean[:, i] - threshold) / std[:, i]).sum()
    else:
        load = keep.float().sum(0)
    return G, load, clean.new_zeros(())


def cv2(v):
    v = v.reshape(-1).float()
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10) if v.numel() > 1 else v.sum() * 0


def dense_moe(layer, x, padding_mask=None):
    """(y, loss, importance, load) of a MoELayer, computed densely."""
    x_TD = x.reshape(-1, layer.input_dim)
    keep = torch.ones(x_TD.shape[0], dtype=torch.bool) if padding_mask is None else ~padding_mask.reshape(-1)
    real = x_TD[keep]
    G, load, aux = dense_gate(layer.gate, x_TD, layer.training, keep)
    y_real = torch.einsum("tn,tno->to", G.to(x.dtype), expert_outputs(layer.experts, real))
    y = x_TD.new_zeros(x_TD.shape[0], layer.output_dim)
    y[keep] = y_real
    importance = G.sum(0)
    loss = layer.w_importance * cv2(importance) + layer.w_load * cv2(load) + aux
    return y.reshape(*x.shape[:-1], -1), loss, importance, load


def dense_hierarchical_moe(layer, x, padding_mask=None):
    """(y, loss, importance [a, b], load [a, b]) of a HierarchicalMoELayer (App. B), densely."""
    a, b = layer.num_groups, layer.experts_per_group
    x_TD = x.reshape(-1, layer.input_dim)
    keep = torch.ones(x_TD.shape[0], dtype=torch.bool) if padding_mask is None else ~padding_mask.reshape(-1)
    real = x_TD[keep]
    T = real.shape[0]
    G_primary, load_primary, aux = dense_gate(layer.primary_gate, x_TD, layer.training, keep)
    G_full = G_primary.new_zeros(T, a, b)
    load = G_primary.new_zeros(a, b)
    group_rows = [(G_primary[:, i] > 0).nonzero().squeeze(1) for i in range(a)]  # X^(i), in order
    # Noisy secondary gates: one draw for the rows of all groups, X^(1) first (as the layer),
    # shaped for all T·k_primary primary assignments (padding ones last, unused).
    noise = None
    if layer.training and layer.secondary_gates.gating == "noisy_top_k":
        real_rows = sum(len(r) for r in group_rows)
        noise = gate_noise(x_TD.shape[0] * layer.k_primary, b,
                           torch.promote_types(real.dtype, torch.float32), x.device)[:real_rows]
        noise = torch.split(noise, [len(r) for r in group_rows])
    for i, rows in enumerate(group_rows):
        G_i, load_i, aux_i = dense_gate(layer.secondary_gates.group_gate(i), real[rows], layer.training,
                                        noise=None if noise is None else noise[i])
        G_full[rows, i] = G_primary[rows, i : i + 1] * G_i
        load[i] = load_primary[i] * load_i / max(len(rows), 1)
        aux = aux + aux_i
    outputs = expert_outputs(layer.experts, real)  # [T, a*b, out]
    y_real = torch.einsum("tn,tno->to", G_full.reshape(T, a * b).to(x.dtype), outputs)
    y = x_TD.new_zeros(x_TD.shape[0], layer.output_dim)
    y[keep] = y_real
    importance = G_full.sum(0)
    loss = layer.w_importance * cv2(importance) + layer.w_load * cv2(load) + aux
    return y.reshape(*x.shape[:-1], -1), loss, importance, load


def randomise_gates(layer, scale=1.0):
    """Gates start at zero (App. A); give them random weights so routing is non-trivial."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "w_gate" in name or "w_noise" in name:
                p.copy_(torch.randn_like(p) * scale)
            if "log_thresholds" in name:
                p.copy_(torch.log(torch.rand_like(p) * 2 / p.numel()))
    return layer
