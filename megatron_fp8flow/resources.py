"""Where the package's data folders are: the YAML recipes (``configs``) and the Megatron-LM
patches (``patches``).

The repository's top-level ``configs/`` and ``patches/`` are the source of truth. A wheel (and
so ``pip install .``) carries a copy of each inside the package, as
``megatron_fp8flow/_data/<name>/`` (``setup.py``'s build step copies them there). A source
checkout or an editable install (``pip install -e .``) has no such copy: it reads the top-level
folders beside the package, so an edited recipe is used at once.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DATA_FOLDERS = ("configs", "patches")


def data_dir(name: str) -> Path:
    """The folder ``name`` (one of :data:`DATA_FOLDERS`): the copy shipped in the package if
    there is one, else the source checkout's top-level folder. When neither exists (a broken
    install) it returns the shipped location, which callers report as missing."""
    if name not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {name!r}; one of: {', '.join(DATA_FOLDERS)}")
    package = Path(str(resources.files(__package__))).resolve()
    shipped = package / "_data" / name
    if shipped.is_dir():
        return shipped
    checkout = package.parent
    if (checkout / "setup.py").is_file() and (checkout / name).is_dir():
        return checkout / name
    return shipped
