#!/usr/bin/env python
"""Side-by-side speed and memory of the MoE layer and its computationally matched dense layer.

For each configuration of the paper's language models (§5.1, App. C: d = 512, expert hidden
1024, k = 4 flat or k = 2×2 hierarchical with 16 groups) this times forward + backward of
``MoELayer`` / ``HierarchicalMoELayer`` and of the dense feed-forward layer with the same
active compute, MoE-1-Wide (d → k·hidden → d, i.e. 512 → 4096 → 512), **in the same run,
interleaved** (dense, MoE, dense, MoE, ...), and reports medians, so that the ratio stays
meaningful on a shared, noisy machine. It also reports tokens/s, the achieved FLOP/s with the
paper's counting, the peak memory of one training step, and the memory-traffic floor of the
expert weights.

    .venv/bin/python scripts/benchmark_moe.py                     # the full table (CPU, ~20 min)
    .venv/bin/python scripts/benchmark_moe.py --quick             # smoke run, < 1 min on 2 cores
    .venv/bin/python scripts/benchmark_moe.py --configs moe-32,moe-256 --tokens 8192 \\
        --dtypes fp32 --json results.json

Columns (see docs/performance.md):
    ratio       median MoE step time / median dense step time (forward + backward).
    pair        median over the reps of MoE time / the dense time measured just before it:
                steadier than "ratio" when the machine's load drifts during the run.
    w-floor     time to move the expert weights once per step (read forward, read backward,
                write the gradient: 3 × weight bytes at the copy bandwidth measured in the same
                run), divided by the dense step time. With few tokens per expert this traffic,
                not the FLOPs, is the floor of the MoE step.
    tok/s       tokens per second through the MoE layer (forward + backward).
    GFLOP/s     the paper's counting: 2 FLOPs per multiply-add of the expert (or dense) matrix
                products, forward + backward = 3 × forward; the gate is not counted (the paper's
                "ops/timestep", §5.1). Both layers do the same counted work per token.
    act MiB     peak memory of one forward + backward above the state before it (every tensor
                allocation, the MoE layer's reused buffers included), less the parameter
                gradients: activations and temporaries. The expert weights and their
                gradients come on top (column "weights MiB" in the JSON).
    mem         MoE act MiB / dense act MiB.
    max/mean    largest expert's token count over the mean (routing balance of the batch).

Launch/sync proxy (second table, per backend of --proxy-backends; see docs/performance.md): one
training step of the MoE layer (forward + backward) counted by fairseq_smoe/ops/counting.py:
    reads       host reads (Tensor.tolist/item/__int__/__bool__..., nonzero, bincount, ...):
                each one drains a GPU's queue
    aten        ATen operators dispatched (about one kernel launch each on a GPU; views included)
    triton      Triton kernel launches (triton backend)
    kernels     aten + triton: the launch proxy; at 5-10 µs per launch it bounds a GPU step
The loop backend is counted on its real step. The device-resident backends issue the same
operators whatever the values (tests/test_module_backends.py checks it), so on CPU the triton
backend's launches are counted without running them (the interpreter would take minutes at
these sizes) and grouped_mm runs torch's CPU _grouped_mm.

Routing: the gate weights start at zero as in the paper (App. A), so the noise spreads tokens
evenly over the experts, as the balance losses keep them in training (Table 6: max/mean 1.14).
"""

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer  # noqa: E402
from fairseq_smoe.ops.workspace import Workspace  # noqa: E402

PAPER_CONFIGS = ("moe-4", "moe-32", "moe-256", "moe-256-h", "moe-1024-h")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The targets (2-core CPU, fp32, forward + backward), keyed by (config, tokens).
TARGETS = {("moe-32", 8192): 1.05, ("moe-256", 8192): 1.20, ("moe-1024-h", 8192): 1.6,
           ("moe-256", 32768): 1.10}


@dataclass
class Config:
    name: str
    num_experts: int
    hierarchical: bool
    num_groups: int = 1
    k: int = 4  # flat k, or k_primary·k_secondary
    k_primary: int = 2
    k_secondary: int = 2


