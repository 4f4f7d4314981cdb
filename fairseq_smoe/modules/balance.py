"""Balance statistics of a gate (paper §4 and App. A).

Pure functions on small per-expert vectors; the gates call them, the layers combine
them into one loss, and the tests check them on hand-made tensors.
"""

import torch

# The reference code adds these to keep CV² finite and make a single expert give 0.
_CV_EPS = 1e-10
_INV_SQRT2 = 0.5**0.5


def cv_squared(values_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, variance / mean², with *population* variance.

    ``values_E`` is any tensor of per-expert totals; it is flattened (hierarchical layers
    pass their [groups, experts_per_group] grid: the loss is over all cells, App. B).
    One value gives 0, as in the reference code.
    """
    values = values_E.reshape(-1)
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    if values.numel() <= 1:
        return values.sum() * 0.0
    mean = values.mean()
    variance = ((values - mean) ** 2).mean()
    return variance / (mean * mean + _CV_EPS)


def coefficient_of_variation(values_E: torch.Tensor) -> float:
    """CV (not squared) as a detached Python float, for logging (paper Table 6)."""
    return float(cv_squared(values_E.detach()).clamp_min(0).sqrt())


def max_over_mean(values_E: torch.Tensor) -> float:
    """max/mean of a per-expert vector as a Python float (paper Table 6's "max/mean load")."""
    values = values_E.detach().reshape(-1).float()
    mean = values.mean()
    if mean <= 0:
        return 0.0
    return float(values.max() / mean)


def smooth_load(
    clean_logits_TE: torch.Tensor,
    noisy_logits_TE: torch.Tensor,
    noise_std_TE: torch.Tensor,
    noisy_top_values_TK: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """P(x, i) of paper eq. (8)-(9): the probability that expert i is in the top k for x
    if only expert i's noise were drawn again, the other noisy logits held fixed.

        P(x,i) = Φ( ((x·W_g)_i − kth_excluding(H(x), k, i)) / softplus((x·W_noise)_i) )

    ``noisy_top_values_TK`` holds the k+1 largest noisy logits of each row, sorted
    descending. kth_excluding(H(x), k, i) is the k-th largest noisy logit among the others:
    for an expert currently in the top k that is the (k+1)-th largest overall, for an expert
    out of the top k it is the k-th largest. Thresholds come from noisy *logits*, never from
    probabilities. Returns P [T, E]; summing over tokens gives Load(X) of eq. (10).
    """
    threshold_if_in_T1 = noisy_top_values_TK[:, k : k + 1]
    threshold_if_out_T1 = noisy_top_values_TK[:, k - 1 : k]
    is_in_TE = noisy_logits_TE > threshold_if_in_T1
    # Pick each expert's threshold first, then one Φ over tokens × experts (not two).
    threshold_TE = torch.where(is_in_TE, threshold_if_in_T1, threshold_if_out_T1)
    z_TE = (clean_logits_TE - threshold_TE) / noise_std_TE
    return 0.5 * torch.erfc(z_TE * -_INV_SQRT2)  # Φ(z) = erfc(−z/√2)/2, accurate in both tails
