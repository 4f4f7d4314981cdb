#!/usr/bin/env python
"""The Python half of scripts/gpu_check.sh: what is easier to get right, and to test
(tests/test_cli_gpu_check.py), in Python than in bash.

    gpu_check_summary.py install-bundle WHEELS TARGET   install .whl/ (MANIFEST.txt) into TARGET
    gpu_check_summary.py probe-imports OUT_JSON         fairseq, the plugin, fairseq's extensions
    gpu_check_summary.py record STEPS NAME STATUS ...   append one step's line to steps.jsonl
    gpu_check_summary.py sync-debug OUT_JSON [--cpu]    count every host sync of a training step
    gpu_check_summary.py summary WORK [--out OUT]       gpu_check.json/.md; with --out, exactly
                                                        one tarball and one summary JSON in OUT

Nothing here imports torch at module level: the bookkeeping commands run in a fraction of a
second, also where torch is missing.
"""

import argparse
import collections
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import traceback
import warnings
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "fairseq_smoe")
# What torch's sync debug mode says (c10/cuda: warn_or_error_on_sync) at every synchronising
# CUDA operation.
SYNC_MESSAGE = "synchronizing CUDA operation"
TARBALL = "gpu_check.tar.gz"
SUMMARY = "gpu_check_summary.json"
STATUSES = ("ok", "failed", "timeout", "skipped")
BACKENDS = ("loop", "grouped_mm", "triton")


def fail(message: str):
    """One line naming the fix, no traceback (the scripts' convention)."""
    raise SystemExit(f"[gpu_check] error: {message}")


# ----------------------------------------------------------------------------- the bundle


def read_manifest(wheels_dir: str):
    """The rows of WHEELS/MANIFEST.txt (scripts/build_device_bundle.sh) as dicts."""
    path = os.path.join(wheels_dir, "MANIFEST.txt")
    if not os.path.exists(path):
        fail(f"no {path}: run `bash scripts/build_device_bundle.sh` here, then carry .whl "
             f"(device tool: carry [\".whl\"])")
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name, version, size, sha256, file, module, role = line.split()
            rows.append(dict(name=name, version=version, bytes=int(size), sha256=sha256,
                             file=file, module=module, role=role))
    return rows


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def choose_wheels(rows, have_module=lambda m: importlib.util.find_spec(m) is not None):
    """(to install, skipped): every "needed" wheel; a "fallback" one only where this Python
    cannot import its module (the device had it when last read: ours would only shadow it)."""
    install, skipped = [], []
    for row in rows:
        (skipped if row["role"] == "fallback" and have_module(row["module"]) else install).append(row)
    return install, skipped


def install_bundle(wheels_dir: str, target: str) -> int:
    rows = read_manifest(wheels_dir)
    for row in rows:  # a truncated or stale carry fails here, in one line, not at import time
        path = os.path.join(wheels_dir, row["file"])
        if not os.path.exists(path):
            fail(f"{path} is missing: rerun `bash scripts/build_device_bundle.sh` and carry .whl")
        if sha256_of(path) != row["sha256"]:
            fail(f"{path} does not match MANIFEST.txt: rerun `bash scripts/build_device_bundle.sh`")
    install, skipped = choose_wheels(rows)
    stamp = os.path.join(target, ".smoe-bundle")
    want = "\n".join(sorted(r["sha256"] for r in install))
    if os.path.exists(stamp) and open(stamp).read() == want:
        print(f"[bundle] already installed in {target}")
        return 0
    for row in skipped:
        print(f"[bundle] {row['name']} {row['version']}: skipped, this Python has '{row['module']}'")
    os.makedirs(target, exist_ok=True)
    files = [os.path.join(wheels_dir, r["file"]) for r in install]
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "-q", "--upgrade", "--target", target, *files]
    if importlib.util.find_spec("pip") is not None:
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-3000:])
            fail(f"pip could not install the bundle into {target} (see above)")
    else:
        # No pip on this Python: a wheel is a zip of its installed files, and none of ours has
        # scripts or data files that pip would have to place.
        for path in files:
            with zipfile.ZipFile(path) as archive:
                archive.extractall(target)
    for row in install:
        print(f"[bundle] {row['name']} {row['version']}: installed ({row['bytes']} bytes)")
    with open(stamp, "w") as f:
        f.write(want)
    return 0


