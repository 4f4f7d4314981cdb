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
(or written to --log-dir/worker{R}.log). If a worker fails, the others are stopped and the
launcher exits with the failing worker's status. Each worker gets cores/N threads
(OMP_NUM_THREADS) unless you set --threads-per-worker.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--workers", "-n", type=int, default=2, help="number of workers (default 2)")
    parser.add_argument("--port", type=int, default=0, help="rendezvous port (default: a free one)")
    parser.add_argument("--threads-per-worker", type=int, default=0,
                        help="OMP/torch threads per worker (default: CPU cores / workers, >= 1)")
    parser.add_argument("--log-dir", help="write workers 1..N-1 to LOG_DIR/worker{R}.log "
                                          "instead of prefixing their lines on stdout")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the fairseq command and its arguments (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the fairseq command after --, e.g. -- fairseq-train DATA ...")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    for flag in ("--distributed-rank", "--distributed-world-size", "--distributed-init-method",
                 "--device-id", "--distributed-port"):
        if any(a == flag or a.startswith(flag + "=") for a in command):
            parser.error(f"{flag} is set by the launcher; remove it from the command")
    return args, command


def worker_command(command, rank, world_size, port):
    extra = ["--cpu", "--distributed-backend", "gloo", "--distributed-world-size", str(world_size),
             "--distributed-rank", str(rank), "--distributed-init-method",
             f"tcp://127.0.0.1:{port}", "--distributed-no-spawn"]
    if not any(a == "--ddp-backend" or a.startswith("--ddp-backend=") for a in command):
        extra += ["--ddp-backend", "legacy_ddp"]
    return list(command) + extra


def pump(stream, out, prefix):
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()
    stream.close()


def main(argv=None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    world_size = args.workers
    port = args.port or free_port()
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // world_size)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    print(f"[launch_cpu] {world_size} workers, {threads} threads each, "
          f"rendezvous tcp://127.0.0.1:{port}", file=sys.stderr, flush=True)

    procs, pumps, logs = [], [], []
    for rank in range(world_size):
        cmd = worker_command(command, rank, world_size, port)
        if rank == 0 or not args.log_dir:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            prefix = "" if rank == 0 else f"[worker {rank}] "
            thread = threading.Thread(target=pump, args=(proc.stdout, sys.stdout, prefix), daemon=True)
            thread.start()
            pumps.append(thread)
        else:
            log = open(os.path.join(args.log_dir, f"worker{rank}.log"), "w")
            logs.append(log)
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)

    def stop_all(sig=signal.SIGTERM):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_all())
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                rank = procs.index(failed[0])
                print(f"[launch_cpu] worker {rank} exited with status {status}; stopping the "
                      f"others", file=sys.stderr, flush=True)
                stop_all()
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_all(signal.SIGINT)
        status = 130
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for thread in pumps:
        thread.join(timeout=5)
    for log in logs:
        log.close()
    signal.signal(signal.SIGTERM, previous_handler)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
