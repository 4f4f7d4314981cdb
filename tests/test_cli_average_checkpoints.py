"""scripts/average_checkpoints.py: the mean it writes, and its one-line refusals."""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_script

from fairseq_smoe.checkpoint_files import atomic_torch_save, verify_and_strip
from fairseq_smoe.distributed.checkpoints import SHARD_META_KEY


@pytest.fixture(scope="module")
def script():
    return load_script("average_checkpoints")


def checkpoint(path, seed, **extra):
    generator = torch.Generator().manual_seed(seed)
    state = {"model": {"w": torch.randn(3, 4, generator=generator),
                       "half": torch.randn(5, generator=generator).to(torch.bfloat16),
                       "steps": torch.tensor([7])},
             "last_optimizer_state": {"state": {0: {"exp_avg": torch.ones(3, 4)}}},
             "extra_state": {"epoch": seed}, **extra}
    atomic_torch_save(state, str(path))
    return state


def refused(script, capsys, *argv):
    with pytest.raises(SystemExit) as stop:
        script.main([str(a) for a in argv])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("average_checkpoints.py: error: "), lines
    return lines[-1]


def test_average_is_the_mean_in_each_dtype(script, tmp_path):
    states = [checkpoint(tmp_path / f"c{i}.pt", seed=i) for i in range(3)]
    out = tmp_path / "avg.pt"
    assert script.main([str(tmp_path / f"c{i}.pt") for i in range(3)] + ["-o", str(out)]) == 0
    written = torch.load(out, weights_only=False)
    verify_and_strip(written, str(out))  # its own checksum holds
    expected = sum(s["model"]["w"].double() for s in states) / 3
    torch.testing.assert_close(written["model"]["w"], expected.float(), rtol=0, atol=1e-7)
    assert written["model"]["half"].dtype == torch.bfloat16
    half = sum(s["model"]["half"].double() for s in states) / 3
    torch.testing.assert_close(written["model"]["half"], half.to(torch.bfloat16), rtol=0, atol=0)
    assert torch.equal(written["model"]["steps"], torch.tensor([7]))
    assert written["last_optimizer_state"] is None
    assert written["extra_state"] == {"epoch": 2}  # the last input's training position
    assert len(written["averaged_from"]) == 3


def test_refusals_write_nothing(script, tmp_path, capsys):
    checkpoint(tmp_path / "a.pt", seed=1)
    checkpoint(tmp_path / "b.pt", seed=2)
    out = tmp_path / "avg.pt"
    assert "not found" in refused(script, capsys, tmp_path / "a.pt", tmp_path / "nope.pt", "-o", out)
    assert "given twice" in refused(script, capsys, tmp_path / "a.pt", tmp_path / "a.pt", "-o", out)
    assert "overwrite the input" in refused(script, capsys, tmp_path / "a.pt", "-o", tmp_path / "a.pt")
    other = torch.load(tmp_path / "b.pt", weights_only=False)
    verify_and_strip(other, "b")
    other["model"]["extra"] = torch.zeros(1)
    atomic_torch_save(other, str(tmp_path / "c.pt"))
    assert "different parameters (extra)" in refused(
        script, capsys, tmp_path / "a.pt", tmp_path / "c.pt", "-o", out)
    other["model"].pop("extra")
    other["model"]["steps"] = torch.tensor([8])
    atomic_torch_save(other, str(tmp_path / "d.pt"))
    assert "cannot be averaged" in refused(script, capsys, tmp_path / "a.pt", tmp_path / "d.pt", "-o", out)
    checkpoint(tmp_path / "shard.pt", seed=3, **{SHARD_META_KEY: {"world_size": 2}})
    assert "reshard_experts.py" in refused(script, capsys, tmp_path / "a.pt", tmp_path / "shard.pt",
                                           "-o", out)
    with open(tmp_path / "broken.pt", "wb") as f:
        f.write(open(tmp_path / "b.pt", "rb").read()[:100])
    assert "truncated" in refused(script, capsys, tmp_path / "a.pt", tmp_path / "broken.pt", "-o", out)
    assert not out.exists()
    out.write_bytes(b"keep")
    assert "--force" in refused(script, capsys, tmp_path / "a.pt", "-o", out)
    assert out.read_bytes() == b"keep"
    assert script.main([str(tmp_path / "a.pt"), "-o", str(out), "--force"]) == 0


def run_script(*argv):
    """The script as its own process: (exit status, stderr)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "average_checkpoints.py"),
                             *map(str, argv)], capture_output=True, text=True, timeout=120)
    return result.returncode, result.stderr


def test_runs_with_other_moe_options_or_arch_are_refused(tmp_path):
    def model_cfg(**changes):
        options = dict(arch="lstm_moe_lm_tiny", moe_num_experts=4, moe_k=2,
                       moe_gating="noisy_top_k", moe_experts_backend="loop")
        options.update(changes)
        return argparse.Namespace(**{k: v for k, v in options.items() if v is not None})

    checkpoint(tmp_path / "k2.pt", seed=1, cfg={"model": model_cfg()})
    checkpoint(tmp_path / "k1.pt", seed=2, cfg={"model": model_cfg(moe_k=1)})
    out = tmp_path / "avg.pt"
    status, err = run_script(tmp_path / "k2.pt", tmp_path / "k1.pt", "-o", out)
    assert status == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"average_checkpoints.py: error: {tmp_path / 'k1.pt'} was trained with --moe-k 1 but "
        f"{tmp_path / 'k2.pt'} with --moe-k 2: these are different models; average checkpoints "
        f"of one run")
    # an older file's state["args"], another architecture
    checkpoint(tmp_path / "old.pt", seed=3, cfg=None, args=model_cfg(arch="lstm_moe_lm_tiny_h"))
    status, err = run_script(tmp_path / "k2.pt", tmp_path / "old.pt", "-o", out)
    assert status == 2 and "--arch lstm_moe_lm_tiny_h but" in err and "with --arch lstm_moe_lm_tiny:" in err
    # an option the configuration lost, recorded beside it (smoe_moe_options)
    checkpoint(tmp_path / "lost.pt", seed=4, cfg={"model": model_cfg(moe_gating=None)},
               smoe_moe_options={"moe_gating": "batchwise", "moe_k": 2})
    status, err = run_script(tmp_path / "k2.pt", tmp_path / "lost.pt", "-o", out)
    assert status == 2 and "--moe-gating batchwise but" in err, err
    assert not out.exists()
    # how the experts run is no model difference: a run resumed with another backend averages
    checkpoint(tmp_path / "grouped.pt", seed=5, cfg={"model": model_cfg(moe_experts_backend="grouped_mm")})
    status, err = run_script(tmp_path / "k2.pt", tmp_path / "grouped.pt", "-o", out)
    assert status == 0 and out.exists(), err
