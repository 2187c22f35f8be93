"""Helpers shared by the tests split from tests/test_curation.py."""

from __future__ import annotations

import numpy as np

from lib.core import paths
from lib.io.dicom_write import write_dicom_series
from lib.stages.curation import config, convert, discover, release, select

AFF = np.array([[2.0, 0, 0, -40.0], [0, 2.0, 0, -30.0], [0, 0, 2.5, -80.0], [0, 0, 0, 1]])


SHAPE = (40, 34, 44)  # 110 mm craniocaudal coverage


def _ct(seed: int, noise: float = 12.0, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y = np.mgrid[:nx, :ny]
    body = (((x - nx / 2) / (nx * 0.38)) ** 2 + ((y - ny / 2) / (ny * 0.38)) ** 2) < 1
    vol = np.where(body[..., None], 45.0, -1000.0) + rng.normal(0, noise, (nx, ny, nz))
    vol[nx // 2 - 2: nx // 2 + 2, ny // 2 - 9: ny // 2 - 5, :] = 800.0  # spine
    return np.rint(vol).astype(np.int16)


def _ident(i: int, token: str) -> dict:
    """Identifying tags with a planted token (uppercase letters + digits, like 00_sources)."""
    return {
        "PatientName": f"DOE{token}^JANE", "PatientBirthDate": f"195{i}0312", "StudyDate": f"200{i}0517",
        "InstitutionName": f"RIVERTON CLINIC {token}", "AccessionNumber": f"ACC{token}77",
        "ReferringPhysicianName": f"DR{token}^HOUSE", "OtherPatientIDs": f"MRN{token}12", "StudyID": f"S{token}",
        "PatientSex": "F" if i % 2 else "M", "PatientAge": f"0{50 + i}Y", "Manufacturer": "SYNTH",
        "ManufacturerModelName": "CT-9000", "KVP": "120", "ConvolutionKernel": "B30f",
    }


TOKENS = {}


def _series(root, source, patient, study, series, token, i, position="HFS", **kw):
    tags = dict(_ident(i, token), PatientID=patient, PatientPosition=position, SeriesNumber=kw.pop("number", 2))
    TOKENS[f"{source}/{patient}/{series}"] = token
    return write_dicom_series(_ct(i, kw.pop("noise", 12.0)), AFF, root / source / patient / study / series, tags, **kw)


def _cfg(**kw) -> config.CurationConfig:
    pp = paths.for_profile("ci")
    q = config.QualityThresholds(min_slices=10, min_z_extent_mm=50.0, max_noise_hu=80.0)
    base = dict(sources_dir=pp.sources, release_dir=pp.release, stage_dir=pp.stage("01_curation"), seed=0,
                quality=q, fallback_series=True)
    base.update(kw)
    return config.CurationConfig(**base)


def _run(cfg, split_file_ids=None):
    cands = discover.discover_candidates(cfg.sources_dir, cfg.sources)
    sel = select.select_series(cands, cfg)
    conv = convert.convert_selected(sel, cfg, progress=False)
    split = release.assign_splits([c.release_id for c in conv.included], cfg, split_file_ids)
    release.write_release(cfg, conv, split)
    release.write_stage_tables(cfg, sel, conv, split)
    return sel, conv, split
