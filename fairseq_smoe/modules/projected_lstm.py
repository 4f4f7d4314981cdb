"""An LSTM layer with an optional output projection (LSTMP), time-major, pure PyTorch.

The paper's models use plain 512-unit LSTMs (App. C.1), LSTM-2048-512 (2048 units projected to
512), MoE-143M's 4096-unit LSTMs with a 1024 projection (App. C.2), and 2048-unit LSTMs with a
512 projection in translation (§5.3). This module covers all of them with ``torch.nn.LSTM``'s
fused kernel (``proj_size``: h_t = W_hr (o_t ⊙ tanh(c_t)), Sak et al. 2014):

    lstm = ProjectedLSTM(input_size=512, hidden_size=2048, proj_size=512)
    y_TBO, (h_LBO, c_LBH) = lstm(x_TBC)                  # O = proj_size or hidden_size
    y_TBO, state = lstm(x_TBC, state=state)              # continue from a cached state
    y_TBO, state = lstm(x_TBC, lengths_B=lengths)        # right-padded batch: packed, pads → 0

Initialisation: PyTorch's default uniform(±1/sqrt(hidden_size)) for all weights, then the
forget-gate bias set to 1 (Jozefowicz et al. 2015; TensorFlow's LSTM cell default, which the
paper's implementation used).
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

LSTMState = Tuple[torch.Tensor, torch.Tensor]


class ProjectedLSTM(nn.Module):
    """``num_layers`` stacked LSTM layers over [T, B, input_size] inputs.

    Args:
        input_size: C, the size of each input vector.
        hidden_size: H, the LSTM units (cell size).
        proj_size: P > 0 projects each hidden state to P (LSTMP); 0 means no projection.
        num_layers: stacked layers (no dropout or residual between them: models add their own).
        bidirectional: run a backward LSTM too and concatenate (encoders).
        forget_bias: initial forget-gate bias.

    ``output_size`` is (P or H) × (2 if bidirectional). The state is (h [L·dirs, B, P or H],
    c [L·dirs, B, H]), as ``torch.nn.LSTM`` uses it.
    """

    def __init__(self, input_size: int, hidden_size: int, proj_size: int = 0, num_layers: int = 1,
                 bidirectional: bool = False, forget_bias: float = 1.0):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(f"proj_size must be an integer >= 0 (0: no projection); got {proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size ({proj_size}) must be smaller than hidden_size "
                             f"({hidden_size}); use proj_size=0 for no projection")
        self.input_size, self.hidden_size, self.proj_size = input_size, hidden_size, proj_size
        self.num_layers, self.bidirectional = num_layers, bidirectional
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, proj_size=proj_size,
                            bidirectional=bidirectional)
        with torch.no_grad():
            for name, param in self.lstm.named_parameters():
                if name.startswith("bias_ih"):  # gate order i, f, g, o; bias_hh stays as is
                    param[hidden_size : 2 * hidden_size].fill_(forget_bias)
                elif name.startswith("bias_hh"):
                    param[hidden_size : 2 * hidden_size].zero_()

    @property
    def output_size(self) -> int:
        return (self.proj_size or self.hidden_size) * (2 if self.bidirectional else 1)

    def forward(self, x_TBC: torch.Tensor, state: Optional[LSTMState] = None,
                lengths_B: Optional[torch.Tensor] = None):
        """Run over all T steps. ``state``: initial (h, c), zeros if None. ``lengths_B``: real
        lengths of a right-padded batch; padded steps then neither update the state nor give
        output (they come out 0). Returns (y [T, B, output_size], final (h, c))."""
        if x_TBC.dim() != 3 or x_TBC.shape[-1] != self.input_size:
            raise ValueError(f"expected input [T, B, {self.input_size}], got {list(x_TBC.shape)}")
        if lengths_B is None:
            return self.lstm(x_TBC, state)
        total_length = x_TBC.shape[0]
        packed = pack_padded_sequence(x_TBC, lengths_B.detach().cpu().long(), enforce_sorted=False)
        y_packed, final_state = self.lstm(packed, state)
        y_TBO, _ = pad_packed_sequence(y_packed, total_length=total_length)
        return y_TBO, final_state

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"proj_size={self.proj_size}, output_size={self.output_size}")
