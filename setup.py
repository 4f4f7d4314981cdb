from setuptools import find_packages, setup

setup(
    name="fairseq-smoe",
    version="0.1.0",
    description="Sparsely-Gated Mixture-of-Experts (Shazeer et al. 2017) for fairseq",
    packages=find_packages(include=["fairseq_smoe", "fairseq_smoe.*"]),
    python_requires=">=3.9",
    install_requires=["torch==2.13.0"],
)
