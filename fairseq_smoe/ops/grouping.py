"""``Grouping``: assignments sorted by group (expert, or primary group of a hierarchical layer)."""

from typing import List, Optional

import torch


class Grouping:
    """Where each group's rows are after sorting assignments by group.

    order_S   long [S]: index into the A assignments of each sorted row. The loop backend keeps
              only assigned rows (S ≤ A); the device-resident backends keep all A, the dropped
              ones (group = num_groups: padding) last.
    counts_G  long [G] on the device: rows per group.
    counts    the same as a Python list (loop backend only: read to the host once).
    offs_G    int32 [G] on the device: end row of each group (resident backends).
    key_S     long [S]: group of each sorted row, num_groups for the dropped tail (resident).
    num_assignments  A, the number of assignments grouped (dropped ones included).
    """

    def __init__(self, order_S: torch.Tensor, counts_G: torch.Tensor, num_groups: int,
                 counts: Optional[List[int]] = None, offs_G: Optional[torch.Tensor] = None,
                 key_S: Optional[torch.Tensor] = None, num_assignments: int = 0):
        self.num_assignments = num_assignments
        self.order_S, self.counts_G, self.num_groups = order_S, counts_G, num_groups
        self.counts, self.offs_G, self.key_S = counts, offs_G, key_S
        self._valid_S = None
        self.cache = {}  # per-kernel tables derived from the offsets (triton_experts.py)

    @property
    def num_rows(self) -> int:
        return self.order_S.shape[0]

    @property
    def group_S(self) -> torch.Tensor:
        """long [S]: the group of each sorted row (num_groups for the dropped tail)."""
        if self.key_S is None:
            self.key_S = torch.arange(self.num_groups, device=self.counts_G.device).repeat_interleave(
                self.counts_G, output_size=self.num_rows)
        return self.key_S

    @property
    def valid_S(self) -> torch.Tensor:
        """bool [S]: rows that belong to a group (not the dropped tail)."""
        if self._valid_S is None:
            self._valid_S = self.key_S < self.num_groups
        return self._valid_S
