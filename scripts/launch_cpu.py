#!/usr/bin/env python3
"""Run a fairseq command with N CPU workers (gloo), one process per worker, on this machine.

fairseq's own launcher assumes CUDA. This starts N copies of the command with the flags that
work on CPU:

    --cpu --distributed-backend gloo --distributed-world-size N --distributed-rank R
    --distributed-init-method tcp://127.0.0.1:PORT --distributed-no-spawn
    --ddp-backend legacy_ddp      (torch's DDP wrapper as fairseq builds it needs a GPU)

Example (two workers, experts sharded between them; --user-dir as usual):

    .venv/bin/python scripts/launch_cpu.py --workers 2 -- \\
        .venv/bin/fairseq-train data-bin/wikitext-2 --user-dir fairseq_smoe \\
        --task language_modeling --arch lstm_moe_lm_wikitext2_demo ...

Worker 0's output goes to stdout as is; the others' lines are prefixed with "[worker R]"
(or written to --log-dir/worker{R}.log). Each worker gets cores/N threads (OMP_NUM_THREADS)
unless you set --threads-per-worker.

The workers live and die with the run. If one fails, is killed, stays stopped (SIGSTOP) for
--stopped-timeout seconds, or no worker prints anything for --stall-timeout seconds, the others
are stopped and the launcher exits non-zero with a line saying what happened: the failing
worker's status, 128 + the signal that killed it, or 124 for a stopped or silent run.
SIGINT/SIGTERM/SIGHUP to the launcher stop all workers (a second one kills them at once);
SIGTSTP (Ctrl-Z) pauses them with it until it is continued (fg). On Linux the workers also
die when the launcher itself is killed, even with SIGKILL.
Exit status 2: bad arguments (a --port in use included); 127/126: the command cannot be run.
"""

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 30  # how long stopped workers get to exit before SIGKILL
POLL_S = 0.2
HANG_STATUS = 124  # like timeout(1): the run was stopped because it no longer made progress


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_problem(port):
    """Why the rendezvous port cannot be used (None when it can): worker 0 listens on it, and a
    port that is taken fails only there, as an EADDRINUSE traceback after the workers started."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"port {port} is in use (by another run or program)"
            return f"cannot use port {port} ({error.strerror})"
    return None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="launch_cpu.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--workers", "-n", type=int, default=2, help="number of workers (default 2)")
    parser.add_argument("--port", type=int, default=0, help="rendezvous port (default: a free one)")
    parser.add_argument("--threads-per-worker", type=int, default=0,
                        help="OMP/torch threads per worker (default: CPU cores / workers, >= 1)")
    parser.add_argument("--log-dir", help="write workers 1..N-1 to LOG_DIR/worker{R}.log "
                                          "instead of prefixing their lines on stdout")
    parser.add_argument("--stall-timeout", type=float, default=0, metavar="SECONDS",
                        help="stop the run (exit 124) when no worker has printed anything for "
                             "SECONDS; 0 (default) = never. Set it well above the time between "
                             "fairseq's log lines (--log-interval updates, validation, saving)")
    parser.add_argument("--stopped-timeout", type=float, default=10, metavar="SECONDS",
                        help="stop the run (exit 124) when a worker has been stopped (SIGSTOP, "
                             "state T) for SECONDS; 0 = never (default 10; Linux only)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the fairseq command and its arguments (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the fairseq command after --, e.g. -- fairseq-train DATA ...")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1 (got {args.workers})")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0 (a free one) or a port number 1..65535 (got {args.port})")
    for name in ("threads_per_worker", "stall_timeout", "stopped_timeout"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    for flag in ("--distributed-rank", "--distributed-world-size", "--distributed-init-method",
                 "--device-id", "--distributed-port"):
        if any(a == flag or a.startswith(flag + "=") for a in command):
            parser.error(f"{flag} is set by the launcher; remove it from the command")
    if args.log_dir:
        try:
            os.makedirs(args.log_dir, exist_ok=True)
        except OSError as error:
            parser.error(f"--log-dir {args.log_dir}: {error.strerror}")
    return args, command


def worker_command(command, rank, world_size, port):
    extra = ["--cpu", "--distributed-backend", "gloo", "--distributed-world-size", str(world_size),
             "--distributed-rank", str(rank), "--distributed-init-method",
             f"tcp://127.0.0.1:{port}", "--distributed-no-spawn"]
    if not any(a == "--ddp-backend" or a.startswith("--ddp-backend=") for a in command):
        extra += ["--ddp-backend", "legacy_ddp"]
    return list(command) + extra


# ---------------------------------------------------------------------------------------------
# Workers die with the launcher


def _libc_prctl():
    """libc's prctl, loaded here in the launcher (not between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_launcher(launcher_pid, prctl):
    """preexec_fn of each worker: ask the kernel to SIGKILL it when the launcher dies.

    PR_SET_PDEATHSIG (option 1) fires when the *thread* that forked the child exits. The launcher
    forks every worker from its main thread, which lives until the launcher exits, so it fires
    exactly when the launcher dies, however it dies (SIGKILL included). SIGKILL rather than
    SIGTERM: a stopped or hung worker would not act on SIGTERM. If the launcher died between
    fork and prctl, the parent is already someone else: exit at once (the usual race)."""
    def preexec():
        if prctl is not None:
            prctl(1, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != launcher_pid:
            os._exit(1)
    return preexec


def signal_group(proc, sig):
    """Signal a worker and everything it started (dataloader processes, ...): each worker leads
    its own process group (start_new_session). A group id is not reused while any member lives,
    so a group that still exists is this worker's."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def is_stopped(pid) -> bool:
    """State T in /proc/PID/stat (SIGSTOP/SIGTSTP). A debugger's tracing stop (t) is not counted."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def signal_name(number) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---------------------------------------------------------------------------------------------
# Output


def pump(stream, out, prefix, activity):
    """Copy a worker's output line by line with its prefix. Reads whatever arrives (read1), so
    that output without a newline (progress bars) still counts as activity for --stall-timeout."""
    pending = b""
    for chunk in iter(lambda: stream.read1(1 << 16), b""):
        activity[0] = time.monotonic()
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            out = write(out, prefix + line.decode(errors="replace") + "\n")
    if pending:
        write(out, prefix + pending.decode(errors="replace") + "\n")
    stream.close()


def write(out, text):
    """Write to the launcher's stdout; once that is gone (a closed pipe), keep draining the
    worker so that it never blocks on a full pipe, and drop its output."""
    if out is not None:
        try:
            out.write(text)
            out.flush()
        except (OSError, ValueError):
            return None
    return out


def log(message):
    print(f"[launch_cpu] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Running and watching


class Stop(Exception):
    """SIGTERM/SIGHUP reached the launcher (raised in its main thread by the handler)."""


def on_signal(number, _frame):
    raise Stop(signal_name(number))


def pause_with_workers(procs, activity):
    """SIGTSTP handler (Ctrl-Z). The workers have sessions of their own, so the terminal stops
    only the launcher: stop them too, stop the launcher, and continue them when it is continued
    (fg, SIGCONT)."""
    def handler(_number, _frame):
        for proc in procs:
            if proc.poll() is None:
                signal_group(proc, signal.SIGSTOP)
        # SIGSTOP, not SIGTSTP: the kernel discards a SIGTSTP whose default action would stop
        # a process of an orphaned process group (a launcher started by a daemon or CI job),
        # SIGSTOP always stops. Returns when the launcher is continued.
        os.kill(os.getpid(), signal.SIGSTOP)
        for proc in procs:
            if proc.poll() is None:
                signal_group(proc, signal.SIGCONT)
        activity[0] = time.monotonic()  # a pause is not a stall
    return handler


def start_workers(command, world_size, port, env, log_dir):
    """All workers are started before any output thread, so no other thread runs while we fork
    (preexec_fn is only safe then). Returns (procs, the open --log-dir files)."""
    preexec = die_with_launcher(os.getpid(), _libc_prctl())
    procs, logs = [], []
    try:
        for rank in range(world_size):
            cmd = worker_command(command, rank, world_size, port)
            if rank > 0 and log_dir:
                logs.append(open(os.path.join(log_dir, f"worker{rank}.log"), "w"))
                out = logs[-1]
            else:
                out = subprocess.PIPE
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=preexec))
    except BaseException:
        stop_all(procs, signal.SIGKILL, 0)
        raise
    return procs, logs


