"""Fault injection for scripts/launch_cpu.py: killed launcher, killed/stopped/silent workers,
bad arguments. The workers are small Python programs (no fairseq), so every test is quick and
bounded: each process is waited for with a timeout and killed in a finally block."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "scripts", "launch_cpu.py")
MARK = "smoe-fault-worker"  # in every fake worker's command line: cleanup kills only those

# A fake worker. It records its pid in $FAULT_DIR/pid{rank} (written whole, then renamed), says
# it is ready, and then does what $FAULT_{rank} says (default: sleep, i.e. train forever).
WORKER = f"""# {MARK}
import os, subprocess, sys, time
rank = int(sys.argv[sys.argv.index('--distributed-rank') + 1])
folder = os.environ['FAULT_DIR']
def record(name, pid):
    with open(os.path.join(folder, name + '.tmp'), 'w') as f:
        f.write(str(pid))
    os.replace(os.path.join(folder, name + '.tmp'), os.path.join(folder, name))
action = os.environ.get('FAULT_' + str(rank), 'sleep')
if action == 'child-then-fail':  # e.g. a dataloader process, then an error
    child = subprocess.Popen([sys.executable, '-c', '# {MARK}\\nimport time; time.sleep(60)'])
    record('child' + str(rank), child.pid)
record('pid' + str(rank), os.getpid())
print('worker', rank, 'ready', flush=True)
if action == 'kill9':
    os.kill(os.getpid(), 9)
if action == 'child-then-fail':
    sys.exit(5)
if action == 'chatty':
    for _ in range(30):
        print('step', flush=True)
        time.sleep(0.2)
    sys.exit(0)
if action == 'quiet':
    time.sleep(6)
    sys.exit(0)
time.sleep(60)
"""


def state(pid):
    """'R', 'S', 'T', ... from /proc; None once the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if code in ("Z", "X") else code


