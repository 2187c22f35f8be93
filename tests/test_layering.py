"""The package's layers, checked on every import the code makes (function-level ones too).

Layers (DESIGN §2): core < io, imaging, metrics < datasets, synthetic < ml, evaluation, viz <
stages < app. A module imports its own subpackage or a lower layer; stages never import each other
(``lib.stages.context`` is shared by all of them and imports no stage); torch and MONAI only in
``lib.ml``; a function-level import only for an optional heavy dependency, with a comment saying
so; no import cycle between modules; no private name imported from another module. Notebooks
import only their own stage module, ``lib.viz`` and ``lib.core``. Size limits: modules under
~700 lines, functions under 80 lines of code (docstring excluded).

Each rule is a function of parsed sources, so the planted-violation tests below run the same
checks on a tiny package written to a temporary folder.
"""

from __future__ import annotations

import ast
import json
from collections import defaultdict
from pathlib import Path

import pytest

from lib.core.paths import REPO_ROOT

LAYERS = {"core": 0, "io": 1, "imaging": 1, "metrics": 1, "datasets": 2, "synthetic": 2.5,
          "ml": 3, "evaluation": 3, "viz": 3, "stages": 4, "app": 5}
"""``synthetic`` sits on ``datasets``: the generator writes the real layouts (release IDs, the split
file, VerSe centroid files, the papers' facts), so it imports them; nothing below imports it."""
TORCH_ROOTS = {"torch", "monai"}
OPTIONAL_AT_CALL = {"itkwidgets", "SimpleITK", "playwright", "nnunetv2", "papermill", "nbformat", "nbconvert",
                    "ipywidgets", "IPython", "distributed", "ngff_zarr", "ipyniivue", "medpy", "surface_distance"}
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
STAGE_SHARED = {"context"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def parse_package(root: Path, package: str = "lib") -> dict[str, tuple[Path, ast.Module]]:
    """``{module name: (path, tree)}`` of every module of ``package`` under ``root``."""
    return {module_name(p, root): (p, ast.parse(p.read_text(), str(p)), p.relative_to(root))
            for p in sorted((root / package).rglob("*.py"))}


def _in_functions(tree: ast.Module) -> set[int]:
    """ids of the nodes inside a function body (at any depth)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def imports_of(module: str, tree: ast.Module, is_package: bool) -> list[tuple[str, int, bool, ast.stmt, list[str]]]:
    """``(imported module, line, at module level, node, names)`` for every import in ``tree``
    (module level: not inside a function, e.g. a guarded ``try: import isal``)."""
    out = []
    inside = _in_functions(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) not in inside, node, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = [a.name for a in node.names]
            out.append((base, node.lineno, id(node) not in inside, node, names))
    return out


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "lib" or parts[1] not in LAYERS:
        return None
    return parts[1], LAYERS[parts[1]]


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 3 and parts[:2] == ["lib", "stages"] and parts[2] not in STAGE_SHARED:
        return parts[2]
    return None


def resolve(target: str, names: list[str], modules: set[str]) -> list[str]:
    """The modules an import statement brings in (``from lib.x import y`` may import module ``lib.x.y``)."""
    found = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
    return found or [target]


def _placement_problems(mod: str, target: str, top_level: bool, node, path: Path, where: str) -> list[str]:
    """torch / MONAI only in lib.ml and at module top; function-level imports only for optional
    heavy dependencies, with a comment."""
    problems = []
    root = target.split(".")[0]
    if root in TORCH_ROOTS and not mod.startswith("lib.ml"):
        problems.append(f"{where}: {mod} imports {target} (torch / MONAI only in lib.ml)")
    if root in TORCH_ROOTS and mod.startswith("lib.ml") and not top_level:
        problems.append(f"{where}: {mod} imports {target} inside a function (torch at module top)")
    if not top_level:
        line_text = "".join(path.read_text().splitlines()[node.lineno - 1:node.end_lineno])
        if root == "lib":
            problems.append(f"{where}: function-level import of {target} (import lib modules at the top)")
        elif root not in OPTIONAL_AT_CALL:
            problems.append(f"{where}: function-level import of {target}, not an optional heavy dependency")
        elif "#" not in line_text:
            problems.append(f"{where}: function-level import of {target} without a comment saying why")
    return problems


def _edge_problems(mod: str, me: tuple, target: str, names: list[str], modules: set[str],
                   where: str) -> list[str]:
    """Layer order, stages never importing each other, the context importing no stage."""
    problems = []
    for dep in resolve(target, names, modules):
        other = layer_of(dep)
        if other is None or dep == mod:
            continue
        if other[0] != me[0] and other[1] >= me[1]:
            problems.append(f"{where}: {mod} (layer {me[0]}) imports {dep} (layer {other[0]})")
        s_me, s_dep = stage_of(mod), stage_of(dep)
        if s_me and s_dep and s_me != s_dep:
            problems.append(f"{where}: stage {s_me} imports stage {s_dep} (stages never import each other)")
        if mod.startswith("lib.stages.context") and s_dep:
            problems.append(f"{where}: the shared stage context imports stage {s_dep}")
    return problems


def check_layers(parsed: dict) -> list[str]:
    """Every import that breaks the layering rules, with file and line."""
    problems = []
    modules = set(parsed)
    for mod, (path, tree, rel) in parsed.items():
        me = layer_of(mod)
        for target, line, top_level, node, names in imports_of(mod, tree, path.name == "__init__.py"):
            where = f"{rel}:{line}"
            problems += _placement_problems(mod, target, top_level, node, path, where)
            if target.split(".")[0] == "lib" and me is not None:
                problems += _edge_problems(mod, me, target, names, modules, where)
            if isinstance(node, ast.ImportFrom):
                problems += [f"{where}: {mod} imports the private name {n} from {target}"
                             for n in names if n.startswith("_") and not n.startswith("__")]
    return problems


def import_graph(parsed: dict) -> dict[str, set[str]]:
    modules = set(parsed)
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, (path, tree, _) in parsed.items():
        for target, _, _, _, names in imports_of(mod, tree, path.name == "__init__.py"):
            for dep in resolve(target, names, modules):
                while dep and dep not in modules:
                    dep = dep.rpartition(".")[0]
                if dep and dep != mod and not mod.startswith(dep + "."):  # a package's own __init__ is not a cycle
                    graph[mod].add(dep)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def function_lengths(tree: ast.Module) -> list[tuple[str, int, int]]:
    """``(name, line, code lines without the docstring)`` of every function, nested ones included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                n -= body[0].end_lineno - body[0].lineno + 1
            out.append((node.name, node.lineno, n))
    return out


def check_sizes(parsed: dict) -> list[str]:
    problems = []
    for mod, (path, tree, _) in parsed.items():
        n_lines = len(path.read_text().splitlines())
        if n_lines > MAX_MODULE_LINES:
            problems.append(f"{mod}: {n_lines} lines (limit {MAX_MODULE_LINES})")
        for name, line, n in function_lengths(tree):
            if n > MAX_FUNCTION_LINES:
                problems.append(f"{mod}:{line} {name}: {n} lines of code (limit {MAX_FUNCTION_LINES})")
    return problems


def notebook_imports(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text())
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse("".join(cell["source"]))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lib"):
                out += [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                out += [a.name for a in node.names if a.name.startswith("lib")]
    return out


def check_notebook(nb_path: Path, stage_module: str) -> list[str]:
    """A notebook imports its own stage module, lib.viz and lib.core only."""
    allowed = (f"lib.stages.{stage_module}", "lib.viz", "lib.core")
    return [f"{nb_path.name}: imports {imp}" for imp in notebook_imports(nb_path)
            if not any(imp == a or imp.startswith(a + ".") for a in allowed)]


STAGE_MODULES = {"00_sources": "sources", "01_curation": "curation", "02_pretraining": "pretraining",
                 "03_annotation": "annotation", "04_benchmark": "benchmark", "05_failure_l6": "failure_l6",
                 "06_failure_lowz": "failure_lowz"}


@pytest.fixture(scope="module")
def parsed():
    return parse_package(REPO_ROOT)


def test_every_import_respects_the_layers(parsed):
    assert check_layers(parsed) == []


def test_no_import_cycle(parsed):
    assert find_cycles(import_graph(parsed)) == []


def test_modules_and_functions_stay_small(parsed):
    assert check_sizes(parsed) == []


def test_notebooks_import_only_their_stage_viz_and_core():
    problems = []
    for nb in sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        problems += check_notebook(nb, STAGE_MODULES[nb.stem])
    assert problems == []


def test_one_hop_from_notebook_to_stage_module_params_and_tests():
    for stage, module in STAGE_MODULES.items():
        assert (REPO_ROOT / "notebooks" / f"{stage}.ipynb").exists()
        code = REPO_ROOT / "lib" / "stages"
        assert (code / f"{module}.py").exists() or (code / module / "__init__.py").exists(), module
        for profile in ("synthetic", "ci", "paper"):
            assert (REPO_ROOT / "params" / profile / f"{stage}.yaml").exists()
        tests = REPO_ROOT / "tests" / "stages"
        assert list(tests.glob(f"test_{module}*.py")) or (tests / module).is_dir(), f"no tests/stages/ for {module}"


# ----------------------------------------------------------------------------- the checks catch violations


def _plant(tmp_path: Path, files: dict[str, str]) -> dict:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in {(tmp_path / rel).parent for rel in files}:
        while d != tmp_path:
            (d / "__init__.py").touch()
            d = d.parent
    return parse_package(tmp_path)


def test_a_planted_upward_import_fails(tmp_path):
    parsed_ = _plant(tmp_path, {"lib/core/labels.py": "from lib.io.nifti import load_volume\n",
                                "lib/io/nifti.py": "def load_volume(): ...\n"})
    problems = check_layers(parsed_)
    assert len(problems) == 1
    assert "lib.core.labels (layer core) imports lib.io.nifti (layer io)" in problems[0]


def test_planted_sideways_stage_torch_private_and_function_level_imports_fail(tmp_path):
    parsed_ = _plant(tmp_path, {
        "lib/stages/benchmark.py": "from lib.stages.annotation.loop import run_rounds\n",
        "lib/stages/annotation/loop.py": "def run_rounds(): ...\n",
        "lib/io/atomic.py": "from lib.imaging.resampling import resample\n",
        "lib/imaging/resampling.py": "import torch\n\ndef _private(): ...\ndef resample():\n    import scipy\n",
        "lib/metrics/case.py": "from lib.core.labels import _hidden\n",
        "lib/core/labels.py": "_hidden = 1\n",
    })
    text = "\n".join(check_layers(parsed_))
    assert "stage benchmark imports stage annotation" in text
    assert "lib.io.atomic (layer io) imports lib.imaging.resampling (layer imaging)" in text
    assert "imports torch (torch / MONAI only in lib.ml)" in text
    assert "function-level import of scipy, not an optional heavy dependency" in text
    assert "imports the private name _hidden" in text


def test_a_planted_cycle_is_found(tmp_path):
    parsed_ = _plant(tmp_path, {"lib/viz/a.py": "from lib.viz.b import g\ndef f(): ...\n",
                                "lib/viz/b.py": "from lib.viz.a import f\ndef g(): ...\n"})
    assert find_cycles(import_graph(parsed_)) == [["lib.viz.a", "lib.viz.b"]]


def test_a_planted_long_function_and_a_foreign_notebook_import_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    parsed_ = _plant(tmp_path, {"lib/core/big.py": f'def f():\n    """Doc."""\n{body}\n'})
    assert check_sizes(parsed_) == [f"lib.core.big:1 f: {MAX_FUNCTION_LINES + 2} lines of code (limit {MAX_FUNCTION_LINES})"]
    nb = tmp_path / "04_benchmark.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["from lib.stages import benchmark\n",
                                                                         "from lib.stages.annotation import run\n"]}]}))
    assert check_notebook(nb, "benchmark") == ["04_benchmark.ipynb: imports lib.stages.annotation.run"]
