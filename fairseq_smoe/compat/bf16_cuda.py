"""``--bf16`` on a GPU means CUDA bf16, not TPU training.

fairseq 0.12's ``options.parse_args_and_arch`` ends with ``if args.bf16: args.tpu = True``: it
knew bf16 only on TPUs. The trainer then takes its device from torch_xla, which a GPU machine
does not have (``AttributeError: 'NoneType' object has no attribute 'xla_device'``). fairseq's
bf16 code itself (``model.to(torch.bfloat16)``, the FP16Optimizer family without loss scaling,
bf16 samples) is device-agnostic.

The patch: when a fairseq command turns its parsed arguments into its configuration
(``convert_namespace_to_omegaconf``, looked up as a global of the ``fairseq_cli`` module at call
time), ``--tpu`` set by ``--bf16`` is cleared if CUDA is available, ``--cpu`` is not given and
torch_xla is not installed. The plugin is imported inside ``parse_args_and_arch`` (``--user-dir``),
before the command reaches that call, so the wrapped function is the one it calls. A real TPU
setup (torch_xla installed) is unchanged; on CPU ``--bf16`` stays refused
(``models/run_checks.py``). fairseq-hydra-train never sets ``tpu`` from ``bf16``.
"""

import importlib.util
import logging
import sys

import torch

logger = logging.getLogger(__name__)

CLI_MODULES = ("fairseq_cli.train", "fairseq_cli.validate", "fairseq_cli.eval_lm",
               "fairseq_cli.generate", "fairseq_cli.interactive")


def bf16_means_cuda(args) -> bool:
    """Whether these parsed arguments ask for bf16 on a GPU that fairseq took for a TPU."""
    return (bool(getattr(args, "bf16", False)) and bool(getattr(args, "tpu", False))
            and not getattr(args, "cpu", False) and torch.cuda.is_available()
            and importlib.util.find_spec("torch_xla") is None)


def _wrap(convert):
    def convert_namespace_to_omegaconf(args):
        if bf16_means_cuda(args):
            args.tpu = False
            logger.info("--bf16 on CUDA: training in bfloat16 on the GPU (fairseq 0.12 took "
                        "--bf16 for TPU training; fairseq_smoe.compat.bf16_cuda)")
        return convert(args)

    convert_namespace_to_omegaconf._smoe_bf16_cuda = True
    return convert_namespace_to_omegaconf


def _command_modules(names):
    """The fairseq command modules already imported, ``python -m fairseq_cli.X``'s __main__ too."""
    found = [sys.modules.get(name) for name in names]
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) in names:
        found.append(main)
    return [m for m in found if m is not None]


def install(modules=CLI_MODULES) -> None:
    """Idempotent; wraps the conversion in each fairseq command module already imported."""
    for module in _command_modules(modules):
        convert = getattr(module, "convert_namespace_to_omegaconf", None)
        if convert is not None and not getattr(convert, "_smoe_bf16_cuda", False):
            module.convert_namespace_to_omegaconf = _wrap(convert)
