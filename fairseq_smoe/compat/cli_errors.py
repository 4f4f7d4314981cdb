"""Bad settings and known faults end a fairseq command with one clear line, not a traceback.

Our checks (``--moe-k`` larger than the experts, a world size that does not divide them, a
missing shard file, ...) raise ``ValueError`` / ``FileNotFoundError`` with a message that names
the fix. Inside a fairseq command-line tool such an error would otherwise surface under a page of
fairseq's call stack. When the error was raised by fairseq-smoe code, this hook prints

    fairseq-smoe: error: --moe-k 5 is larger than --moe-num-experts 4; use --moe-k <= 4

and exits with status 2 (argparse's status for bad arguments). Two more cases get one line:

* fairseq's ``FloatingPointError`` (gradients NaN/Inf, minimum fp16 loss scale reached): the
  log above it holds fairseq's own report (NanDetector names the first module with NaN/Inf);
  the line says what to change. Exit status 1.
* fairseq's batching assertion that a sample is longer than ``--max-tokens`` (raised from its
  compiled ``data_utils_fast``): the line names the two options to change. Exit status 2.
* a worker of fairseq's own multi-process launcher (``torch.multiprocessing.spawn``) failed
  with one of our errors: the parent receives it as the child's formatted traceback; the line
  gives the child's message.

Anything else, including every other exception type (bugs), keeps the full traceback, as does
everything when ``SMOE_TRACEBACK=1`` is set.

Where the line goes: ``torch.distributed.init_process_group`` wraps ``sys.excepthook`` in one
that sends the previous hook's output to a buffer and writes it out afterwards, prefixed with
the rank. Our ``sys.exit`` inside that buffer would lose the message, so the line goes straight
to the process's real standard error (``sys.__stderr__``), flushed, before exiting.
"""

import os
import re
import sys
import traceback

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fairseq_smoe/
_USER_ERRORS = (ValueError, FileNotFoundError)
USAGE_STATUS = 2  # argparse's status for bad arguments
_TRACEBACK_HINT = "(set SMOE_TRACEBACK=1 to see where it was raised)"
_DIVERGED_HINT = ("training diverged: {exc}. The log above names the first module with a "
                  "NaN/Inf (fairseq's NanDetector). Lower --lr, add --clip-norm (e.g. 0.1) or a "
                  "warm-up (--warmup-updates), keep --moe-w-importance/--moe-w-load small (0.01-0.1), "
                  "keep --adam-eps above 0 (with 0, Adam divides by zero where a gradient's moments "
                  "are 0, e.g. an expert that got no token; fairseq's default is 1e-8), "
                  "and resume from the last good checkpoint (--restore-file checkpoint_N_M.pt).")
_TOO_LONG_HINT = ("{exc} (fairseq's batching): a sample is longer than --max-tokens. Raise "
                  "--max-tokens, or lower --tokens-per-sample (fairseq-eval-lm's default is 1024) "
                  "or --max-positions")
# The last frame and the final line of a traceback formatted in a child process.
_FRAME_RE = re.compile(r'^\s*File "([^"]+)", line \d+', re.MULTILINE)
_LAST_LINE_RE = re.compile(r"^(ValueError|FileNotFoundError): (.*)\s*\Z", re.MULTILINE | re.DOTALL)


def _in_package(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep)


def _raised_by_us(tb) -> bool:
    frames = traceback.extract_tb(tb)
    return bool(frames) and _in_package(frames[-1].filename)


def _raised_by_fairseq(tb) -> bool:
    frames = traceback.extract_tb(tb)
    return bool(frames) and f"{os.sep}fairseq{os.sep}" in os.path.abspath(frames[-1].filename)


def child_error_message(formatted_traceback: str):
    """Our error's message in a traceback formatted by another process, or None.

    ``torch.multiprocessing.spawn`` hands a failed child's ``traceback.format_exc()`` text to
    the parent (``ProcessRaisedException``); the error is ours when its last frame lies in this
    package and it is one of our error types."""
    frames = _FRAME_RE.findall(formatted_traceback)
    last = _LAST_LINE_RE.search(formatted_traceback.strip())
    if not frames or not _in_package(frames[-1]) or last is None:
        return None
    return last.group(2).strip()