def parse_config(name: str, k: int, groups: int) -> Config:
    match = re.fullmatch(r"moe-(\d+)(-h)?", name.strip().lower())
    if not match:
        raise SystemExit(f"unknown configuration {name!r}: use moe-N (flat, k={k}) or moe-N-h "
                         f"(hierarchical, {groups} groups, k=2 per level), e.g. {','.join(PAPER_CONFIGS)}")
    n = int(match.group(1))
    if match.group(2):
        if n % groups or n // groups < 2:
            raise SystemExit(f"{name}: {n} experts do not split into {groups} groups of >= 2 "
                             f"(change --groups)")
        return Config(name, n, True, num_groups=groups, k=4)
    if k > n:
        raise SystemExit(f"{name}: k={k} is larger than the {n} experts (change --k)")
    return Config(name, n, False, k=k)


def build_layers(cfg: Config, dim: int, hidden: int, gating: str, recompute: bool,
                 backend: str = "auto"):
    if cfg.hierarchical:
        moe = HierarchicalMoELayer(dim, dim, cfg.num_groups, cfg.num_experts // cfg.num_groups, hidden,
                                   k_primary=cfg.k_primary, k_secondary=cfg.k_secondary, gating=gating,
                                   recompute_activations=recompute, backend=backend)
    else:
        moe = MoELayer(dim, dim, cfg.num_experts, hidden, k=cfg.k, gating=gating,
                       recompute_activations=recompute, backend=backend)
    # MoE-1-Wide: one feed-forward layer as wide as the k active experts together.
    dense = nn.Sequential(nn.Linear(dim, cfg.k * hidden), nn.ReLU(), nn.Linear(cfg.k * hidden, dim))
    return moe, dense


def counted_flops_per_token(cfg: Config, dim: int, hidden: int) -> float:
    """Paper's counting: 2 per multiply-add of the (active) expert matmuls, × 3 for fwd + bwd."""
    return 3 * 2 * cfg.k * (dim * hidden + hidden * dim)


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(module: nn.Module, x: torch.Tensor):
    for p in module.parameters():
        p.grad = None
    x.grad = None


def train_step(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor):
    """Forward + backward, as a training step sees it (task gradient + balance loss)."""
    out = module(x)
    if isinstance(out, tuple):  # MoE: (y, stats)
        y, stats = out
        torch.autograd.backward([y, stats.loss], [grad_y, None])
        return stats
    out.backward(grad_y)
    return None


def timed_step(module, x, grad_y, device) -> float:
    clear_grads(module, x)
    sync(device)
    start = time.perf_counter()
    train_step(module, x, grad_y)
    sync(device)
    return time.perf_counter() - start


def clear_workspaces(module: nn.Module):
    """Drop the layer's reused buffers, so that the next step allocates (and counts) them."""
    for m in module.modules():
        workspace = getattr(m, "workspace", None)
        if isinstance(workspace, Workspace):
            workspace.clear()


def grad_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def step_peak_bytes(module, x, grad_y, device) -> int:
    """Peak bytes live during one forward + backward above the state before it.

    Counts every tensor allocation of the step (CUDA: the allocator's peak; CPU: the profiler's
    allocation events), parameter gradients included. The MoE layer's reused buffers are
    dropped first, so they are allocated, and counted, within the step: in steady state they
    stay resident between steps, which is what this peak then describes."""
    clear_grads(module, x)
    clear_workspaces(module)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(module, x, grad_y)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    cpu = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[cpu], profile_memory=True) as prof:
        train_step(module, x, grad_y)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write), the memory-traffic yardstick."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:])


@dataclass
class Row:
    config: str
    experts: int
    k: int
    tokens: int
    dtype: str
    device: str
    threads: int
    dense_ms: float
    moe_ms: float
    ratio: float
    pair_ratio: float  # median over reps of (MoE time / the dense time measured just before it)
    weight_floor: float  # expert-weight traffic time / dense time
    moe_tokens_per_s: float
    dense_tokens_per_s: float
    moe_gflops: float
    dense_gflops: float
    moe_act_mib: Optional[float]
    dense_act_mib: Optional[float]
    mem_ratio: Optional[float]
    expert_weight_mib: float
    max_over_mean: float
    target: Optional[float]
    reps: int
    backend: str = "auto"
    dense_all_ms: List[float] = field(default_factory=list)
    moe_all_ms: List[float] = field(default_factory=list)
    # backend -> {"host_reads", "aten_ops", "triton_launches", "kernels"} of one training step
    proxy: dict = field(default_factory=dict)


