"""The ``loop`` backend: today's CPU path (the speed of paper §3 on CPU).

Routing counts are read to the host once per grouping; every expert runs its own matrix
products on its block of rows, experts spread over the intra-op threads (threads.py), large
buffers reused between steps (workspace.py); experts and combine are one autograd Function with
a hand-written backward (loop_experts.py), gather and combine in loop_dispatch.py. On CUDA
this would launch a handful of kernels per expert and per step: it is the default on CPU only.
"""

import torch

from .grouping import Grouping


class LoopBackend:
    name = "loop"
    resident = False

    def group(self, key_A: torch.Tensor, num_groups: int) -> Grouping:
        from .loop_dispatch import group_by_expert

        order_S, counts = group_by_expert(key_A, num_groups)
        return Grouping(order_S, torch.tensor(counts, device=key_A.device), num_groups,
                        counts=counts, num_assignments=key_A.shape[0])

    def gather(self, x_TD, row_S, workspace=None, name="rows"):
        from .loop_dispatch import gather_rows

        return gather_rows(x_TD, row_S, workspace, name)

    def grouped_matmul(self, x_SD, grouping: Grouping, weight_GIO):
        from .loop_experts import grouped_matmul

        return grouped_matmul(x_SD, grouping.counts, weight_GIO)

    def feed_forward(self, experts, x_SD, counts, workspace=None):
        from .loop_experts import feed_forward

        return feed_forward(x_SD, counts, experts.weights, experts.biases,
                            experts.recompute_activations, workspace)

    def combine(self, y_SO, row_S, gate_S, num_rows: int, workspace=None):
        from .loop_dispatch import combine

        return combine(y_SO, row_S, gate_S, num_rows, workspace)

    def experts_and_combine(self, experts, x_TD, row_A, expert_A, gate_A, num_experts: int,
                            workspace=None):
        from .loop_experts import feed_forward_and_combine

        grouping = self.group(expert_A, num_experts)
        order_S = grouping.order_S
        row_S = row_A[order_S]
        x_SD = self.gather(x_TD, row_S, workspace, "x_SD")
        # The experts and the combine in one Function: its backward forms each expert's output
        # and gate gradients inside the expert loop (loop_experts.py).
        return feed_forward_and_combine(x_SD, grouping.counts, row_S, gate_A[order_S],
                                        x_TD.shape[0], experts.weights, experts.biases,
                                        experts.recompute_activations, workspace)