def failure(procs):
    """(status, message) for the first worker that ended badly, else None."""
    for rank, proc in enumerate(procs):
        code = proc.poll()
        if code is not None and code < 0:
            hint = (" (a SIGKILL from outside the run is often the kernel's out-of-memory killer: "
                    "see dmesg; lower --max-tokens or --workers)") if -code == signal.SIGKILL else ""
            return 128 - code, f"worker {rank} was killed by {signal_name(-code)}{hint}"
        if code:
            where = "its output above" if proc.stdout else f"its --log-dir file worker{rank}.log"
            return code, f"worker {rank} exited with status {code} ({where} says why)"
    return None


def watch(procs, logs, activity, args):
    """Wait for the workers; (status, message) as soon as the run has to be stopped, else
    (0, None) when all exited normally."""
    stopped_since = {}
    sizes = [-1] * len(logs)
    while any(p.poll() is None for p in procs):
        failed = failure(procs)
        if failed:
            return failed
        now = time.monotonic()
        for rank, proc in enumerate(procs):
            if proc.poll() is None and is_stopped(proc.pid):
                since = stopped_since.setdefault(rank, now)
                if args.stopped_timeout and now - since >= args.stopped_timeout:
                    return HANG_STATUS, (
                        f"worker {rank} (pid {proc.pid}) has been stopped (SIGSTOP) for "
                        f"{now - since:.0f} s and the others wait for it; send it SIGCONT within "
                        f"--stopped-timeout {args.stopped_timeout:g} s to resume it, or raise that "
                        f"option (0 = never)")
            else:
                stopped_since.pop(rank, None)
        for index, file in enumerate(logs):  # workers writing to --log-dir
            size = os.fstat(file.fileno()).st_size
            if size != sizes[index]:
                sizes[index], activity[0] = size, now
        if args.stall_timeout and now - activity[0] >= args.stall_timeout:
            return HANG_STATUS, (
                f"no output from any worker for {now - activity[0]:.0f} s (--stall-timeout "
                f"{args.stall_timeout:g}): a worker hangs or the run logs less often; raise "
                f"--stall-timeout above the time between log lines, or 0 to turn it off")
        time.sleep(POLL_S)
    return failure(procs) or (0, None)


