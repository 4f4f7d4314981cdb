"""scripts/launch_cpu.py: the flags each worker gets, output, and failure handling."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def launcher():
    path = os.path.join(ROOT, "scripts", "launch_cpu.py")
    spec = importlib.util.spec_from_file_location("launch_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_flags(launcher):
    cmd = launcher.worker_command(["fairseq-train", "DATA"], 1, 2, 1234)
    joined = " ".join(cmd)
    assert joined.startswith("fairseq-train DATA --cpu --distributed-backend gloo")
    for part in ("--distributed-world-size 2", "--distributed-rank 1", "--distributed-no-spawn",
                 "--distributed-init-method tcp://127.0.0.1:1234", "--ddp-backend legacy_ddp"):
        assert part in joined
    own = launcher.worker_command(["fairseq-train", "--ddp-backend", "no_c10d"], 0, 2, 1)
    assert own.count("--ddp-backend") == 1


def test_flags_the_launcher_owns_are_refused(launcher, capsys):
    with pytest.raises(SystemExit):
        launcher.parse_args(["-n", "2", "--", "fairseq-train", "--distributed-rank", "0"])
    assert "set by the launcher" in capsys.readouterr().err


ECHO_RANK = ("import sys; rank = sys.argv[sys.argv.index('--distributed-rank') + 1]; "
             "print('hello from', rank); sys.exit(int(rank) * {code})")


def test_output_and_exit_status(launcher, tmp_path, capfd):
    assert launcher.main(["-n", "2", "--", sys.executable, "-c", ECHO_RANK.format(code=0)]) == 0
    out = capfd.readouterr().out
    assert "hello from 0" in out and "[worker 1] hello from 1" in out
    # a failing worker: its status is the launcher's
    status = launcher.main(["-n", "2", "--log-dir", str(tmp_path), "--", sys.executable, "-c",
                            ECHO_RANK.format(code=3)])
    assert status == 3
    assert "hello from 1" in (tmp_path / "worker1.log").read_text()