def kill_if_ours(pid, marker):
    """SIGKILL a leftover process of a test, if it still runs and its command line shows it
    is ours (not another process that got the same pid since)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = marker.encode() in f.read()
    except OSError:
        return
    if ours and state(pid) is not None:
        os.kill(pid, signal.SIGKILL)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.05)


class Run:
    """The launcher as a subprocess with fake workers; ``pids(n)`` waits for their pid files."""

    def __init__(self, folder, *flags, workers=2, faults=None):
        self.folder = folder
        env = dict(os.environ, FAULT_DIR=str(folder))
        env.update({f"FAULT_{rank}": action for rank, action in (faults or {}).items()})
        self.proc = subprocess.Popen(
            [sys.executable, LAUNCHER, "-n", str(workers), *flags, "--", sys.executable, "-c", WORKER],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)

    def pid(self, name, timeout=30):
        path = self.folder / name
        wait_until(path.exists, timeout, f"{name} is written")
        return int(path.read_text())

    def pids(self, workers=2):
        return [self.pid(f"pid{rank}") for rank in range(workers)]

    def finish(self, timeout=60):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)
        for path in self.folder.iterdir():
            if path.suffix == "" and path.name.startswith(("pid", "child")):
                kill_if_ours(int(path.read_text()), MARK)


@pytest.fixture
def run(tmp_path):
    runs = []

    def start(*flags, **kwargs):
        runs.append(Run(tmp_path, *flags, **kwargs))
        return runs[-1]

    yield start
    for r in runs:
        r.cleanup()


def assert_gone(pids, timeout=15):
    wait_until(lambda: all(state(pid) is None for pid in pids), timeout, f"processes {pids} are gone")


def test_sigkill_of_the_launcher_kills_its_workers(run):
    r = run()
    pids = r.pids()
    assert all(state(pid) is not None for pid in pids)
    r.proc.send_signal(signal.SIGKILL)
    r.proc.communicate(timeout=30)
    assert_gone(pids)


def test_sigterm_to_the_launcher_stops_all_workers(run):
    r = run()
    pids = r.pids()
    r.proc.send_signal(signal.SIGTERM)
    status, _, err = r.finish()
    assert status == 128 + signal.SIGTERM
    assert "[launch_cpu] got SIGTERM; stopping all workers" in err
    assert_gone(pids)


def test_ctrl_z_pauses_the_workers_with_the_launcher(run):
    r = run("--stopped-timeout", "1")
    pids = r.pids()
    r.proc.send_signal(signal.SIGTSTP)  # the workers have their own sessions: forwarded
    wait_until(lambda: [state(p) for p in [r.proc.pid] + pids] == ["T"] * 3, 15, "all are stopped")
    r.proc.send_signal(signal.SIGCONT)  # fg
    wait_until(lambda: "T" not in [state(p) for p in [r.proc.pid] + pids], 15, "all run again")
    time.sleep(2.5)  # > --stopped-timeout: the pause did not count as a stopped worker
    assert r.proc.poll() is None and all(state(p) is not None for p in pids)
    r.proc.send_signal(signal.SIGTERM)
    status, _, err = r.finish()
    assert status == 128 + signal.SIGTERM and "has been stopped" not in err, err
    assert_gone(pids)


def test_a_stopped_worker_stops_the_run(run):
    r = run("--stopped-timeout", "1")
    pids = r.pids()
    os.kill(pids[1], signal.SIGSTOP)
    status, _, err = r.finish()
    assert status == 124, err
    assert f"worker 1 (pid {pids[1]}) has been stopped (SIGSTOP)" in err
    assert "stopping all workers" in err and "--stopped-timeout" in err
    assert_gone(pids)


def test_no_output_for_stall_timeout_stops_the_run(run):
    r = run("--stall-timeout", "1")
    pids = r.pids()
    status, _, err = r.finish()
    assert status == 124, err
    assert re.search(r"no output from any worker for \d+ s \(--stall-timeout 1\): a worker hangs", err)
    assert_gone(pids)


def test_output_in_a_log_file_counts_as_activity(run, tmp_path):
    """Worker 0 prints one line and exits after 6 s; worker 1 writes a line to --log-dir every
    0.2 s meanwhile. Without counting the log file, 6 s of silence > --stall-timeout 4."""
    logs = tmp_path / "logs"
    r = run("--stall-timeout", "4", "--log-dir", str(logs), faults={0: "quiet", 1: "chatty"})
    status, out, err = r.finish()
    assert status == 0, err
    assert "no output" not in err
    assert out.count("ready") == 1 and (logs / "worker1.log").read_text().count("step") == 30


def test_a_worker_killed_by_a_signal_stops_the_others(run):
    r = run(faults={1: "kill9"})
    pids = r.pids()
    status, _, err = r.finish()
    assert status == 128 + signal.SIGKILL
    assert "[launch_cpu] worker 1 was killed by SIGKILL" in err and "out-of-memory" in err
    assert_gone(pids)


def test_a_failed_worker_takes_its_children_and_the_others_with_it(run):
    r = run(faults={1: "child-then-fail"})
    pids, child = r.pids(), r.pid("child1")
    status, _, err = r.finish()
    assert status == 5
    assert "[launch_cpu] worker 1 exited with status 5 (its output above says why); " \
           "stopping all workers" in err
    assert_gone(pids + [child])


def test_a_command_that_does_not_exist_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, LAUNCHER, "-n", "2", "--", "no-such-fairseq-train", "x"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 127
    assert "[launch_cpu] error: cannot run 'no-such-fairseq-train': No such file or directory; " \
           "give the program's path" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_refused_before_any_worker_starts():
    with socket.socket() as busy:  # another run's rendezvous, say
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, LAUNCHER, "-n", "2", "--port", str(port), "--",
                                 sys.executable, "-c", "print('worker started')"],
                                capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"[launch_cpu] error: port {port} is in use" in result.stderr
    assert "give another --port or leave it out to pick a free one" in result.stderr
    assert "worker started" not in result.stdout  # refused before any worker ran
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["-n", "0", "--", "fairseq-train"], "--workers must be >= 1 (got 0)"),
    (["--stall-timeout", "-1", "--", "fairseq-train"], "--stall-timeout must be >= 0"),
    (["--port", "70000", "--", "fairseq-train"], "--port must be 0"),
    (["-n", "2"], "give the fairseq command after --"),
])
def test_impossible_arguments_are_refused(flags, message):
    result = subprocess.run([sys.executable, LAUNCHER, *flags], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert f"launch_cpu.py: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr


def children(pid):
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_real_fairseq_workers_die_with_a_killed_launcher(tmp_path):
    """fairseq-train on two workers (fairseq's synthetic dummy_lm task, no data files), saving
    every 5 updates: SIGKILL of the launcher after the first save ends both workers."""
    train = os.path.join(ROOT, ".venv", "bin", "fairseq-train")
    save_dir, log_path = tmp_path / "checkpoints", tmp_path / "run.log"
    cmd = [sys.executable, LAUNCHER, "-n", "2", "--", train, "--task", "dummy_lm", "--dict-size", "100",
           "--dataset-size", "100000", "--user-dir", os.path.join(ROOT, "fairseq_smoe"),
           "--arch", "lstm_moe_lm", "--criterion", "smoe_cross_entropy", "--decoder-embed-dim", "16",
           "--decoder-hidden-size", "16", "--moe-num-experts", "4", "--moe-k", "2",
           "--moe-hidden-dim", "16", "--tokens-per-sample", "16", "--max-tokens", "128",
           "--optimizer", "adam", "--lr", "1e-3", "--log-format", "simple", "--no-progress-bar",
           "--num-workers", "0", "--disable-validation", "--save-dir", str(save_dir),
           "--save-interval-updates", "5", "--max-update", "100000"]
    workers = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Saved checkpoint" in log_path.read_text() or proc.poll() is not None,
                   180, "the workers save a checkpoint")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        workers = children(proc.pid)
        assert len(workers) == 2
        assert os.path.exists(save_dir / "checkpoint_1_5-expert-shard1.pt")
        proc.kill()
        proc.wait(timeout=30)
        assert_gone(workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for pid in workers:
            kill_if_ours(pid, "fairseq-train")
