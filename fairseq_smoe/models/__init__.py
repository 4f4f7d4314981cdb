"""fairseq models of fairseq-smoe. Each module registers its model and architectures.

fairseq's ``--user-dir fairseq_smoe`` imports this package: it installs the plugin's patches of
fairseq and registers the criteria, lr scheduler and optimizer too (``compat.install_all``).
"""

import importlib
import os

from .. import compat

compat.install_all()

for _file in sorted(os.listdir(os.path.dirname(__file__))):
    if _file.endswith(".py") and not _file.startswith("_"):
        importlib.import_module(f"{__name__}.{_file[:-3]}")
