"""fairseq-smoe: the Sparsely-Gated Mixture-of-Experts layer (Shazeer et al. 2017) for fairseq.

Importing this package, or the layer (``fairseq_smoe.modules``, plain PyTorch), imports no
fairseq and changes nothing. The fairseq plugin is ``--user-dir fairseq_smoe``: fairseq then
imports ``fairseq_smoe.models``, which registers the models, criteria, lr scheduler and
optimizer and installs the plugin's patches of fairseq (``fairseq_smoe.compat``: what each one
changes, and its ``SMOE_PATCH_<NAME>=0`` off switch, are in docs/compat.md). In a Python
program that drives fairseq, call ``fairseq_smoe.plugin.install()`` first.
"""

__version__ = "0.1.0"
