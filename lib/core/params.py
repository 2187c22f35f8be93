"""Notebook parameters: read the ``parameters`` cell, validate params files against it.

Each notebook declares its parameters in one cell tagged ``parameters``, one typed literal
per line with a trailing comment (papermill's convention)::

    profile: Profile = "synthetic"  # the data and budget
    max_epochs: int = 40  # training length on the synthetic grid

That cell is the schema; a choice type from :data:`CHOICES` (``Profile``, ``HD95``...) lists
the allowed values, and a wrong one fails with the choices. ``params/<profile>/NN_stage.yaml`` must use exactly those names with
values of those types. Papermill only *warns* about unknown names, so the workspace checks
itself: a typo (``max_epoch``) or a wrong type is an error that names the file, the key and
the closest valid names. Inside the notebook, :func:`collect` builds the typed object from the
notebook's globals after papermill injected the overrides.
"""

from __future__ import annotations

import ast
import difflib
import io as _io
import json
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, ValidationError, create_model

from lib.core.paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PARAMS_DIR = REPO_ROOT / "params"

Profile = typing.Literal["synthetic", "ci", "paper"]
"""The three profiles: embedded synthetic data (default), the smallest runs of every code path, real data."""
HD95 = typing.Literal["pooled", "max"]
"""HD95 definitions by name (:data:`lib.metrics.surface.HD95_DEFINITIONS`)."""
OnError = typing.Literal["collect", "raise"]
"""What a map over cases does with a failed case (:func:`lib.core.parallel.map_cases`)."""
AnnotationMode = typing.Literal["simulated", "replay", "human"]
"""Who annotates in 03: simulated tiers against the oracle, against a real release's masks, or people."""
InitFrom = typing.Literal["annotation", "pretrained", "scratch"]
"""What 04's final model starts from."""
ProfileKind = typing.Literal["synthetic", "paper"]
"""Network plan kind (:mod:`lib.ml.planning`)."""
SplitUnlisted = typing.Literal["error", "exclude", "seeded"]
"""01: what a split-file ID matching no case, or a case the split file does not list, is
(:mod:`lib.stages.curation.release`): an error, kept out of every split, or split by the seeded rule."""

Backend = typing.Literal["cascade", "nnunetv2"]
"""04: who plans, trains and predicts the final model: the workspace's MONAI cascade
(:mod:`lib.ml.trainer`) or nnU-Net v2 itself (:mod:`lib.ml.nnunet`, the ``nnunet`` extra)."""
NnunetPlan = typing.Literal["default", "reduced"]
"""nnU-Net v2 plans: its default planner (the paper's 3d_fullres), or its planner at a coarser
target spacing and a smaller memory target (a CPU-sized plan of nnU-Net's own kind)."""

CHOICES: dict[str, Any] = {"Profile": Profile, "HD95": HD95, "OnError": OnError, "AnnotationMode": AnnotationMode,
                           "InitFrom": InitFrom, "ProfileKind": ProfileKind, "SplitUnlisted": SplitUnlisted,
                           "Backend": Backend, "NnunetPlan": NnunetPlan}
"""Named choices a parameters cell may use as a type (``hd95: HD95 = "pooled"``): papermill parses a
plain name, not a ``Literal[...]`` with quoted values, so the choices are declared once here."""

_TYPE_NAMESPACE: dict[str, Any] = {
    "str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict,
    "tuple": tuple, "None": None, "Any": Any, "Optional": typing.Optional, "Literal": typing.Literal, **CHOICES,
}


