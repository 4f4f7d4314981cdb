"""scripts/average_checkpoints.py: the mean it writes, and its one-line refusals."""


import pytest
import torch
from conftest import load_script

from fairseq_smoe.compat.checkpoint_safety import atomic_torch_save, verify_and_strip
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