# ----------------------------------------------------------------------------- imports


# fairseq's compiled modules. The Cython ones (numpy) are used by the batching; the C++/torch
# ones were built against another torch and fail to load under torch 2.11, which is harmless
# as long as nothing we run imports them: fairseq imports them lazily (NAT models, libbleu
# scoring, alignment training).
EXTENSIONS = ("fairseq.data.data_utils_fast", "fairseq.data.token_block_utils_fast",
              "fairseq.libbleu", "fairseq.libnat", "fairseq.libbase", "fairseq.libnat_cuda",
              "alignment_train_cpu_binding", "alignment_train_cuda_binding")
NEEDED_EXTENSIONS = ("fairseq.data.data_utils_fast", "fairseq.data.token_block_utils_fast")


def probe_imports(out_json: str) -> int:
    result = {"python": sys.version.split()[0], "imports": {}, "extensions": {}}
    ok = True
    for name in ("torch", "numpy", "yaml", "tqdm", "scipy", "sklearn", "hydra", "omegaconf",
                 "bitarray", "fairseq", "fairseq.tasks", "fairseq.models", "fairseq.criterions",
                 "fairseq_cli.train", "fairseq_smoe.models"):
        try:
            module = importlib.import_module(name)
            where = getattr(module, "__file__", None) or ""
            version = getattr(module, "__version__", None)
            result["imports"][name] = f"ok {version or ''} {where}".strip()
        except Exception as error:  # noqa: BLE001 - recorded
            ok = False
            result["imports"][name] = f"FAILED {type(error).__name__}: {str(error)[:200]}"
    before = set(sys.modules)
    for name in EXTENSIONS:
        if not _spec_exists(name):
            result["extensions"][name] = "absent"
            continue
        try:
            importlib.import_module(name)
            result["extensions"][name] = "ok"
        except Exception as error:  # noqa: BLE001 - recorded
            result["extensions"][name] = f"FAILED {type(error).__name__}: {str(error)[:160]}"
            ok = ok and name not in NEEDED_EXTENSIONS
    result["loaded_by_import"] = sorted(n for n in EXTENSIONS if n in before)
    for name, value in {**result["imports"], **result["extensions"]}.items():
        print(f"{name:<40} {value}")
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if ok else 1


def _spec_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# ----------------------------------------------------------------------------- steps


def record(steps: str, name: str, status: str, exit_code, seconds: float, log: str, note: str = ""):
    if status not in STATUSES:
        fail(f"unknown status {status!r}")
    line = {"step": name, "status": status, "exit": exit_code, "seconds": round(seconds, 1),
            "log": log}
    if note:
        line["note"] = note
    with open(steps, "a") as f:
        f.write(json.dumps(line) + "\n")


def status_of(exit_code: int) -> str:
    # timeout(1) exits 124 when the limit hit, 137 when it had to KILL after the grace period.
    return "ok" if exit_code == 0 else "timeout" if exit_code in (124, 137) else "failed"


# ----------------------------------------------------------------------------- sync debug


