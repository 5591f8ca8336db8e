from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "megatron_fp8flow" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="megatron-fp8flow",
    version=version["__version__"],
    description=(
        "FP8-Flow MoE for Megatron-Core: a persistent blockwise-FP8 dataflow through MoE "
        "dispatch, permutation and expert GEMMs, with an exact scaling-aware transpose"
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_fp8flow", "megatron_fp8flow.*"]),
    package_data={"megatron_fp8flow.benchmarks": ["paper_results/*.csv", "paper_results/*.md"],
                  "megatron_fp8flow.recipes": ["megatron_args/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "pyyaml>=6.0",
        "rich>=13.0",
        "matplotlib>=3.5",
    ],
    extras_require={
        "megatron": ["megatron-core>=0.16.1,<0.20", "psutil"],  # psutil: Megatron's checkpoint writer
        "test": ["pytest>=7.4", "hypothesis>=6.100", "megatron-core>=0.16.1,<0.20", "psutil"],
    },
    entry_points={"console_scripts": ["fp8flow=megatron_fp8flow.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
