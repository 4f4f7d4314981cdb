"""Let fairseq 0.12 run on NumPy 2.

fairseq's ``TokenBlockDataset`` (``--sample-break-mode eos``/``complete``, the datasets that
``fairseq-interactive`` and ``fairseq-eval-lm`` build for language models) and
``LanguagePairDataset`` still name ``np.compat.long``, which NumPy 2.0 removed, so they fail
with "`np.compat` was removed in the NumPy 2.0 release". NumPy 1.x defined ``np.compat.long``
as Python's ``int``; we restore exactly that name and nothing else.
"""

import types

import numpy as np


def install() -> None:
    try:
        np.compat  # noqa: B018  (NumPy 1.x: present)
    except AttributeError:
        np.compat = types.SimpleNamespace(long=int)