class ParamsError(ValueError):
    """A params file or notebook parameter that does not fit the schema."""


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: name, annotation text, default value and help comment."""

    name: str
    annotation: str
    default: Any
    help: str

    @property
    def type(self) -> Any:
        try:
            return eval(self.annotation, {"__builtins__": {}}, dict(_TYPE_NAMESPACE))  # noqa: S307
        except Exception as exc:
            raise ParamsError(f"parameter {self.name}: unsupported type annotation {self.annotation!r} ({exc})") from None


def notebook_path(stage: str) -> Path:
    """Path of ``notebooks/<stage>.ipynb``."""
    return NOTEBOOK_DIR / f"{stage}.ipynb"


def parameters_source(nb_path: str | Path) -> str:
    """Source of the cell tagged ``parameters`` in a notebook.

    Raises:
        ParamsError: no such cell, naming the notebook.
    """
    nb_path = Path(nb_path)
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            src = cell.get("source", "")
            return "".join(src) if isinstance(src, list) else src
    raise ParamsError(f"{nb_path}: no code cell tagged 'parameters'")


def _comments(source: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(_io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def parse_parameters(source: str, origin: str = "<parameters cell>") -> dict[str, ParamSpec]:
    """Parse a parameters cell into ``{name: ParamSpec}``.

    Every statement must be an annotated assignment of a literal (``name: type = literal``);
    anything else is rejected so that the schema stays declarative.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ParamsError(f"{origin}: parameters cell is not valid Python ({exc})") from None
    comments = _comments(source)
    specs: dict[str, ParamSpec] = {}
    for node in tree.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None):
            raise ParamsError(f"{origin}, line {node.lineno}: only 'name: type = literal' lines are allowed "
                              f"in the parameters cell (derive values in a later cell)")
        name = node.target.id
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            raise ParamsError(f"{origin}, line {node.lineno}: default of {name!r} is not a literal") from None
        spec = ParamSpec(name, ast.unparse(node.annotation), default, comments.get(node.lineno, ""))
        _ = spec.type  # fail early on an unsupported annotation
        specs[name] = spec
    return specs


def notebook_parameters(stage_or_path: str | Path) -> dict[str, ParamSpec]:
    """Declared parameters of a notebook given its stage name or path."""
    path = Path(stage_or_path)
    if path.suffix != ".ipynb":
        path = notebook_path(str(stage_or_path))
    return parse_parameters(parameters_source(path), origin=str(path))


def _model(specs: dict[str, ParamSpec], name: str):
    fields = {s.name: (s.type, s.default) for s in specs.values()}
    return create_model(name, __config__=ConfigDict(strict=True, extra="forbid", frozen=True), **fields)