def measure(cfg: Config, tokens: int, dtype_name: str, device: torch.device, args, bandwidth: float) -> Row:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        # Initialise the weights on the GPU: MoE-1024-h has 1.07G expert parameters, whose CPU
        # initialisation alone would take longer than the row's timed steps.
        with device:
            moe, dense = build_layers(cfg, args.dim, args.hidden, args.gating, args.recompute,
                                      args.backend)
    else:
        moe, dense = build_layers(cfg, args.dim, args.hidden, args.gating, args.recompute, args.backend)
    moe.to(device=device, dtype=dtype).train()
    dense.to(device=device, dtype=dtype).train()
    x = torch.randn(tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(tokens, args.dim, device=device, dtype=dtype)

    for _ in range(args.warmup):
        timed_step(dense, x, grad_y, device)
        timed_step(moe, x, grad_y, device)
    dense_s, moe_s = [], []
    for _ in range(args.reps):  # interleaved: both see the same machine load
        dense_s.append(timed_step(dense, x, grad_y, device))
        moe_s.append(timed_step(moe, x, grad_y, device))
    dense_med, moe_med = statistics.median(dense_s), statistics.median(moe_s)

    clear_grads(moe, x)
    with torch.no_grad():
        counts = moe(x)[1].counts.reshape(-1).double()
    max_over_mean = float(counts.max() / counts.mean().clamp_min(1e-9))

    dense_act = moe_act = None
    if not args.no_memory:
        dense_act = (step_peak_bytes(dense, x, grad_y, device) - grad_bytes(dense)) / 2**20
        moe_act = (step_peak_bytes(moe, x, grad_y, device) - grad_bytes(moe)) / 2**20
    clear_grads(moe, x)
    clear_grads(dense, x)

    expert_bytes = sum(p.numel() * p.element_size() for p in moe.experts.parameters())
    weight_floor = (3 * expert_bytes / bandwidth) / dense_med
    flops = counted_flops_per_token(cfg, args.dim, args.hidden) * tokens
    target = TARGETS.get((cfg.name, tokens)) if (dtype_name == "fp32" and device.type == "cpu") else None
    row = Row(
        config=cfg.name, experts=cfg.num_experts, k=cfg.k, tokens=tokens, dtype=dtype_name,
        device=device.type, threads=torch.get_num_threads(),
        dense_ms=dense_med * 1e3, moe_ms=moe_med * 1e3, ratio=moe_med / dense_med,
        pair_ratio=statistics.median(m / d for d, m in zip(dense_s, moe_s)),
        weight_floor=weight_floor,
        moe_tokens_per_s=tokens / moe_med, dense_tokens_per_s=tokens / dense_med,
        moe_gflops=flops / moe_med / 1e9, dense_gflops=flops / dense_med / 1e9,
        moe_act_mib=moe_act, dense_act_mib=dense_act,
        mem_ratio=(moe_act / dense_act) if moe_act is not None and dense_act else None,
        expert_weight_mib=expert_bytes / 2**20, max_over_mean=max_over_mean, target=target,
        reps=args.reps, backend=moe.experts_backend(x).name,
        dense_all_ms=[t * 1e3 for t in dense_s], moe_all_ms=[t * 1e3 for t in moe_s],
    )
    for backend in args.proxy_backends:
        row.proxy[backend] = count_proxy(moe, backend, x, grad_y)
    del moe, dense, x, grad_y
    return row


def count_proxy(moe: nn.Module, backend: str, x: torch.Tensor, grad_y: torch.Tensor) -> dict:
    """Host reads, ATen operators and Triton launches of one training step on ``backend``
    (the same parameters; see the module docstring)."""
    from fairseq_smoe.ops.counting import count_step

    previous, moe.backend = moe.backend, backend
    dry_run = backend == "triton" and x.device.type == "cpu"
    try:
        if backend == "triton":
            from fairseq_smoe.ops import triton_experts

            triton_experts.DRY_RUN[0] = dry_run
        train_step(moe, x, grad_y)  # warm-up: lazy imports, Triton compilation
        clear_grads(moe, x)
        with count_step() as counts:
            train_step(moe, x, grad_y)
        clear_grads(moe, x)
    finally:
        moe.backend = previous
        if backend == "triton":
            triton_experts.DRY_RUN[0] = False
    return {"host_reads": len(counts.host_reads), "host_copies": len(counts.host_copies),
            "aten_ops": counts.aten_ops, "triton_launches": counts.launches, "kernels": counts.kernels,
            "reads": sorted(set(counts.host_reads)), "syncs": sorted(set(counts.syncs)),
            "dry_run": dry_run}


PROXY_HEADER = (f"{'config':<11}{'tokens':>7} {'dtype':<5}{'dev':<5}{'backend':<11}{'reads':>6}"
                f"{'copies':>7}{'aten':>8}{'triton':>7}{'kernels':>8}")


def format_proxy(r: Row) -> List[str]:
    return [f"{r.config:<11}{r.tokens:>7} {r.dtype:<5}{r.device:<5}{b:<11}{p['host_reads']:>6}"
            f"{p.get('host_copies', 0):>7}{p['aten_ops']:>8}{p['triton_launches']:>7}{p['kernels']:>8}"
            for b, p in r.proxy.items()]


# ----------------------------------------------------------------------------- output

HEADER = (f"{'config':<11}{'tokens':>7} {'dtype':<5}{'dev':<5}{'dense ms':>9}{'MoE ms':>9}{'ratio':>7}"
          f"{'pair':>7}{'target':>7}{'w-floor':>8}{'tok/s':>8}{'GFLOP/s':>8}{'dense':>7}{'act MiB':>9}"
          f"{'dense':>8}{'mem':>6}{'max/mean':>9}")


def format_row(r: Row) -> str:
    def opt(v, fmt):
        return format(v, fmt) if v is not None else "-"
    return (f"{r.config:<11}{r.tokens:>7} {r.dtype:<5}{r.device:<5}{r.dense_ms:>9.1f}{r.moe_ms:>9.1f}"
            f"{r.ratio:>7.3f}{r.pair_ratio:>7.2f}{opt(r.target, '>7.2f'):>7}{r.weight_floor:>8.3f}"
            f"{r.moe_tokens_per_s:>8.0f}"
            f"{r.moe_gflops:>8.1f}{r.dense_gflops:>7.1f}{opt(r.moe_act_mib, '>9.0f'):>9}"
            f"{opt(r.dense_act_mib, '>8.0f'):>8}{opt(r.mem_ratio, '>6.2f'):>6}{r.max_over_mean:>9.2f}")


def machine_info(threads: int) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        info["loadavg_start"] = None
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(PAPER_CONFIGS),
                   help="comma-separated moe-N (flat) / moe-N-h (hierarchical); default: the paper's")
    p.add_argument("--tokens", default="2048,8192,32768", help="comma-separated batch sizes in tokens")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    p.add_argument("--dim", type=int, default=512, help="MoE input/output size d (paper: 512)")
    p.add_argument("--hidden", type=int, default=1024, help="expert hidden size (paper: 1024)")
    p.add_argument("--k", type=int, default=4, help="experts per token for flat configs (paper: 4)")
    p.add_argument("--groups", type=int, default=16, help="groups of hierarchical configs (paper: 16)")
    p.add_argument("--gating", default="noisy_top_k", help="gating mode of the MoE layer")
    p.add_argument("--backend", default="auto", choices=("auto", "loop", "grouped_mm", "triton"),
                   help="expert backend of the timed MoE layer (auto: loop on CPU)")
    p.add_argument("--proxy-backends", default="loop,grouped_mm,triton",
                   help="backends whose host reads and kernel launches per training step are "
                        "counted (comma-separated; 'none' to skip)")
    p.add_argument("--recompute", action="store_true", help="recompute expert activations (App. D)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both layers")
    p.add_argument("--reps", type=int, default=5, help="timed steps per layer (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per layer first")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE",
                   help="also write all results as JSON to FILE ('-': stdout); a file is rewritten "
                        "after every row, with the rows that raised under 'failed' (the run goes on "
                        "and exits 1 at the end)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 1 min on 2 cores): moe-32 and moe-64-h (4 groups), 1024 tokens, "
                        "fp32 and bf16, 3 reps; options given explicitly still apply")
    args = p.parse_args(argv)
    args.proxy_backends = [b.strip() for b in args.proxy_backends.split(",")
                           if b.strip() and b.strip() != "none"]
    if args.quick:
        explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        quick = {"--configs": ("configs", "moe-32,moe-64-h"), "--tokens": ("tokens", "1024"),
                 "--reps": ("reps", 3), "--groups": ("groups", 4)}
        for flag, (attr, value) in quick.items():
            if flag not in explicit:
                setattr(args, attr, value)
    return args


