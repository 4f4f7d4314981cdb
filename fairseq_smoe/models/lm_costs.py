"""Size and compute of an ``lstm_moe_lm`` configuration, counted as the paper counts them
(Table 7, App. C): parameters and multiply-adds per time step *excluding the embedding and
softmax layers*. Computed from the options alone, so the 4-billion-parameter presets can be
tabulated without building them.

    params: the weight matrices of the LSTMs and of the MoE layer (experts and gates); this
            reproduces the paper's figures (MoE-256: 272.9M, MoE-4096-h: 4303.4M), so the
            paper did not count biases. ``params_with_biases`` is what the modules really hold.
    ops:    multiply-adds per time step of the LSTM matrices and of the experts a token visits
            (k for a flat top-k MoE, k·k for a hierarchical one, all n for dense softmax
            gating, k on average for batchwise). The gate's own x·W_g is reported separately
            (``gate_ops``): the paper's "8.4M ops/timestep" leaves it out.

    python -c "from fairseq_smoe.models.lm_costs import preset_table; print(preset_table())"
"""

import argparse
from typing import Dict


def lstm_costs(input_size: int, hidden_size: int, proj_size: int) -> Dict[str, int]:
    out = proj_size or hidden_size
    weights = 4 * hidden_size * (input_size + out) + (proj_size * hidden_size if proj_size else 0)
    return {"params": weights, "biases": 2 * 4 * hidden_size, "ops": weights}


def expert_costs(dim: int, hidden: int, layers: int) -> Dict[str, int]:
    dims = [dim] + [hidden] * layers + [dim]
    weights = sum(a * b for a, b in zip(dims, dims[1:]))
    return {"params": weights, "biases": sum(dims[1:]), "ops": weights}


def gate_params(gating: str, dim: int, num_experts: int) -> int:
    if gating == "noisy_top_k":
        return 2 * dim * num_experts  # W_g and W_noise
    if gating == "batchwise":
        return dim * num_experts + num_experts  # W_g and the thresholds T
    return dim * num_experts  # top_k, softmax: W_g


def lm_costs(args) -> Dict[str, float]:
    """{"params", "params_with_biases", "ops", "gate_ops", "total_experts",
    "experts_per_token"} for ``args`` after the architecture function has filled the defaults."""
    D = args.decoder_embed_dim
    n_lstm = args.lstm_layers_before_moe + args.lstm_layers_after_moe
    lstm = lstm_costs(D, args.decoder_hidden_size, args.decoder_lstm_proj_size)
    params, ops, gate_ops = n_lstm * lstm["params"], n_lstm * lstm["ops"], 0
    biases = n_lstm * lstm["biases"]
    n = args.moe_num_experts or 0
    per_token = 0
    if n:
        expert = expert_costs(D, args.moe_hidden_dim, args.moe_expert_layers)
        groups = args.moe_groups if (args.moe_groups or 0) > 1 else 0
        gating, k = args.moe_gating, args.moe_k
        if groups:
            per_group = n // groups
            params += gate_params(gating, D, groups) + groups * gate_params(gating, D, per_group)
            per_token = n if gating == "softmax" else k * k
            gate_ops = D * groups + (groups if gating == "softmax" else k) * D * per_group
        else:
            params += gate_params(gating, D, n)
            per_token = n if gating == "softmax" else k
            gate_ops = D * n
        params += n * expert["params"]
        biases += n * expert["biases"]
        ops += per_token * expert["ops"]
    return {"params": params, "params_with_biases": params + biases, "ops": ops,
            "gate_ops": gate_ops, "total_experts": n, "experts_per_token": per_token}


def preset_table() -> str:
    """Markdown table of every registered lstm_moe_lm architecture."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY

    from fairseq_smoe.plugin import install

    install()  # registers the plugin with fairseq, installs its patches

    rows = ["| `--arch` | experts (groups) | k | expert hidden | LSTMs below+above MoE × units | "
            "params (M) | ops/timestep (M) |",
            "|---|---|---|---|---|---|---|"]
    for name in ARCH_MODEL_INV_REGISTRY["lstm_moe_lm"]:
        args = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[name](args)
        c = lm_costs(args)
        groups = f" ({args.moe_groups})" if (args.moe_groups or 0) > 1 else ""
        hidden = (f"{args.moe_hidden_dim}" + (f"×{args.moe_expert_layers}" if args.moe_expert_layers > 1
                                              else "")) if c["total_experts"] else "-"
        lstm = (f"{args.lstm_layers_before_moe}+{args.lstm_layers_after_moe} × {args.decoder_hidden_size}"
                + (f"→{args.decoder_lstm_proj_size}" if args.decoder_lstm_proj_size else ""))
        rows.append(f"| `{name}` | {c['total_experts'] or '-'}{groups} | "
                    f"{args.moe_k if c['total_experts'] else '-'} | {hidden} | {lstm} | "
                    f"{c['params'] / 1e6:.1f} | {c['ops'] / 1e6:.1f} |")
    return "\n".join(rows)

