"""nnU-Net v2 raw dataset export: ``DatasetNNN_Name/{imagesTr,labelsTr,imagesTs}/``, ``dataset.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lib.core import labels as L
from lib.io.atomic import link_or_copy, write_text
from lib.io.integrity import check_pair
from lib.io.nifti import strip_nifti_suffix


def export_nnunet(release_dir: str | Path, out_dir: str | Path, dataset_id: int = 501, name: str = "CTSpine1K",
                  test_splits: Sequence[str] = ("test_public", "test_private"), check: bool = True) -> Path:
    """Export the release as an nnU-Net v2 raw dataset.

    ``<out_dir>/DatasetNNN_<name>/imagesTr/<ID>_0000.nii.gz`` + ``labelsTr/<ID>.nii.gz`` for
    every trainset case with a mask (``gt/<ID>_seg.nii.gz``), ``imagesTs/<ID>_0000.nii.gz``
    for the test splits, and ``dataset.json`` (``channel_names`` CT, ``labels`` background
    plus C1..L6 from :mod:`lib.core.labels`, ``numTraining``, ``file_ending``). Files are hard
    links where possible (else copies), written atomically; re-running skips what is there.
    Trainset cases without a mask, or whose mask fails :func:`lib.io.check_pair`, are
    skipped and listed in ``skipped.txt``; files of cases no longer in a split are removed.

    Returns:
        The dataset folder.
    """
    rd = Path(release_dir)
    ds = Path(out_dir) / f"Dataset{int(dataset_id):03d}_{name}"
    training, test, skipped = [], [], []
    for f in sorted((rd / "trainset" / "data").glob("*.nii.gz")):
        rid = strip_nifti_suffix(f)
        m = rd / "trainset" / "gt" / f"{rid}_seg.nii.gz"
        if not m.exists():
            skipped.append(f"{rid}: no mask in trainset/gt yet")
            continue
        if check:
            faults = check_pair(f, m, allowed_labels=L.CTSPINE1K_LABELS)
            if faults:
                skipped.append(f"{rid}: " + "; ".join(f"{Path(x.path).name}: [{x.kind}] {x.message}" for x in faults))
                continue
        link_or_copy(f, ds / "imagesTr" / f"{rid}_0000.nii.gz")
        link_or_copy(m, ds / "labelsTr" / f"{rid}.nii.gz")
        training.append(rid)
    for split in test_splits:
        for f in sorted((rd / split / "data").glob("*.nii.gz")):
            rid = strip_nifti_suffix(f)
            link_or_copy(f, ds / "imagesTs" / f"{rid}_0000.nii.gz")
            test.append(rid)
    expected = {"imagesTr": {f"{r}_0000.nii.gz" for r in training}, "labelsTr": {f"{r}.nii.gz" for r in training},
                "imagesTs": {f"{r}_0000.nii.gz" for r in test}}
    for sub, names in expected.items():  # cases that left a split since the last export
        (ds / sub).mkdir(parents=True, exist_ok=True)
        for f in (ds / sub).glob("*.nii.gz"):
            if f.name not in names:
                f.unlink()
    body = {"channel_names": {"0": "CT"},
            "labels": {"background": 0, **{L.name(v): v for v in L.CTSPINE1K_LABELS}},
            "numTraining": len(training), "file_ending": ".nii.gz",
            "name": name, "description": "CTSpine1K-style release exported by the spine1k workspace",
            "reference": "Deng et al., CTSpine1K", "licence": "see the sources' licences",
            "test_splits": list(test_splits)}
    write_text(ds / "dataset.json", json.dumps(body, indent=2) + "\n")
    write_text(ds / "skipped.txt", "".join(s + "\n" for s in skipped))
    return ds
