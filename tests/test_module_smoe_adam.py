"""``--optimizer smoe_adam`` (App. D) without fairseq-train: formulas, state, fp16 wrappers,
state dicts, expert-parallel checkpoint sharding of the factored state."""

import copy

import pytest
import torch
from conftest import load_script
from omegaconf import OmegaConf

from fairseq_smoe.distributed.checkpoints import merge_expert_shards, select_expert_shard, shard_path
from fairseq_smoe.modules import MoELayer
from fairseq_smoe.optim.smoe_adam import (
    SmoeAdam,
    SmoeAdamConfig,
    SmoeAdamW,
    is_expert_param,
    state_elements,
)
from fairseq_smoe.plugin import install

install()  # the plugin, as --user-dir does: registers it with fairseq, installs its patches

LR, BETAS, EPS, WD = 0.01, (0.8, 0.95), 1e-6, 0.1


def make_params(dtype=torch.float32):
    """Shared matrix and vector, an expert weight [E=3, 4, 5] and bias [3, 5] (marked like
    FeedForwardExperts marks its parameters)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (4,), (3, 4, 5), (3, 5)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    for p in params[2:]:
        p.moe_expert_dim = 0
    return params


def gradients(steps, zero_expert=1):
    """Per step, a gradient for each parameter; expert ``zero_expert`` never gets a gradient
    (an expert no token reached: its moments stay 0 and it must not move)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) * 0.1 for p in make_params()]
        for grad in grads[2:]:
            grad[zero_expert] = 0
        out.append(grads)
    return out


def reference(params, grads_per_step):
    """The formulas by hand, in float64: Adam for shared tensors; β1 = 0 and, per expert, the
    factored second moment of App. D written with row/column *means* over the mean."""
    b1, b2 = BETAS
    p = [x.detach().double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    rows = torch.zeros(3, 4, dtype=torch.float64)
    cols = torch.zeros(3, 5, dtype=torch.float64)
    for t, grads in enumerate(grads_per_step, start=1):
        grads = [g.double() for g in grads]
        for i in (0, 1):  # Adam (fairseq's: decoupled decay, ε on the uncorrected √v)
            m[i] = b1 * m[i] + (1 - b1) * grads[i]
            v[i] = b2 * v[i] + (1 - b2) * grads[i] ** 2
            step = LR * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t)
            p[i] = p[i] - LR * WD * p[i] - step * m[i] / (v[i].sqrt() + EPS)
        step = LR * (1 - b2 ** t) ** 0.5
        new_weight = p[2].clone()
        for e in range(3):  # each expert's [d_in, d_out] matrix on its own
            g2 = grads[2][e] ** 2
            rows[e] = b2 * rows[e] + (1 - b2) * g2.mean(dim=1)
            cols[e] = b2 * cols[e] + (1 - b2) * g2.mean(dim=0)
            mean = rows[e].mean()
            v_hat = torch.outer(rows[e], cols[e]) / mean if mean > 0 else torch.zeros(4, 5).double()
            new_weight[e] = p[2][e] - LR * WD * p[2][e] - step * grads[2][e] / (v_hat.sqrt() + EPS)
        p[2] = new_weight
        v[3] = b2 * v[3] + (1 - b2) * grads[3] ** 2  # expert biases: β1 = 0, full v
        p[3] = p[3] - LR * WD * p[3] - step * grads[3] / (v[3].sqrt() + EPS)
    return p


def run(optimizer, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype).clone()
        optimizer.step()


def run_wrapped(optimizer, params, grads_per_step):
    """Through a fairseq optimizer's backward (the fp16 wrappers sync gradients after it)."""
    for grads in grads_per_step:
        optimizer.zero_grad()
        optimizer.backward(sum((p.float() * g).sum() for p, g in zip(params, grads)))
        optimizer.step()


def new_optimizer(params, moments="factored"):
    return SmoeAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, expert_moments=moments)


def test_steps_equal_the_formulas_by_hand():
    params, grads = make_params(), gradients(3)
    opt = new_optimizer(params)
    run(opt, params, grads)
    expected = reference(make_params(), grads)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
    # the expert without gradients only decayed
    torch.testing.assert_close(params[2][1].detach().double(),
                               make_params()[2][1].double() * (1 - LR * WD) ** 3)
    state = opt.state[params[2]]
    assert sorted(state) == ["exp_avg_sq_col", "exp_avg_sq_row", "step"] and state["step"] == 3
    assert state["exp_avg_sq_row"].shape == (3, 4) and state["exp_avg_sq_col"].shape == (3, 5)
    assert sorted(opt.state[params[3]]) == ["exp_avg_sq", "step"]  # no first moment
    assert sorted(opt.state[params[0]]) == ["exp_avg", "exp_avg_sq", "step"]


