"""Moved to ``fairseq_smoe.ops.loop_dispatch`` (the loop backend's machinery); this name stays an alias
of that module, so imports and monkeypatches of the old name reach the same objects."""

import sys

from ..ops import loop_dispatch as _moved

sys.modules[__name__] = _moved