def _folder_with_path_separator(exc):
    """The command-line folder whose name holds ':' behind fairseq's FileNotFoundError: fairseq
    splits a data path at ':' (a list of folders, one per epoch) and opens the first part."""
    missing = getattr(exc, "filename", None)
    if not missing:
        return None
    for arg in sys.argv[1:]:
        parts = arg.split(os.pathsep)
        if len(parts) > 1 and os.path.isdir(arg) and any(
                os.path.abspath(str(missing)).startswith(os.path.abspath(p) + os.sep) for p in parts):
            return arg
    return None


def one_line(exc_type, exc, tb):
    """(message, exit status) when this exception gets one line instead of a traceback."""
    if issubclass(exc_type, _USER_ERRORS) and _raised_by_us(tb):
        return f"fairseq-smoe: error: {exc}\n{_TRACEBACK_HINT}", USAGE_STATUS
    if issubclass(exc_type, FileNotFoundError) and _raised_by_fairseq(tb):
        folder = _folder_with_path_separator(exc)
        if folder is not None:
            return (f"fairseq-smoe: error: the data folder {folder} contains {os.pathsep!r}, which "
                    f"fairseq reads as a list of folders (one per epoch), so it looked for "
                    f"{exc.filename}; move or link the data to a path without {os.pathsep!r}",
                    USAGE_STATUS)
    if issubclass(exc_type, FloatingPointError) and _raised_by_fairseq(tb):
        return f"fairseq-smoe: error: {_DIVERGED_HINT.format(exc=str(exc).strip().rstrip('.'))}", 1
    if exc_type is Exception and "skip this example with --skip-invalid-size-inputs-valid-test" in str(exc):
        return (f"fairseq-smoe: error: {str(exc).split(', skip')[0]}: an input is longer than the "
                f"model's positions. Raise --max-source-positions/--max-target-positions (an LSTM "
                f"has no positional limit of its own), or skip such inputs with "
                f"--skip-invalid-size-inputs-valid-test", USAGE_STATUS)
    if issubclass(exc_type, AssertionError) and "should not exceed max_tokens" in str(exc):
        return f"fairseq-smoe: error: {_TOO_LONG_HINT.format(exc=str(exc).strip())}", USAGE_STATUS
    if exc_type.__name__ == "ProcessRaisedException":  # torch.multiprocessing.spawn
        message = child_error_message(str(exc))
        rank = getattr(exc, "error_index", None)
        if message is not None:
            worker = f" (worker {rank})" if rank is not None else ""
            return f"fairseq-smoe: error{worker}: {message}\n{_TRACEBACK_HINT}", USAGE_STATUS
    return None


def _hook(previous):
    def hook(exc_type, exc, tb):
        verdict = None
        if os.environ.get("SMOE_TRACEBACK", "0") in ("", "0"):
            verdict = one_line(exc_type, exc, tb)
        if verdict is None:
            previous(exc_type, exc, tb)
            return
        message, status = verdict
        stream = sys.__stderr__ or sys.stderr
        stream.write(message + "\n")
        stream.flush()
        sys.exit(status)

    hook._smoe = True
    return hook


def install() -> None:
    """Only in fairseq's command-line tools; a Python program keeps its own exception handling.

    fairseq-hydra-train runs under hydra, which catches every exception of the run itself,
    prints it with a shortened traceback and exits 1: our errors never reached the hook. With
    HYDRA_FULL_ERROR set hydra re-raises instead, so they do (it is read when the error comes,
    and this runs before the model is built). Other errors then print hydra's full traceback."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if program.startswith("fairseq-") and not getattr(sys.excepthook, "_smoe", False):
        sys.excepthook = _hook(sys.excepthook)
    if program == "fairseq-hydra-train":
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
