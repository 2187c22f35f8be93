"""Where everything lives, derived from the profile.

``data/<profile>/`` holds data (``sources/`` raw and read-only once written, ``oracle/`` synthetic
truth read only by simulated annotators and evaluation, ``CTSpine1K/`` the curated release);
``runs/<profile>/NN_stage/`` holds each stage's outputs. The roots default to the repository
folders and can be moved with the environment variables ``SPINE1K_DATA`` and ``SPINE1K_RUNS``
(tests point them at temporary folders).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("synthetic", "ci", "paper")
STAGES = (
    "00_sources",
    "01_curation",
    "02_pretraining",
    "03_annotation",
    "04_benchmark",
    "05_failure_l6",
    "06_failure_lowz",
)
SPLITS = ("trainset", "test_public", "test_private")


def data_root() -> Path:
    """Root of all data folders (``$SPINE1K_DATA`` or ``<repo>/data``)."""
    return Path(os.environ.get("SPINE1K_DATA", REPO_ROOT / "data"))


def runs_root() -> Path:
    """Root of all run folders (``$SPINE1K_RUNS`` or ``<repo>/runs``)."""
    return Path(os.environ.get("SPINE1K_RUNS", REPO_ROOT / "runs"))


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    return profile


@dataclass(frozen=True)
class ProfilePaths:
    """All folders of one profile. Nothing is created until a stage asks for it."""

    profile: str

    @property
    def data(self) -> Path:
        return data_root() / self.profile

    @property
    def sources(self) -> Path:
        """Raw sources as downloaded (or generated): COLONOG, HNSCC, MSD_T10, COVID19, VerSe."""
        return self.data / "sources"

    @property
    def oracle(self) -> Path:
        """Synthetic truth masks/centroids; read only by simulated annotators and evaluation."""
        return self.data / "oracle"

    @property
    def release(self) -> Path:
        """The curated CTSpine1K release layout."""
        return self.data / "CTSpine1K"

    def split_dir(self, split: str, kind: str = "data") -> Path:
        """``CTSpine1K/<split>/<kind>`` with kind ``data`` (images) or ``gt`` (masks)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if kind not in ("data", "gt"):
            raise ValueError(f"unknown kind {kind!r}; expected 'data' or 'gt'")
        return self.release / split / kind

    @property
    def runs(self) -> Path:
        return runs_root() / self.profile

    def stage(self, stage: str) -> Path:
        """``runs/<profile>/<stage>/``; ``stage`` is a name from :data:`STAGES`."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        return self.runs / stage

    def figures(self, stage: str) -> Path:
        return self.stage(stage) / "figures"

    def tables(self, stage: str) -> Path:
        return self.stage(stage) / "tables"

    def models(self, stage: str) -> Path:
        return self.stage(stage) / "models"


def for_profile(profile: str) -> ProfilePaths:
    """Paths of a profile (``synthetic``, ``ci`` or ``paper``)."""
    return ProfilePaths(check_profile(profile))


def ensure(path: Path) -> Path:
    """Create a folder (and parents) and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path


RUNS_PREFIX = "runs:"
"""Marks a table path relative to the profile's runs folder (``runs:01_curation/x.csv``);
one without it is relative to the profile's data folder (``CTSpine1K/trainset/data/x.nii.gz``)."""


def rel_to_profile(path: str | Path, profile: str) -> str:
    """A path as a run table stores it, so that a moved workspace still finds the file.

    Relative to ``data_root()/<profile>`` (``CTSpine1K/trainset/data/liver_3.nii.gz``) or, with
    :data:`RUNS_PREFIX`, to ``runs_root()/<profile>`` (``runs:01_curation/superseded/x.nii.gz``);
    the nearer root wins when one lies inside the other. A relative path is returned as given
    (POSIX separators), a path under neither root as an absolute POSIX path. Read it back with
    :func:`resolve_profile_path`.
    """
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    found: list[tuple[int, str]] = []
    for root, prefix in ((data_root() / check_profile(profile), ""), (runs_root() / profile, RUNS_PREFIX)):
        for q, r in ((p, root), (p.resolve(), root.resolve())):
            try:
                rel = q.relative_to(r)
            except ValueError:
                continue
            found.append((len(rel.parts), prefix + rel.as_posix()))
            break
    return min(found)[1] if found else p.as_posix()


def resolve_profile_path(text: str | Path, profile: str) -> Path:
    """The file a run-table path names (the inverse of :func:`rel_to_profile`).

    ``runs:<rel>`` -> ``runs_root()/<profile>/<rel>``; an absolute path (older tables) as it is;
    any other relative path -> ``data_root()/<profile>/<rel>``.

    Raises:
        ValueError: an empty path or an unknown profile.
    """
    s = str(text).strip()
    if not s:
        raise ValueError(f"empty path in a {profile} run table")
    check_profile(profile)
    if s.startswith(RUNS_PREFIX):
        return runs_root() / profile / s[len(RUNS_PREFIX):]
    p = Path(s)
    return p if p.is_absolute() else data_root() / profile / p


def prediction_path(stage_dir: str | Path, split: str, case_id: str, sub: str = "predictions") -> Path:
    """Where a stage keeps a case's predicted mask: ``<stage>/<sub>/<split>/<case_id>_seg.nii.gz``
    (04 writes ``predictions/``, 05 ``corrected/``; later stages read them by this rule)."""
    return Path(stage_dir) / sub / split / f"{case_id}_seg.nii.gz"


def find_model_dir(root: str | Path) -> Path:
    """The newest folder under ``root`` holding a trained model (``model.pt`` + ``plan.json``).

    Raises:
        FileNotFoundError: none under ``root``, naming it.
    """
    found = sorted((p.parent for p in Path(root).rglob("model.pt") if (p.parent / "plan.json").exists()),
                   key=lambda d: (d / "model.pt").stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{root}: no trained model (model.pt + plan.json); run the stage that trains it")
    return found[-1]
