"""Imports run one way: a module of ``megatron_fp8flow`` imports only from its own layer or below,
and no two modules import each other at import time.

The layers, bottom to top:

1. ``fp8``: the FP8 format and its exact references: ``fp8/format.py`` (constants, layouts, the
   tensor container), ``fp8/reference.py`` (plain-PyTorch numerics), ``fp8/audit.py`` (the cast
   counter the cast points report to), ``fp8/activation.py`` (the autograd wrapper of a format
   tensor). Nothing here chooses a kernel.
2. ``kernels``: Triton kernels and their launchers (they may read the format's constants).
3. ``api+ops``: ``fp8/api.py`` (the public FP8 API: kernel or reference), the ``fp8`` package
   (it re-exports the API), the ``ops`` package (MoE operators: kernel or their plain-PyTorch
   form, kept beside the op that chooses it), and the package root ``megatron_fp8flow``
   (it imports ``fp8``).
4. ``gemm``: the GEMM engine.
5. ``moe``: the expert MLP modules.
6. ``megatron``: the Megatron-Core adapters (``megatron/small_model.py`` is a demo model).
7. ``app``: ``recipes``, ``training``, ``benchmarks``, ``numerics``, ``patching``,
   ``pretrain_gpt``, ``validation``, ``resources`` (the data folders recipes and patching read).
8. ``cli``: the command line.

The model code (``moe``, ``megatron``) reaches the Triton kernels only through the FP8 API, the
ops or the GEMM engine, which choose between a kernel and its plain-PyTorch form.

``BlockwiseFP8Tensor.dequantize`` (layer 1) runs the API's dequantize through a function the API
installs at import (``fp8.format.set_dequantizer``), not through an import of the API.

Imports are read statically (``ast``), those inside functions included. ``from pkg import name``
counts as an import of ``pkg.name`` when that is a module, else of ``pkg``. The packages above
a module (which Python initialises first) are not counted as its imports. The cycle check
takes module-level imports only (function bodies run later, ``if TYPE_CHECKING:`` never).
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Optional, Set, Tuple

PACKAGE = "megatron_fp8flow"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# (layer name, module patterns): ``a.b`` is that module, ``a.b.*`` the package and all below it.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("fp8", ("fp8.format", "fp8.reference", "fp8.audit", "fp8.activation")),
    ("kernels", ("kernels.*",)),
    ("api+ops", ("", "fp8", "fp8.api", "ops.*")),
    ("gemm", ("gemm.*",)),
    ("moe", ("moe.*",)),
    ("megatron", ("megatron.*",)),
    ("app", ("recipes.*", "training.*", "benchmarks.*", "numerics", "patching", "pretrain_gpt", "validation",
             "resources")),
    ("cli", ("cli",)),
]

# Upward imports that are deliberate: (importer, imported) -> why it is harmless. Keep it short.
ALLOWED: Dict[Tuple[str, str], str] = {}

# (importers, imported): module patterns (as in LAYERS) that must not import the others directly.
NO_DIRECT_IMPORT: List[Tuple[Tuple[str, ...], Tuple[str, ...]]] = [
    (("moe.*", "megatron.*"), ("kernels.*",)),
]


def layer_of(module: str, layers=LAYERS, package: str = PACKAGE) -> Optional[int]:
    """Index of ``module``'s layer (the most specific pattern wins), or None when none names it."""
    best, best_len = None, -1
    for index, (_, patterns) in enumerate(layers):
        for pattern in patterns:
            wildcard = pattern.endswith(".*")
            name = pattern[:-2] if wildcard else pattern
            base = f"{package}.{name}" if name else package
            hit = module == base or (wildcard and module.startswith(base + "."))
            if hit and len(base) > best_len:
                best, best_len = index, len(base)
    return best


def find_modules(root: pathlib.Path = ROOT, package: str = PACKAGE) -> Dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every ``.py`` file of the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    return modules


