import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.command.sdist import sdist as _sdist

here = Path(__file__).resolve().parent
# The top-level recipes and Megatron-LM patches are the source of truth; a wheel carries a copy of
# each as megatron_fp8flow/_data/<folder>/ (megatron_fp8flow/resources.py finds either).
DATA_FOLDERS = ("configs", "patches")


def _data_files():
    """The files of the data folders, relative to the source tree."""
    return [p.relative_to(here) for top in DATA_FOLDERS for p in sorted((here / top).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts]


class build_py(_build_py):
    """Also copy configs/ and patches/ into the built package as megatron_fp8flow/_data/.
    An editable install skips this: it reads the top-level folders in place."""

    def _data_targets(self):
        return [(here / rel, Path(self.build_lib) / "megatron_fp8flow" / "_data" / rel) for rel in _data_files()]

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        shutil.rmtree(Path(self.build_lib) / "megatron_fp8flow" / "_data", ignore_errors=True)  # no stale copies
        for src, dst in self._data_targets():
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst), preserve_mode=False)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [str(dst) for _, dst in self._data_targets()]


class sdist(_sdist):
    """Put configs/ and patches/ into the source distribution too, so a wheel built from it has them."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, sorted(set(files) | {str(rel) for rel in _data_files()}))

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
        "triton>=3.6,<3.10",  # tested under 3.6.0 to 3.9.0 (.ci/run: the newest it admits, and 3.6.0)
        "pyyaml>=6.0",
        "rich>=13.0",
        "matplotlib>=3.5",
    ],
    extras_require={
        "megatron": ["megatron-core>=0.16.1,<0.20", "psutil"],  # psutil: Megatron's checkpoint writer
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "hypothesis>=6.100", "megatron-core>=0.16.1,<0.20", "psutil"],
    },
    cmdclass={"build_py": build_py, "sdist": sdist},
    entry_points={"console_scripts": ["fp8flow=megatron_fp8flow.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