def stop_all(procs, sig, grace):
    """Send ``sig`` (and SIGCONT, so that a stopped worker acts on it) to every worker's group,
    SIGKILL whatever is still there after ``grace`` seconds, and reap them. A second SIGINT/SIGTERM
    meanwhile kills at once. The final SIGKILL also ends leftover children of exited workers."""
    for proc in procs:
        if proc.poll() is None:
            signal_group(proc, sig)
            signal_group(proc, signal.SIGCONT)
    deadline = time.monotonic() + grace
    try:
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"worker {rank} still runs {grace:g} s after {signal_name(sig)}; killing it")
    except (Stop, KeyboardInterrupt):
        log("interrupted again; killing all workers")
    for proc in procs:
        signal_group(proc, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def main(argv=None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    world_size = args.workers
    problem = port_problem(args.port) if args.port else None
    if problem:
        log(f"error: {problem}; give another --port or leave it out to pick a free one")
        return 2
    port = args.port or free_port()
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // world_size)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log(f"{world_size} workers, {threads} threads each, rendezvous tcp://127.0.0.1:{port}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGTSTP] = signal.getsignal(signal.SIGTSTP)
    procs, logs, pumps = [], [], []
    try:
        try:
            procs, logs = start_workers(command, world_size, port, env, args.log_dir)
        except OSError as error:  # FileNotFoundError, PermissionError, ... from exec
            log(f"error: cannot run {command[0]!r}: {error.strerror}; give the program's path "
                f"(e.g. .venv/bin/fairseq-train) or put it on PATH")
            return 127 if isinstance(error, FileNotFoundError) else 126
        activity = [time.monotonic()]
        signal.signal(signal.SIGTSTP, pause_with_workers(procs, activity))
        for rank, proc in enumerate(procs):
            if proc.stdout is not None:
                prefix = "" if rank == 0 else f"[worker {rank}] "
                pumps.append(threading.Thread(target=pump, daemon=True,
                                              args=(proc.stdout, sys.stdout, prefix, activity)))
                pumps[-1].start()
        status, message = watch(procs, logs, activity, args)
        if message:
            log(f"{message}; stopping all workers")
        stop_all(procs, signal.SIGTERM, GRACE_S)
    except (Stop, KeyboardInterrupt) as interrupt:
        name = str(interrupt) if isinstance(interrupt, Stop) else "SIGINT"
        log(f"got {name}; stopping all workers")
        stop_all(procs, getattr(signal, name), GRACE_S)
        status = 128 + getattr(signal, name)
    finally:
        for thread in pumps:
            thread.join(timeout=5)
        for file in logs:
            file.close()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
