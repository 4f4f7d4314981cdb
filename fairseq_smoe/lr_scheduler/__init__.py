"""Learning-rate schedulers of fairseq-smoe, registered with fairseq on import:

    warmup_hold_inverse_sqrt   the translation models' schedule (App. E)
"""

from . import warmup_hold_inverse_sqrt  # noqa: F401  (registers the scheduler)