def _coerce(spec: ParamSpec, value: Any) -> Any:
    """Accept what YAML/JSON cannot express exactly: int for float, list for tuple."""
    t = spec.type
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (t is tuple or typing.get_origin(t) is tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _unknown_key_message(origin: str, key: str, specs: dict[str, ParamSpec]) -> str:
    close = difflib.get_close_matches(key, list(specs), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{origin}: unknown parameter {key!r}{hint} (valid: {', '.join(specs)})"


def validate(values: dict[str, Any], specs: dict[str, ParamSpec], origin: str) -> dict[str, Any]:
    """Check names and types of ``values`` against ``specs``; return defaults merged with values.

    Raises:
        ParamsError: naming ``origin``, every unknown key with its closest valid names, and
            every value of the wrong type with the expected type.
    """
    problems = [_unknown_key_message(origin, k, specs) for k in values if k not in specs]
    known = {k: _coerce(specs[k], v) for k, v in values.items() if k in specs}
    try:
        obj = _model(specs, "Params")(**known)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            spec = specs.get(str(err["loc"][0])) if err["loc"] else None
            expected = f" (expected {spec.annotation})" if spec else ""
            problems.append(f"{origin}: parameter {key!r} = {err.get('input')!r}: {err['msg']}{expected}")
    if problems:
        raise ParamsError("\n".join(problems))
    return obj.model_dump()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML mapping; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return data


def load_params(params_file: str | Path, notebook: str | Path) -> dict[str, Any]:
    """Validate a params file against a notebook's parameters cell.

    Args:
        params_file: ``params/<profile>/NN_stage.yaml``.
        notebook: the notebook path or its stage name (``"02_pretraining"``).

    Returns:
        The full parameter set (notebook defaults overridden by the file).
    """
    specs = notebook_parameters(notebook)
    return validate(load_yaml(params_file), specs, origin=str(params_file))


def params_file(profile: str, stage: str) -> Path:
    """``params/<profile>/<stage>.yaml``."""
    return PARAMS_DIR / profile / f"{stage}.yaml"


class Params(types.SimpleNamespace):
    """Validated, typed parameters with attribute access (``P.max_epochs``)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def __setattr__(self, key, value):
        raise AttributeError(f"parameters are read-only; derive {key!r} into a new variable")


def collect(namespace: dict[str, Any], stage: str) -> Params:
    """Build the typed parameter object inside a notebook.

    Call as ``P = params.collect(globals(), "02_pretraining")`` in the cell after the
    ``parameters`` cell (and papermill's injected one). Reads the declared names from the
    notebook file, takes their current values from ``namespace`` and validates the types.

    Raises:
        ParamsError: a value of the wrong type, naming the notebook and the parameter.
    """
    specs = notebook_parameters(stage)
    missing = [k for k in specs if k not in namespace]
    if missing:
        raise ParamsError(f"{notebook_path(stage)}: parameters {missing} are not defined; run the parameters cell first")
    values = validate({k: namespace[k] for k in specs}, specs, origin=str(notebook_path(stage)))
    return Params(**values)


def check_all(profiles=None) -> list[str]:
    """Validate every ``params/<profile>/NN_stage.yaml`` against its notebook.

    Returns:
        Problems found (empty when all files are valid). A params file without a notebook,
        or a notebook without a params file in a profile, is a problem too.
    """
    problems: list[str] = []
    profile_dirs = sorted(p for p in PARAMS_DIR.iterdir() if p.is_dir()) if PARAMS_DIR.exists() else []
    if profiles:
        profile_dirs = [d for d in profile_dirs if d.name in profiles]
    stages = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    for pdir in profile_dirs:
        for f in sorted(pdir.glob("*.yaml")):
            if f.stem not in stages:
                problems.append(f"{f}: no notebook notebooks/{f.stem}.ipynb")
                continue
            try:
                values = load_params(f, f.stem)
            except ParamsError as exc:
                problems.append(str(exc))
                continue
            if values.get("profile", pdir.name) != pdir.name:
                problems.append(f"{f}: profile is {values['profile']!r} but the file is under params/{pdir.name}/")
        for stage in stages:
            if not (pdir / f"{stage}.yaml").exists():
                problems.append(f"{pdir}/{stage}.yaml: missing (notebooks/{stage}.ipynb has no params in profile {pdir.name})")
    for stage in stages:
        problems += papermill_blind_spots(notebook_path(stage))
    return problems


def papermill_blind_spots(nb_path: str | Path) -> list[str]:
    """Parameters of a notebook's ``parameters`` cell that papermill's own parser does not see.

    Papermill reads the cell with a regular expression of its own (``papermill.inspect_notebook``);
    a line it cannot parse (e.g. a comment holding ``=``) is silently left out, and a value given
    for that name is then injected as an "unknown parameter" with only a warning. Each such name
    is a problem naming the notebook, the line and the comment.
    """
    import papermill  # heavy: only check-params needs it

    specs = notebook_parameters(nb_path)
    seen = set(papermill.inspect_notebook(str(nb_path)))
    return [f"{nb_path}: papermill does not see parameter {name!r} (its line cannot be parsed by papermill; "
            f"comment: {spec.help!r}; avoid '=' in parameter comments)" for name, spec in specs.items() if name not in seen]


def main(argv=None) -> int:
    """``python -m lib.core.params [PROFILE ...]``: validate params files; exit 1 on any problem."""
    argv = sys.argv[1:] if argv is None else argv
    problems = check_all(argv or None)
    for p in problems:
        print(p)
    if not problems:
        print("params: all files valid")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
