"""Compile every Triton kernel of the triton backend ahead of time, without a GPU, and report
registers, spills and shared memory per kernel and config (docs/performance.md, "Triton kernels
ahead of time"; tests/test_module_triton_aot.py runs it).

    python scripts/triton_aot_report.py                       # sm_80 and sm_90, the table
    python scripts/triton_aot_report.py --arch 80,86,90,100   # other targets
    python scripts/triton_aot_report.py --config 64,64,32,4,3 # every kernel at one config
    python scripts/triton_aot_report.py --json rows.json      # the rows as JSON as well

What is compiled is what the host code would launch on a GPU: the backend's own host functions
run on small CPU tensors with ``triton_experts.CAPTURE`` set, which records each launch (kernel,
arguments, constexprs, tiles, warps, stages) instead of running it, for a stand-in device of the
given compute capability and for fp32's two dot precisions ("ieee", and "tf32" as chosen when
PyTorch allows TF32). Arguments are specialised as Triton's launcher would (16-byte aligned
pointers and sizes, unit strides as constants: the sizes below are multiples of 16), then
``triton.compile`` builds them for ``GPUTarget("cuda", arch, 32)``. Registers and spills are
ptxas's own report (``-v``, from the ptxas bundled with the triton wheel), shared memory
Triton's metadata. Exit status: 0, 1 when a kernel failed to compile or spilled at the configs
the host chooses, 77 when triton or its ptxas is missing (nothing compiled).
"""

import argparse
import atexit
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings

SKIPPED = 77
ARCHS = (80, 90)
# Rows, groups and layer sizes of the stand-in problem: multiples of 16, as most real layers.
ROWS, GROUPS, D_IN, D_HIDDEN, D_OUT = 96, 4, 64, 128, 64


def missing_prerequisite(archs=ARCHS):
    """Why the report cannot run here (None when it can): triton, its compiler API and the
    ptxas its NVIDIA backend runs for each arch."""
    try:
        import triton  # noqa: F401
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import native_specialize_impl  # noqa: F401
    except ImportError as error:
        return f"triton with its NVIDIA backend and compiler API (tested: 3.9) is not installed ({error})"
    if not hasattr(knobs.nvidia, "dump_ptxas_log"):
        return f"triton {triton.__version__} has no knobs.nvidia.dump_ptxas_log (tested: 3.9)"
    for arch in archs:
        try:
            path = get_ptxas(arch).path
        except Exception as error:  # a missing binary raises from the knob's lookup
            return f"no ptxas for sm_{arch} in the triton wheel ({error})"
        if not path or not os.access(path, os.X_OK):
            return f"no executable ptxas for sm_{arch} in the triton wheel ({path})"
    return None


def _specialize(backend, arg):
    """(type, attribute) of a kernel argument as Triton's launcher specialises it."""
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(backend, arg, False, True, True)


def _launches(capability, dtype, precision):
    """The launches of one training step's grouped products (a 2-layer expert forward and
    backward, and a gate projection without bias) for a device of ``capability``."""
    import torch

    from fairseq_smoe.ops import triton_experts
    from fairseq_smoe.ops.resident import group

    torch.manual_seed(0)
    grouping = group(torch.randint(0, GROUPS, (ROWS,)), GROUPS)
    x = torch.randn(ROWS, D_IN, dtype=dtype, requires_grad=True)
    w1 = torch.randn(GROUPS, D_IN, D_HIDDEN, dtype=dtype, requires_grad=True)
    b1 = torch.randn(GROUPS, D_HIDDEN, dtype=dtype, requires_grad=True)
    w2 = torch.randn(GROUPS, D_HIDDEN, D_OUT, dtype=dtype, requires_grad=True)
    b2 = torch.randn(GROUPS, D_OUT, dtype=dtype, requires_grad=True)
    backend = triton_experts.TritonBackend()
    capture = triton_experts.Capture(capability, precision, [])
    triton_experts.CAPTURE[0] = capture
    try:
        h = backend.linear(x, grouping, w1, b1, True)
        y = backend.linear(h, grouping, w2, b2, False)
        y.sum().backward()
        backend.grouped_matmul(x.detach(), grouping, w1.detach())
    finally:
        triton_experts.CAPTURE[0] = None
    return capture.launches


def _variant(kernel_name, arguments):
    if "wgrad" in kernel_name:
        return "weight grad"
    # The input gradient reads W[g] transposed: unit stride along K, not along N.
    if arguments["swk"] == 1 and arguments["swn"] != 1:
        return "input grad (Wᵀ)"
    return ("bias" if arguments["HAS_BIAS"] else "no bias") + (", relu" if arguments["RELU"] else "")


