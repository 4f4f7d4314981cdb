from setuptools import find_packages, setup

# No exact pins: the plugin joins the user's fairseq environment as it is. The torch range is the
# one tested (2.5.1 and 2.13.0); the project's own .venv pins exact CPU builds in
# requirements.txt (scripts/bootstrap.sh). fairseq itself is not listed: PyPI's fairseq 0.12.2
# does not build on Python >= 3.11; install it yourself (docs/install.md: fairseq-fixed built
# with --no-build-isolation).
setup(
    name="fairseq-smoe",
    version="0.1.0",
    description="Sparsely-Gated Mixture-of-Experts (Shazeer et al. 2017) for fairseq",
    packages=find_packages(include=["fairseq_smoe", "fairseq_smoe.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.5,<2.14", "numpy"],
    extras_require={
        "tensorboard": ["tensorboardX"],  # fairseq-train --tensorboard-logdir
        "test": ["pytest", "ruff"],
        "plots": ["matplotlib"],  # scripts/moe_utilisation.py --plot
    },
)