class _Imports(ast.NodeVisitor):
    """(line, imported module, module-level?) for every import of a module of ours."""

    def __init__(self, module: str, is_package: bool, known: Set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: List[Tuple[int, str, bool]] = []
        self._depth = 0  # > 0 inside a function body or an ``if TYPE_CHECKING:`` block

    def _nested(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node):
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            self._nested(node)
        else:
            self.generic_visit(node)

    def _add(self, node, target: str):
        # The deepest module of ours that the dotted name names (``pkg.mod.attr`` -> ``pkg.mod``).
        while target and target not in self.known:
            target = target.rpartition(".")[0]
        if target:
            self.found.append((node.lineno, target, self._depth == 0))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            self._add(node, sub if sub in self.known else source)


def module_imports(modules: Dict[str, pathlib.Path]) -> Dict[str, List[Tuple[int, str, bool]]]:
    """Module -> its imports of other modules of ours (not of itself or of its parent packages)."""
    known = set(modules)
    result = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        found = dict.fromkeys((line, target, top) for line, target, top in visitor.found
                              if target != name and not name.startswith(target + "."))
        result[name] = list(found)
    return result


def layer_violations(imports, layers=LAYERS, allowed=ALLOWED, package: str = PACKAGE) -> List[str]:
    """One line per import of a higher layer, and per module that no layer names."""
    problems = []
    for module, found in sorted(imports.items()):
        mine = layer_of(module, layers, package)
        if mine is None:
            problems.append(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
            continue
        for line, target, _ in found:
            theirs = layer_of(target, layers, package)
            if theirs is not None and theirs > mine and (module, target) not in allowed:
                problems.append(
                    f"{module} (layer {mine + 1} {layers[mine][0]!r}) imports {target} "
                    f"(layer {theirs + 1} {layers[theirs][0]!r}) at line {line}")
    return problems


def direct_imports(imports, rules=NO_DIRECT_IMPORT, package: str = PACKAGE) -> List[str]:
    """One line per import that a NO_DIRECT_IMPORT rule forbids."""
    def matches(module, patterns):
        return layer_of(module, [("", tuple(patterns))], package) is not None

    problems = []
    for module, found in sorted(imports.items()):
        for importers, imported in rules:
            if matches(module, importers):
                problems += [f"{module} imports {target} at line {line}: go through the API, ops or gemm"
                             for line, target, _ in found if matches(target, imported)]
    return problems


def import_cycles(imports) -> List[List[str]]:
    """The cycles of the module-level import graph (one per strongly connected component)."""
    graph = {m: sorted({t for _, t, top in found if top and t in imports}) for m, found in imports.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles = []

    def visit(v):  # Tarjan's algorithm; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _package_imports():
    return module_imports(find_modules())


def test_every_import_goes_down_the_layers():
    problems = layer_violations(_package_imports())
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_model_code_reaches_kernels_through_the_api_ops_or_gemm():
    problems = direct_imports(_package_imports())
    assert not problems, "\n".join(problems)


def test_no_import_cycles_at_module_level():
    cycles = import_cycles(_package_imports())
    assert not cycles, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_allow_list_entries_are_still_needed():
    imports = _package_imports()
    present = {(m, t) for m, found in imports.items() for _, t, _ in found}
    stale = sorted(set(ALLOWED) - present)
    assert not stale, f"ALLOWED names imports that no longer exist: {stale}"


def test_the_checker_reports_a_synthetic_violation_and_cycle(tmp_path):
    """The checks can fail: a tiny package with an upward import (inside a function), a module in
    no layer and a module-level cycle, checked by the same functions."""
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from ..high import b\n    return b\n",
        "low/c.py": "from . import d\n",
        "low/d.py": "from .c import thing\n",
        "high.py": "from .low import a\nb = 1\n",
        "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import high\n",
        "stray.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    layers = [("low", ("", "low.*")), ("high", ("high", "typed"))]
    imports = module_imports(find_modules(pkg, "pkg"))

    problems = layer_violations(imports, layers, allowed={}, package="pkg")
    assert problems == [
        "pkg.low.a (layer 1 'low') imports pkg.high (layer 2 'high') at line 2",
        "pkg.stray is in no layer: add it to LAYERS in tests/test_layers.py",
    ], problems
    allowed = {("pkg.low.a", "pkg.high"): "lazy, for the test"}
    assert layer_violations(imports, layers, allowed=allowed, package="pkg") == problems[1:]
    assert direct_imports(imports, [(("high",), ("low.*",))], package="pkg") == [
        "pkg.high imports pkg.low.a at line 1: go through the API, ops or gemm"]
    # c <-> d is a cycle; high -> low.a -> (inside a function) high and typed -> high are not.
    assert import_cycles(imports) == [["pkg.low.c", "pkg.low.d"]]
