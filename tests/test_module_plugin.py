"""The plugin imports cleanly in every fairseq CLI and makes fairseq checkpoints loadable under
torch >= 2.6 without environment variables."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

BIN = os.path.dirname(sys.executable)
USER_DIR = os.path.join(ROOT, "fairseq_smoe")


def clean_env():
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    return env


@pytest.mark.parametrize("cli", ["fairseq-train", "fairseq-generate", "fairseq-eval-lm",
                                 "fairseq-interactive"])
def test_user_dir_imports_in_every_cli(cli, tmp_path):
    result = subprocess.run([os.path.join(BIN, cli), "--user-dir", USER_DIR, "--help"],
                            capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "smoe_cross_entropy" in result.stdout  # our criteria are registered
    assert "Traceback" not in result.stderr


def test_trusted_checkpoint_loading_is_limited_to_fairseq_checkpoint_utils(tmp_path):
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    from fairseq_smoe.plugin import install

    install()  # registers the plugin with fairseq, installs its patches

    path = str(tmp_path / "checkpoint.pt")
    state = {
        "args": None,
        "cfg": OmegaConf.create({"model": {"arch": "x"}}),
        "model": {"w": torch.ones(2)},
        "optimizer_history": [{"criterion_name": "SMoECrossEntropyCriterion",
                               "optimizer_name": "Adam", "lr_scheduler_state": {"best": 1.0},
                               "num_updates": 3}],
        "extra_state": {"epoch": 1},
    }
    torch.save(state, path)
    # torch's safe default still refuses the pickled config everywhere else...
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path)
    # ...while fairseq's loader, which reads the checkpoints users name, loads it.
    loaded = checkpoint_utils.load_checkpoint_to_cpu(path)
    assert loaded["model"]["w"].tolist() == [1.0, 1.0]
    assert loaded["cfg"].model.arch == "x"


def test_last_partial_batch_is_kept():
    import numpy as np
    from fairseq.data import data_utils

    from fairseq_smoe.plugin import install

    install()  # registers the plugin with fairseq, installs its patches

    indices = np.arange(100)
    sizes = np.full(100, 10)
    for max_tokens, max_sentences in [(4000, None), (None, 32), (None, 128)]:
        batches = data_utils.batch_by_size(indices, lambda i: sizes[i], max_tokens=max_tokens,
                                           max_sentences=max_sentences, required_batch_size_multiple=8)
        assert sorted(np.concatenate(batches).tolist()) == list(range(100))
        assert all(len(b) % 8 == 0 for b in batches[:-1])  # the multiple still holds elsewhere


@pytest.mark.parametrize("extra, message", [
    (["--moe-num-experts", "4", "--moe-k", "5"], "--moe-k 5 is larger than --moe-num-experts 4"),
    (["--moe-num-experts", "6", "--moe-groups", "4"],
     "--moe-num-experts 6 is not divisible by --moe-groups 4"),
    (["--moe-groups", "-2"], "--moe-groups must be >= 0"),
    (["--moe-w-load", "inf"], "--moe-w-load must be a finite number >= 0; got inf"),
    (["--moe-w-importance", "nan"], "--moe-w-importance must be a finite number >= 0; got nan"),
    (["--bf16"], "--bf16 (and --memory-efficient-bf16) in fairseq 0.12 means TPU training"),
])
def test_bad_moe_options_end_fairseq_train_with_one_clear_line(tmp_path, extra, message):
    (tmp_path / "dict.txt").write_text("a 5\nb 4\n")
    result = subprocess.run(
        [os.path.join(BIN, "fairseq-train"), str(tmp_path), "--user-dir", USER_DIR,
         "--task", "language_modeling", "--arch", "lstm_moe_lm_wikitext2_demo",
         "--criterion", "smoe_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
         "--max-tokens", "512", "--cpu", "--save-dir", str(tmp_path / "ckpt"), *extra],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"fairseq-smoe: error: lstm_moe_lm: {message}" in result.stderr
    assert "Traceback" not in result.stderr


# What each patch of fairseq_smoe.compat changes, as a check run in a fresh process.
_PATCH_PROBES = """
import json, sys
import numpy as np
import torch
from fairseq import checkpoint_utils, utils
from fairseq.data import data_utils
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin
from fairseq.trainer import Trainer
import fairseq_cli.train  # noqa: F401  (BF16_CUDA wraps the commands' configuration step)
import fairseq_cli.interactive  # noqa: F401  (INTERACTIVE_INPUT replaces its reader)
print(json.dumps({
    "CHECKPOINT_LOAD": type(checkpoint_utils.torch).__name__ == "_TorchWithTrustedLoad",
    "CHECKPOINT_SAFETY": getattr(checkpoint_utils, "_smoe_checkpoint_safety", False),
    "NUMPY2": hasattr(np, "compat") and getattr(np.compat, "long", None) is int,
    "LAST_BATCH": getattr(data_utils.batch_by_size, "_smoe_keeps_last_batch", False),
    "EXPERT_PARALLEL": getattr(Trainer, "_smoe_expert_parallel_hooks", False)
                       and utils.clip_grad_norm_.__module__.startswith("fairseq_smoe"),
    "CRITERION_CHECK": getattr(Trainer, "_smoe_criterion_check", False),
    "FP16_EXPERTS": getattr(_FP16OptimizerMixin.__dict__["build_fp32_params"].__func__, "_smoe",
                            False),
    "CLI_ERRORS": getattr(sys.excepthook, "_smoe", False),
    "BF16_CUDA": getattr(sys.modules["fairseq_cli.train"].convert_namespace_to_omegaconf,
                         "_smoe_bf16_cuda", False),
    "PATIENCE_RESUME": "PATIENCE_RESUME" in __import__(
        "fairseq_smoe.compat.trainer_checkpoint", fromlist=["_"])._load_after,
    "INTERACTIVE_INPUT": sys.modules["fairseq_cli.interactive"].buffered_read.__module__.startswith(
        "fairseq_smoe"),
}))
"""


def _last_json(stdout):
    """The probes' line (fairseq_cli.train's import sends log lines to stdout before it)."""
    return json.loads(stdout.strip().splitlines()[-1])


def _run_python(code, env=None, argv0=None):
    full_env = clean_env()
    full_env.update(env or {})
    if argv0:  # cli_errors installs its hook only in fairseq-* programs
        code = f"import sys; sys.argv[0] = {argv0!r}\n" + code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=full_env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_importing_the_layer_imports_no_fairseq_patches_nothing_prints_nothing():
    result = _run_python(
        "import sys\n"
        "hook = sys.excepthook\n"
        "import fairseq_smoe, fairseq_smoe.modules\n"
        "from fairseq_smoe.modules import MoELayer, HierarchicalMoELayer  # noqa\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'fairseq'], 'fairseq imported'\n"
        "assert sys.excepthook is hook\n"
        "sys.stdout.write('-- fairseq --\\n'); sys.stderr.write('-- fairseq --\\n')\n"
        + _PATCH_PROBES, argv0="fairseq-train")
    assert result.stderr.startswith("-- fairseq --\n"), result.stderr  # nothing before fairseq
    assert result.stdout.startswith("-- fairseq --\n"), result.stdout
    probes = json.loads(result.stdout.split("\n")[1])
    assert not any(probes.values()), probes  # fairseq imported afterwards is untouched


def test_install_all_installs_every_patch_and_each_switch_turns_its_patch_off():
    from fairseq_smoe import compat

    code = ("from fairseq_smoe import compat\n"
            "import fairseq_cli.train\n"  # as in a fairseq command: imported before the plugin
            "state = compat.install_all()\n"
            "from fairseq.criterions import CRITERION_REGISTRY as criteria\n"
            "assert 'smoe_cross_entropy' not in criteria  # patches only patch\n"
            "from fairseq_smoe.plugin import install\n"
            "install()\n"
            "from fairseq.models import ARCH_MODEL_REGISTRY\n"
            "from fairseq.criterions import CRITERION_REGISTRY\n"
            "from fairseq.optim import OPTIMIZER_REGISTRY\n"
            "assert 'lstm_moe_lm' in ARCH_MODEL_REGISTRY and 'lstm_moe_nmt' in ARCH_MODEL_REGISTRY\n"
            "assert 'smoe_cross_entropy' in CRITERION_REGISTRY and 'smoe_adam' in OPTIMIZER_REGISTRY\n"
            + _PATCH_PROBES)
    names = [p.name for p in compat.PATCHES]
    on = _last_json(_run_python(code, argv0="fairseq-train").stdout)
    assert on == {name: True for name in names}
    # Every other patch off: the ones left on are exactly those switched on.
    half = names[::2]
    env = {f"SMOE_PATCH_{n}": "0" for n in names if n not in half}
    mixed = _last_json(_run_python(code, env, argv0="fairseq-train").stdout)
    assert mixed == {name: name in half for name in names}
    env = {f"SMOE_PATCH_{n}": "off" for n in half}
    other = _last_json(_run_python(code, env, argv0="fairseq-train").stdout)
    assert other == {name: name not in half for name in names}
    # The older switch of checkpoint_safety still works.
    assert _last_json(_run_python(code, {"SMOE_CHECKPOINT_SAFETY": "0"}).stdout)[
        "CHECKPOINT_SAFETY"] is False


def test_every_patch_is_documented_with_its_switch():
    from fairseq_smoe import compat

    page = open(os.path.join(ROOT, "docs", "compat.md")).read()
    for patch in compat.PATCHES:
        assert f"`{patch.variable}=0`" in page, patch.name
        assert patch.module.split(".")[-1] in page, patch.module


def test_install_requirements_have_no_exact_pins_and_admit_the_tested_torch():
    from unittest import mock

    from packaging.requirements import Requirement

    captured = {}
    with mock.patch("setuptools.setup", lambda **kw: captured.update(kw)):
        exec(compile(open(os.path.join(ROOT, "setup.py")).read(), "setup.py", "exec"), {})
    requirements = [Requirement(r) for r in captured["install_requires"]]
    assert not [r for r in requirements if any(s.operator in ("==", "===") for s in r.specifier)]
    torch_req = next(r for r in requirements if r.name == "torch")
    assert torch_req.specifier.contains("2.5.1") and torch_req.specifier.contains("2.13.0")
    assert not torch_req.specifier.contains("2.4.1")
    assert captured["extras_require"]["tensorboard"] == ["tensorboardX"]
    assert {"pytest", "ruff"} <= set(captured["extras_require"]["test"])


def test_bf16_on_cuda_is_cuda_bf16_not_tpu(monkeypatch):
    """fairseq 0.12 sets --tpu from --bf16; with CUDA and without torch_xla the plugin clears it
    where the command converts its arguments (CUDA faked: the decision, not a GPU run)."""
    import types
    from argparse import Namespace

    from fairseq_smoe.compat import bf16_cuda
    from fairseq_smoe.models.run_checks import check_precision_options

    seen = []
    command = types.ModuleType("fake_fairseq_cli")
    command.convert_namespace_to_omegaconf = lambda args: seen.append(args.tpu) or "cfg"
    monkeypatch.setitem(sys.modules, "fake_fairseq_cli", command)
    bf16_cuda.install(("fake_fairseq_cli",))
    wrapped = command.convert_namespace_to_omegaconf
    bf16_cuda.install(("fake_fairseq_cli",))  # idempotent: wrapped once
    assert command.convert_namespace_to_omegaconf is wrapped

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = Namespace(bf16=True, tpu=True, cpu=False)
    assert command.convert_namespace_to_omegaconf(gpu) == "cfg" and seen == [False]
    check_precision_options(gpu)  # no refusal: CUDA bf16
    cpu = Namespace(bf16=True, tpu=True, cpu=True)
    command.convert_namespace_to_omegaconf(cpu)
    assert seen[-1] is True
    with pytest.raises(ValueError, match="on CPU train in fp32"):
        check_precision_options(cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    command.convert_namespace_to_omegaconf(Namespace(bf16=True, tpu=True, cpu=False))
    assert seen[-1] is True  # no GPU: left to the refusal
    command.convert_namespace_to_omegaconf(Namespace(bf16=False, tpu=False, cpu=False))
    assert seen[-1] is False


def test_importing_the_layer_changes_nothing_in_the_process():
    """``import fairseq_smoe.modules`` (and ``fairseq_smoe.ops``) imports no fairseq, leaves the
    environment as it was (TRITON_INTERPRET included) and patches nothing."""
    code = ("import os, sys, json\n"
            "before = dict(os.environ)\n"
            "import fairseq_smoe, fairseq_smoe.modules, fairseq_smoe.ops\n"
            "print(json.dumps({'env_same': dict(os.environ) == before,\n"
            "                  'fairseq': any(m.split('.')[0] == 'fairseq' for m in sys.modules),\n"
            "                  'hook': sys.excepthook is sys.__excepthook__}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"env_same": True, "fairseq": False,
                                                                  "hook": True}
