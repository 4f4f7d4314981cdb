"""Moved to ``fairseq_smoe.ops.workspace`` (the loop backend's machinery); this name stays an alias
of that module, so imports and monkeypatches of the old name reach the same objects."""

import sys

from ..ops import workspace as _moved

sys.modules[__name__] = _moved