@contextlib.contextmanager
def capture_syncs(package_dir: str = PACKAGE_DIR):
    """Every synchronising CUDA operation warned about inside the block, as "file:line (function)"
    of the innermost frame in ``package_dir`` (torch's sync debug mode must be "warn").

    The frame is read when the warning is shown (``traceback.extract_stack`` in a showwarning
    hook): the warning's own filename/lineno is the innermost Python frame, often torch's.
    Syncs in autograd's C++ backward formulas are reported by torch when ``backward()`` returns,
    at its caller; those that come from our Python backward code keep their own line."""
    found = []
    lock = threading.Lock()
    base = os.path.dirname(os.path.realpath(package_dir))
    inside = os.path.realpath(package_dir) + os.sep
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every sync, not once per location
        shown = warnings.showwarning

        def hook(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE not in str(message):
                return shown(message, category, filename, lineno, file, line)
            frames = traceback.extract_stack()[:-1]
            ours = [fr for fr in frames if os.path.realpath(fr.filename).startswith(inside)]
            if ours:
                fr = ours[-1]
                where = f"{os.path.relpath(os.path.realpath(fr.filename), base)}:{fr.lineno} ({fr.name})"
            else:
                where = f"{os.path.basename(filename)}:{lineno} (outside {os.path.basename(package_dir)})"
            with lock:
                found.append(where)

        warnings.showwarning = hook
        yield found


def compress(where):
    """["a:1", "a:1", "b:2"] -> ["a:1 ×2", "b:2"], in order of first appearance."""
    counts = collections.Counter(where)
    return [f"{w} ×{counts[w]}" if counts[w] > 1 else w for w in dict.fromkeys(where)]


def expected_to_sync(backend: str, dtype: str) -> bool:
    """The loop reads the per-expert counts on the host (by design); torch's fp32/fp16
    _grouped_mm is a host loop after offs.cpu() (hence "auto" picks grouped_mm for bf16 only)."""
    return backend == "loop" or (backend == "grouped_mm" and dtype != "bfloat16")


def sync_debug(out_json: str, cpu: bool = False) -> int:
    """One training step (forward + backward) per layer kind × dtype × backend, after a warm-up
    step, with torch.cuda.set_sync_debug_mode("warn"): each case's syncs and where they are.
    On CPU (--cpu, the rehearsal) there is no sync debug mode: the same cases run at tiny sizes,
    to prove the code path, and report no syncs."""
    import torch

    from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer

    device = torch.device("cpu" if cpu else "cuda")
    if cpu:  # tiny, fp32 only
        d, experts, hidden, tokens, groups, dtypes = 16, 16, 32, 64, 4, (torch.float32,)
        # Not triton: on CPU it would run in Triton's interpreter, and the device's triton 3.6
        # interpreter fails under its numpy 2.5 ("only 0-dimensional arrays can be converted to
        # Python scalars", seen in the rehearsal); the device compiles the kernels instead.
        backends = ("loop", "grouped_mm")
    else:  # the paper's MoE-256 and MoE-256-h at 8192 tokens
        d, experts, hidden, tokens, groups = 512, 256, 1024, 8192, 16
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        backends = BACKENDS

    def set_mode(mode):
        if not cpu:
            torch.cuda.set_sync_debug_mode(mode)

    def drain():
        if not cpu:
            torch.cuda.synchronize()

    def train_step(layer, x, mask, counts=None):
        """Forward + backward; with ``counts`` (a dict), each phase's syncs are captured into
        counts[phase] and their places appended to counts["where"]."""
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        with phase(counts, "forward"):
            y, stats = layer(x, mask)
            loss = y.float().square().mean() + stats.loss
        with phase(counts, "backward"):
            loss.backward()

    @contextlib.contextmanager
    def phase(counts, name):
        if counts is None:
            yield
            return
        with capture_syncs() as seen:
            set_mode("warn")
            try:
                yield
            finally:
                set_mode("default")
        counts[name] = len(seen)
        counts["where"].extend(seen)

    results, canary = [], None
    if not cpu:  # proves the capture works before any "0 syncs" is believed
        with capture_syncs(os.path.dirname(os.path.abspath(__file__))) as seen:
            set_mode("warn")
            torch.ones(1, device=device).item()
            set_mode("default")
        canary = len(seen) >= 1
        print(json.dumps({"canary_item_sync_captured": canary}), flush=True)
    for kind in ("flat", "hierarchical"):
        for dtype in dtypes:
            torch.manual_seed(0)
            with device:  # weights initialised where they run (268M expert parameters)
                layer = (MoELayer(d, d, experts, hidden, k=4, backend="loop") if kind == "flat" else
                         HierarchicalMoELayer(d, d, groups, experts // groups, hidden, backend="loop"))
            layer = layer.to(dtype).train()
            x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
            mask = torch.zeros(tokens, dtype=torch.bool, device=device)
            mask[-tokens // 80:] = True
            for backend in backends:
                layer.backend = backend
                case = {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "kind": kind,
                        "device": device.type}
                case["expected"] = expected_to_sync(backend, case["dtype"])
                try:
                    train_step(layer, x, mask)  # warm-up: lazy imports, Triton compilation
                    drain()
                    counts = {"where": []}
                    train_step(layer, x, mask, counts)
                    drain()
                    case.update(syncs=len(counts["where"]), forward_syncs=counts.get("forward", 0),
                                backward_syncs=counts.get("backward", 0), where=counts["where"])
                except Exception as error:  # noqa: BLE001 - recorded, the next case runs
                    set_mode("default")
                    case["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
                results.append(case)
                print(json.dumps({**case, "where": compress(case.get("where", []))}), flush=True)
            del layer, x, mask
            if not cpu:
                torch.cuda.empty_cache()
    with open(out_json, "w") as f:
        json.dump({"canary": canary, "cases": results}, f, indent=1)
    bad = [c for c in results if "error" in c or (c.get("syncs") and not c["expected"])]
    for c in bad:
        print(f"[sync_debug] {c['backend']} {c['dtype']} {c['kind']}: "
              f"{c.get('error') or str(c['syncs']) + ' unexpected syncs'}", file=sys.stderr)
    if canary is False:
        print("[sync_debug] the canary .item() was not captured: the counts above prove nothing",
              file=sys.stderr)
    return 1 if bad or canary is False else 0


# ----------------------------------------------------------------------------- summary


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def last_wps(text: str):
    """words/s of the last interval fairseq logged (simple format: "wps=1234" in interval lines,
    "| wps 1234 |" in the epoch line)."""
    found = re.findall(r"\bwps[= ]([0-9.]+)", text)
    return float(found[-1]) if found else None


def build_summary(work: str) -> dict:
    steps = []
    path = os.path.join(work, "steps.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            steps = [json.loads(line) for line in f if line.strip()]
    device_txt = os.path.join(work, "logs", "device.txt")
    summary = {"device": open(device_txt).read().strip() if os.path.exists(device_txt) else None,
               "steps": steps}
    meta = _load_json(os.path.join(work, "meta.json"))
    if meta:
        summary.update(meta)
    for s in steps:
        if s["step"].startswith("train"):
            try:
                with open(os.path.join(work, s["log"])) as f:
                    s["wps"] = last_wps(f.read())
            except OSError:
                s["wps"] = None
    imports = _load_json(os.path.join(work, "import_check.json"))
    if imports:
        summary["imports"] = imports
    sync = _load_json(os.path.join(work, "sync_debug.json"))
    if sync:
        summary["sync_debug"] = sync
    bench = _load_json(os.path.join(work, "benchmark.json"))
    if bench:
        summary["benchmark"] = {"complete": bench.get("complete", True), "rows": bench.get("rows", []),
                                "failed": bench.get("failed", []),
                                "bandwidth_GBps": bench.get("bandwidth_GBps")}
    # Skipped by design (no CUDA in a rehearsal, one GPU) is fine; cut by the budget is not.
    summary["ok"] = bool(steps) and all(
        s["status"] == "ok" or (s["status"] == "skipped" and not s.get("note", "").startswith("deadline"))
        for s in steps)
    summary["markdown"] = markdown(summary)
    return summary


def markdown(summary: dict) -> str:
    title = f"GPU check on {summary.get('device')}"
    md = [title + (" (REHEARSAL on CPU)" if summary.get("rehearsal") else ""),
          "", "| step | status | exit | seconds | note |", "|---|---|---|---|---|"]
    md += [f"| {s['step']} | {s['status']} | {s['exit']} | {s['seconds']} | {s.get('note', '')} |"
           for s in summary["steps"]]
    sync = summary.get("sync_debug")
    if sync:
        md += ["", f"Sync debug (\"warn\" mode; canary captured: {sync.get('canary')})", "",
               "| backend | dtype | layer | syncs (fwd/bwd) | expected | where |",
               "|---|---|---|---|---|---|"]
        for c in sync["cases"]:
            count = (f"error: {c['error']}" if "error" in c else
                     f"{c['syncs']} ({c['forward_syncs']}/{c['backward_syncs']})")
            md.append(f"| {c['backend']} | {c['dtype']} | {c['kind']} | {count} | "
                      f"{'yes' if c['expected'] else 'no'} | {'; '.join(compress(c.get('where', [])))} |")
    bench = summary.get("benchmark")
    if bench:
        md += ["", "Benchmark" + ("" if bench["complete"] else " (INCOMPLETE: stopped before the end)"), "",
               "| config | dtype | backend | dense ms | MoE ms | ratio | reads loop/gmm/triton | "
               "kernels loop/gmm/triton |", "|---|---|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            p = r.get("proxy", {})
            reads = "/".join(str(p.get(b, {}).get("host_reads", "-")) for b in BACKENDS)
            kernels = "/".join(str(p.get(b, {}).get("kernels", "-")) for b in BACKENDS)
            md.append(f"| {r['config']} | {r['dtype']} | {r['backend']} | {r['dense_ms']:.2f} | "
                      f"{r['moe_ms']:.2f} | {r['ratio']:.2f} | {reads} | {kernels} |")
        for r in bench["failed"]:
            md.append(f"| {r['config']} | {r['dtype']} | FAILED | {r['error']} | | | | |")
    trains = [s for s in summary["steps"] if s["step"].startswith("train")]
    if trains:
        md += ["", "| fairseq-train | status | seconds | words/s (last interval) |",
               "|---|---|---|---|"]
        md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('wps')} |" for s in trains]
    return "\n".join(md) + "\n"


def write_summary(work: str, out=None) -> dict:
    summary = build_summary(work)
    with open(os.path.join(work, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(work, "gpu_check.md"), "w") as f:
        f.write(summary["markdown"])
    if out:
        # The device tool brings back at most 8 files, each at most 2 folders deep: one tarball
        # of everything and one summary, whatever the number of logs.
        os.makedirs(out, exist_ok=True)
        tmp = os.path.join(out, TARBALL + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(work, arcname="gpu_check", filter=_skip_partial)
        os.replace(tmp, os.path.join(out, TARBALL))
        with open(os.path.join(out, SUMMARY), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _skip_partial(info: tarfile.TarInfo):
    return None if info.name.endswith(".tmp") else info


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("install-bundle", help="install WHEELS (MANIFEST.txt) into TARGET")
    c.add_argument("wheels")
    c.add_argument("target")
    c = sub.add_parser("probe-imports", help="import fairseq, the plugin and fairseq's extensions")
    c.add_argument("out_json")
    c = sub.add_parser("record", help="append a step's line to STEPS (status from the exit code "
                                      "unless --status)")
    c.add_argument("steps")
    c.add_argument("name")
    c.add_argument("exit", type=int)
    c.add_argument("start", type=float)
    c.add_argument("end", type=float)
    c.add_argument("log")
    c.add_argument("--status", choices=STATUSES)
    c.add_argument("--note", default="")
    c = sub.add_parser("sync-debug", help="host syncs of a training step per backend, dtype, layer")
    c.add_argument("out_json")
    c.add_argument("--cpu", action="store_true", help="rehearsal: tiny sizes on CPU, no sync mode")
    c = sub.add_parser("summary", help="gpu_check.json and gpu_check.md; with --out, one tarball "
                                       "and one summary JSON there")
    c.add_argument("work")
    c.add_argument("--out")
    args = p.parse_args(argv)
    if args.command == "install-bundle":
        return install_bundle(args.wheels, args.target)
    if args.command == "probe-imports":
        return probe_imports(args.out_json)
    if args.command == "record":
        # --status: a step that did not run (skipped, or failed before it could): no exit code.
        status = args.status or status_of(args.exit)
        record(args.steps, args.name, status, None if args.status else args.exit,
               args.end - args.start, args.log, args.note)
        return 0
    if args.command == "sync-debug":
        return sync_debug(args.out_json, args.cpu)
    summary = write_summary(args.work, args.out)
    sys.stdout.write(summary["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
