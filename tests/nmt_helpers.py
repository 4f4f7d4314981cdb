"""Shared helpers of the translation-model tests: a dictionary, a fake task, model building."""

import argparse
from types import SimpleNamespace

import torch
from fairseq.data import Dictionary

from fairseq_smoe.models import lstm_moe_nmt as nmt
from fairseq_smoe.plugin import install

install()  # the plugin, as --user-dir does: registers it with fairseq, installs its patches


def make_dictionary(num_symbols: int = 20) -> Dictionary:
    dictionary = Dictionary()
    for index in range(num_symbols):
        dictionary.add_symbol(f"w{index}")
    return dictionary


def make_args(arch: str = "lstm_moe_nmt_tiny", **overrides):
    parser = argparse.ArgumentParser()
    nmt.LSTMMoETranslationModel.add_args(parser)
    args = parser.parse_args([])
    for name, value in overrides.items():
        setattr(args, name, value)
    from fairseq.models import ARCH_CONFIG_REGISTRY

    ARCH_CONFIG_REGISTRY[arch](args)
    return args


def build_model(arch: str = "lstm_moe_nmt_tiny", dictionary=None, **overrides):
    dictionary = dictionary or make_dictionary()
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    return nmt.LSTMMoETranslationModel.build_model(make_args(arch, **overrides), task)


def random_batch(dictionary, batch: int = 5, src_len: int = 9, tgt_len: int = 7, left_pad: bool = True):
    """Source tokens of varied lengths (padded on the left like fairseq's translation task),
    lengths, and decoder inputs starting with EOS."""
    nspecial = dictionary.nspecial
    lengths = torch.randint(2, src_len + 1, (batch,))
    lengths[0] = src_len
    src = torch.full((batch, src_len), dictionary.pad(), dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        tokens = torch.randint(nspecial, len(dictionary), (length,))
        tokens[-1] = dictionary.eos()
        if left_pad:
            src[row, src_len - length:] = tokens
        else:
            src[row, :length] = tokens
    prev = torch.randint(nspecial, len(dictionary), (batch, tgt_len))
    prev[:, 0] = dictionary.eos()
    return src, lengths, prev
