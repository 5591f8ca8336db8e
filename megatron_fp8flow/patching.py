"""``fp8flow patch``: add the plugin to a Megatron-LM checkout (or fork) with a small patch.

The patches in ``patches/core_r0.<minor>.0/`` touch only ``pretrain_gpt.py``: one import plus
``fp8flow_setup()`` after its imports, and the plugin's flags chained onto its
``extra_args_provider``. Everything else stays in the pip-installed package. This module finds
the checkout's Megatron-Core version, checks that the patch applies (``git apply --check``),
applies it, and when a fork changed those lines, says exactly what to add by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List

from .resources import data_dir

PATCH_DIR = data_dir("patches")  # the package's copy of patches/, or the checkout's (see resources.py)


class PatchError(RuntimeError):
    pass


@dataclass
class PatchResult:
    patch: Path
    status: str  # "applied" | "already applied" | "would apply"


def megatron_lm_version(root: Path) -> tuple:
    """(major, minor) of the Megatron-Core inside a Megatron-LM checkout."""
    info = Path(root) / "megatron" / "core" / "package_info.py"
    if not info.is_file():
        raise PatchError(f"{root} is not a Megatron-LM checkout: {info.relative_to(root)} is missing")
    text = info.read_text()
    found = {k: re.search(rf"^{k}\s*=\s*(\d+)", text, re.M) for k in ("MAJOR", "MINOR")}
    if not all(found.values()):
        raise PatchError(f"cannot read MAJOR/MINOR from {info}")
    return int(found["MAJOR"].group(1)), int(found["MINOR"].group(1))


def available_versions(patch_dir: Path = PATCH_DIR) -> List[str]:
    if not patch_dir.is_dir():
        raise PatchError(f"no patch folder at {patch_dir}: the package was installed without its patches")
    return sorted(p.name for p in patch_dir.iterdir() if p.is_dir() and list(p.glob("*.patch")))


def patches_for(version: tuple, patch_dir: Path = PATCH_DIR) -> List[Path]:
    folder = patch_dir / f"core_r{version[0]}.{version[1]}.0"
    found = sorted(folder.glob("*.patch")) if folder.is_dir() else []
    if not found:
        raise PatchError(
            f"no patch for Megatron-Core {version[0]}.{version[1]}; patches exist for: "
            f"{', '.join(available_versions(patch_dir)) or 'none'}. Add the lines by hand (see patches/README.md)"
        )
    return found


def _git_apply(root: Path, patch: Path, *flags: str) -> subprocess.CompletedProcess:
    if shutil.which("git") is None:
        raise PatchError("git is needed to apply the patch (git apply); install git")
    return subprocess.run(["git", "apply", *flags, str(patch)], cwd=root, capture_output=True, text=True)


def _added_lines(patch: Path) -> str:
    return "\n".join(line[1:] for line in patch.read_text().splitlines()
                     if line.startswith("+") and not line.startswith("+++"))


def apply(root, dry_run: bool = False, patch_dir: Path = PATCH_DIR) -> List[PatchResult]:
    """Apply the plugin's patches to the checkout at ``root`` (idempotent)."""
    root = Path(root).resolve()
    results = []
    for patch in patches_for(megatron_lm_version(root), patch_dir):
        if _git_apply(root, patch, "--check", "--reverse").returncode == 0:
            results.append(PatchResult(patch, "already applied"))
            continue
        check = _git_apply(root, patch, "--check")
        if check.returncode != 0:
            raise PatchError(
                f"{patch.name} does not apply to {root}: {check.stderr.strip()}\n"
                f"Your copy changed the lines the patch anchors on. Add these lines by hand "
                f"(the import after the script's imports; the flags around its extra_args_provider):\n"
                f"{_added_lines(patch)}"
            )
        if dry_run:
            results.append(PatchResult(patch, "would apply"))
            continue
        done = _git_apply(root, patch)
        if done.returncode != 0:
            raise PatchError(f"{patch.name}: git apply failed: {done.stderr.strip()}")
        results.append(PatchResult(patch, "applied"))
    return results
