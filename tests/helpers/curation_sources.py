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


# ----------------------------------------------------------------------------- real download layouts
# Tiny trees laid out and named exactly like the archives unpack (16 x 16 x 12 volumes).

TINY = (16, 16, 12)
TINY_AFF = np.array([[2.0, 0, 0, -16.0], [0, 2.0, 0, -16.0], [0, 0, 3.0, -18.0], [0, 0, 0, 1]])
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "  # the AppleDouble header macOS writes


def _nifti(path, seed: int) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_ct(seed, shape=TINY), TINY_AFF), str(path))


def _junk(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(APPLEDOUBLE + b"\x00" * 40)


def write_task03_liver(root, folder: str = "Task03_Liver") -> dict:
    """The MSD liver archive as it unpacks: imagesTr (liver_0, liver_1), labelsTr, imagesTs
    (liver_132), dataset.json and macOS ``._*`` companions. Returns the planted paths."""
    task = root / folder
    for i, n in enumerate((0, 1)):
        _nifti(task / "imagesTr" / f"liver_{n}.nii.gz", 40 + i)
        _nifti(task / "labelsTr" / f"liver_{n}.nii.gz", 50 + i)
        _junk(task / "imagesTr" / f"._liver_{n}.nii.gz")
    _nifti(task / "imagesTs" / "liver_132.nii.gz", 42)
    _junk(task / "imagesTs" / "._liver_132.nii.gz")
    _junk(task / "labelsTr" / "._liver_0.nii.gz")
    _junk(task / "._imagesTr")
    (task / "dataset.json").write_text('{"name": "Liver", "numTraining": 131, "numTest": 70}\n')
    return {"task": task, "appledouble": [task / "imagesTr" / "._liver_0.nii.gz", task / "imagesTr" / "._liver_1.nii.gz",
                                          task / "imagesTs" / "._liver_132.nii.gz", task / "._imagesTr"],
            "labels": task / "labelsTr", "dataset_json": task / "dataset.json"}


def write_covid(root) -> dict:
    """A COVID-19-20 style folder: ``Train/`` and ``Validation/`` CTs ``volume-covid19-A-NNNN_ct.nii.gz``
    with their lesion masks ``..._seg.nii.gz`` beside them, and a macOS ``._`` companion."""
    base = root / "COVID19"
    masks = []
    for sub, n, seed in (("Train", "0003", 60), ("Validation", "0011", 61)):
        _nifti(base / sub / f"volume-covid19-A-{n}_ct.nii.gz", seed)
        _nifti(base / sub / f"volume-covid19-A-{n}_seg.nii.gz", seed + 10)
        masks.append(base / sub / f"volume-covid19-A-{n}_seg.nii.gz")
    _junk(base / "Train" / "._volume-covid19-A-0003_ct.nii.gz")
    return {"masks": masks, "appledouble": [base / "Train" / "._volume-covid19-A-0003_ct.nii.gz"]}


COLONOG_SERIES = {  # TCIA folder names: <PatientID>/<date-n-description-number>/<number-description-number>
    "1.3.6.1.4.1.9328.50.4.0001": ("01-01-2000-1-Abdomen-12345",
                                   {"2.000000-Supine 1.0 B30f-67890": "HFS", "3.000000-Prone 1.0 B30f-67891": "HFP"}),
    "1.3.6.1.4.1.9328.50.4.0002": ("01-02-2000-1-Abdomen-23456",
                                   {"2.000000-Supine 1.0 B30f-78901": "HFS", "3.000000-Prone 1.0 B30f-78902": "HFP"}),
}
HNSCC_STUDIES = {"20040702": "07-02-2004-NA-NECK-7", "20040102": "01-02-2004-NA-NECK-9",
                 "20040401": "04-01-2004-NA-NECK-8"}  # on disk out of date order
HNSCC_SERIES = "2.000000-NECK 2.0 B30s-101"


def _study_date(folder: str) -> str:
    m, d, y = folder.split("-")[:3]
    return f"{y}{m}{d}"


def write_tcia_dicom(root) -> dict:
    """COLONOG (two patients, supine and prone) and HNSCC (one patient, three time points) with
    TCIA's folder names (spaces, dates); tags carry matching dates and planted identifiers."""
    files = {}
    for k, (patient, (study, series)) in enumerate(COLONOG_SERIES.items(), 1):
        for j, (name, position) in enumerate(series.items()):
            tags = dict(_ident(k, f"TK{k}Q{j}X"), PatientID=patient, PatientPosition=position, SeriesNumber=2 + j,
                        StudyDate=_study_date(study), SeriesDescription=name.split("-", 1)[1].rsplit("-", 1)[0])
            files[(patient, name)] = write_dicom_series(_ct(10 * k + j, shape=TINY), TINY_AFF,
                                                        root / "COLONOG" / patient / study / name, tags)
    for tp, (date, study) in enumerate(sorted(HNSCC_STUDIES.items())):
        tags = dict(_ident(7, "TKH7N5"), PatientID="HN_P001", StudyDate=date, PatientPosition="HFS", SeriesNumber=2)
        files[("HN_P001", study)] = write_dicom_series(_ct(70 + tp, shape=TINY), TINY_AFF,
                                                       root / "HNSCC" / "HN_P001" / study / HNSCC_SERIES, tags,
                                                       study_uid=f"1.2.826.0.1.3680043.10.99.{tp}")
    return files


def write_path_csv(root) -> dict:
    """``Path.csv`` as released: rows that match the tree, and one (patient 0002) whose study
    folder a downloader spelled differently (``-NA-`` for ``-1-``). Returns ``{patient: line}``."""
    rows = ["1.3.6.1.4.1.9328.50.4.0001/01-01-2000-1-Abdomen-12345/3.000000-Prone 1.0 B30f-67891",
            "1.3.6.1.4.1.9328.50.4.0002/01-02-2000-NA-Abdomen-23456/2.000000-Supine 1.0 B30f-78901",
            f"HN_P001/{HNSCC_STUDIES['20040401']}/{HNSCC_SERIES}"]  # the second time point by date
    (root / "Path.csv").write_text("\n".join(rows) + "\n")
    return {"1.3.6.1.4.1.9328.50.4.0001": 1, "1.3.6.1.4.1.9328.50.4.0002": 2, "HN_P001": 3}
