"""The fairseq plugin in one call, for programs that drive fairseq in-process.

``install()`` does what ``--user-dir fairseq_smoe`` does: it imports ``fairseq_smoe.models``,
whose ``__init__`` installs the patches of fairseq (``compat.install_all``, each with its
``SMOE_PATCH_<NAME>=0`` switch) and then registers, module by module, what the plugin adds to
fairseq. Importing this module does nothing; the layer (``fairseq_smoe.modules``) never needs it.
"""

import importlib


def install() -> None:
    """Patches and registrations, once (later calls do nothing)."""
    importlib.import_module("fairseq_smoe.models")