def main(argv=None) -> List[Row]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [parse_config(c, args.k, args.groups) for c in args.configs.split(",") if c.strip()]
    token_sizes = [int(t) for t in args.tokens.split(",") if t.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}: choose from {', '.join(DTYPES)}")
    devices = []
    for d in (d.strip() for d in args.devices.split(",") if d.strip()):
        if d == "cuda" and not torch.cuda.is_available():
            print("[benchmark] no CUDA device here: CPU only", file=sys.stderr)
            continue
        devices.append(torch.device(d))
    info = machine_info(args.threads)
    to_stdout = args.json == "-"
    log = sys.stderr if to_stdout else sys.stdout
    print(f"[benchmark] torch {info['torch']}, {info['cpus']} CPUs, {args.threads} threads, "
          f"load average {info['loadavg_start']}, d={args.dim}, hidden={args.hidden}, "
          f"gating={args.gating}, reps={args.reps}", file=log)

    rows: List[Row] = []
    failed: List[dict] = []  # rows that raised: their keys and the error, the others go on
    bandwidth = {}

    def save(complete: bool):
        # Rewritten after every row (atomically), so that a run stopped by a time limit or a
        # crash keeps the rows it finished (scripts/gpu_check.sh gives each step a limit).
        if args.json and not to_stdout:
            write_json(args.json, info, args, bandwidth, rows, failed, complete)

    for device in devices:
        bandwidth[device.type] = copy_bandwidth(device)
        print(f"[benchmark] {device.type} copy bandwidth {bandwidth[device.type] / 1e9:.1f} GB/s "
              f"(read + write)", file=log)
        print(HEADER, file=log, flush=True)
        for dtype_name in dtypes:
            for cfg in configs:
                for tokens in token_sizes:
                    try:
                        row = measure(cfg, tokens, dtype_name, device, args, bandwidth[device.type])
                    except Exception as error:  # noqa: BLE001 - recorded, the next row runs
                        message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
                        failed.append({"config": cfg.name, "tokens": tokens, "dtype": dtype_name,
                                       "device": device.type, "error": message})
                        print(f"{cfg.name:<11}{tokens:>7} {dtype_name:<5}{device.type:<5}FAILED: {message}",
                              file=log, flush=True)
                    else:
                        rows.append(row)
                        print(format_row(row), file=log, flush=True)
                    if failed and device.type == "cuda":
                        # After the except clause, which held the failed row's tensors through the
                        # traceback: an out-of-memory row must not sink the next one.
                        torch.cuda.empty_cache()
                    save(complete=False)
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        info["loadavg_end"] = None
    print(f"[benchmark] load average at the end {info['loadavg_end']}", file=log)
    if any(r.proxy for r in rows):
        print("[benchmark] launch/sync proxy: one training step of the MoE layer", file=log)
        print(PROXY_HEADER, file=log)
        for r in rows:
            for line in format_proxy(r):
                print(line, file=log)
    missed = [r for r in rows if r.target is not None and r.ratio > r.target]
    for r in missed:
        print(f"[benchmark] {r.config} at {r.tokens} tokens: ratio {r.ratio:.3f} above the target "
              f"{r.target:.2f}", file=log)
    if to_stdout:
        print(json_text(info, args, bandwidth, rows, failed, complete=True))
    elif args.json:
        save(complete=True)
        print(f"[benchmark] wrote {args.json}", file=log)
    if failed:
        raise SystemExit(f"[benchmark] {len(failed)} of {len(failed) + len(rows)} rows failed "
                         f"(first: {failed[0]['config']} {failed[0]['dtype']}: {failed[0]['error']})")
    return rows


def json_text(info, args, bandwidth, rows, failed, complete) -> str:
    """The JSON result: "rows" as before, "failed" the rows that raised, "complete" false while
    the run is still going (or was stopped)."""
    result = {"machine": info, "args": vars(args),
              "bandwidth_GBps": {k: v / 1e9 for k, v in bandwidth.items()},
              "rows": [asdict(r) for r in rows], "failed": failed, "complete": complete}
    return json.dumps(result, indent=1, default=lambda v: None if isinstance(v, float) and
                      math.isnan(v) else str(v))


def write_json(path, info, args, bandwidth, rows, failed, complete):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json_text(info, args, bandwidth, rows, failed, complete) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