def test_shared_parameters_and_full_expert_moments_are_fairseqs_adam():
    from fairseq.optim.adam import Adam

    grads = gradients(3)
    ours, theirs = make_params(), make_params()
    run(new_optimizer(ours, "full"), ours, grads)
    run(Adam(theirs, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD), theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    factored = make_params()
    run(new_optimizer(factored), factored, grads)
    torch.testing.assert_close(factored[0], theirs[0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(factored[2], theirs[2], atol=1e-4)  # the experts do differ


def test_expert_state_is_under_a_tenth_of_adams():
    layer = MoELayer(64, 64, num_experts=8, hidden_dim=128, k=2)
    params = list(layer.parameters())
    assert [is_expert_param(p) for p in params].count(True) == 4  # 2 weights, 2 biases

    def state_numel(moments):
        opt = SmoeAdamW(params, expert_moments=moments)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        with torch.no_grad():  # the step moved them: back for the next optimizer
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        return sum(t.numel() for p in params if is_expert_param(p)
                   for t in opt.state[p].values() if torch.is_tensor(t))

    initial = [p.detach().clone() for p in params]
    expert_numel = sum(p.numel() for p in params if is_expert_param(p))
    assert state_numel("full") == 2 * expert_numel
    for moments in ("full", "factored"):  # the accounting of scripts/memory_train.py
        assert state_numel(moments) == sum(state_elements(p, moments) for p in params
                                           if is_expert_param(p))
    # rows + columns per expert matrix: 8·(64+128) + 8·(128+64); biases: 8·(128+64)
    assert state_numel("factored") == 8 * (64 + 128) * 2 + 8 * (128 + 64)
    assert state_numel("factored") < 0.1 * state_numel("full")


def test_blocks_of_experts_give_the_same_update(monkeypatch):
    import fairseq_smoe.optim.smoe_adam as module

    grads = gradients(2)
    whole, blocks = make_params(), make_params()
    run(new_optimizer(whole), whole, grads)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 20)  # one expert matrix (4·5) per block
    run(new_optimizer(blocks), blocks, grads)
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_continues_bitwise():
    grads = gradients(4)
    straight = make_params()
    run(new_optimizer(straight), straight, grads)
    first = make_params()
    opt = new_optimizer(first)
    run(opt, first, grads[:2])
    saved = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    for p in resumed[2:]:
        p.moe_expert_dim = 0
    opt2 = new_optimizer(resumed)
    opt2.load_state_dict(saved)
    run(opt2, resumed, grads[2:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    wrong = new_optimizer([torch.nn.Parameter(p.detach().clone()) for p in first], "full")
    wrong.load_state_dict(saved)
    for p in wrong.param_groups[0]["params"][2:]:
        p.moe_expert_dim = 0
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="--moe-expert-moments factored"):
        wrong.step()


def fairseq_cfg(**common):
    base = dict(fp16_scale_window=None, fp16_init_scale=2 ** 7, fp16_scale_tolerance=0.0,
                threshold_loss_scale=None, min_loss_scale=1e-4, bf16=False,
                fp16_no_flatten_grads=False, model_parallel_size=1)
    base.update(common)
    return OmegaConf.create({
        "common": base, "optimization": {"update_freq": [1], "lr": [LR]},
        "distributed_training": {"distributed_world_size": 1},
        "optimizer": {"_name": "smoe_adam", "adam_betas": str(BETAS), "adam_eps": EPS,
                      "weight_decay": WD, "moe_expert_moments": "factored", "lr": [LR]}})


def test_fairseq_fp16_wrappers():
    from fairseq.optim.fp16_optimizer import FP16Optimizer, MemoryEfficientFP16Optimizer

    cfg = fairseq_cfg(bf16=True)
    grads = gradients(2)
    expected = reference(make_params(), grads)
    # --memory-efficient-bf16: bf16 parameters, fp32 moments, update computed in fp32
    params = make_params(torch.bfloat16)
    opt = MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
    assert isinstance(opt.wrapped_optimizer, SmoeAdam)
    run_wrapped(opt, params, grads)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    state = opt.optimizer.state[params[2]]
    assert state["exp_avg_sq_row"].dtype == torch.float32 and state["exp_avg_sq_row"].shape == (3, 4)
    # --bf16 (fp32 master copies, not flattened): the copies keep the expert mark
    params = make_params(torch.bfloat16)
    opt = FP16Optimizer.build_optimizer(cfg, params)
    run_wrapped(opt, params, grads)
    assert sorted(opt.fp32_optimizer.optimizer.state[opt.fp32_params[2]]) == \
        ["exp_avg_sq_col", "exp_avg_sq_row", "step"]
    torch.testing.assert_close(opt.fp32_params[2].double(), expected[2], rtol=2e-2, atol=2e-2)
    # --fp16 with flattened master weights: refused, naming the fixes
    with pytest.raises(ValueError, match="--fp16-no-flatten-grads, use --memory-efficient-fp16"):
        FP16Optimizer.build_optimizer(fairseq_cfg(), make_params(torch.float16))


def test_fairseq_wrapper_reads_the_cli_options():
    cfg = SmoeAdamConfig(adam_betas="(0.8, 0.95)", adam_eps=EPS, weight_decay=WD, lr=[LR],
                         moe_expert_moments="full")
    opt = SmoeAdam(cfg, make_params())
    assert opt.optimizer.expert_moments == "full" and opt.supports_flat_params
    assert opt.optimizer_config == {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD}


# --- expert-parallel checkpoints of the factored state ------------------------------------------


def checkpoint_of(optimizer_state, params):
    keys = ["shared.weight", "shared.bias", "experts.weights.0", "experts.biases.0"]
    return {"model": dict(zip(keys, [p.detach().clone() for p in params])),
            "last_optimizer_state": copy.deepcopy(optimizer_state), "optimizer_history": [{"num_updates": 2}],
            "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 2}}}


def expert_setup(experts=4):
    """Shared [6, 4], [4] and expert [E, 4, 5], [E, 5] parameters after 2 smoe_adam steps."""
    g = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s, generator=g))
              for s in [(6, 4), (4,), (experts, 4, 5), (experts, 5)]]
    for p in params[2:]:
        p.moe_expert_dim = 0
    opt = new_optimizer(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


def plan(rank, world, experts=4):
    return {"world_size": world, "rank": rank,
            "model_keys": {"experts.weights.0": experts, "experts.biases.0": experts},
            "optimizer_slots": {2: experts, 3: experts}}


def test_factored_state_shards_and_merges_along_the_experts():
    params, opt = expert_setup()
    full = checkpoint_of(opt.state_dict(), params)
    shards = [select_expert_shard(full, plan(r, 2)) for r in range(2)]
    state1 = shards[1]["last_optimizer_state"]["state"]
    assert state1[2]["exp_avg_sq_row"].shape == (2, 4) and state1[2]["exp_avg_sq_col"].shape == (2, 5)
    torch.testing.assert_close(state1[2]["exp_avg_sq_col"], full["last_optimizer_state"]["state"][2]
                               ["exp_avg_sq_col"][2:], rtol=0, atol=0)
    assert state1[3]["exp_avg_sq"].shape == (2, 5) and state1[2]["step"] == 2  # steps untouched
    assert state1[0]["exp_avg"].shape == (6, 4)  # shared state whole on every worker
    merged = merge_expert_shards(shards)["last_optimizer_state"]["state"]
    for index, entry in full["last_optimizer_state"]["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(merged[index][name], value), (index, name)
            else:
                assert merged[index][name] == value


def test_worker_shard_state_continues_like_the_full_optimizer():
    """A worker's optimizer with its experts and its slice of the factored state makes the same
    update to those experts as the one-process optimizer (the factored moments are per expert)."""
    params, opt = expert_setup()
    full = checkpoint_of(opt.state_dict(), params)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    opt.step()
    shard = select_expert_shard(full, plan(1, 2))
    local = [torch.nn.Parameter(t.clone()) for t in shard["model"].values()]
    for p in local[2:]:
        p.moe_expert_dim = 0
    local_opt = new_optimizer(local)
    local_opt.load_state_dict(shard["last_optimizer_state"])
    for p, grad in zip(local, grads):
        p.grad = (grad[2:] if is_expert_param(p) else grad).clone()
    local_opt.step()
    # other tensor shapes may vectorise the sums differently: equal to rounding
    torch.testing.assert_close(local[2], params[2][2:], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(local[3], params[3][2:], rtol=1e-6, atol=1e-7)
    assert torch.equal(local[0], params[0])


def test_reshard_script_two_to_one_and_four(tmp_path):
    script = load_script("reshard_experts")
    params, opt = expert_setup(8)
    full = checkpoint_of(opt.state_dict(), params)
    base = str(tmp_path / "checkpoint_last.pt")
    for rank in range(2):
        torch.save(select_expert_shard(full, plan(rank, 2, 8)), shard_path(base, rank))
    merged_path, four = str(tmp_path / "merged.pt"), str(tmp_path / "four" / "checkpoint_last.pt")
    assert script.main([base, "-o", merged_path]) == 0
    assert script.main([base, "--workers", "4", "-o", four]) == 0
    merged = torch.load(merged_path, weights_only=False)["last_optimizer_state"]["state"]
    expected = full["last_optimizer_state"]["state"]
    for name in ("exp_avg_sq_row", "exp_avg_sq_col"):
        assert torch.equal(merged[2][name], expected[2][name])
    for rank in range(4):
        state = torch.load(shard_path(four, rank), weights_only=False)["last_optimizer_state"]["state"]
        assert torch.equal(state[2]["exp_avg_sq_row"], expected[2]["exp_avg_sq_row"][2 * rank:2 * rank + 2])
        assert torch.equal(state[3]["exp_avg_sq"], expected[3]["exp_avg_sq"][2 * rank:2 * rank + 2])
        assert state[2]["step"] == 2 and torch.equal(state[0]["exp_avg_sq"], expected[0]["exp_avg_sq"])


