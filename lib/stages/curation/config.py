"""Curation configuration: the quality thresholds and everything the curation steps need, from the params."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from lib.core.params import SplitUnlisted
from lib.core.paths import PROFILES, ProfilePaths, rel_to_profile, runs_root
from lib.datasets.ctspine1k.ids import (
    BUILTIN_ID_PATTERNS,
    SOURCES,
    merge_id_patterns,
)

METADATA_SHEETS = {"COLONOG": "metadata_colonog.xlsx", "HNSCC": "metadata_neck.xlsx"}


#: Non-identifying DICOM tags kept in the metadata sheets (keyword -> column).
METADATA_TAGS = {
    "Manufacturer": "manufacturer", "ManufacturerModelName": "model", "ConvolutionKernel": "kernel",
    "KVP": "kvp", "XRayTubeCurrent": "tube_current_ma", "SliceThickness": "slice_thickness_mm",
    "PatientSex": "sex", "BodyPartExamined": "body_part",
}


CONVERTER_VERSION = "lib.dicom/1"

SPLIT_UNLISTED: tuple[str, ...] = get_args(SplitUnlisted)
"""What curation does with a split-file ID that matches no case in the sources and with an
included case the split file does not list (:func:`lib.stages.curation.release.assign_splits`)."""


@dataclass(frozen=True)
class QualityThresholds:
    """Measured criteria for excluding a scan (all in the units named).

    Attributes:
        min_slices: fewer slices -> ``too_few_slices`` (truncated scan).
        min_z_extent_mm: craniocaudal coverage (slices x spacing) below this -> ``z_extent``.
        max_slice_spacing_mm: thicker slices -> ``slice_spacing``.
        max_noise_hu: local noise SD in soft tissue above this -> ``noise``.
        max_border_fraction: share of the in-plane image border lying inside the body
            (> -500 HU) above this -> ``truncated_fov`` (body cut by the field of view).
        spacing_tolerance: relative slice-step deviation allowed (DICOM geometry check).
        max_gantry_tilt_deg: larger tilt -> ``gantry_tilt`` (DICOM geometry check).
    """

    min_slices: int = 20
    min_z_extent_mm: float = 100.0
    max_slice_spacing_mm: float = 6.0
    max_noise_hu: float = 80.0
    max_border_fraction: float = 0.1
    spacing_tolerance: float = 0.05
    max_gantry_tilt_deg: float = 0.5


@dataclass(frozen=True)
class CurationConfig:
    """Everything the curation functions need, built from the notebook parameters.

    ``path_csv_fallback``: a ``Path.csv`` row that matches no series on disk excludes the
    patient (False, the default: the table is authoritative) or lets the source's own rule
    choose, labelled so in the selection and provenance tables (True).

    ``split_unlisted`` (with a split file): an ID of the file that matches no case in the
    sources, and an included case the file does not list, are a
    :class:`~lib.stages.curation.release.SplitFileError` (``"error"``, the default); or are
    written to ``tables/split_problems.csv`` and the unlisted cases kept out of every split
    (``"exclude"``) or split by the seeded rule (``"seeded"``; never into ``trainset`` when the
    case resembles an ID the file lists for a test split).

    ``profile``: table paths are written relative to this profile's data / runs folders
    (:func:`lib.core.paths.rel_to_profile`); "" = the profile of ``stage_dir``
    (``runs/<profile>/01_curation``), else absolute.
    """

    sources_dir: Path
    release_dir: Path
    stage_dir: Path
    sources: tuple[str, ...] = SOURCES
    seed: int = 0
    path_csv: Path | None = None
    path_csv_fallback: bool = False
    fallback_series: bool = True
    hnscc_time_point: int = 0
    subset_sizes: Mapping[str, int] = field(default_factory=dict)
    split_file: Path | None = None
    restrict_to_split_file: bool = False
    split_unlisted: SplitUnlisted = "error"
    id_patterns: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(BUILTIN_ID_PATTERNS))
    quality: QualityThresholds = QualityThresholds()
    deidentify: bool = True
    workers: int = 0
    scheduler: str | None = None
    on_error: str = "collect"
    profile: str = ""

    def __post_init__(self):
        if self.split_unlisted not in SPLIT_UNLISTED:
            raise ValueError(f"split_unlisted: {self.split_unlisted!r}; expected one of {SPLIT_UNLISTED}")
        if not self.profile:
            stage = Path(self.stage_dir)
            name = stage.parent.name
            if name in PROFILES and stage.parent == runs_root() / name:
                object.__setattr__(self, "profile", name)

    def rel(self, path: str | Path) -> str:
        """``path`` as the stage tables store it (relative to the profile's data or runs folder)."""
        return rel_to_profile(path, self.profile) if self.profile else Path(path).as_posix()

    @property
    def work_dir(self) -> Path:
        """Per-series records and staged conversions (``runs/<profile>/01_curation/work``)."""
        return self.stage_dir / "work"

    @property
    def tables_dir(self) -> Path:
        return self.stage_dir / "tables"

    @classmethod
    def from_params(cls, P: Any, paths: ProfilePaths) -> CurationConfig:
        """Build from the validated 01_curation parameters (attribute or dict access)."""
        p = P.as_dict() if hasattr(P, "as_dict") else dict(P)
        src = Path(p["sources_dir"]) if p.get("sources_dir") else paths.sources

        def rel(name: str) -> Path | None:
            v = p.get(name) or ""
            if not v:
                return None
            q = Path(v)
            return q if q.is_absolute() else src / q

        q = QualityThresholds(
            min_slices=int(p["min_slices"]), min_z_extent_mm=float(p["min_z_extent_mm"]),
            max_slice_spacing_mm=float(p["max_slice_spacing_mm"]), max_noise_hu=float(p["max_noise_hu"]),
            max_border_fraction=float(p["max_border_fraction"]), spacing_tolerance=float(p["spacing_tolerance"]),
            max_gantry_tilt_deg=float(p["max_gantry_tilt_deg"]))
        unknown = sorted(set(p["sources"]) - set(SOURCES))
        if unknown:
            raise ValueError(f"parameter sources: unknown source(s) {unknown}; expected some of {SOURCES}")
        split_unlisted = p.get("split_unlisted") or "error"
        if split_unlisted not in SPLIT_UNLISTED:
            raise ValueError(f"parameter split_unlisted: {split_unlisted!r}; expected one of {SPLIT_UNLISTED}")
        if p["on_error"] not in ("collect", "raise"):
            raise ValueError(f"parameter on_error: {p['on_error']!r}; expected 'collect' or 'raise'")
        return cls(
            sources_dir=src, release_dir=Path(p["release_dir"]) if p.get("release_dir") else paths.release,
            stage_dir=paths.stage("01_curation"), sources=tuple(p["sources"]), seed=int(p["seed"]),
            path_csv=rel("path_csv"), path_csv_fallback=bool(p["path_csv_fallback"]),
            fallback_series=bool(p["fallback_series"]),
            hnscc_time_point=int(p["hnscc_time_point"]),
            subset_sizes={"MSD_T10": int(p["msd_subset_size"]), "COVID19": int(p["covid_subset_size"])},
            split_file=rel("split_file"), restrict_to_split_file=bool(p["restrict_to_split_file"]),
            split_unlisted=split_unlisted,
            id_patterns=merge_id_patterns(p.get("extra_id_patterns") or {}), quality=q,
            deidentify=bool(p["deidentify"]), workers=int(p["workers"]), scheduler=p.get("scheduler") or None,
            on_error=str(p["on_error"]), profile=paths.profile)
