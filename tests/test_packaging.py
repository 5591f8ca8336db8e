"""The package carries its recipes (``configs/``) and Megatron-LM patches (``patches/``).

A wheel built from this checkout holds a copy of both under ``megatron_fp8flow/_data/``; installed
into a folder of its own and run from elsewhere, with the checkout off the path, the CLI lists
and reads the recipes and dry-runs the patch on a small Megatron-LM-shaped checkout. Building and
installing need no network (``--no-deps --no-build-isolation``); deselect with ``-m "not packaging"``.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import megatron_fp8flow
from megatron_fp8flow.recipes import list_recipes, load_recipe, to_argv

from test_patching import SCRIPT  # the pretrain_gpt.py of a Megatron-LM checkout, per release
from megatron_fp8flow.resources import DATA_FOLDERS, data_dir

REPO = Path(__file__).resolve().parents[1]
# Build from a copy, so the checkout gets no build/ or egg-info and no stale build output is packed.
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis", "fp8flow_results", "*.whl")



def _source_files(folder: str):
    return sorted(str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_checkout_reads_top_level_folders():
    """From a source checkout (or an editable install) the top-level folders are used in place."""
    if Path(megatron_fp8flow.__file__).resolve().parents[1] != REPO:
        pytest.skip("megatron_fp8flow is imported from an installed copy, not this checkout")
    for name in DATA_FOLDERS:
        assert data_dir(name) == REPO / name
    assert "proxies/tiny_cpu" in list_recipes()


def test_data_dir_rejects_unknown_folder():
    with pytest.raises(ValueError, match="unknown data folder"):
        data_dir("scripts")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {setuptools.__version__} builds wheels only with the wheel package installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."],
         cwd=src)
    (found,) = dist.glob("megatron_fp8flow-*.whl")
    return found


@pytest.mark.packaging
def test_wheel_contains_recipes_and_patches(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in DATA_FOLDERS:
        expected = _source_files(folder)
        assert expected, f"the checkout has no files under {folder}/"
        missing = [f for f in expected if f"megatron_fp8flow/_data/{f}" not in names]
        assert not missing, f"the wheel lacks {missing}"
        shipped = sorted(n[len("megatron_fp8flow/_data/"):] for n in names
                         if n.startswith(f"megatron_fp8flow/_data/{folder}/"))
        assert shipped == expected  # nothing stale or extra either
    assert "megatron_fp8flow/_data/configs/proxies/tiny_cpu.yaml" in names
    assert "megatron_fp8flow/_data/patches/core_r0.16.0/pretrain_gpt.patch" in names
    assert "megatron_fp8flow/resources.py" in names


@pytest.mark.packaging
@pytest.mark.skipif(shutil.which("git") is None, reason="fp8flow patch uses git apply")
def test_installed_wheel_cli_without_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH keeps what it adds besides this checkout (a Megatron-LM tree, say), after the install
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), *kept]))

    def cli(*args):
        return _run([sys.executable, "-m", "megatron_fp8flow.cli", *args], cwd=elsewhere, env=env).stdout

    # The installed copy is the one imported, and the checkout is not on the path.
    where = _run([sys.executable, "-c", "import sys, megatron_fp8flow, megatron_fp8flow.resources as r; "
                  "print(megatron_fp8flow.__file__); print(r.data_dir('configs')); print('\\n'.join(sys.path))"],
                 cwd=elsewhere, env=env).stdout.splitlines()
    assert Path(where[0]).resolve().is_relative_to(target.resolve()), where[0]
    assert Path(where[1]).resolve() == (target / "megatron_fp8flow" / "_data" / "configs").resolve()
    assert not any(p and Path(p).resolve() == REPO for p in where[2:]), "the checkout is on sys.path"

    listed = cli("recipe", "list").split()
    assert "proxies/tiny_cpu" in listed
    assert listed == list_recipes()

    argv = cli("recipe", "argv", "proxies/tiny_cpu").strip()
    assert argv == " ".join(to_argv(load_recipe("proxies/tiny_cpu")))

    root = tmp_path / "Megatron-LM"
    (root / "megatron" / "core").mkdir(parents=True)
    (root / "megatron" / "core" / "package_info.py").write_text("MAJOR = 0\nMINOR = 16\nPATCH = 1\n")
    (root / "pretrain_gpt.py").write_text(SCRIPT[16])
    out = cli("patch", "--dry-run", str(root))
    assert "core_r0.16.0/pretrain_gpt.patch: would apply" in out
    assert (root / "pretrain_gpt.py").read_text() == SCRIPT[16]
