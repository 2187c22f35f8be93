"""nnU-Net v2 raw dataset export: ``DatasetNNN_Name/{imagesTr,labelsTr,imagesTs}/``, ``dataset.json``.

Labels: background 0 and C1..L6 = 1..25 (:data:`lib.core.labels.CTSPINE1K_LABELS`), consecutive as
nnU-Net v2 requires. VerSe's T13 (28) is not a CTSpine1K label: a training mask holding it (or any
other value outside the table) fails :func:`lib.io.integrity.check_pair` and is skipped and listed in
``skipped.txt``, never relabelled behind the user's back. Files are NIfTI (``.nii.gz``), one channel
(``_0000``, CT), read by nnU-Net's SimpleITK reader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lib.core import labels as L
from lib.io.atomic import link_or_copy, write_text
from lib.io.integrity import check_pair
from lib.io.nifti import strip_nifti_suffix


def dataset_folder(out_dir: str | Path, dataset_id: int = 501, name: str = "CTSpine1K") -> Path:
    """``<out_dir>/DatasetNNN_<name>`` (nnU-Net's folder name: three-digit ID)."""
    return Path(out_dir) / f"Dataset{int(dataset_id):03d}_{name}"


def dataset_json(n_training: int, name: str, test_splits: Sequence[str] = ()) -> dict:
    """The ``dataset.json`` of an export: ``channel_names`` CT, ``labels`` background + C1..L6,
    ``numTraining``, ``file_ending`` .nii.gz (nnU-Net's required keys) and a description."""
    return {"channel_names": {"0": "CT"},
            "labels": {"background": 0, **{L.name(v): v for v in L.CTSPINE1K_LABELS}},
            "numTraining": n_training, "file_ending": ".nii.gz",
            "name": name, "description": "CTSpine1K-style release exported by the spine1k workspace",
            "reference": "Deng et al., CTSpine1K", "licence": "see the sources' licences",
            "test_splits": list(test_splits)}


def export_cases(training: Sequence[tuple[str, Path, Path]], test: Sequence[tuple[str, Path]], ds: Path,
                 name: str = "CTSpine1K", test_splits: Sequence[str] = (), check: bool = True,
                 skipped: Sequence[str] = ()) -> Path:
    """Write an nnU-Net v2 raw dataset at ``ds`` from (ID, image, mask) training cases and (ID,
    image) test cases: ``imagesTr/<ID>_0000.nii.gz`` + ``labelsTr/<ID>.nii.gz``,
    ``imagesTs/<ID>_0000.nii.gz``, ``dataset.json``, ``skipped.txt`` (``skipped`` plus every
    training case whose pair fails :func:`lib.io.check_pair`, with its faults). Hard links where
    possible, else copies, written atomically; files of cases no longer listed are removed.

    Returns:
        ``ds``.
    """
    ds = Path(ds)
    kept, skipped = [], list(skipped)
    for rid, image, mask in training:
        if check:
            faults = check_pair(image, mask, allowed_labels=L.CTSPINE1K_LABELS)
            if faults:
                skipped.append(f"{rid}: " + "; ".join(f"{Path(x.path).name}: [{x.kind}] {x.message}" for x in faults))
                continue
        link_or_copy(image, ds / "imagesTr" / f"{rid}_0000.nii.gz")
        link_or_copy(mask, ds / "labelsTr" / f"{rid}.nii.gz")
        kept.append(rid)
    for rid, image in test:
        link_or_copy(image, ds / "imagesTs" / f"{rid}_0000.nii.gz")
    expected = {"imagesTr": {f"{r}_0000.nii.gz" for r in kept}, "labelsTr": {f"{r}.nii.gz" for r in kept},
                "imagesTs": {f"{r}_0000.nii.gz" for r, _ in test}}
    for sub, names in expected.items():  # cases that left a split since the last export
        (ds / sub).mkdir(parents=True, exist_ok=True)
        for f in (ds / sub).glob("*.nii.gz"):
            if f.name not in names:
                f.unlink()
    write_text(ds / "dataset.json", json.dumps(dataset_json(len(kept), name, test_splits), indent=2) + "\n")
    write_text(ds / "skipped.txt", "".join(s + "\n" for s in skipped))
    return ds


def export_nnunet(release_dir: str | Path, out_dir: str | Path, dataset_id: int = 501, name: str = "CTSpine1K",
                  test_splits: Sequence[str] = ("test_public", "test_private"), check: bool = True) -> Path:
    """Export the release as an nnU-Net v2 raw dataset (:func:`export_cases`).

    ``<out_dir>/DatasetNNN_<name>/``: every trainset case with a mask (``gt/<ID>_seg.nii.gz``) in
    ``imagesTr``/``labelsTr``, the test splits' images in ``imagesTs``. Trainset cases without a
    mask, or whose mask fails :func:`lib.io.check_pair`, are skipped and listed in ``skipped.txt``.
    Re-running skips what is there.

    Returns:
        The dataset folder.
    """
    rd = Path(release_dir)
    training, skipped = [], []
    for f in sorted((rd / "trainset" / "data").glob("*.nii.gz")):
        rid = strip_nifti_suffix(f)
        m = rd / "trainset" / "gt" / f"{rid}_seg.nii.gz"
        if m.exists():
            training.append((rid, f, m))
        else:
            skipped.append(f"{rid}: no mask in trainset/gt yet")
    test = [(strip_nifti_suffix(f), f) for split in test_splits for f in sorted((rd / split / "data").glob("*.nii.gz"))]
    return export_cases(training, test, dataset_folder(out_dir, dataset_id, name), name=name, test_splits=test_splits,
                        check=check, skipped=skipped)
