"""Bad settings end a fairseq command with one clear line, not a traceback.

Our checks (``--moe-k`` larger than the experts, a world size that does not divide them, a
missing shard file, ...) raise ``ValueError`` / ``FileNotFoundError`` with a message that names
the fix. Inside a fairseq command-line tool such an error would otherwise surface under a page of
fairseq's call stack. When the error was raised by fairseq-smoe code, this hook prints

    fairseq-smoe: error: --moe-k 5 is larger than --moe-num-experts 4; use --moe-k <= 4

and exits with status 2 (argparse's status for bad arguments). Anything else, including errors
raised by fairseq or torch and every other exception type (bugs), keeps the full traceback, as
does everything when ``SMOE_TRACEBACK=1`` is set.
"""

import os
import sys
import traceback

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_USER_ERRORS = (ValueError, FileNotFoundError)


def _raised_by_us(tb) -> bool:
    frames = traceback.extract_tb(tb)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR + os.sep)


def _hook(previous):
    def hook(exc_type, exc, tb):
        if (issubclass(exc_type, _USER_ERRORS) and _raised_by_us(tb)
                and os.environ.get("SMOE_TRACEBACK", "0") in ("", "0")):
            print(f"fairseq-smoe: error: {exc}", file=sys.stderr)
            print("(set SMOE_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
            sys.exit(2)
        previous(exc_type, exc, tb)

    hook._smoe = True
    return hook


def install() -> None:
    """Only in fairseq's command-line tools; a Python program keeps its own exception handling."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if program.startswith("fairseq-") and not getattr(sys.excepthook, "_smoe", False):
        sys.excepthook = _hook(sys.excepthook)
