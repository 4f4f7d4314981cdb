from . import smoe_cross_entropy  # noqa: F401  (registers the criteria)
