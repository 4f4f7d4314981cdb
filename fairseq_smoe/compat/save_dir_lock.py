"""One training per ``--save-dir`` (part of ``SMOE_PATCH_CHECKPOINT_SAFETY``).

fairseq lets two trainings write one save directory: both run to the end, their numbered files
alternate, and ``checkpoint_best.pt`` ends as whichever saved last, not the better run. At the
start of training (``checkpoint_utils.load_checkpoint``, before anything is written) the first
data-parallel worker takes an exclusive ``flock`` on ``SAVE_DIR/.smoe-train.lock`` and keeps it
until the process ends; the file says who holds it (pid, host, start time, command). A second
training on the same directory stops at once with one line naming the first. The kernel drops
the lock when its process ends, however it ends, so a leftover file never blocks a later run.
(On file systems without working ``flock`` — some network mounts — the check does nothing.)
"""

import datetime
import errno
import os
import socket
import sys
from typing import Optional

LOCK_NAME = ".smoe-train.lock"
_held = {}  # save dir -> open file whose lock this process holds


def _describe_holder(path: str) -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        text = ""
    return text or "another process"


def lock_save_dir(save_dir: str) -> Optional[str]:
    """Take the lock of ``save_dir`` for this process (idempotent); raises ValueError when
    another live process holds it. Returns the lock file's path, or None where locking is not
    available (no fcntl, or the file system refuses it)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: nothing to lock with
        return None
    directory = os.path.abspath(save_dir)
    if directory in _held:
        return os.path.join(directory, LOCK_NAME)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValueError(f"--save-dir {save_dir} is in use by another training "
                             f"({_describe_holder(path)}; lock file {path}). Two runs in one "
                             f"save directory overwrite each other's checkpoints: wait for it to "
                             f"end, or give this run its own --save-dir") from None
        return None  # ENOLCK, EOPNOTSUPP...: this file system does not lock
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}\n")
    handle.flush()
    _held[directory] = handle
    return path


def release_all() -> None:
    """Drop this process's locks (tests; a process that ends drops them anyway)."""
    for handle in _held.values():
        handle.close()
    _held.clear()
