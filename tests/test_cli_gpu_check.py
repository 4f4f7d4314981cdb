"""scripts/gpu_check.sh and its helpers, without a GPU, downloads or fairseq runs: the
scripts parse, the bundle installs from its manifest (and refuses a damaged one in one line),
every sync warning is counted with its place, the summary makes exactly one tarball and one JSON,
and the benchmark writes each row as it finishes and goes on past a failing one."""

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import threading
import warnings
import zipfile

import pytest
from conftest import ROOT, load_script

helper = load_script("gpu_check_summary")
SCRIPTS = os.path.join(ROOT, "scripts")


@pytest.mark.parametrize("script", ["gpu_check.sh", "build_device_bundle.sh", "rehearse_device.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(SCRIPTS, script)], check=True, timeout=30)


def test_gpu_check_help_and_a_wrong_option():
    script = os.path.join(SCRIPTS, "gpu_check.sh")
    shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "--rehearsal" in shown.stdout and "gpu_check.tar.gz" in shown.stdout
    wrong = subprocess.run(["bash", script, "--fast"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and wrong.stderr.strip().count("\n") == 0 and "--rehearsal" in wrong.stderr


# ----------------------------------------------------------------------------- the bundle


def make_wheel(folder, name="smoefake", version="1.0"):
    """A minimal pure-Python wheel whose module ``name`` defines VALUE = 42."""
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                               "Tag: py3-none-any\n")}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for arcname, text in files.items():
            archive.writestr(arcname, text)
    return path


def write_manifest(folder, rows):
    lines = ["# test bundle", "# name version bytes sha256 file module role"]
    lines += [" ".join(str(v) for v in row) for row in rows]
    with open(os.path.join(folder, "MANIFEST.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_bundle_installs_needed_wheels_and_skips_present_fallbacks(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    needed = make_wheel(str(wheels))
    fallback = make_wheel(str(wheels), name="json_fallback")  # stands for a module the Python has
    write_manifest(str(wheels), [
        ("smoefake", "1.0", os.path.getsize(needed), helper.sha256_of(needed), os.path.basename(needed),
         "smoefake", "needed"),
        ("json-fallback", "1.0", os.path.getsize(fallback), helper.sha256_of(fallback),
         os.path.basename(fallback), "json", "fallback")])
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "gpu_check_summary.py"), "install-bundle",
                           str(wheels), str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "json-fallback 1.0: skipped" in proc.stdout and "smoefake 1.0: installed" in proc.stdout
    assert (target / "smoefake" / "__init__.py").exists() and not (target / "json_fallback").exists()
    check = subprocess.run([sys.executable, "-c", "import smoefake; print(smoefake.VALUE)"],
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert check.stdout.strip() == "42"


def test_choose_wheels_installs_a_fallback_only_where_missing():
    rows = [dict(name="a", module="a", role="needed"), dict(name="yaml", module="yaml", role="fallback"),
            dict(name="tqdm", module="tqdm", role="fallback")]
    install, skipped = helper.choose_wheels(rows, have_module=lambda m: m == "yaml")
    assert [r["name"] for r in install] == ["a", "tqdm"] and [r["name"] for r in skipped] == ["yaml"]


def test_missing_or_damaged_bundle_fails_in_one_line_naming_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="build_device_bundle.sh"):
        helper.install_bundle(str(tmp_path), str(tmp_path / "site"))
    wheel = make_wheel(str(tmp_path))
    write_manifest(str(tmp_path), [("smoefake", "1.0", 1, "0" * 64, os.path.basename(wheel), "smoefake",
                                    "needed")])
    with pytest.raises(SystemExit, match="does not match MANIFEST.txt.*build_device_bundle.sh"):
        helper.install_bundle(str(tmp_path), str(tmp_path / "site"))


# ----------------------------------------------------------------------------- sync counting


def test_every_sync_is_counted_with_its_innermost_package_line(tmp_path):
    package = tmp_path / "fakepkg"
    package.mkdir()
    (package / "ops.py").write_text(
        "import warnings\n"
        "def read_back():\n"
        "    warnings.warn('called a synchronizing CUDA operation')\n"  # line 3
        "def other():\n"
        "    warnings.warn('something else')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from fakepkg import ops
    finally:
        sys.path.remove(str(tmp_path))
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        with helper.capture_syncs(str(package)) as found:
            ops.read_back()
            ops.read_back()  # same place twice: counted twice ("always")
            thread = threading.Thread(target=ops.read_back)  # autograd's backward threads
            thread.start()
            thread.join()
            ops.other()
            # no frame in the package: the place where the warning points is reported
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    assert found[:3] == ["fakepkg/ops.py:3 (read_back)"] * 3
    assert len(found) == 4 and found[3].endswith("(outside fakepkg)")
    assert helper.compress(found)[0] == "fakepkg/ops.py:3 (read_back) ×3"
    assert [str(w.message) for w in outside] == ["something else"]  # other warnings pass through


def test_expected_syncs():
    assert helper.expected_to_sync("loop", "float32") and helper.expected_to_sync("grouped_mm", "float16")
    assert not helper.expected_to_sync("grouped_mm", "bfloat16")
    assert not helper.expected_to_sync("triton", "float32")


# ----------------------------------------------------------------------------- summary


def fake_work(tmp_path):
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "device.txt").write_text("2.11.0+cu130 13.0 1 NVIDIA H100 80GB HBM3 (9, 0)\n")
    (work / "logs" / "train_fp32.log").write_text(
        "epoch 001:      5 / 3125 loss=9.1, wps=1000.5, ups=1\n"
        "epoch 001:     10 / 3125 loss=8.7, wps=2345.5\n")
    steps = work / "steps.jsonl"
    helper.record(str(steps), "pytest_gpu", "ok", 0, 12.34, "logs/pytest_gpu.log")
    helper.record(str(steps), "benchmark", helper.status_of(124), 124, 75.0, "logs/benchmark.log")
    helper.record(str(steps), "train_fp32", "ok", 0, 20.0, "logs/train_fp32.log")
    helper.record(str(steps), "train_expert_parallel", "skipped", None, 0, "logs/x.log", "needs 2 GPUs")
    (work / "sync_debug.json").write_text(json.dumps({"canary": True, "cases": [
        {"backend": "triton", "dtype": "bfloat16", "kind": "flat", "expected": False, "syncs": 0,
         "forward_syncs": 0, "backward_syncs": 0, "where": []},
        {"backend": "loop", "dtype": "float32", "kind": "flat", "expected": True, "syncs": 2,
         "forward_syncs": 2, "backward_syncs": 0, "where": ["fairseq_smoe/ops/loop.py:9 (f)"] * 2}]}))
    (work / "benchmark.json").write_text(json.dumps({"complete": False, "rows": [
        {"config": "moe-32", "dtype": "bf16", "backend": "grouped_mm", "dense_ms": 1.0, "moe_ms": 1.5,
         "ratio": 1.5, "proxy": {"loop": {"host_reads": 2, "kernels": 1600}}}],
        "failed": [{"config": "moe-1024-h", "dtype": "bf16", "tokens": 8192, "device": "cuda",
                    "error": "OutOfMemoryError: CUDA out of memory"}]}))
    return work


def test_summary_writes_one_tarball_and_one_json(tmp_path):
    work, out = fake_work(tmp_path), tmp_path / "OUT"
    summary = helper.write_summary(str(work), str(out))
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "gpu_check_summary.json"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert {"gpu_check/logs/train_fp32.log", "gpu_check/gpu_check.md", "gpu_check/benchmark.json",
            "gpu_check/steps.jsonl"} <= set(names)
    assert json.loads((out / "gpu_check_summary.json").read_text()) == summary
    assert summary["ok"] is False  # the benchmark timed out
    assert [s["status"] for s in summary["steps"]] == ["ok", "timeout", "ok", "skipped"]
    assert summary["steps"][2]["wps"] == 2345.5  # the last interval
    md = summary["markdown"]
    assert "INCOMPLETE" in md and "OutOfMemoryError" in md
    assert "| moe-32 | bf16 | grouped_mm | 1.00 | 1.50 |" in md
    assert "fairseq_smoe/ops/loop.py:9 (f) ×2" in md and "H100" in md


def test_summary_without_out_writes_only_into_the_work_folder(tmp_path):
    work = fake_work(tmp_path)
    helper.main(["summary", str(work)])
    assert (work / "gpu_check.json").exists() and (work / "gpu_check.md").exists()
    assert not any(name.endswith(".tar.gz") for name in os.listdir(work))


def test_deadline_skips_are_not_ok_but_skips_by_design_are(tmp_path):
    work = tmp_path / "w"
    (work / "logs").mkdir(parents=True)
    helper.record(str(work / "steps.jsonl"), "pytest_gpu", "ok", 0, 1, "logs/p.log")
    helper.record(str(work / "steps.jsonl"), "train_fp16", "skipped", None, 0, "logs/t.log", "needs CUDA")
    assert helper.build_summary(str(work))["ok"] is True
    helper.record(str(work / "steps.jsonl"), "train_bf16", "skipped", None, 0, "logs/b.log",
                  "deadline: 3s left")
    assert helper.build_summary(str(work))["ok"] is False


# ----------------------------------------------------------------------------- benchmark rows


def fake_row(benchmark_moe, cfg, tokens, dtype_name, device):
    values = {f.name: 1.0 for f in dataclasses.fields(benchmark_moe.Row)
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values.update(config=cfg.name, experts=cfg.num_experts, k=cfg.k, tokens=tokens, dtype=dtype_name,
                  device=device.type, threads=1, reps=1, target=None)
    return benchmark_moe.Row(**values)


def test_benchmark_writes_each_row_and_goes_on_past_a_failing_one(tmp_path, monkeypatch):
    sys.path.insert(0, SCRIPTS)
    try:
        import benchmark_moe
    finally:
        sys.path.remove(SCRIPTS)
    out = tmp_path / "bench.json"
    seen = []

    def measure(cfg, tokens, dtype_name, device, args, bandwidth):
        if seen:  # the rows before this one are on disk already
            on_disk = json.loads(out.read_text())
            assert len(on_disk["rows"]) + len(on_disk["failed"]) == len(seen) and not on_disk["complete"]
        seen.append(cfg.name)
        if cfg.name == "moe-16":
            raise RuntimeError("CUDA out of memory\nsecond line")
        return fake_row(benchmark_moe, cfg, tokens, dtype_name, device)

    monkeypatch.setattr(benchmark_moe, "measure", measure)
    monkeypatch.setattr(benchmark_moe, "copy_bandwidth", lambda device: 1e9)
    with pytest.raises(SystemExit, match=r"1 of 3 rows failed.*moe-16.*RuntimeError: CUDA out of memory"):
        benchmark_moe.main(["--configs", "moe-8,moe-16,moe-32", "--tokens", "64", "--dtypes", "fp32",
                            "--devices", "cpu", "--proxy-backends", "none", "--json", str(out)])
    assert seen == ["moe-8", "moe-16", "moe-32"]
    result = json.loads(out.read_text())
    assert result["complete"] is True and [r["config"] for r in result["rows"]] == ["moe-8", "moe-32"]
    assert result["failed"] == [{"config": "moe-16", "tokens": 64, "dtype": "fp32", "device": "cpu",
                                 "error": "RuntimeError: CUDA out of memory"}]
