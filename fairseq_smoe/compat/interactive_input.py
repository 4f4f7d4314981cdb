"""fairseq-interactive reads lines that are not UTF-8 without stopping (``SMOE_PATCH_INTERACTIVE_INPUT``).

fairseq's ``buffered_read`` decodes its input (stdin or ``--input FILE``) as strict UTF-8, so one
line of another encoding (a Latin-1 file, a binary paste) ended the whole session with a
``UnicodeDecodeError`` traceback, losing the translations of every line after it. The patch reads
bytes, and a line that is not UTF-8 is skipped with a warning naming its number; the others are
translated as before, in order.
"""

import logging
import sys

logger = logging.getLogger(__name__)


def decoded_lines(stream, name: str):
    """The lines of a binary ``stream`` as text, skipping (with a warning) those not in UTF-8."""
    for number, raw in enumerate(stream, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            logger.warning(f"{name} line {number} is not UTF-8 ({error.reason} at byte "
                           f"{error.start}); skipped it: give fairseq-interactive UTF-8 text "
                           f"(e.g. iconv -f latin1 -t utf-8)")


def buffered_read(input, buffer_size):
    """fairseq_cli.interactive.buffered_read over ``decoded_lines``: batches of stripped lines."""
    buffer = []
    stream = sys.stdin.buffer if input == "-" else open(input, "rb")
    try:
        for line in decoded_lines(stream, "standard input" if input == "-" else input):
            buffer.append(line.strip())
            if len(buffer) >= buffer_size:
                yield buffer
                buffer = []
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if buffer:
        yield buffer


def install() -> None:
    """Replace fairseq_cli.interactive.buffered_read. Idempotent."""
    from fairseq_cli import interactive

    interactive.buffered_read = buffered_read
