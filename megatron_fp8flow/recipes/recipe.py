"""Load, inherit and validate YAML recipes, and turn them into Megatron command lines.

A recipe is a flat map of Megatron arguments in snake_case (``num_layers: 61``), an optional
``extends:`` (a recipe name or a path relative to the file; later keys override) and an optional
``fp8flow:`` section with :class:`~megatron_fp8flow.moe.settings.FP8FlowSettings` fields
plus ``enabled``. Every key is checked against Megatron-LM's ``pretrain_gpt`` arguments (the
lists in ``megatron_args/``, one per Megatron-LM release, read from its parser by
``scripts/megatron_arg_names.py``) and every ``fp8flow`` value against the plugin's settings; an
error names the recipe file, the key and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from ..resources import data_dir

CONFIG_DIR = data_dir("configs")  # the package's copy of configs/, or the checkout's (see resources.py)
MEGATRON_ARGS_DIR = Path(__file__).resolve().parent / "megatron_args"


def fp8flow_keys() -> set:
    """The keys of a recipe's ``fp8flow:`` section: ``enabled`` and the settings' fields."""
    from ..moe.settings import KEYS

    return {"enabled", *KEYS}


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key."""


@dataclass
class Recipe:
    name: str
    args: Dict[str, Any]
    fp8flow: Dict[str, Any] = field(default_factory=dict)
    sources: List[str] = field(default_factory=list)  # the files, most derived first

    @property
    def fp8flow_enabled(self) -> bool:
        return bool(self.fp8flow.get("enabled", bool(self.fp8flow)))


def list_recipes(config_dir: Path = CONFIG_DIR) -> List[str]:
    """Names of the recipes in ``configs/`` (paths below it, without .yaml)."""
    if not config_dir.is_dir():
        raise RecipeError(f"no recipe folder at {config_dir}: the package was installed without its recipes")
    return sorted(str(p.relative_to(config_dir).with_suffix("")) for p in config_dir.rglob("*.yaml"))


def find_recipe(name_or_path: Union[str, Path], relative_to: Optional[Path] = None,
                config_dir: Path = CONFIG_DIR) -> Path:
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    candidates.append(config_dir / name_or_path)
    candidates += [c.with_suffix(".yaml") for c in list(candidates) if c.suffix != ".yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = ", ".join(list_recipes(config_dir) if config_dir.is_dir() else []) or f"none (no folder {config_dir})"
    raise RecipeError(f"recipe {str(name_or_path)!r} not found (a path, or one of: {known})")


@functools.lru_cache(maxsize=None)
def megatron_arg_names() -> Dict[str, frozenset]:
    """Megatron-LM release (e.g. ``core_r0.19``) -> its ``pretrain_gpt`` arguments as recipe keys."""
    return {f.stem: frozenset(ln.strip() for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
            for f in sorted(MEGATRON_ARGS_DIR.glob("*.txt"))}


def _known_args() -> frozenset:
    return frozenset().union(*megatron_arg_names().values())


def _read(path: Path, seen: tuple) -> Recipe:
    if path in seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a map of argument: value, got {type(data).__name__}")
    parent = data.pop("extends", None)
    fp8 = data.pop("fp8flow", None) or {}
    if not isinstance(fp8, dict):
        raise RecipeError(f"{path}: 'fp8flow' must be a map of settings, got {fp8!r}")
    base = _read(find_recipe(parent, path.parent), (*seen, path)) if parent else Recipe(path.stem, {}, {}, [])
    return Recipe(path.stem, {**base.args, **data}, {**base.fp8flow, **fp8}, [str(path), *base.sources])


def validate(recipe: Recipe, overridden=()) -> Recipe:
    """Check every key and value (``overridden``: the keys given by ``--set``, named so in errors);
    the values' types and ranges come from :data:`megatron_fp8flow.validation.RECIPE_VALUES`."""
    from ..validation import as_text, check_recipe_values

    known = _known_args()
    where = recipe.sources[0] if recipe.sources else recipe.name
    for key, value in recipe.args.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            releases = ", ".join(megatron_arg_names())
            source = f"--set {key}={as_text(value)}" if key in overridden else where
            raise RecipeError(f"{source}: unknown Megatron argument {key!r} "
                              f"(not a pretrain_gpt argument of Megatron-LM {releases}){hint}")
        if isinstance(value, dict):
            raise RecipeError(f"{where}: {key!r} must be a value or a list, not a map")
    for key in recipe.fp8flow:
        if key not in fp8flow_keys():
            raise RecipeError(f"{where}: unknown fp8flow setting {key!r}; expected one of {sorted(fp8flow_keys())}")
    check_recipe_values(recipe.args, recipe.fp8flow, where, overridden)
    if recipe.fp8flow_enabled:
        from ..moe.settings import FP8FlowSettings

        try:
            FP8FlowSettings(**{k: v for k, v in recipe.fp8flow.items() if k != "enabled"})
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{where}: fp8flow: {err}") from err
    return recipe


def load_recipe(name_or_path: Union[str, Path], overrides: Optional[Dict[str, Any]] = None) -> Recipe:
    """Read a recipe (with its ``extends`` chain), apply ``overrides`` (``fp8flow.mode`` style
    keys reach the fp8flow section) and validate it."""
    recipe = _read(find_recipe(name_or_path), ())
    for key, value in (overrides or {}).items():
        if key.startswith("fp8flow."):
            recipe.fp8flow[key.split(".", 1)[1]] = value
        else:
            recipe.args[key] = value
    return validate(recipe, overridden=frozenset(overrides or {}))


def parse_override(text: str) -> tuple:
    """``key=value`` from the command line; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise RecipeError(f"--set takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise RecipeError(f"--set {text}: the key is missing; expected key=value, e.g. --set train_iters=100")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({str(err).splitlines()[0]})") from None


# Megatron parses these from one Python list literal ("[0,1,1]"), not from several values.
LIST_LITERAL_ARGS = {"moe_layer_freq"}


def to_argv(recipe: Recipe) -> List[str]:
    """Megatron command-line arguments: ``--kebab-case value``; True gives the bare flag, False and
    None are left out, lists give several values (one list literal for ``LIST_LITERAL_ARGS``); the
    fp8flow section gives ``--moe-fp8-flow*``."""
    argv: List[str] = []
    for key, value in recipe.args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, (list, tuple)) and key in LIST_LITERAL_ARGS:
            value = "[" + ",".join(str(v) for v in value) + "]"
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    if recipe.fp8flow_enabled:
        from ..moe.settings import to_argv as settings_argv

        argv.append("--moe-fp8-flow")
        argv += settings_argv(recipe.fp8flow)
    return argv
