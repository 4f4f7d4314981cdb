"""Helpers of the command-line tools in scripts/ (no fairseq import)."""