def _ptxas_numbers(log):
    def number(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else None

    return dict(registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"),
                stack=number(r"(\d+) bytes stack frame"))


def compile_all(archs=ARCHS, config=None):
    """One row per distinct kernel build (arch, kernel, variant, dtype, precision, config) with
    ptxas's registers and spills and Triton's shared memory; ``config`` (a KernelConfig) replaces
    the host's choice for every kernel."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from fairseq_smoe.ops import triton_experts

    if triton_experts.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are interpreted functions here; run "
                           "this script with TRITON_INTERPRET=0 (its default)")
    chosen = triton_experts.kernel_config
    if config is not None:
        triton_experts.kernel_config = lambda dtype, capability, precision: config
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    rows, seen = [], set()
    try:
        for arch in archs:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            capability = (arch // 10, arch % 10)
            for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"),
                                     (torch.float16, "tf32"), (torch.bfloat16, "tf32")):
                for kernel, args, meta, kconfig in _launches(capability, dtype, precision):
                    names = kernel.arg_names
                    signature, constexprs, attrs = {}, {}, {}
                    for i, (name, arg) in enumerate(zip(names, args)):
                        kind, attr = _specialize(backend, arg)
                        signature[name] = kind
                        if kind == "constexpr":
                            constexprs[name] = attr
                        elif attr:
                            attrs[(i,)] = backend.parse_attr(attr)
                    for name, value in meta.items():
                        signature[name], constexprs[name] = "constexpr", value
                    signature = {name: signature[name] for name in names}
                    key = (arch, kernel.__name__, tuple(signature.items()),
                           tuple(sorted(constexprs.items())), tuple(kconfig))
                    if key in seen:
                        continue
                    seen.add(key)
                    options = dict(num_warps=kconfig.num_warps, num_stages=kconfig.num_stages)
                    log = io.StringIO()
                    start = time.perf_counter()
                    error = None
                    try:
                        with contextlib.redirect_stdout(log):
                            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                                      target=target, options=options)
                        shared = compiled.metadata.shared
                    except Exception as exc:  # reported as a failed row
                        error, shared = f"{type(exc).__name__}: {exc}".splitlines()[0], None
                    short = kernel.__name__.strip("_").replace("_kernel", "")
                    row = dict(arch=f"sm_{arch}", kernel=short,
                               variant=_variant(short, dict(zip(names, args), **meta)),
                               dtype=str(dtype).replace("torch.", ""),
                               precision=precision if dtype == torch.float32 else "-",
                               BM=kconfig.BM, BN=kconfig.BN, BK=kconfig.BK,
                               num_warps=kconfig.num_warps, num_stages=kconfig.num_stages,
                               shared=shared, seconds=round(time.perf_counter() - start, 2),
                               error=error, **_ptxas_numbers(log.getvalue()))
                    rows.append(row)
    finally:
        triton_experts.kernel_config = chosen
    return rows


COLUMNS = [("arch", "arch"), ("kernel", "kernel"), ("variant", "variant"), ("dtype", "dtype"),
           ("precision", "dot"), ("tiles", "BM×BN×BK"), ("num_warps", "warps"),
           ("num_stages", "stages"), ("registers", "regs"), ("spills", "spill st/ld B"),
           ("shared", "smem B"), ("seconds", "s")]


def format_table(rows):
    def cell(row, key):
        if key == "tiles":
            return f"{row['BM']}×{row['BN']}×{row['BK']}"
        if key == "spills":
            if row["error"]:
                return "FAILED"
            return f"{row['spill_stores']}/{row['spill_loads']}"
        value = row[key]
        return "-" if value is None else str(value)

    cells = [[title for _, title in COLUMNS]] + [[cell(r, key) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        if row["error"]:
            lines.append(f"FAILED {row['arch']} {row['kernel']} {row['variant']} {row['dtype']}: "
                         f"{row['error']}")
    return "\n".join(lines)


def problems(rows):
    """Rows that failed to compile or spilled."""
    return [r for r in rows if r["error"] or r["registers"] is None or r["spill_stores"]
            or r["spill_loads"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)),
                        help="compute capabilities to compile for, e.g. 80,90 (default)")
    parser.add_argument("--config", help="BM,BN,BK,num_warps,num_stages for every kernel instead "
                                         "of the host's choice (to audit other tiles)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))

    # Compiled kernels, not interpreted ones: before anything imports triton.
    os.environ["TRITON_INTERPRET"] = "0"
    if "TRITON_CACHE_DIR" not in os.environ:  # every build is forced anyway: keep none of them
        cache = tempfile.mkdtemp(prefix="smoe-triton-aot-")
        atexit.register(shutil.rmtree, cache, True)
        os.environ["TRITON_CACHE_DIR"] = cache
    # Triton 3.9 warns that its fp-fusion default will change; the default is what runs.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    reason = missing_prerequisite(archs)
    if reason is not None:
        print(f"skipped: {reason}")
        return SKIPPED
    config = None
    if args.config:
        from fairseq_smoe.ops.triton_experts import KernelConfig

        config = KernelConfig(*(int(v) for v in args.config.split(",")))
    start = time.perf_counter()
    rows = compile_all(archs, config)
    print(format_table(rows))
    bad = problems(rows)
    print(f"{len(rows)} kernel builds for {', '.join(f'sm_{a}' for a in archs)} in "
          f"{time.perf_counter() - start:.0f} s; {len(bad)} failed or spilled"
          + ("" if config is None else f" (every kernel at {tuple(config)})"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
